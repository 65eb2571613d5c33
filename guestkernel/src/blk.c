/* rayguest: virtio-blk driver and the blktest / blksum / blkwrite jobs.
 * One request in flight: header, 4 KiB data, status, completed by the
 * device's interrupt (the CPU sleeps in hlt until the used ring moves). */
#include "virtio.h"

#define VIRTIO_BLK_F_SEG_MAX	(1ULL << 2)
#define VIRTIO_BLK_F_RO		(1ULL << 5)
#define VIRTIO_BLK_F_BLK_SIZE	(1ULL << 6)
#define VIRTIO_BLK_F_FLUSH	(1ULL << 9)

#define VIRTIO_BLK_T_IN		0
#define VIRTIO_BLK_T_OUT	1
#define VIRTIO_BLK_T_FLUSH	4

#define BLOCK_SIZE	4096
#define WORDS		(BLOCK_SIZE / 8)
#define REQ_TIMEOUT_US	10000000	/* 10 s */
#define STATUS_NONE	0x100		/* no status: timed out */

#define FNV_BASIS	0xcbf29ce484222325ULL
#define FNV_PRIME	0x100000001b3ULL

struct blkdev {
	struct vdev v;
	struct vq q;
	u64 capacity;	/* 512-byte sectors */
	char name[4];
};

static struct blkdev disks[MAX_VIRTIO];
static u64 req_hdr[2] ALIGNED(16);
static volatile u8 req_status ALIGNED(16);
static u64 buf[WORDS] ALIGNED(4096);

u64 splitmix64(u64 x)
{
	u64 z = x + 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* The pattern of a block is an arithmetic sequence: word 0 is
 * splitmix64(seed * 2^32 + block) and each next word adds the golden
 * ratio constant. Every block and seed differs, yet filling or checking a
 * word costs one add: guest instructions are expensive under emulation. */
#define PATTERN_STEP 0x9e3779b97f4a7c15ULL

static inline u64 pattern_start(u64 block)
{
	return splitmix64(cfg.seed * 0x100000000ULL + block);
}

/* The loops below run once per 8-byte word of every block, so they are
 * unrolled eight times: under KVM's instruction emulator each instruction
 * costs hundreds of nanoseconds, and loop control would be a third of them. */
static void fill_pattern(u64 block)
{
	u64 w = pattern_start(block);
	for (u32 i = 0; i < WORDS; i += 8) {
		buf[i] = w;
		buf[i + 1] = w + PATTERN_STEP;
		buf[i + 2] = w + 2 * PATTERN_STEP;
		buf[i + 3] = w + 3 * PATTERN_STEP;
		buf[i + 4] = w + 4 * PATTERN_STEP;
		buf[i + 5] = w + 5 * PATTERN_STEP;
		buf[i + 6] = w + 6 * PATTERN_STEP;
		buf[i + 7] = w + 7 * PATTERN_STEP;
		w += 8 * PATTERN_STEP;
	}
}

/* check_pattern returns the index of the first word of buf that differs
 * from the block's pattern, or WORDS if all match. */
static u32 check_pattern(u64 block)
{
	u64 w = pattern_start(block);
	for (u32 i = 0; i < WORDS; i += 8) {
		u64 diff = (buf[i] ^ w) | (buf[i + 1] ^ (w + PATTERN_STEP)) |
			   (buf[i + 2] ^ (w + 2 * PATTERN_STEP)) | (buf[i + 3] ^ (w + 3 * PATTERN_STEP)) |
			   (buf[i + 4] ^ (w + 4 * PATTERN_STEP)) | (buf[i + 5] ^ (w + 5 * PATTERN_STEP)) |
			   (buf[i + 6] ^ (w + 6 * PATTERN_STEP)) | (buf[i + 7] ^ (w + 7 * PATTERN_STEP));
		if (diff) {
			for (u32 j = i;; j++, w += PATTERN_STEP)
				if (buf[j] != w)
					return j;
		}
		w += 8 * PATTERN_STEP;
	}
	return WORDS;
}

/* sum_block folds buf into the running sum h. */
static u64 sum_block(u64 h)
{
	for (u32 i = 0; i < WORDS; i += 8) {
		h = (h ^ buf[i]) * FNV_PRIME;
		h = (h ^ buf[i + 1]) * FNV_PRIME;
		h = (h ^ buf[i + 2]) * FNV_PRIME;
		h = (h ^ buf[i + 3]) * FNV_PRIME;
		h = (h ^ buf[i + 4]) * FNV_PRIME;
		h = (h ^ buf[i + 5]) * FNV_PRIME;
		h = (h ^ buf[i + 6]) * FNV_PRIME;
		h = (h ^ buf[i + 7]) * FNV_PRIME;
	}
	return h;
}

static int used_moved(void *arg) { return vq_pending(arg); }

/* blk_req runs one request and returns its virtio status (0 = OK), or
 * STATUS_NONE when the device did not complete it in time. */
static u32 blk_req(struct blkdev *b, u32 type, u64 sector, int with_data)
{
	volatile struct vring_desc *d = b->q.desc;
	req_hdr[0] = type;		/* type, reserved */
	req_hdr[1] = sector;
	req_status = 0xff;
	d[0].addr = (u64)req_hdr;
	d[0].len = 16;
	d[0].flags = VRING_DESC_F_NEXT;
	d[0].next = with_data ? 1 : 2;
	d[1].addr = (u64)buf;
	d[1].len = BLOCK_SIZE;
	d[1].flags = VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VRING_DESC_F_WRITE : 0);
	d[1].next = 2;
	d[2].addr = (u64)&req_status;
	d[2].len = 1;
	d[2].flags = VRING_DESC_F_WRITE;
	d[2].next = 0;
	vq_push(&b->q, 0);
	vq_kick(&b->q);
	if (!wait_for(used_moved, &b->q, REQ_TIMEOUT_US, NULL))
		return STATUS_NONE;
	u32 id, len;
	vq_pop(&b->q, &id, &len);
	return req_status;
}

