package queue_test

import (
	"errors"
	"testing"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

const memSize = 1 << 20

func newPair(t testing.TB, size uint16, eventIdx, indirect bool) (*queuetest.Driver, *queue.Queue) {
	t.Helper()
	mem := memory.FromBytes(0, make([]byte, memSize))
	drv, err := queuetest.New(mem, 0x1000, size)
	if err != nil {
		t.Fatal(err)
	}
	drv.EventIdx, drv.Indirect = eventIdx, indirect
	q, err := queue.New(mem, 256, drv.Config())
	if err != nil {
		t.Fatal(err)
	}
	return drv, q
}

func TestNewValidates(t *testing.T) {
	mem := memory.FromBytes(0, make([]byte, 0x10000))
	good := queue.Config{Size: 16, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}
	tests := []struct {
		name string
		mod  func(c *queue.Config)
		ok   bool
	}{
		{"valid", func(c *queue.Config) {}, true},
		{"size zero", func(c *queue.Config) { c.Size = 0 }, false},
		{"size not power of two", func(c *queue.Config) { c.Size = 24 }, false},
		{"size above device max", func(c *queue.Config) { c.Size = 512 }, false},
		{"desc unaligned", func(c *queue.Config) { c.Desc = 0x1008 }, false},
		{"avail unaligned", func(c *queue.Config) { c.Avail = 0x2001 }, false},
		{"used unaligned", func(c *queue.Config) { c.Used = 0x3002 }, false},
		{"desc outside memory", func(c *queue.Config) { c.Desc = 0x100000 }, false},
		{"desc straddles end", func(c *queue.Config) { c.Desc = 0x10000 - 16*8 }, false},
		{"avail outside memory", func(c *queue.Config) { c.Avail = 1 << 40 }, false},
		{"used straddles end", func(c *queue.Config) { c.Used = 0x10000 - 64 }, false},
		{"used near 2^64", func(c *queue.Config) { c.Used = ^memory.GuestAddr(0) &^ 3 }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := good
			tc.mod(&c)
			_, err := queue.New(mem, 256, c)
			if (err == nil) != tc.ok {
				t.Fatalf("New(%+v) = %v, want ok=%v", c, err, tc.ok)
			}
			if err != nil && !errors.Is(err, queue.ErrInvalidQueue) {
				t.Fatalf("error %v does not wrap ErrInvalidQueue", err)
			}
		})
	}
}

