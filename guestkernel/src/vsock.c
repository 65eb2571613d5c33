/* rayguest: virtio-vsock driver (stream sockets with credit flow control)
 * and the vsock jobs: vsock-echo (port 52), vsock-connect:PORT, and the
 * health responder (rayguest.health=PORT) that runs beside any job.
 *
 * Everything is driven from vsock_poll, which wait_for runs on every
 * wake-up (bg_poll): received packets are handled, completed sends free
 * their slots, then each connection does its work (echo, pong, pattern)
 * and sends credit updates. Per-byte work is kept to rep movs copies: echo
 * data is copied once into the connection's ring and sent from there;
 * the connect job and the health responder read straight out of the
 * receive buffers. */
#include "virtio.h"

#define VIRTIO_ID_VSOCK	19

#define HDR		44
#define TYPE_STREAM	1
#define HOST_CID	2
#define OP_REQUEST	1
#define OP_RESPONSE	2
#define OP_RST		3
#define OP_SHUTDOWN	4
#define OP_RW		5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUT_RCV	1
#define SHUT_SEND	2

/* Buffers live in RAM above the image (the image must end below 2 MiB):
 * receive buffers, then one ring per connection, then the connect job's
 * pattern. */
#define VSOCK_MEM	0x200000ULL
#define RX_BUFS		32
#define RX_DATA		16384
#define RX_STRIDE	(RX_DATA + 64)
#define MAX_CONNS	40
#define RING		16384		/* each connection's buf_alloc */
#define PATTERN_LEN	65536
#define RINGS_AT	(VSOCK_MEM + RX_BUFS * RX_STRIDE)
#define PATTERN_AT	(RINGS_AT + MAX_CONNS * RING)
#define VSOCK_MEM_END	(PATTERN_AT + PATTERN_LEN)

#define TX_SLOTS	21		/* 3 descriptors each: header, data, wrapped data */
#define MAX_RSTS	8
#define ECHO_PORT	52
#define CONNECT_PORT	1024		/* the connect job's local port */
#define CONNECT_WAIT_US	5000000
#define PROGRESS_WAIT_US 10000000

#define PATTERN_BASE	0x6b636f73762d7972ULL	/* "ry-vsock" */
#define PATTERN_STEP	0x9e3779b97f4a7c15ULL

enum { C_FREE, C_CONNECTING, C_OPEN, C_CLOSED };
enum { APP_ECHO = 1, APP_HEALTH, APP_CONNECT };

struct vconn {
	u8 state, app;
	u8 need_response, need_rst, need_credit, shut_sent;
	u8 peer_shut;			/* SHUTDOWN flags received */
	u8 reset;			/* ended by the device's RST */
	u32 local, peer;		/* ports */
	u32 rx_cnt, fwd_cnt, last_fwd;	/* receive side: got, consumed, last told */
	u32 sent;			/* echo: ring bytes sent back */
	u32 tx_cnt, peer_alloc, peer_fwd;	/* send side */
	u32 inflight;			/* sends not yet completed */
	u8 *ring;
	u32 pongs;			/* health: pongs owed */
	u32 line_len;
	char line[16];
};

struct txslot {
	u8 busy;
	s64 conn;			/* connection whose ring data this carries, or -1 */
	u32 ring_len;
	u8 hdr[HDR] ALIGNED(8);
};

static struct vdev dev;
static struct vq rxq, txq;
static u64 guest_cid;
static int vsock_up;
static const char *vsock_err;
static struct vconn conns[MAX_CONNS];
static struct txslot txs[TX_SLOTS];
static struct { u32 local, peer; } rsts[MAX_RSTS];
static u32 nrsts;
static int tx_pushed, rx_pushed;

static u32 echo_port, health_port;	/* listening ports, 0 = none */
static u64 health_fail_at;		/* time_us() after which health is silent; 0 = never */
static int health_fail_noted;

static const char pong[] = "pong\n";

static inline u8 *rxbuf(u32 i) { return (u8 *)(VSOCK_MEM + (u64)i * RX_STRIDE); }

/* ---- packets ---- */

static void put_hdr(u8 *h, u32 src_port, u32 dst_port, u32 len, u16 op, u32 flags, u32 fwd)
{
	*(u64 *)(h + 0) = guest_cid;
	*(u64 *)(h + 8) = HOST_CID;
	*(u32 *)(h + 16) = src_port;
	*(u32 *)(h + 20) = dst_port;
	*(u32 *)(h + 24) = len;
	*(u16 *)(h + 28) = TYPE_STREAM;
	*(u16 *)(h + 30) = op;
	*(u32 *)(h + 32) = flags;
	*(u32 *)(h + 36) = RING;
	*(u32 *)(h + 40) = fwd;
}

