/* rayguest: shared declarations. */
#ifndef RAYGUEST_KERNEL_H
#define RAYGUEST_KERNEL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

#define RAYGUEST_VERSION "0.3"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define NORETURN __attribute__((noreturn))
#define ALIGNED(n) __attribute__((aligned(n)))
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Ports */
#define PORT_BOOT_TIMER	0x440	/* write 123 right after "ready" */
#define PORT_PIO_BENCH	0x441	/* pio:N writes here */
#define PORT_I8042_CMD	0x64	/* 0xfe = reset (power off) */

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

/* Full fence (store-load ordering) without SSE2's mfence. */
static inline void mb(void)
{
	__asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
}

static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }

/* sti; hlt: an interrupt that arrives after the sti wakes the hlt. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" : : : "memory"); }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 get32(const u8 *p)
{
	return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}
static inline void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = v & 0xff; }
static inline void put32(u8 *p, u32 v)
{
	p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static inline u16 le16(const void *p) { return *(const u16 *)p; }
static inline u32 le32(const void *p) { return *(const u32 *)p; }
static inline u64 le64(const void *p) { return *(const u64 *)p; }

/* lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int streq(const char *a, const char *b);
int startswith(const char *s, const char *prefix);
/* parse_u64: base 0 = C-style (0x hex, 0 octal, else decimal); returns the
 * end pointer, or NULL when no digit was read or the value overflows. */
const char *parse_u64(const char *s, int base, u64 *out);
int parse_ipv4(const char *s, u32 *ip, const char **end);

/* console.c */
void serial_init(void);
void serial_irq(void);
int serial_getc(void);		/* -1 when the input ring is empty */
int serial_rx_ready(void);
void kputs(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kvprintf(const char *fmt, va_list ap);

/* cpu.c */
extern volatile u32 irq_count;	/* bumped by every interrupt */
extern u32 bsp_apic_id;
extern u32 ncpus_found, ncpus_online;
void pic_disable(void);
void lapic_init(void);
void lapic_eoi(void);
void ioapic_route(u32 gsi, int level);
void cpus_discover(u64 rsdp);
void smp_start(void);
NORETURN void poweroff(void);
NORETURN void triple_fault(void);

/* time.c */
extern u64 tsc_khz;
void timer_calibrate(void);
u64 time_us(void);
void timer_irq(void);
/* wait_for: sleep (hlt) until cond(arg) holds, with interrupts as the only
 * wake-ups. poll, when set, runs before each check. timeout_us = 0 waits
 * forever. Returns 1 when cond held, 0 on timeout. */
int wait_for(int (*cond)(void *), void *arg, u64 timeout_us, void (*poll)(void));
/* bg_poll, when set, runs in every wait_for round as well (the vsock
 * driver, so the health responder answers whatever the job waits for). */
extern void (*bg_poll)(void);

/* main.c: configuration from the command line */
#define MAX_VIRTIO 16
struct virtio_cmdline {
	u64 base, size;
	u32 gsi;
};
struct config {
	const char *run;
	u64 blocks, seed, flushevery;
	u64 health, failafter;	/* rayguest.health=PORT (0: off), .failafter=S */
	const char *ip, *gw, *vlan;
	struct virtio_cmdline virtio[MAX_VIRTIO];
	u32 nvirtio;
};
extern struct config cfg;
/* ram_covers reports whether [base, base+len) is RAM in the boot memory map. */
int ram_covers(u64 base, u64 len);

/* virtio.c */
void virtio_irq(u32 gsi);

/* blk.c */
NORETURN void job_blk(int mode);
#define BLK_TEST 0
#define BLK_SUM 1
#define BLK_WRITE 2
u64 splitmix64(u64 x);

/* net.c */
NORETURN void job_serve(void);
NORETURN void job_ping(const char *spec);

/* vsock.c */
void vsock_poll(void);
void vsock_health_start(void);
NORETURN void job_vsock_echo(void);
NORETURN void job_vsock_connect(const char *port);

#endif
