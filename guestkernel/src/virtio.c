/* rayguest: virtio-mmio version 2 transport and split virtqueues. */
#include "virtio.h"

#define MMIO_MAGIC		0x000
#define MMIO_VERSION		0x004
#define MMIO_DEVICE_ID		0x008
#define MMIO_DEVICE_FEATURES	0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES	0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL		0x030
#define MMIO_QUEUE_NUM_MAX	0x034
#define MMIO_QUEUE_NUM		0x038
#define MMIO_QUEUE_READY	0x044
#define MMIO_QUEUE_NOTIFY	0x050
#define MMIO_INTERRUPT_STATUS	0x060
#define MMIO_INTERRUPT_ACK	0x064
#define MMIO_STATUS		0x070
#define MMIO_QUEUE_DESC_LOW	0x080
#define MMIO_QUEUE_DESC_HIGH	0x084
#define MMIO_QUEUE_DRIVER_LOW	0x090
#define MMIO_QUEUE_DRIVER_HIGH	0x094
#define MMIO_QUEUE_DEVICE_LOW	0x0a0
#define MMIO_QUEUE_DEVICE_HIGH	0x0a4
#define MMIO_CONFIG		0x100

#define STATUS_ACKNOWLEDGE	1
#define STATUS_DRIVER		2
#define STATUS_DRIVER_OK	4
#define STATUS_FEATURES_OK	8
#define STATUS_FAILED		0x80

#define VRING_USED_F_NO_NOTIFY	1

#define MAX_QUEUES	16
#define QUEUE_MAX_SIZE	64	/* desc 1 KiB, avail at 1 KiB, used at 2 KiB */

static u8 queue_pages[MAX_QUEUES][4096] ALIGNED(4096);
static u32 queues_used;

static struct vdev *active[MAX_VIRTIO];
static u32 nactive;

static inline u32 rd(struct vdev *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void wr(struct vdev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

u32 virtio_probe(struct vdev *d, const struct virtio_cmdline *c, const char **err)
{
	d->base = c->base;
	d->gsi = c->gsi;
	d->active = 0;
	if (rd(d, MMIO_MAGIC) != 0x74726976) {	/* "virt" */
		*err = "bad magic";
		return 0;
	}
	u32 v = rd(d, MMIO_VERSION);
	if (v != 2) {
		*err = v == 1 ? "legacy virtio-mmio (version 1) not supported" : "unknown version";
		return 0;
	}
	d->id = rd(d, MMIO_DEVICE_ID);
	if (d->id == 0)
		*err = "no device";
	return d->id;
}

void virtio_fail(struct vdev *d)
{
	wr(d, MMIO_STATUS, rd(d, MMIO_STATUS) | STATUS_FAILED);
}

const char *virtio_start(struct vdev *d, u64 wanted)
{
	wr(d, MMIO_STATUS, 0);
	wr(d, MMIO_STATUS, STATUS_ACKNOWLEDGE);
	wr(d, MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	wr(d, MMIO_DEVICE_FEATURES_SEL, 0);
	u64 f = rd(d, MMIO_DEVICE_FEATURES);
	wr(d, MMIO_DEVICE_FEATURES_SEL, 1);
	f |= (u64)rd(d, MMIO_DEVICE_FEATURES) << 32;
	if (!(f & VIRTIO_F_VERSION_1)) {
		virtio_fail(d);
		return "device does not offer VIRTIO_F_VERSION_1";
	}
	d->features = f & (wanted | VIRTIO_F_VERSION_1);
	wr(d, MMIO_DRIVER_FEATURES_SEL, 0);
	wr(d, MMIO_DRIVER_FEATURES, (u32)d->features);
	wr(d, MMIO_DRIVER_FEATURES_SEL, 1);
	wr(d, MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
	wr(d, MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd(d, MMIO_STATUS) & STATUS_FEATURES_OK)) {
		virtio_fail(d);
		return "device rejected FEATURES_OK";
	}
	return NULL;
}

const char *vq_setup(struct vdev *d, struct vq *q, u32 index, u16 max)
{
	wr(d, MMIO_QUEUE_SEL, index);
	if (rd(d, MMIO_QUEUE_READY))
		return "queue already live";
	u32 n = rd(d, MMIO_QUEUE_NUM_MAX);
	if (n == 0)
		return "queue not available";
	if (n > max)
		n = max;
	if (n > QUEUE_MAX_SIZE)
		n = QUEUE_MAX_SIZE;
	while (n & (n - 1))	/* power of two */
		n &= n - 1;
	if (queues_used == MAX_QUEUES)
		return "out of queue memory";
	u8 *m = queue_pages[queues_used++];
	q->dev = d;
	q->index = index;
	q->size = (u16)n;
	q->avail_idx = 0;
	q->last_used = 0;
	q->desc = (volatile struct vring_desc *)m;
	q->avail = (volatile u16 *)(m + 1024);
	q->used = m + 2048;
	u64 desc = (u64)m, avail = (u64)(m + 1024), used = (u64)(m + 2048);
	wr(d, MMIO_QUEUE_NUM, n);
	wr(d, MMIO_QUEUE_DESC_LOW, (u32)desc);
	wr(d, MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	wr(d, MMIO_QUEUE_DRIVER_LOW, (u32)avail);
	wr(d, MMIO_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
	wr(d, MMIO_QUEUE_DEVICE_LOW, (u32)used);
	wr(d, MMIO_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
	wr(d, MMIO_QUEUE_READY, 1);
	return NULL;
}

void virtio_ready(struct vdev *d)
{
	if (nactive < MAX_VIRTIO) {
		active[nactive++] = d;
		d->active = 1;
	}
	ioapic_route(d->gsi, 1);
	wr(d, MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK |
		STATUS_DRIVER_OK);
}

u8 virtio_config8(struct vdev *d, u32 off) { return mmio_read8(d->base + MMIO_CONFIG + off); }
u16 virtio_config16(struct vdev *d, u32 off) { return mmio_read16(d->base + MMIO_CONFIG + off); }
u32 virtio_config32(struct vdev *d, u32 off) { return rd(d, MMIO_CONFIG + off); }

/* virtio_irq acknowledges every active device on the GSI (level-triggered:
 * the ack lowers the line before the LAPIC EOI). */
void virtio_irq(u32 gsi)
{
	for (u32 i = 0; i < nactive; i++) {
		struct vdev *d = active[i];
		if (d->gsi != gsi || !d->active)
			continue;
		u32 s = rd(d, MMIO_INTERRUPT_STATUS);
		if (s)
			wr(d, MMIO_INTERRUPT_ACK, s);
	}
}

void vq_push(struct vq *q, u16 head)
{
	q->avail[2 + q->avail_idx % q->size] = head;
	barrier();	/* x86 keeps stores in order; keep the compiler from reordering */
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
}

void vq_kick(struct vq *q)
{
	mb();		/* publish avail->idx before reading used->flags */
	if (!(*(volatile u16 *)q->used & VRING_USED_F_NO_NOTIFY))
		wr(q->dev, MMIO_QUEUE_NOTIFY, q->index);
}

int vq_pending(struct vq *q)
{
	return *(volatile u16 *)(q->used + 2) != q->last_used;
}

int vq_pop(struct vq *q, u32 *id, u32 *len)
{
	if (!vq_pending(q))
		return 0;
	barrier();	/* read the element after seeing idx */
	volatile u8 *e = q->used + 4 + 8 * (q->last_used % q->size);
	*id = *(volatile u32 *)e;
	*len = *(volatile u32 *)(e + 4);
	q->last_used++;
	return 1;
}
