/* rayguest: COM1 8250/16550 console. Output polls LSR.THRE (once per
 * 16-byte FIFO load when the UART has a FIFO); input is interrupt-driven
 * (IER receive-data-available, IRQ 4) into a ring drained by the jobs. */
#include "kernel.h"

#define COM1 0x3f8
#define UART_RBR 0
#define UART_THR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_DR 0x01
#define LSR_THRE 0x20

static u32 tx_load;	/* bytes the transmitter takes after THRE */
static u32 tx_room;	/* bytes left in the current load */

#define RX_RING 4096
static volatile u8 rx_ring[RX_RING];
static volatile u32 rx_head, rx_tail;	/* head: ISR writes; tail: reader */

/* serial_init must not lose input the host queued before boot: writing FCR
 * clear bits empties the receive FIFO (rayvmm drops its whole buffer), and
 * on a 16550 even toggling FIFO enable clears it. So the FIFO is left as it
 * is when already on, and only switched on (without clear bits) when no
 * input is waiting; otherwise output goes one byte per THRE. */
void serial_init(void)
{
	outb(COM1 + UART_LCR, 0x03);		/* 8N1, DLAB off */
	if ((inb(COM1 + UART_IIR) & 0xc0) == 0xc0) {
		tx_load = 16;
	} else if (!(inb(COM1 + UART_LSR) & LSR_DR)) {
		outb(COM1 + UART_FCR, 0x01);	/* FIFO on, trigger level 1 */
		tx_load = (inb(COM1 + UART_IIR) & 0xc0) == 0xc0 ? 16 : 1;
	} else {
		tx_load = 1;
	}
	outb(COM1 + UART_MCR, 0x0b);		/* DTR, RTS, OUT2 (IRQ gate) */
	outb(COM1 + UART_IER, 0x01);		/* receive data available */
	serial_irq();
}

/* serial_irq drains the receiver; called from the IRQ 4 handler. */
void serial_irq(void)
{
	while (inb(COM1 + UART_LSR) & LSR_DR) {
		u8 c = inb(COM1 + UART_RBR);
		u32 h = rx_head;
		if (h - rx_tail < RX_RING) {
			rx_ring[h % RX_RING] = c;
			barrier();
			rx_head = h + 1;
		}
	}
}

int serial_rx_ready(void) { return rx_head != rx_tail; }

int serial_getc(void)
{
	u32 t = rx_tail;
	if (rx_head == t)
		return -1;
	barrier();
	u8 c = rx_ring[t % RX_RING];
	rx_tail = t + 1;
	return c;
}

static void putc_raw(char c)
{
	if (tx_room == 0) {
		while (!(inb(COM1 + UART_LSR) & LSR_THRE))
			;
		tx_room = tx_load;
	}
	outb(COM1 + UART_THR, (u8)c);
	tx_room--;
}

void kputs(const char *s)
{
	while (*s)
		putc_raw(*s++);
}

static void put_num(u64 v, unsigned base, int width, char pad)
{
	char buf[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (n < width--)
		putc_raw(pad);
	while (n)
		putc_raw(buf[--n]);
}

/* A small printf: %s %c %d %u %x with l/ll, width and 0 padding, %%. */
void kvprintf(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putc_raw(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, lng = 0;
		if (*fmt == '0')
			pad = '0', fmt++;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l')
			lng++, fmt++;
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			kputs(s ? s : "(null)");
			break;
		}
		case 'c':
			putc_raw((char)va_arg(ap, int));
			break;
		case 'd': {
			s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
			if (v < 0) {
				putc_raw('-');
				v = -v;
			}
			put_num((u64)v, 10, width, pad);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
			put_num(v, *fmt == 'x' ? 16 : 10, width, pad);
			break;
		}
		case '%':
			putc_raw('%');
			break;
		default:
			putc_raw('?');
			break;
		}
	}
}

void kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
}