static int free_slot(void)
{
	for (int i = 0; i < TX_SLOTS; i++)
		if (!txs[i].busy)
			return i;
	return -1;
}

/* send queues one packet: header plus up to two data pieces. For a
 * connection's packets conn is its index; ring_len bytes of its ring are
 * freed when the send completes. Returns 0 when no slot is free. */
static int send(s64 conn, u32 src, u32 dst, u16 op, u32 flags, const u8 *d1, u32 n1,
		const u8 *d2, u32 n2, u32 ring_len)
{
	int s = free_slot();
	if (s < 0)
		return 0;
	struct txslot *t = &txs[s];
	u32 fwd = 0;
	if (conn >= 0) {
		struct vconn *c = &conns[conn];
		fwd = c->fwd_cnt;
		c->last_fwd = fwd;
		c->inflight++;
	}
	t->busy = 1;
	t->conn = conn;
	t->ring_len = ring_len;
	put_hdr(t->hdr, src, dst, n1 + n2, op, flags, fwd);
	volatile struct vring_desc *d = &txq.desc[3 * s];
	d[0].addr = (u64)t->hdr;
	d[0].len = HDR;
	d[0].flags = n1 ? VRING_DESC_F_NEXT : 0;
	d[0].next = (u16)(3 * s + 1);
	if (n1) {
		d[1].addr = (u64)d1;
		d[1].len = n1;
		d[1].flags = n2 ? VRING_DESC_F_NEXT : 0;
		d[1].next = (u16)(3 * s + 2);
		if (n2) {
			d[2].addr = (u64)d2;
			d[2].len = n2;
			d[2].flags = 0;
		}
	}
	vq_push(&txq, (u16)(3 * s));
	tx_pushed = 1;
	return 1;
}

static int ctrl(struct vconn *c, u16 op, u32 flags)
{
	return send(c - conns, c->local, c->peer, op, flags, NULL, 0, NULL, 0, 0);
}

/* credit is how much the host takes now on c (saturating). */
static u32 credit(struct vconn *c)
{
	u32 inflight = c->tx_cnt - c->peer_fwd;
	return inflight >= c->peer_alloc ? 0 : c->peer_alloc - inflight;
}

static struct vconn *find(u32 local, u32 peer)
{
	for (u32 i = 0; i < MAX_CONNS; i++)
		if (conns[i].state != C_FREE && conns[i].local == local && conns[i].peer == peer)
			return &conns[i];
	return NULL;
}

static struct vconn *alloc_conn(u32 local, u32 peer, u8 app)
{
	for (u32 i = 0; i < MAX_CONNS; i++) {
		struct vconn *c = &conns[i];
		if (c->state != C_FREE)
			continue;
		u8 *ring = (u8 *)(RINGS_AT + (u64)i * RING);
		memset(c, 0, sizeof(*c));
		c->ring = ring;
		c->local = local;
		c->peer = peer;
		c->app = app;
		return c;
	}
	return NULL;
}

static void rst_unknown(u32 local, u32 peer)
{
	if (nrsts < MAX_RSTS) {
		rsts[nrsts].local = local;
		rsts[nrsts].peer = peer;
		nrsts++;
	}
}

/* kill ends c with RST (sent by conn_work). */
static void kill(struct vconn *c)
{
	c->need_rst = 1;
	c->state = C_CLOSED;
}

/* ---- receive ---- */

static void health_input(struct vconn *c, const u8 *p, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		char ch = (char)p[i];
		if (ch != '\n') {
			if (c->line_len < sizeof(c->line) - 1)
				c->line[c->line_len++] = ch;
			continue;
		}
		if (c->line_len && c->line[c->line_len - 1] == '\r')
			c->line_len--;
		c->line[c->line_len] = 0;
		if (streq(c->line, "ping")) {
			if (health_fail_at && time_us() >= health_fail_at) {
				if (!health_fail_noted) {
					kputs("rayguest: health failafter reached: ping not answered\n");
					health_fail_noted = 1;
				}
			} else if (c->pongs < 64) {
				c->pongs++;
			}
		}
		c->line_len = 0;
	}
}

/* connect_input checks received bytes against the pattern. */
static u64 connect_bad = ~0ULL;

