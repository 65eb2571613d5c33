package blk

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// gateDisk holds reads and writes at chosen offsets until the test opens
// their gate (or, with hang, until their context ends, like a replica
// that never answers), and records what the device did in order.
type gateDisk struct {
	*fileDisk
	hang bool

	mu      sync.Mutex
	gates   map[int64]chan struct{} // by byte offset
	entered chan int64              // offsets of gated calls as they start
	events  []string
	inside  int // calls in the disk now
	most    int // the most at once
	ctxErrs int // calls that returned because their context ended
}

func newGateDisk(fd *fileDisk, offsets ...int64) *gateDisk {
	g := &gateDisk{fileDisk: fd, gates: map[int64]chan struct{}{}, entered: make(chan int64, 64)}
	for _, o := range offsets {
		g.gates[o] = make(chan struct{})
	}
	return g
}

func (g *gateDisk) record(format string, a ...any) {
	g.mu.Lock()
	g.events = append(g.events, fmt.Sprintf(format, a...))
	g.mu.Unlock()
}

func (g *gateDisk) log() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.events)
}

// open lets the calls at off through.
func (g *gateDisk) open(off int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	close(g.gates[off])
}

// pass waits at off's gate, if it has one.
func (g *gateDisk) pass(ctx context.Context, op string, off int64) error {
	g.mu.Lock()
	g.inside++
	g.most = max(g.most, g.inside)
	gate := g.gates[off]
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.inside--
		g.mu.Unlock()
	}()
	if gate == nil {
		return nil
	}
	g.record("%s %d start", op, off)
	g.entered <- off
	if g.hang {
		<-ctx.Done()
		g.mu.Lock()
		g.ctxErrs++
		g.mu.Unlock()
		return ctx.Err()
	}
	select {
	case <-gate:
		return nil
	case <-ctx.Done(): // the test failed and is closing the device
		return ctx.Err()
	}
}

func (g *gateDisk) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := g.pass(ctx, "read", off); err != nil {
		return 0, err
	}
	return g.fileDisk.ReadAt(ctx, p, off)
}

func (g *gateDisk) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := g.pass(ctx, "write", off); err != nil {
		return 0, err
	}
	n, err := g.fileDisk.WriteAt(ctx, p, off)
	g.record("write %d done", off)
	return n, err
}

func (g *gateDisk) Flush(ctx context.Context) error {
	g.record("flush")
	return g.fileDisk.Flush(ctx)
}

// addRead queues a one-sector read of sector and returns its head, the
// data buffer and the status byte.
func (h *harness) addRead(sector uint64) (uint16, memory.GuestAddr, memory.GuestAddr) {
	h.t.Helper()
	data, s := h.alloc(512), h.status()
	head, err := h.drv.Add(rd(h.header(TypeIn, sector), 16), wr(data, 512), wr(s, 1))
	if err != nil {
		h.t.Fatal(err)
	}
	return head, data, s
}

// addWrite queues a one-sector write of b at sector.
func (h *harness) addWrite(sector uint64, b byte) (uint16, memory.GuestAddr) {
	h.t.Helper()
	data, s := h.alloc(512), h.status()
	if err := h.mem.Write(data, bytes.Repeat([]byte{b}, 512)); err != nil {
		h.t.Fatal(err)
	}
	head, err := h.drv.Add(rd(h.header(TypeOut, sector), 16), rd(data, 512), wr(s, 1))
	if err != nil {
		h.t.Fatal(err)
	}
	return head, s
}

func (h *harness) addFlush() (uint16, memory.GuestAddr) {
	h.t.Helper()
	s := h.status()
	head, err := h.drv.Add(rd(h.header(TypeFlush, 0), 16), wr(s, 1))
	if err != nil {
		h.t.Fatal(err)
	}
	return head, s
}

func waitEntered(t *testing.T, g *gateDisk, off int64) {
	t.Helper()
	select {
	case got := <-g.entered:
		if got != off {
			t.Fatalf("the disk call at %d started, want the one at %d", got, off)
		}
	case <-time.After(10 * time.Second):
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		t.Fatalf("the disk call at byte %d did not start within 10 s\n%s", off, buf)
	}
}

// TestOutOfOrderCompletion: a request the disk is slow with does not hold
// back one queued after it; each completes when its own I/O is done.
func TestOutOfOrderCompletion(t *testing.T) {
	var g *gateDisk
	h := newHarness(t, opts{wrap: func(fd *fileDisk) storage.Disk { g = newGateDisk(fd, 0); return g }})
	slow, slowData, slowStatus := h.addRead(0)
	fast, fastData, fastStatus := h.addRead(8)
	h.kick()
	waitEntered(t, g, 0)
	if id, n := h.wait(); id != uint32(fast) || n != 513 || h.byteAt(fastStatus) != StatusOK {
		t.Fatalf("first completion %d (%d bytes, status %d), want the fast read %d", id, n, h.byteAt(fastStatus), fast)
	}
	if _, _, ok, _ := h.drv.Used(); ok {
		t.Fatal("the slow read completed while its I/O was held")
	}
	g.open(0)
	if id, n := h.wait(); id != uint32(slow) || n != 513 || h.byteAt(slowStatus) != StatusOK {
		t.Fatalf("second completion %d (%d bytes), want the slow read %d", id, n, slow)
	}
	file := h.fileBytes()
	if !bytes.Equal(h.guestBytes(slowData, 512), file[:512]) || !bytes.Equal(h.guestBytes(fastData, 512), file[4096:4096+512]) {
		t.Fatal("the reads returned the wrong bytes")
	}
}