static void fail(struct blkdev *b, const char *what, u64 block, u32 st)
{
	if (st == STATUS_NONE)
		kprintf("rayguest: blk %s FAIL block %lu %s timeout\n", b->name, block, what);
	else
		kprintf("rayguest: blk %s FAIL block %lu %s status %u\n", b->name, block, what, st);
}

/* blk_flush sends a FLUSH if the device offers it; returns its status. */
static u32 blk_flush(struct blkdev *b, int report)
{
	if (!(b->v.features & VIRTIO_BLK_F_FLUSH))
		return 0;
	u32 st = blk_req(b, VIRTIO_BLK_T_FLUSH, 0, 0);
	if (st && report) {
		if (st == STATUS_NONE)
			kprintf("rayguest: blk %s FAIL flush timeout\n", b->name);
		else
			kprintf("rayguest: blk %s FAIL flush status %u\n", b->name, st);
	}
	return st;
}

/* blk_write writes the pattern; returns the first non-zero status. With
 * rayguest.flushevery=N it also flushes after every N blocks and reports
 * how many blocks the device has acknowledged as durable. */
static u32 blk_write(struct blkdev *b, u64 nblocks, int stop_on_error)
{
	u32 first = 0;
	for (u64 blk = 0; blk < nblocks; blk++) {
		fill_pattern(blk);
		u32 st = blk_req(b, VIRTIO_BLK_T_OUT, blk * (BLOCK_SIZE / 512), 1);
		if (st && !first) {
			first = st;
			if (stop_on_error) {
				fail(b, "write", blk, st);
				return st;
			}
		}
		if (cfg.flushevery && (blk + 1) % cfg.flushevery == 0 && blk + 1 < nblocks) {
			st = blk_flush(b, stop_on_error);
			if (st && !first)
				first = st;
			if (st && stop_on_error)
				return st;
			if (!st)
				kprintf("rayguest: blk %s flushed blocks=%lu\n", b->name, blk + 1);
		}
	}
	u32 st = blk_flush(b, stop_on_error);
	if (st && !first)
		first = st;
	if (!st && cfg.flushevery)
		kprintf("rayguest: blk %s flushed blocks=%lu\n", b->name, nblocks);
	return first;
}

/* blk_read_sum reads the blocks, verifies them against the pattern when
 * verify is set, and folds every word into the sum. */
static int blk_read_sum(struct blkdev *b, u64 nblocks, int verify, u64 *sum)
{
	u64 h = FNV_BASIS;
	for (u64 blk = 0; blk < nblocks; blk++) {
		u32 st = blk_req(b, VIRTIO_BLK_T_IN, blk * (BLOCK_SIZE / 512), 1);
		if (st) {
			fail(b, "read", blk, st);
			return 0;
		}
		if (verify) {
			u32 i = check_pattern(blk);
			if (i < WORDS) {
				kprintf("rayguest: blk %s FAIL block %lu word %u mismatch\n", b->name,
					blk, i);
				return 0;
			}
		}
		h = sum_block(h);
	}
	*sum = h;
	return 1;
}

static const char *blk_init(struct blkdev *b)
{
	const char *err = virtio_start(&b->v, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_SEG_MAX |
						  VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH);
	if (!err)
		err = vq_setup(&b->v, &b->q, 0, 16);
	if (err) {
		virtio_fail(&b->v);
		return err;
	}
	b->capacity = virtio_config32(&b->v, 0) | (u64)virtio_config32(&b->v, 4) << 32;
	virtio_ready(&b->v);
	return NULL;
}

NORETURN void job_blk(int mode)
{
	u32 n = 0;
	for (u32 i = 0; i < cfg.nvirtio && n < 26; i++) {
		struct blkdev *b = &disks[n];
		const char *err = NULL;
		u32 id = virtio_probe(&b->v, &cfg.virtio[i], &err);
		if (id == 0 && err)
			kprintf("rayguest: virtio %lx: %s\n", cfg.virtio[i].base, err);
		if (id != VIRTIO_ID_BLK)
			continue;	/* not a disk: not counted in vdX */
		b->name[0] = 'v';
		b->name[1] = 'd';
		b->name[2] = (char)('a' + n);
		n++;
		if ((err = blk_init(b)) != NULL) {
			kprintf("rayguest: blk %s FAIL init: %s\n", b->name, err);
			continue;
		}
		u64 nblocks = b->capacity / (BLOCK_SIZE / 512);
		if (nblocks > cfg.blocks)
			nblocks = cfg.blocks;
		int ro = (b->v.features & VIRTIO_BLK_F_RO) != 0;
		u64 sum;
		switch (mode) {
		case BLK_WRITE:
			kprintf("rayguest: blk %s write status=%u\n", b->name,
				blk_write(b, nblocks, 0));
			break;
		case BLK_TEST:
			if (!ro && blk_write(b, nblocks, 1))
				break;
			if (blk_read_sum(b, nblocks, !ro, &sum))
				kprintf("rayguest: blk %s ok sectors=%lu sum=%016lx\n", b->name,
					b->capacity, sum);
			break;
		case BLK_SUM:
			if (blk_read_sum(b, nblocks, 0, &sum))
				kprintf("rayguest: blk %s ok sectors=%lu sum=%016lx\n", b->name,
					b->capacity, sum);
			break;
		}
	}
	if (n == 0)
		kputs("rayguest: blk no disks\n");
	poweroff();
}