static void connect_input(struct vconn *c, const u8 *p, u32 n)
{
	const u8 *want = (const u8 *)PATTERN_AT + c->rx_cnt;
	if (c->rx_cnt + (u64)n > PATTERN_LEN) {
		if (connect_bad == ~0ULL)
			connect_bad = PATTERN_LEN;
		return;
	}
	if (connect_bad == ~0ULL && memcmp(p, want, n) != 0) {
		u32 i = 0;
		while (p[i] == want[i])
			i++;
		connect_bad = c->rx_cnt + i;
	}
}

static void rw_input(struct vconn *c, const u8 *p, u32 n)
{
	if (c->rx_cnt - c->fwd_cnt + (u64)n > RING) {	/* past our credit */
		kill(c);
		return;
	}
	switch (c->app) {
	case APP_ECHO: {
		u32 at = c->rx_cnt % RING, first = RING - at;
		if (first > n)
			first = n;
		memcpy(c->ring + at, p, first);
		memcpy(c->ring, p + first, n - first);
		c->rx_cnt += n;
		return;
	}
	case APP_HEALTH:
		health_input(c, p, n);
		break;
	case APP_CONNECT:
		connect_input(c, p, n);
		break;
	}
	c->rx_cnt += n;
	c->fwd_cnt += n;	/* consumed in place */
}

static int listening(u32 port)
{
	return port && (port == echo_port || port == health_port);
}

static void packet(const u8 *h, const u8 *data, u32 n)
{
	u64 src_cid = le64(h), dst_cid = le64(h + 8);
	u32 src = le32(h + 16), dst = le32(h + 20);
	u16 type = le16(h + 28), op = le16(h + 30);
	u32 flags = le32(h + 32);
	if (src_cid != HOST_CID || dst_cid != guest_cid || type != TYPE_STREAM)
		return;
	struct vconn *c = find(dst, src);
	if (!c) {
		if (op == OP_REQUEST && listening(dst)) {
			c = alloc_conn(dst, src, dst == health_port ? APP_HEALTH : APP_ECHO);
			if (c) {
				c->state = C_OPEN;
				c->need_response = 1;
				c->peer_alloc = le32(h + 36);
				c->peer_fwd = le32(h + 40);
				return;
			}
		}
		if (op != OP_RST)
			rst_unknown(dst, src);
		return;
	}
	c->peer_alloc = le32(h + 36);
	c->peer_fwd = le32(h + 40);
	switch (op) {
	case OP_RESPONSE:
		if (c->state == C_CONNECTING)
			c->state = C_OPEN;
		break;
	case OP_RST:
		c->reset = 1;
		c->need_rst = 0;
		c->state = C_CLOSED;
		break;
	case OP_SHUTDOWN:
		c->peer_shut |= (u8)(flags & (SHUT_RCV | SHUT_SEND));
		if (c->peer_shut == (SHUT_RCV | SHUT_SEND) && c->state != C_CLOSED)
			kill(c);	/* the host is gone: end it as Linux does */
		break;
	case OP_RW:
		if (c->state == C_OPEN && !(c->peer_shut & SHUT_SEND))
			rw_input(c, data, n);
		break;
	case OP_CREDIT_REQUEST:
		c->need_credit = 1;
		break;
	}
}

static void rx_poll(void)
{
	u32 id, len;
	while (vq_pop(&rxq, &id, &len)) {
		if (id >= RX_BUFS)
			continue;
		u8 *b = rxbuf(id);
		if (len >= HDR && len <= HDR + RX_DATA) {
			u32 n = le32(b + 24);
			if (n <= len - HDR)
				packet(b, b + HDR, n);
		}
		vq_push(&rxq, (u16)id);
		rx_pushed = 1;
	}
}

static void tx_poll(void)
{
	u32 id, len;
	while (vq_pop(&txq, &id, &len)) {
		u32 s = id / 3;
		if (id % 3 || s >= TX_SLOTS || !txs[s].busy)
			continue;
		struct txslot *t = &txs[s];
		t->busy = 0;
		if (t->conn >= 0) {
			struct vconn *c = &conns[t->conn];
			c->fwd_cnt += t->ring_len;	/* echoed bytes leave the ring */
			if (c->inflight)
				c->inflight--;
		}
	}
}

/* ---- per-connection work ---- */

