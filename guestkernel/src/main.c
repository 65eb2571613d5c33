/* rayguest: boot information, command line, and the jobs. */
#include "kernel.h"

#define CMDLINE_MAX 2048
#define E820_RAM 1
#define PVH_MAGIC 0x336ec578

struct config cfg = { .run = "poweroff", .blocks = 16, .seed = 1 };

static char cmdline[CMDLINE_MAX];
static u64 mem_usable;
static u64 rsdp;

#define MAX_RAM 16
static struct { u64 base, len; } ram[MAX_RAM];	/* RAM entries of the memory map */
static u32 nram;

static void add_ram(u64 base, u64 len)
{
	mem_usable += len;
	if (nram < MAX_RAM) {
		ram[nram].base = base;
		ram[nram].len = len;
		nram++;
	}
}

int ram_covers(u64 base, u64 len)
{
	for (u32 i = 0; i < nram; i++)
		if (base >= ram[i].base && base - ram[i].base <= ram[i].len &&
		    len <= ram[i].len - (base - ram[i].base))
			return 1;
	return 0;
}

static int low4g(u64 a, u64 n) { return a != 0 && a < 0x100000000ULL && n <= 0x100000000ULL - a; }

static void copy_cmdline(u64 p)
{
	if (!low4g(p, 1))
		return;
	const char *s = (const char *)p;
	u32 n = 0;
	while (n < CMDLINE_MAX - 1 && s[n])
		n++;
	memcpy(cmdline, s, n);
	cmdline[n] = 0;
}

/* boot_info copies what the kernel needs out of the boot protocol's
 * structure (zero page or PVH start_info): command line, usable RAM, RSDP. */
static void boot_info(u64 info, u32 kind)
{
	if (!low4g(info, 0x1000))
		return;
	const u8 *b = (const u8 *)info;
	if (kind == BOOT_LINUX) {
		copy_cmdline(le32(b + 0x228) | (u64)le32(b + 0x0c8) << 32);
		u32 n = b[0x1e8];
		if (n > 128)
			n = 128;
		for (u32 i = 0; i < n; i++) {
			const u8 *e = b + 0x2d0 + 20 * i;
			if (le32(e + 16) == E820_RAM)
				add_ram(le64(e), le64(e + 8));
		}
		rsdp = le64(b + 0x070);
	} else if (kind == BOOT_PVH && le32(b) == PVH_MAGIC) {
		copy_cmdline(le64(b + 24));
		rsdp = le64(b + 32);
		if (le32(b + 4) >= 1) {
			u64 mm = le64(b + 40);
			u32 n = le32(b + 48);
			if (n > 128)
				n = 128;
			if (low4g(mm, 24 * (u64)n))
				for (u32 i = 0; i < n; i++) {
					const u8 *e = (const u8 *)mm + 24 * i;
					if (le32(e + 16) == E820_RAM)
						add_ram(le64(e), le64(e + 8));
				}
		}
	}
}

/* parse_virtio reads Linux's <size>@<base>:<irq>[:<id>]. */
static void parse_virtio(const char *v)
{
	u64 size, base, irq;
	const char *p = parse_u64(v, 0, &size);
	if (p) {
		switch (*p) {
		case 'k': case 'K': size <<= 10; p++; break;
		case 'm': case 'M': size <<= 20; p++; break;
		case 'g': case 'G': size <<= 30; p++; break;
		}
	}
	if (p && *p == '@')
		p = parse_u64(p + 1, 0, &base);
	else
		p = NULL;
	if (p && *p == ':')
		p = parse_u64(p + 1, 10, &irq);
	else
		p = NULL;
	if (!p || (*p != 0 && *p != ':') || irq >= MAX_GSI || size < 0x100 ||
	    !low4g(base, size)) {
		kprintf("rayguest: bad virtio_mmio.device=%s\n", v);
		return;
	}
	if (cfg.nvirtio == MAX_VIRTIO) {
		kprintf("rayguest: too many virtio devices, ignoring %s\n", v);
		return;
	}
	struct virtio_cmdline *d = &cfg.virtio[cfg.nvirtio++];
	d->base = base;
	d->size = size;
	d->gsi = (u32)irq;
}

static void parse_u64_key(const char *key, const char *v, u64 *out)
{
	const char *e = parse_u64(v, 0, out);
	if (!e || *e)
		kprintf("rayguest: bad %s=%s\n", key, v);
}