// TestFlushWaitsForEarlierWrites: a FLUSH makes durable every write
// popped before it, also one still running when the flush arrives: the
// disk's Flush runs only after that write returned. A write popped after
// the flush is not held back by it.
func TestFlushWaitsForEarlierWrites(t *testing.T) {
	var g *gateDisk
	h := newHarness(t, opts{wrap: func(fd *fileDisk) storage.Disk { g = newGateDisk(fd, 0); return g }})
	w1, s1 := h.addWrite(0, 0xa1)
	fl, sf := h.addFlush()
	w2, s2 := h.addWrite(8, 0xa2)
	h.kick()
	waitEntered(t, g, 0)
	if id, _ := h.wait(); id != uint32(w2) || h.byteAt(s2) != StatusOK {
		t.Fatalf("first completion %d, want the later write %d", id, w2)
	}
	// The flush has been popped (it was queued before w2). Give it every
	// chance to run early: a device that did not wait for w1 would call
	// the disk's Flush now. This bounds an observation, not a hand-off.
	time.Sleep(100 * time.Millisecond)
	if _, _, ok, _ := h.drv.Used(); ok {
		t.Fatal("a completion arrived while the first write was held")
	}
	g.open(0)
	got := map[uint32]bool{}
	for range 2 {
		id, _ := h.wait()
		got[id] = true
	}
	if !got[uint32(w1)] || !got[uint32(fl)] || h.byteAt(s1) != StatusOK || h.byteAt(sf) != StatusOK {
		t.Fatalf("completions %v, want the first write %d and the flush %d, both OK", got, w1, fl)
	}
	ev := g.log()
	i, j := slices.Index(ev, "write 0 done"), slices.Index(ev, "flush")
	if i < 0 || j < 0 || j < i {
		t.Fatalf("disk calls %q: the flush must follow the write it covers", ev)
	}
	if f := h.fileBytes(); f[0] != 0xa1 || f[4096] != 0xa2 {
		t.Fatal("the writes did not land")
	}
}

// TestResetCancelsHungDisk: a disk call that never returns on its own (a
// replica that does not answer) is cancelled by Reset through its
// context, so Reset, which runs on a vCPU thread, returns; the request is
// not completed.
func TestResetCancelsHungDisk(t *testing.T) {
	var g *gateDisk
	h := newHarness(t, opts{wrap: func(fd *fileDisk) storage.Disk {
		g = newGateDisk(fd, 0)
		g.hang = true
		return g
	}})
	_, _, s := h.addRead(0)
	h.kick()
	waitEntered(t, g, 0)
	done := make(chan struct{})
	go func() { h.dev.Reset(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Reset waited for a hung disk call")
	}
	if _, _, ok, _ := h.drv.Used(); ok || h.byteAt(s) != 0xff {
		t.Fatal("a cancelled request was completed")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ctxErrs != 1 || g.inside != 0 {
		t.Fatalf("%d calls saw their context end, %d still inside; want 1 and 0", g.ctxErrs, g.inside)
	}
}

// TestMaxInFlight: at most MaxInFlight requests are in the disk at once,
// and every one completes.
func TestMaxInFlight(t *testing.T) {
	const limit, n = 3, 10
	var g *gateDisk
	offs := make([]int64, n)
	for i := range offs {
		offs[i] = int64(i) * 4096
	}
	h := newHarness(t, opts{queueSize: 64, maxInFlight: limit, wrap: func(fd *fileDisk) storage.Disk { g = newGateDisk(fd, offs...); return g }})
	heads := map[uint32]bool{}
	for i := range n {
		head, _, _ := h.addRead(uint64(i) * 8)
		heads[uint32(head)] = true
	}
	h.kick()
	started := map[int64]bool{}
	for range limit {
		select {
		case o := <-g.entered:
			started[o] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d requests reached the disk", len(started))
		}
	}
	select { // a device over its bound would start a fourth now
	case o := <-g.entered:
		t.Fatalf("request at %d started while %d were in the disk (limit %d)", o, limit, limit)
	case <-time.After(100 * time.Millisecond):
	}
	for _, o := range offs {
		g.open(o)
	}
	for range n {
		id, _ := h.wait()
		if !heads[id] {
			t.Fatalf("unexpected or repeated completion %d", id)
		}
		delete(heads, id)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.most > limit {
		t.Fatalf("%d requests in the disk at once, limit %d", g.most, limit)
	}
}

// TestHostileDriverBoundedByQueue: a driver that publishes chains again
// before they were completed cannot make the device take more than a
// queue's worth at once.
func TestHostileDriverBoundedByQueue(t *testing.T) {
	const qs = 4
	var g *gateDisk
	h := newHarness(t, opts{queueSize: qs, maxInFlight: 16, wrap: func(fd *fileDisk) storage.Disk {
		g = newGateDisk(fd, 0)
		g.hang = true
		return g
	}})
	var heads []uint16
	for range qs { // indirect: one descriptor each, so the queue holds qs
		head, err := h.drv.AddIndirect(rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 512), wr(h.status(), 1))
		if err != nil {
			t.Fatal(err)
		}
		heads = append(heads, head)
	}
	h.kick()
	for range qs {
		waitEntered(t, g, 0)
	}
	for _, head := range heads { // the same chains again, still in flight
		if err := h.drv.Publish(head); err != nil {
			t.Fatal(err)
		}
	}
	h.dev.Notify(0)
	select {
	case <-g.entered:
		t.Fatalf("the device took more than %d chains into the disk", qs)
	case <-time.After(100 * time.Millisecond):
	}
	h.dev.Reset()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.most != qs {
		t.Fatalf("%d requests in the disk at once, want %d", g.most, qs)
	}
}