static void echo_work(struct vconn *c)
{
	while (c->sent != c->rx_cnt && !(c->peer_shut & SHUT_RCV)) {
		u32 n = c->rx_cnt - c->sent, cr = credit(c);
		if (n > cr)
			n = cr;
		if (n == 0)
			return;
		u32 at = c->sent % RING, first = RING - at;
		if (first > n)
			first = n;
		if (!send(c - conns, c->local, c->peer, OP_RW, 0, c->ring + at, first, c->ring,
			  n - first, n))
			return;
		c->sent += n;
		c->tx_cnt += n;
	}
	/* The host sends no more and everything was echoed: close. */
	if ((c->peer_shut & SHUT_SEND) && c->sent == c->rx_cnt && !c->shut_sent) {
		if (ctrl(c, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND))
			c->shut_sent = 1;
	}
}

static u32 connect_sent;

static void connect_work(struct vconn *c)
{
	while (connect_sent < PATTERN_LEN) {
		u32 n = PATTERN_LEN - connect_sent, cr = credit(c);
		if (n > cr)
			n = cr;
		if (n > RX_DATA)
			n = RX_DATA;
		if (n == 0)
			return;
		if (!send(c - conns, c->local, c->peer, OP_RW, 0, (const u8 *)PATTERN_AT + connect_sent,
			  n, NULL, 0, 0))
			return;
		connect_sent += n;
		c->tx_cnt += n;
	}
}

static void conn_work(struct vconn *c)
{
	if (c->state == C_FREE)
		return;
	if (c->need_rst) {
		if (ctrl(c, OP_RST, 0))
			c->need_rst = 0;
		return;
	}
	if (c->state == C_CLOSED) {
		if (!c->inflight)
			c->state = C_FREE;
		return;
	}
	if (c->need_response) {
		if (!ctrl(c, OP_RESPONSE, 0))
			return;
		c->need_response = 0;
	}
	if (c->state != C_OPEN)
		return;
	switch (c->app) {
	case APP_ECHO:
		echo_work(c);
		break;
	case APP_HEALTH:
		while (c->pongs && credit(c) >= sizeof(pong) - 1 &&
		       send(c - conns, c->local, c->peer, OP_RW, 0, (const u8 *)pong, sizeof(pong) - 1,
			    NULL, 0, 0)) {
			c->pongs--;
			c->tx_cnt += sizeof(pong) - 1;
		}
		break;
	case APP_CONNECT:
		connect_work(c);
		break;
	}
	/* Tell the host about consumed data once its view of our free space
	 * is below half, or when it asked. */
	u32 seen = c->rx_cnt - c->last_fwd;
	if (c->need_credit || (c->fwd_cnt != c->last_fwd && seen > RING / 2)) {
		if (ctrl(c, OP_CREDIT_UPDATE, 0))
			c->need_credit = 0;
	}
}

void vsock_poll(void)
{
	if (!vsock_up)
		return;
	rx_poll();
	tx_poll();
	while (nrsts && send(-1, rsts[nrsts - 1].local, rsts[nrsts - 1].peer, OP_RST, 0, NULL, 0,
			     NULL, 0, 0))
		nrsts--;
	for (u32 i = 0; i < MAX_CONNS; i++)
		conn_work(&conns[i]);
	if (rx_pushed)
		vq_kick(&rxq);
	if (tx_pushed)
		vq_kick(&txq);
	rx_pushed = tx_pushed = 0;
}

/* ---- setup ---- */

static const char *vsock_init(void)
{
	if (vsock_up)
		return NULL;
	if (vsock_err)
		return vsock_err;
	if (!ram_covers(VSOCK_MEM, VSOCK_MEM_END - VSOCK_MEM))
		return vsock_err = "not enough memory (needs RAM up to 3.25 MiB)";
	const char *err = NULL;
	u32 i;
	for (i = 0; i < cfg.nvirtio; i++) {
		if (virtio_probe(&dev, &cfg.virtio[i], &err) == VIRTIO_ID_VSOCK)
			break;
		err = NULL;
	}
	if (i == cfg.nvirtio)
		return vsock_err = "no virtio-vsock device";
	if ((err = virtio_start(&dev, 0)) || (err = vq_setup(&dev, &rxq, 0, 64)) ||
	    (err = vq_setup(&dev, &txq, 1, 64))) {
		virtio_fail(&dev);
		return vsock_err = err;
	}
	if (rxq.size < RX_BUFS || txq.size < 3 * TX_SLOTS) {
		virtio_fail(&dev);
		return vsock_err = "queues too small";
	}
	/* The event queue (2) is not set up: rayvmm's device never sends
	 * events, and a transport reset would find no listener anyway. */
	guest_cid = virtio_config32(&dev, 0) | (u64)virtio_config32(&dev, 4) << 32;
	for (u32 j = 0; j < RX_BUFS; j++) {
		rxq.desc[j].addr = (u64)rxbuf(j);
		rxq.desc[j].len = HDR + RX_DATA;
		rxq.desc[j].flags = VRING_DESC_F_WRITE;
		rxq.desc[j].next = 0;
		vq_push(&rxq, (u16)j);
	}
	timer_calibrate();
	virtio_ready(&dev);
	vq_kick(&rxq);
	vsock_up = 1;
	bg_poll = vsock_poll;
	return NULL;
}