/* parse_cmdline splits the copy in place at blanks; keys point into it. */
static void parse_cmdline(void)
{
	char *p = cmdline;
	for (;;) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (!*p)
			break;
		char *tok = p;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		if (*p)
			*p++ = 0;
		char *eq = tok;
		while (*eq && *eq != '=')
			eq++;
		if (!*eq)
			continue;
		*eq = 0;
		const char *v = eq + 1;
		if (streq(tok, "rayguest.run"))
			cfg.run = v;
		else if (streq(tok, "rayguest.blocks"))
			parse_u64_key(tok, v, &cfg.blocks);
		else if (streq(tok, "rayguest.seed"))
			parse_u64_key(tok, v, &cfg.seed);
		else if (streq(tok, "rayguest.flushevery"))
			parse_u64_key(tok, v, &cfg.flushevery);
		else if (streq(tok, "rayguest.ip"))
			cfg.ip = v;
		else if (streq(tok, "rayguest.gw"))
			cfg.gw = v;
		else if (streq(tok, "rayguest.vlan"))
			cfg.vlan = v;
		else if (streq(tok, "rayguest.health"))
			parse_u64_key(tok, v, &cfg.health);
		else if (streq(tok, "rayguest.health.failafter"))
			parse_u64_key(tok, v, &cfg.failafter);
		else if (streq(tok, "virtio_mmio.device"))
			parse_virtio(v);
	}
}

static int serial_has_input(void *arg)
{
	(void)arg;
	return serial_rx_ready();
}

/* serial_poll drains the UART outside the ISR too, so input can never be
 * stranded behind a lost edge. */
static void serial_poll(void)
{
	cli();
	serial_irq();
	sti();
}

static NORETURN void job_echo(void)
{
	static char line[1024];
	u32 len = 0;
	for (;;) {
		wait_for(serial_has_input, NULL, 0, serial_poll);
		int c;
		while ((c = serial_getc()) >= 0) {
			if (c == '\r' || c == '\n') {
				if (len == 0)
					continue;
				line[len] = 0;
				len = 0;
				if (streq(line, "quit")) {
					kputs("rayguest: bye\n");
					poweroff();
				}
				kprintf("rayguest: echo %s\n", line);
			} else if (len < sizeof(line) - 1) {
				line[len++] = (char)c;
			}
		}
	}
}

static NORETURN void job_pio(const char *arg)
{
	u64 n;
	const char *e = parse_u64(arg, 10, &n);
	if (!e || *e) {
		kprintf("rayguest: bad pio count %s\n", arg);
		poweroff();
	}
	for (u64 i = 0; i < n; i++)
		outb(PORT_PIO_BENCH, 0);
	kprintf("rayguest: pio %lu done\n", n);
	poweroff();
}

NORETURN void kmain(u64 info, u32 kind)
{
	pic_disable();
	lapic_init();
	ioapic_route(4, 0);	/* COM1: edge, active high */
	serial_init();
	kputs("rayguest: ready\n");
	outb(PORT_BOOT_TIMER, 123);

	boot_info(info, kind);
	parse_cmdline();
	cpus_discover(rsdp);
	smp_start();
	kprintf("rayguest: rayguest %s memory %lu bytes (%lu MiB) cpus %u\n", RAYGUEST_VERSION,
		mem_usable, mem_usable >> 20, ncpus_online);

	if (cfg.health) {
		if (cfg.health > 0xffffffffULL)
			kprintf("rayguest: bad rayguest.health=%lu\n", cfg.health);
		else
			vsock_health_start();
	}
	const char *run = cfg.run;
	if (streq(run, "poweroff")) {
		kputs("rayguest: poweroff\n");
		poweroff();
	}
	if (streq(run, "echo"))
		job_echo();
	if (streq(run, "crash")) {
		kputs("rayguest: crash: triple fault now\n");
		triple_fault();
	}
	if (streq(run, "fault")) {	/* exercises the exception report */
		kputs("rayguest: fault: reading unmapped memory\n");
		(void)*(volatile u64 *)0x100000000ULL;
	}
	if (startswith(run, "pio:"))
		job_pio(run + 4);
	if (streq(run, "blktest"))
		job_blk(BLK_TEST);
	if (streq(run, "blksum"))
		job_blk(BLK_SUM);
	if (streq(run, "blkwrite"))
		job_blk(BLK_WRITE);
	if (streq(run, "serve"))
		job_serve();
	if (startswith(run, "ping:"))
		job_ping(run + 5);
	if (streq(run, "vsock-echo"))
		job_vsock_echo();
	if (startswith(run, "vsock-connect:"))
		job_vsock_connect(run + 14);
	kprintf("rayguest: unknown job %s\n", run);
	poweroff();
}
