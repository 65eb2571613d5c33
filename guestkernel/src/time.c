/* rayguest: time. The TSC gives timestamps; the LAPIC timer (one-shot) gives
 * wake-ups for timeouts. Both are calibrated once, lazily: from the
 * hypervisor timing leaf (CPUID 0x40000010: TSC and APIC bus kHz) when the
 * VMM offers it, else against PIT channel 0 over about 4 ms. */
#include "kernel.h"

#define LAPIC_BASE	0xfee00000ULL
#define LAPIC_LVT_TIMER	0x320
#define LAPIC_TIMER_ICR	0x380
#define LAPIC_TIMER_CCR	0x390
#define LAPIC_TIMER_DCR	0x3e0
#define TIMER_DIV	16		/* DCR value 0x3 */

#define PIT_HZ		1193182
#define PIT_WINDOW	4773		/* ~4 ms of PIT ticks */

u64 tsc_khz;
static u64 apic_khz;		/* LAPIC timer ticks per ms, after TIMER_DIV */
static volatile int timer_fired;

static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }

static u32 pit_read(void)
{
	outb(0x43, 0x00);	/* latch channel 0 */
	u32 lo = inb(0x40);
	u32 hi = inb(0x40);
	return hi << 8 | lo;
}

static int calibrate_cpuid(void)
{
	u32 a, b, c, d;
	cpuid(1, &a, &b, &c, &d);
	if (!(c & (1u << 31)))		/* no hypervisor */
		return 0;
	cpuid(0x40000000, &a, &b, &c, &d);
	if (a < 0x40000010 || a > 0x400000ff)
		return 0;
	cpuid(0x40000010, &a, &b, &c, &d);
	if (a == 0 || b == 0)
		return 0;
	tsc_khz = a;
	apic_khz = b / TIMER_DIV;
	return 1;
}

static void calibrate_pit(void)
{
	lapic_write(LAPIC_TIMER_DCR, 0x3);
	lapic_write(LAPIC_LVT_TIMER, 0x10000 | VEC_TIMER);	/* masked */
	lapic_write(LAPIC_TIMER_ICR, 0xffffffff);
	outb(0x43, 0x30);	/* channel 0, lo/hi, mode 0, binary */
	outb(0x40, 0xff);
	outb(0x40, 0xff);
	u32 start = pit_read(), now = start;
	/* Align to a PIT tick edge; give up on a PIT that never moves. */
	for (int i = 0; i < 1000 && now == start; i++)
		now = pit_read();
	if (now == start) {
		tsc_khz = 1000000;	/* no PIT: assume 1 GHz for both */
		apic_khz = 1000000 / TIMER_DIV;
		kputs("rayguest: warning: PIT not counting, timer uncalibrated\n");
		return;
	}
	start = now;
	u64 t0 = rdtsc();
	u32 a0 = lapic_read(LAPIC_TIMER_CCR);
	u32 ticks;
	int guard = 0;
	do {
		now = pit_read();
		ticks = (start - now) & 0xffff;
	} while (ticks < PIT_WINDOW && ++guard < 1000000);
	if (ticks == 0)
		ticks = 1;
	u64 t1 = rdtsc();
	u32 a1 = lapic_read(LAPIC_TIMER_CCR);
	tsc_khz = (t1 - t0) * (PIT_HZ / 1000) / ticks;
	apic_khz = (u64)(a0 - a1) * (PIT_HZ / 1000) / ticks;
	if (tsc_khz == 0)
		tsc_khz = 1;
	if (apic_khz == 0)
		apic_khz = 1;
}

void timer_calibrate(void)
{
	if (tsc_khz)
		return;
	if (!calibrate_cpuid())
		calibrate_pit();
	lapic_write(LAPIC_TIMER_DCR, 0x3);
	lapic_write(LAPIC_LVT_TIMER, VEC_TIMER);	/* one-shot, unmasked */
	lapic_write(LAPIC_TIMER_ICR, 0);		/* stopped */
}

u64 time_us(void)
{
	return rdtsc() * 1000 / tsc_khz;
}

static void timer_arm_us(u64 us)
{
	u64 count = us * apic_khz / 1000 + 1;
	if (count > 0xffffffffULL)
		count = 0xffffffffULL;
	timer_fired = 0;
	lapic_write(LAPIC_TIMER_ICR, (u32)count);
}

void timer_irq(void) { timer_fired = 1; }

void (*bg_poll)(void);

int wait_for(int (*cond)(void *), void *arg, u64 timeout_us, void (*poll)(void))
{
	u64 deadline = 0;
	if (timeout_us) {
		timer_calibrate();
		deadline = rdtsc() + timeout_us * tsc_khz / 1000;
		timer_arm_us(timeout_us);
	}
	for (;;) {
		u32 seen = irq_count;
		if (poll)
			poll();
		if (bg_poll)
			bg_poll();
		cli();
		if (cond(arg)) {
			sti();
			return 1;
		}
		if (timeout_us) {
			u64 now = rdtsc();
			if (now >= deadline) {
				sti();
				return 0;
			}
			/* The timer fired a little early (calibration error): re-arm. */
			if (timer_fired)
				timer_arm_us((deadline - now) * 1000 / tsc_khz);
		}
		if (irq_count != seen) {	/* something arrived during poll */
			sti();
			continue;
		}
		sti_hlt();
	}
}