func TestChainRoundTrip(t *testing.T) {
	bufs := []queuetest.Buf{{Addr: 0x80000, Len: 16}, {Addr: 0x81000, Len: 4096, Write: true}, {Addr: 0x82000, Len: 1, Write: true}}
	for _, tc := range []struct {
		name     string
		indirect bool
	}{{"direct", false}, {"indirect", true}} {
		t.Run(tc.name, func(t *testing.T) {
			drv, q := newPair(t, 8, false, true)
			var head uint16
			var err error
			if tc.indirect {
				head, err = drv.AddIndirect(bufs...)
			} else {
				head, err = drv.Add(bufs...)
			}
			if err != nil {
				t.Fatal(err)
			}
			c, ok, err := q.Pop()
			if !ok || err != nil {
				t.Fatalf("Pop = %v, %v", ok, err)
			}
			if c.Head() != head {
				t.Fatalf("head %d, want %d", c.Head(), head)
			}
			ds, err := c.Collect(nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(ds) != len(bufs) {
				t.Fatalf("walked %d descriptors, want %d", len(ds), len(bufs))
			}
			for i, d := range ds {
				if d.Addr != bufs[i].Addr || d.Len != bufs[i].Len || d.Writable() != bufs[i].Write {
					t.Fatalf("descriptor %d = %+v, want %+v", i, d, bufs[i])
				}
			}
			if _, ok, _ := q.Pop(); ok {
				t.Fatal("second Pop found a chain on an empty ring")
			}
			if err := q.AddUsed(c.Head(), 4097); err != nil {
				t.Fatal(err)
			}
			id, n, ok, err := drv.Used()
			if !ok || err != nil || id != uint32(head) || n != 4097 {
				t.Fatalf("Used = %d, %d, %v, %v; want %d, 4097", id, n, ok, err, head)
			}
		})
	}
}

// hostile is a chain written raw into the descriptor table.
type rawDesc struct {
	i           uint16
	addr        memory.GuestAddr
	len         uint32
	flags, next uint16
}

func TestHostileChains(t *testing.T) {
	const (
		N = queue.DescFNext
		W = queue.DescFWrite
		I = queue.DescFIndirect
	)
	tbl := memory.GuestAddr(0x90000) // an indirect table's address
	tests := []struct {
		name     string
		size     uint16
		indirect bool
		descs    []rawDesc
		table    []rawDesc // written at tbl
		head     uint16
		wantN    int  // descriptors returned before the walk stops
		bad      bool // walk ends with ErrInvalidChain
	}{
		{name: "self loop", size: 8, descs: []rawDesc{{0, 0x80000, 16, N, 0}}, wantN: 8, bad: true},
		{name: "two descriptor loop", size: 8, descs: []rawDesc{{0, 0x80000, 16, N, 1}, {1, 0x80000, 16, N, 0}}, wantN: 8, bad: true},
		{name: "next past table", size: 8, descs: []rawDesc{{0, 0x80000, 16, N, 8}}, wantN: 1, bad: true},
		{name: "next far past table", size: 8, descs: []rawDesc{{0, 0x80000, 16, N, 0xffff}}, wantN: 1, bad: true},
		{name: "head past table", size: 8, head: 9, wantN: 0, bad: true},
		{name: "head 0xffff", size: 8, head: 0xffff, wantN: 0, bad: true},
		{name: "buffer wraps address space", size: 8, descs: []rawDesc{{0, ^memory.GuestAddr(0) - 15, 32, 0, 0}}, wantN: 0, bad: true},
		{name: "4 GiB length alone is the device's problem", size: 8, descs: []rawDesc{{0, 0x80000, 0xffffffff, 0, 0}}, wantN: 1},
		{name: "lengths overflow 32 bits", size: 8, descs: []rawDesc{{0, 0x80000, 0xffffffff, N, 1}, {1, 0x80000, 1, 0, 0}}, wantN: 1, bad: true},
		{name: "indirect not negotiated", size: 8, descs: []rawDesc{{0, tbl, 32, I, 0}}, table: []rawDesc{{0, 0x80000, 16, 0, 0}}, wantN: 0, bad: true},
		{name: "indirect with next", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 32, I | N, 1}}, wantN: 0, bad: true},
		{name: "indirect length zero", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 0, I, 0}}, wantN: 0, bad: true},
		{name: "indirect length not multiple of 16", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 17, I, 0}}, wantN: 0, bad: true},
		{name: "indirect longer than queue", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 16 * 9, I, 0}}, wantN: 0, bad: true},
		{name: "indirect table outside memory", size: 8, indirect: true, descs: []rawDesc{{0, memSize - 16, 32, I, 0}}, wantN: 0, bad: true},
		{name: "indirect 4 GiB table", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 0xfffffff0, I, 0}}, wantN: 0, bad: true},
		{name: "nested indirect", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 32, I, 0}},
			table: []rawDesc{{0, tbl, 32, I, 0}}, wantN: 0, bad: true},
		{name: "loop inside indirect table", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 32, I, 0}},
			table: []rawDesc{{0, 0x80000, 16, N, 1}, {1, 0x80000, 16, N, 0}}, wantN: 2, bad: true},
		{name: "indirect next past its table", size: 8, indirect: true, descs: []rawDesc{{0, tbl, 32, I, 0}},
			table: []rawDesc{{0, 0x80000, 16, N, 2}}, wantN: 1, bad: true},
		{name: "direct then indirect", size: 8, indirect: true, descs: []rawDesc{{0, 0x80000, 16, N, 3}, {3, tbl, 32, I, 0}},
			table: []rawDesc{{0, 0x81000, 512, W | N, 1}, {1, 0x82000, 1, W, 0}}, wantN: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			drv, q := newPair(t, tc.size, false, tc.indirect)
			for _, d := range tc.descs {
				if err := drv.SetDesc(d.i, d.addr, d.len, d.flags, d.next); err != nil {
					t.Fatal(err)
				}
			}
			for _, d := range tc.table {
				if err := writeRaw(drv.Mem, tbl+16*memory.GuestAddr(d.i), d); err != nil {
					t.Fatal(err)
				}
			}
			if err := drv.Publish(tc.head); err != nil {
				t.Fatal(err)
			}
			c, ok, err := q.Pop()
			if !ok || err != nil {
				t.Fatalf("Pop = %v, %v", ok, err)
			}
			ds, err := c.Collect(nil)
			if len(ds) != tc.wantN {
				t.Errorf("walked %d descriptors, want %d", len(ds), tc.wantN)
			}
			if tc.bad != (err != nil) {
				t.Fatalf("walk error %v, want error=%v", err, tc.bad)
			}
			if err != nil && !errors.Is(err, queue.ErrInvalidChain) {
				t.Fatalf("error %v does not wrap ErrInvalidChain", err)
			}
			// The chain is consumed either way; AddUsed takes only a valid head.
			if err := q.AddUsed(c.Head(), 0); (err == nil) != (c.Head() < tc.size) {
				t.Fatalf("AddUsed(%d) = %v", c.Head(), err)
			}
		})
	}
}

