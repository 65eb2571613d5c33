/* rayguest: virtio-mmio (version 2) transport and split virtqueues. */
#ifndef RAYGUEST_VIRTIO_H
#define RAYGUEST_VIRTIO_H

#include "kernel.h"

#define VIRTIO_ID_NET	1
#define VIRTIO_ID_BLK	2

#define VIRTIO_F_VERSION_1	(1ULL << 32)

#define VRING_DESC_F_NEXT	1
#define VRING_DESC_F_WRITE	2

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vdev {
	u64 base;
	u32 gsi;
	u32 id;			/* virtio device ID */
	u64 features;		/* negotiated */
	volatile int active;	/* DRIVER_OK: the ISR acknowledges for it */
};

struct vq {
	struct vdev *dev;
	u32 index;
	u16 size;
	u16 avail_idx;		/* next avail->idx to publish */
	u16 last_used;		/* used entries consumed so far */
	volatile struct vring_desc *desc;
	volatile u16 *avail;	/* flags, idx, ring[size] */
	volatile u8 *used;	/* flags, idx, ring[size] of {id, len} */
};

/* virtio_probe reads magic, version and device ID of a command-line device.
 * Returns the device ID, or 0 with *err set. */
u32 virtio_probe(struct vdev *d, const struct virtio_cmdline *c, const char **err);
/* virtio_start resets the device and negotiates features (wanted &
 * offered, VERSION_1 required). NULL on success, else the reason. */
const char *virtio_start(struct vdev *d, u64 wanted);
const char *vq_setup(struct vdev *d, struct vq *q, u32 index, u16 max);
/* virtio_ready routes the device's GSI (level) and sets DRIVER_OK. */
void virtio_ready(struct vdev *d);
void virtio_fail(struct vdev *d);
u8 virtio_config8(struct vdev *d, u32 off);
u16 virtio_config16(struct vdev *d, u32 off);
u32 virtio_config32(struct vdev *d, u32 off);

/* vq_push makes descriptor chain head available; vq_kick notifies the
 * device unless it asked not to be. */
void vq_push(struct vq *q, u16 head);
void vq_kick(struct vq *q);
int vq_pending(struct vq *q);
/* vq_pop consumes one used entry; returns 0 when there is none. */
int vq_pop(struct vq *q, u32 *id, u32 *len);

#endif
