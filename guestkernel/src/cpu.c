/* rayguest: interrupt controllers, exceptions, CPU discovery (MP table,
 * ACPI MADT), SMP bring-up and power off. */
#include "kernel.h"

#define LAPIC_BASE	0xfee00000ULL
#define LAPIC_ID	0x020
#define LAPIC_EOI	0x0b0
#define LAPIC_SVR	0x0f0
#define LAPIC_ICR_LO	0x300
#define LAPIC_ICR_HI	0x310
#define LAPIC_LVT_LINT0	0x350

#define IOAPIC_DEFAULT	0xfec00000ULL
#define MAX_CPUS	32
#define MAX_IOAPICS	4
#define AP_STACK_SIZE	4096

volatile u32 irq_count;
u32 bsp_apic_id;
u32 ncpus_found = 1, ncpus_online = 1;

static u8 cpu_apic_id[MAX_CPUS];

static struct ioapic {
	u64 base;
	u32 gsi_base;
} ioapics[MAX_IOAPICS] = { { IOAPIC_DEFAULT, 0 } };
static u32 nioapics = 1;

/* AP start hand-off (boot.S reads ap_stack_top). */
u64 ap_stack_top;
static volatile u32 ap_index, ap_started;
static u8 ap_stacks[MAX_CPUS][AP_STACK_SIZE] ALIGNED(16);
extern const u8 trampoline_start[], trampoline_end[];
extern const u8 idt_desc[];

static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }

void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

void pic_disable(void)
{
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

/* lapic_init software-enables the BSP's LAPIC (spurious vector) and masks
 * LINT0 so nothing arrives through the (masked) 8259s. */
void lapic_init(void)
{
	lapic_write(LAPIC_LVT_LINT0, 0x10000);
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	bsp_apic_id = lapic_read(LAPIC_ID) >> 24;
}

/* ioapic_route sends GSI gsi to the BSP at vector VEC_GSI_BASE + gsi:
 * fixed delivery, physical destination, active high; edge or level. */
void ioapic_route(u32 gsi, int level)
{
	if (gsi >= MAX_GSI)
		return;
	struct ioapic *io = &ioapics[0];
	for (u32 i = 1; i < nioapics; i++)
		if (ioapics[i].gsi_base <= gsi && ioapics[i].gsi_base > io->gsi_base)
			io = &ioapics[i];
	u32 pin = gsi - io->gsi_base;
	if (bsp_apic_id != 0) {
		mmio_write32(io->base, 0x11 + 2 * pin);
		mmio_write32(io->base + 0x10, bsp_apic_id << 24);
	}
	mmio_write32(io->base, 0x10 + 2 * pin);
	mmio_write32(io->base + 0x10, (VEC_GSI_BASE + gsi) | (level ? 1u << 15 : 0));
}

/* exception_handler: frame = vector, error code, then the CPU's frame. */
struct exc_frame {
	u64 vector, err, rip, cs, rflags, rsp, ss;
};

NORETURN void exception_handler(struct exc_frame *f)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	kprintf("rayguest: exception %lu rip=%lx err=%lx cr2=%lx\n", f->vector, f->rip,
		f->err, cr2);
	triple_fault();
}

void irq_handler(u32 vector)
{
	irq_count++;
	if (vector == VEC_SPURIOUS)
		return;
	if (vector == VEC_TIMER) {
		timer_irq();
	} else if (vector >= VEC_GSI_BASE && vector < VEC_GSI_BASE + MAX_GSI) {
		u32 gsi = vector - VEC_GSI_BASE;
		if (gsi == 4)
			serial_irq();
		virtio_irq(gsi);
	}
	lapic_eoi();
}

NORETURN void triple_fault(void)
{
	static const struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) null_idt = { 0, 0 };
	__asm__ volatile("cli; lidt %0" : : "m"(null_idt));
	for (;;) /* non-canonical address: #GP -> #DF -> shutdown */
		__asm__ volatile("movq (%0), %%rax" : : "r"(0x8000000000000000ULL) : "rax", "memory");
}