/* vsock_health_start starts the health responder beside the job. */
void vsock_health_start(void)
{
	const char *err = vsock_init();
	if (err) {
		kprintf("rayguest: health FAIL %s\n", err);
		return;
	}
	health_port = (u32)cfg.health;
	if (cfg.failafter)
		health_fail_at = time_us() + cfg.failafter * 1000000;
	kprintf("rayguest: health on port %u\n", health_port);
}

static int never(void *arg)
{
	(void)arg;
	return 0;
}

NORETURN void job_vsock_echo(void)
{
	const char *err = vsock_init();
	if (err) {
		kprintf("rayguest: vsock FAIL %s\n", err);
		poweroff();
	}
	echo_port = ECHO_PORT;
	kprintf("rayguest: vsock cid %lu listening on port %u\n", guest_cid, echo_port);
	for (;;)
		wait_for(never, NULL, 0, NULL);
}

static int conn_settled(void *arg)
{
	struct vconn *c = arg;
	return c->state != C_CONNECTING;
}

struct progress {
	struct vconn *c;
	u32 mark;
};

static int connect_progress(void *arg)
{
	struct progress *p = arg;
	struct vconn *c = p->c;
	return c->state == C_CLOSED || c->state == C_FREE || c->rx_cnt >= PATTERN_LEN ||
	       connect_bad != ~0ULL || c->rx_cnt + connect_sent != p->mark;
}

static int conn_gone(void *arg)
{
	struct vconn *c = arg;
	return c->state == C_FREE || (c->state == C_CLOSED && !c->need_rst && !c->inflight);
}

NORETURN void job_vsock_connect(const char *arg)
{
	u64 port;
	const char *e = parse_u64(arg, 10, &port);
	if (!e || *e || port > 0xffffffffULL) {
		kprintf("rayguest: bad vsock-connect port %s\n", arg);
		poweroff();
	}
	const char *err = vsock_init();
	if (err) {
		kprintf("rayguest: vsock FAIL %s\n", err);
		poweroff();
	}
	u64 *w = (u64 *)PATTERN_AT;
	u64 v = PATTERN_BASE;
	for (u32 i = 0; i < PATTERN_LEN / 8; i++, v += PATTERN_STEP)
		w[i] = v;
	struct vconn *c = alloc_conn(CONNECT_PORT, (u32)port, APP_CONNECT);
	c->state = C_CONNECTING;
	c->peer_alloc = 0;
	while (!send(c - conns, c->local, c->peer, OP_REQUEST, 0, NULL, 0, NULL, 0, 0))
		vsock_poll();
	vq_kick(&txq);
	if (!wait_for(conn_settled, c, CONNECT_WAIT_US, NULL)) {
		kprintf("rayguest: vsock FAIL connect to port %lu: no answer\n", port);
		poweroff();
	}
	if (c->state != C_OPEN) {
		kprintf("rayguest: vsock FAIL connect to port %lu: connection reset\n", port);
		poweroff();
	}
	struct progress p = { c, ~0u };
	while (c->rx_cnt < PATTERN_LEN && connect_bad == ~0ULL && c->state == C_OPEN) {
		p.mark = c->rx_cnt + connect_sent;
		if (!wait_for(connect_progress, &p, PROGRESS_WAIT_US, NULL)) {
			kprintf("rayguest: vsock FAIL timeout after sending %u and receiving %u bytes\n",
				connect_sent, c->rx_cnt);
			poweroff();
		}
	}
	if (connect_bad != ~0ULL)
		kprintf("rayguest: vsock FAIL mismatch at byte %lu\n", connect_bad);
	else if (c->rx_cnt < PATTERN_LEN)
		kprintf("rayguest: vsock FAIL connection %s after receiving %u bytes\n",
			c->reset ? "reset" : "closed", c->rx_cnt);
	else
		kputs("rayguest: vsock ok\n");
	/* Close (the host reads EOF) and wait for the device's RST. */
	if (c->state == C_OPEN) {
		while (!ctrl(c, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND))
			vsock_poll();
		vq_kick(&txq);
		wait_for(conn_gone, c, CONNECT_WAIT_US, NULL);
	}
	poweroff();
}