func writeRaw(mem *memory.Memory, at memory.GuestAddr, d rawDesc) error {
	if err := mem.PutUint64(at, uint64(d.addr)); err != nil {
		return err
	}
	if err := mem.PutUint32(at+8, d.len); err != nil {
		return err
	}
	if err := mem.PutUint16(at+12, d.flags); err != nil {
		return err
	}
	return mem.PutUint16(at+14, d.next)
}

func TestAvailIndexSanity(t *testing.T) {
	tests := []struct {
		name  string
		idx   uint16
		want  uint16
		error bool
	}{
		{"empty", 0, 0, false},
		{"full", 8, 8, false},
		{"one past full", 9, 0, true},
		{"far ahead", 0x8000, 0, true},
		{"behind (wrapped)", 0xffff, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			drv, q := newPair(t, 8, false, false)
			if err := drv.SetAvailIdx(tc.idx); err != nil {
				t.Fatal(err)
			}
			n, err := q.Pending()
			if (err != nil) != tc.error || n != tc.want {
				t.Fatalf("Pending = %d, %v; want %d, error=%v", n, err, tc.want, tc.error)
			}
			_, ok, err := q.Pop()
			if tc.error && (ok || !errors.Is(err, queue.ErrAvailIndex)) {
				t.Fatalf("Pop = %v, %v; want ErrAvailIndex", ok, err)
			}
		})
	}
}

// TestIndexWrap runs more than 2^16 chains through a small queue, so both
// free-running indices wrap.
func TestIndexWrap(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		drv, q := newPair(t, 4, eventIdx, false)
		buf, _ := drv.Alloc(64)
		for i := range 70000 {
			head, err := drv.Add(queuetest.Buf{Addr: buf, Len: 64, Write: true})
			if err != nil {
				t.Fatal(err)
			}
			c, ok, err := q.Pop()
			if !ok || err != nil || c.Head() != head {
				t.Fatalf("round %d: Pop = %d, %v, %v; want head %d", i, c.Head(), ok, err, head)
			}
			if err := q.AddUsed(c.Head(), uint32(i)); err != nil {
				t.Fatal(err)
			}
			id, n, ok, err := drv.Used()
			if !ok || err != nil || id != uint32(head) || n != uint32(i) {
				t.Fatalf("round %d: Used = %d, %d, %v, %v", i, id, n, ok, err)
			}
		}
	}
}