NORETURN void poweroff(void)
{
	outb(PORT_I8042_CMD, 0xfe);	/* rayvmm: i8042 reset ends the VM */
	triple_fault();			/* QEMU microvm: no i8042; -no-reboot */
}

/* ---- CPU discovery ---- */

static u8 sum8(const u8 *p, u32 n)
{
	u8 s = 0;
	while (n--)
		s += *p++;
	return s;
}

static void add_cpu(u32 apic_id)
{
	if (apic_id == bsp_apic_id || apic_id > 0xfe)
		return;
	if (ncpus_found < MAX_CPUS)
		cpu_apic_id[ncpus_found++] = (u8)apic_id;
}

static void add_ioapic(u64 base, u32 gsi_base, int first)
{
	if (first) {
		nioapics = 0;
	}
	if (nioapics < MAX_IOAPICS) {
		ioapics[nioapics].base = base;
		ioapics[nioapics].gsi_base = gsi_base;
		nioapics++;
	}
}

/* scan looks for a 16-byte aligned signature of sig_len (4 or 8) bytes. */
static const u8 *scan(u64 start, u64 end, u64 sig, int sig_len)
{
	for (u64 a = start; a + 16 <= end; a += 16) {
		u64 v = sig_len == 8 ? le64((const void *)a) : le32((const void *)a);
		if (v == sig)
			return (const u8 *)a;
	}
	return NULL;
}

#define SIG_MP 0x5f504d5fULL			/* "_MP_" */
#define SIG_PCMP 0x504d4350U			/* "PCMP" */
#define SIG_RSDP 0x2052545020445352ULL		/* "RSD PTR " */
#define SIG_APIC 0x43495041U			/* "APIC" */

static int parse_mp(const u8 *fp)
{
	if (sum8(fp, 16) != 0 || fp[11] != 0)	/* bad checksum or default config */
		return 0;
	u32 ct = le32(fp + 4);
	if (ct == 0 || ct >= 0x100000)
		return 0;
	const u8 *t = (const u8 *)(u64)ct;
	u32 len = le16(t + 4);
	if (le32(t) != SIG_PCMP || len < 44 || ct + len > 0x100000 || sum8(t, len) != 0)
		return 0;
	/* Walk by length, as Linux does: qboot leaves the entry count 0. */
	const u8 *p = t + 44, *end = t + len;
	int first_ioapic = 1;
	while (p < end) {
		switch (p[0]) {
		case 0:	/* processor */
			if (p + 20 > end)
				return 1;
			if (p[3] & 1)
				add_cpu(p[1]);
			p += 20;
			break;
		case 2:	/* I/O APIC: assume GSIs in table order, 24 pins each */
			if (p + 8 > end)
				return 1;
			if (p[3] & 1) {
				add_ioapic(le32(p + 4), first_ioapic ? 0 : nioapics * 24, first_ioapic);
				first_ioapic = 0;
			}
			p += 8;
			break;
		case 1: case 3: case 4:
			p += 8;
			break;
		default:	/* unknown entry: its size is unknown too */
			return 1;
		}
	}
	return 1;
}

static const u8 *acpi_table(const u8 *rsdp, u32 sig)
{
	u64 sdt;
	int esz;
	if (rsdp[15] >= 2 && le64(rsdp + 24) != 0 && sum8(rsdp, 36) == 0) {
		sdt = le64(rsdp + 24);
		esz = 8;
	} else {
		sdt = le32(rsdp + 16);
		esz = 4;
	}
	if (sdt == 0 || sdt >= 0x100000000ULL)
		return NULL;
	const u8 *h = (const u8 *)sdt;
	u32 len = le32(h + 4);
	if (len < 36 || len > 0x10000)
		return NULL;
	for (u32 off = 36; off + (u32)esz <= len; off += (u32)esz) {
		u64 a = esz == 8 ? le64(h + off) : le32(h + off);
		if (a == 0 || a >= 0x100000000ULL)
			continue;
		if (le32((const void *)a) == sig)
			return (const u8 *)a;
	}
	return NULL;
}

