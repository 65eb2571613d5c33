package queue_test

import (
	"encoding/binary"
	"errors"
	"flag"
	"testing"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/internal/seedcorpus"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the fuzz seed corpus in testdata/fuzz")

// Fuzz image layout: data[0] picks the queue size (1 << data[0]%6), data[1]
// bit 0 EVENT_IDX and bit 1 INDIRECT_DESC; the rest is guest memory from
// address 0: descriptor table at 0, avail ring at queuetest.FuzzAvail, used ring at
// queuetest.FuzzUsed, buffers and indirect tables after, and nothing past queuetest.FuzzMem.

// walk is the fuzz body: pop and walk every chain the image offers.
func walk(t *testing.T, data []byte) {
	_, q, ok, err := queuetest.FuzzQueue(data)
	if err != nil {
		t.Fatalf("valid layout rejected: %v", err)
	}
	if !ok {
		return
	}
	size := q.Size()
	for range 3*int(size) + 3 {
		c, ok, err := q.Pop()
		if err != nil {
			if !errors.Is(err, queue.ErrAvailIndex) {
				t.Fatalf("Pop error %v is not ErrAvailIndex", err)
			}
			break
		}
		if !ok {
			break
		}
		ds, err := c.Collect(nil)
		if err != nil && !errors.Is(err, queue.ErrInvalidChain) {
			t.Fatalf("walk error %v is not ErrInvalidChain", err)
		}
		if len(ds) > 2*int(size) {
			t.Fatalf("walked %d descriptors on a queue of %d", len(ds), size)
		}
		var total uint64
		for _, d := range ds {
			total += uint64(d.Len)
			if uint64(d.Addr)+uint64(d.Len) < uint64(d.Addr) {
				t.Fatalf("returned wrapping buffer %+v", d)
			}
		}
		if total > 1<<32-1 {
			t.Fatalf("returned %d bytes in one chain", total)
		}
		if err := q.AddUsed(c.Head(), uint32(total)); (err == nil) != (c.Head() < size) {
			t.Fatalf("AddUsed(%d) on a queue of %d = %v", c.Head(), size, err)
		}
		if _, err := q.NeedsNotification(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := q.EnableNotification(); err != nil && !errors.Is(err, queue.ErrAvailIndex) {
		t.Fatal(err)
	}
}

func FuzzQueueWalk(f *testing.F) {
	for _, s := range walkSeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(walk)
}

// image builds a fuzz input: a queue of 1<<sizeExp, the given features and
// chains. Each chain is a list of raw descriptors {index, addr, len,
// flags, next}; heads are published in order.
type fzDesc struct {
	i           uint16
	addr        uint64
	len         uint32
	flags, next uint16
}

func image(sizeExp, feat byte, heads []uint16, availIdx uint16, descs []fzDesc, tables map[uint64][]fzDesc) []byte {
	m := make([]byte, 0x390)
	put := func(at uint64, d fzDesc) {
		if at+16 > uint64(len(m)) {
			m = append(m, make([]byte, at+16-uint64(len(m)))...)
		}
		binary.LittleEndian.PutUint64(m[at:], d.addr)
		binary.LittleEndian.PutUint32(m[at+8:], d.len)
		binary.LittleEndian.PutUint16(m[at+12:], d.flags)
		binary.LittleEndian.PutUint16(m[at+14:], d.next)
	}
	for _, d := range descs {
		put(16*uint64(d.i), d)
	}
	for base, t := range tables {
		for _, d := range t {
			put(base+16*uint64(d.i), d)
		}
	}
	binary.LittleEndian.PutUint16(m[queuetest.FuzzAvail+2:], availIdx)
	for i, h := range heads {
		binary.LittleEndian.PutUint16(m[queuetest.FuzzAvail+4+2*i:], h)
	}
	return append([]byte{sizeExp, feat}, m...)
}

func walkSeeds() []seedcorpus.Seed {
	const N, W, I = queue.DescFNext, queue.DescFWrite, queue.DescFIndirect
	return []seedcorpus.Seed{
		{Name: "empty", Data: image(3, 0, nil, 0, nil, nil)},
		{Name: "direct-blk-read", Data: image(3, 1, []uint16{0}, 1, []fzDesc{{0, 0x500, 16, N, 1}, {1, 0x600, 512, W | N, 2}, {2, 0x700, 1, W, 0}}, nil)},
		{Name: "two-chains", Data: image(3, 0, []uint16{0, 3}, 2, []fzDesc{{0, 0x500, 16, 0, 0}, {3, 0x500, 16, N, 4}, {4, 0x600, 8, W, 0}}, nil)},
		{Name: "indirect", Data: image(3, 3, []uint16{1}, 1, []fzDesc{{1, 0x800, 48, I, 0}},
			map[uint64][]fzDesc{0x800: {{0, 0x500, 16, N, 1}, {1, 0x600, 512, N, 2}, {2, 0x700, 1, W, 0}}})},
		{Name: "loop", Data: image(3, 0, []uint16{0}, 1, []fzDesc{{0, 0x500, 16, N, 1}, {1, 0x500, 16, N, 0}}, nil)},
		{Name: "self-loop", Data: image(5, 0, []uint16{5}, 1, []fzDesc{{5, 0x500, 16, N, 5}}, nil)},
		{Name: "next-out-of-range", Data: image(3, 0, []uint16{0}, 1, []fzDesc{{0, 0x500, 16, N, 200}}, nil)},
		{Name: "head-out-of-range", Data: image(3, 0, []uint16{0xffff}, 1, nil, nil)},
		{Name: "avail-idx-too-far", Data: image(3, 0, nil, 9, nil, nil)},
		{Name: "addr-outside-memory", Data: image(3, 0, []uint16{0}, 1, []fzDesc{{0, 1 << 40, 16, 0, 0}}, nil)},
		{Name: "addr-wraps", Data: image(3, 0, []uint16{0}, 1, []fzDesc{{0, ^uint64(0) - 8, 16, 0, 0}}, nil)},
		{Name: "len-4GiB", Data: image(3, 0, []uint16{0}, 1, []fzDesc{{0, 0x500, 0xffffffff, N, 1}, {1, 0x500, 0xffffffff, 0, 0}}, nil)},
		{Name: "nested-indirect", Data: image(3, 2, []uint16{0}, 1, []fzDesc{{0, 0x800, 32, I, 0}},
			map[uint64][]fzDesc{0x800: {{0, 0x800, 32, I, 0}}})},
		{Name: "indirect-loop", Data: image(3, 2, []uint16{0}, 1, []fzDesc{{0, 0x800, 32, I, 0}},
			map[uint64][]fzDesc{0x800: {{0, 0x500, 16, N, 1}, {1, 0x500, 16, N, 0}}})},
		{Name: "indirect-table-outside", Data: image(3, 2, []uint16{0}, 1, []fzDesc{{0, queuetest.FuzzMem - 16, 64, I, 0}}, nil)},
		{Name: "indirect-not-negotiated", Data: image(3, 0, []uint16{0}, 1, []fzDesc{{0, 0x800, 32, I, 0}}, nil)},
		{Name: "direct-then-indirect", Data: image(3, 2, []uint16{0}, 1, []fzDesc{{0, 0x500, 16, N, 2}, {2, 0x800, 32, I, 0}},
			map[uint64][]fzDesc{0x800: {{0, 0x600, 512, W | N, 1}, {1, 0x700, 1, W, 0}}})},
	}
}

// TestSeedCorpus keeps testdata/fuzz/FuzzQueueWalk in step with walkSeeds
// (go test runs the files; -update-seeds rewrites them).
func TestSeedCorpus(t *testing.T) {
	seedcorpus.Check(t, "FuzzQueueWalk", walkSeeds(), *updateSeeds)
}