func TestNeedEvent(t *testing.T) {
	tests := []struct {
		name            string
		event, new, old uint16
		want            bool
	}{
		{"crossed", 5, 6, 5, true},
		{"not reached", 10, 6, 5, false},
		{"batch crosses", 7, 10, 5, true},
		{"already past before", 3, 6, 5, false},
		{"wrap crossed", 0xffff, 1, 0xfffe, true},
		{"wrap not reached", 2, 1, 0xfffe, false},
		{"nothing new", 5, 5, 5, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := queue.NeedEvent(tc.event, tc.new, tc.old); got != tc.want {
				t.Fatalf("NeedEvent(%d, %d, %d) = %v", tc.event, tc.new, tc.old, got)
			}
		})
	}
}

// TestInterruptSuppression: the device interrupts only when the driver's
// used_event (EVENT_IDX) or NO_INTERRUPT flag asks for it.
func TestInterruptSuppression(t *testing.T) {
	complete := func(t *testing.T, drv *queuetest.Driver, q *queue.Queue) bool {
		t.Helper()
		buf, _ := drv.Alloc(8)
		if _, err := drv.Add(queuetest.Buf{Addr: buf, Len: 8}); err != nil {
			t.Fatal(err)
		}
		c, ok, err := q.Pop()
		if !ok || err != nil {
			t.Fatal(ok, err)
		}
		if err := q.AddUsed(c.Head(), 0); err != nil {
			t.Fatal(err)
		}
		need, err := q.NeedsNotification()
		if err != nil {
			t.Fatal(err)
		}
		return need
	}
	t.Run("event idx", func(t *testing.T) {
		drv, q := newPair(t, 8, true, false)
		if !complete(t, drv, q) {
			t.Fatal("first completion must interrupt")
		}
		// used_event = 3: no interrupt for used idx 2 and 3, one when it passes 3.
		if err := drv.SetUsedEvent(3); err != nil {
			t.Fatal(err)
		}
		got := []bool{complete(t, drv, q), complete(t, drv, q), complete(t, drv, q)}
		if got[0] || got[1] || !got[2] {
			t.Fatalf("interrupts for used idx 2,3,4 = %v, want false,false,true", got)
		}
	})
	t.Run("no interrupt flag", func(t *testing.T) {
		drv, q := newPair(t, 8, false, false)
		if err := drv.SetAvailFlags(queue.AvailFNoInterrupt); err != nil {
			t.Fatal(err)
		}
		if complete(t, drv, q) {
			t.Fatal("interrupted although the driver set NO_INTERRUPT")
		}
		if err := drv.SetAvailFlags(0); err != nil {
			t.Fatal(err)
		}
		if !complete(t, drv, q) {
			t.Fatal("no interrupt with flags 0")
		}
	})
}

// TestNotificationSuppression: the driver's decision to kick follows what
// the device published, and EnableNotification catches chains that raced
// with it.
func TestNotificationSuppression(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		name := map[bool]string{false: "flags", true: "event idx"}[eventIdx]
		t.Run(name, func(t *testing.T) {
			drv, q := newPair(t, 8, eventIdx, false)
			buf, _ := drv.Alloc(8)
			add := func() {
				if _, err := drv.Add(queuetest.Buf{Addr: buf, Len: 8}); err != nil {
					t.Fatal(err)
				}
			}
			if more, err := q.EnableNotification(); more || err != nil {
				t.Fatalf("EnableNotification on empty ring = %v, %v", more, err)
			}
			add()
			if kick, _ := drv.NeedsKick(); !kick {
				t.Fatal("driver does not kick an idle device")
			}
			if err := q.DisableNotification(); err != nil {
				t.Fatal(err)
			}
			if _, ok, _ := q.Pop(); !ok {
				t.Fatal("no chain")
			}
			add() // arrives while the device is draining
			if kick, _ := drv.NeedsKick(); kick {
				t.Fatal("driver kicks a device that is draining")
			}
			more, err := q.EnableNotification()
			if err != nil || !more {
				t.Fatalf("EnableNotification = %v, %v; want more=true", more, err)
			}
			if _, ok, _ := q.Pop(); !ok {
				t.Fatal("no chain")
			}
			if more, _ := q.EnableNotification(); more {
				t.Fatal("more after draining")
			}
			add()
			if kick, _ := drv.NeedsKick(); !kick {
				t.Fatal("driver does not kick after the device re-enabled notifications")
			}
		})
	}
}