static int parse_madt(const u8 *rsdp)
{
	if (le64(rsdp) != SIG_RSDP || sum8(rsdp, 20) != 0)
		return 0;
	const u8 *m = acpi_table(rsdp, SIG_APIC);
	if (!m)
		return 0;
	u32 len = le32(m + 4);
	if (len < 44 || len > 0x10000)
		return 0;
	const u8 *p = m + 44, *end = m + len;
	int first_ioapic = 1;
	while (p + 2 <= end && p[1] >= 2 && p + p[1] <= end) {
		switch (p[0]) {
		case 0:	/* processor local APIC */
			if (p[1] >= 8 && (le32(p + 4) & 1))
				add_cpu(p[3]);
			break;
		case 1:	/* I/O APIC */
			if (p[1] >= 12) {
				add_ioapic(le32(p + 4), le32(p + 8), first_ioapic);
				first_ioapic = 0;
			}
			break;
		case 9:	/* processor local x2APIC */
			if (p[1] >= 16 && (le32(p + 8) & 1))
				add_cpu(le32(p + 4));
			break;
		}
		p += p[1];
	}
	return 1;
}

/* cpus_discover fills the CPU and IOAPIC lists: MP table in the EBDA first
 * (where rayvmm puts it), then the ACPI MADT when the boot protocol gave an
 * RSDP, then the BIOS area for either. One CPU when nothing is found. */
void cpus_discover(u64 rsdp)
{
	const u8 *fp = NULL;
	u64 ebda = (u64)le16((const void *)0x40e) << 4;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = scan(ebda, ebda + 1024, SIG_MP, 4);
	if (!fp && ebda != 0x9fc00)
		fp = scan(0x9fc00, 0xa0000, SIG_MP, 4);
	if (fp && parse_mp(fp))
		return;
	if (rsdp && rsdp < 0x100000000ULL && parse_madt((const u8 *)rsdp))
		return;
	fp = scan(0xf0000, 0x100000, SIG_MP, 4);
	if (fp && parse_mp(fp))
		return;
	const u8 *r = scan(0xe0000, 0x100000, SIG_RSDP, 8);
	if (r)
		parse_madt(r);
}

/* ---- SMP ---- */

static void send_ipi(u32 apic_id, u32 icr_lo)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, icr_lo);
}

NORETURN void ap_main(void)
{
	u32 idx = ap_index;
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	kprintf("rayguest: cpu %u up\n", idx);
	ap_started = idx;
	send_ipi(bsp_apic_id, VEC_WAKE);	/* fixed, physical */
	for (;;)
		__asm__ volatile("cli; hlt");
}

static int ap_is_up(void *arg)
{
	return ap_started == (u32)(u64)arg;
}

/* smp_start brings up the APs one at a time (INIT, SIPI, SIPI), so their
 * "cpu N up" lines come out in order, each within a bounded wait. */
void smp_start(void)
{
	if (ncpus_found < 2)
		return;
	memcpy((void *)TRAMPOLINE_ADDR, trampoline_start,
	       (size_t)(trampoline_end - trampoline_start));
	timer_calibrate();
	for (u32 i = 1; i < ncpus_found; i++) {
		ap_index = i;
		ap_stack_top = (u64)&ap_stacks[i][AP_STACK_SIZE];
		barrier();
		send_ipi(cpu_apic_id[i], 0x4500);			/* INIT */
		send_ipi(cpu_apic_id[i], 0x4600 | (TRAMPOLINE_ADDR >> 12));	/* SIPI */
		send_ipi(cpu_apic_id[i], 0x4600 | (TRAMPOLINE_ADDR >> 12));
		if (wait_for(ap_is_up, (void *)(u64)i, 2000000, NULL))
			ncpus_online++;
		else
			kprintf("rayguest: cpu %u FAIL\n", i);
	}
}
