package net

import (
	"bytes"
	"encoding/binary"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

var testMAC = []byte{0x02, 0, 0, 0, 0, 0x42}

// irqCounter is the test's transport side of interrupts.
type irqCounter struct {
	used, config, resets atomic.Uint64
	kick                 chan struct{} // signalled on every used-ring interrupt
}

func (i *irqCounter) Trigger(k virtio.InterruptKind, _ uint16) error {
	if k == virtio.InterruptUsedRing {
		i.used.Add(1)
		select {
		case i.kick <- struct{}{}:
		default:
		}
	} else {
		i.config.Add(1)
	}
	return nil
}

func (i *irqCounter) NeedsReset() { i.resets.Add(1) }

// memPort is an in-memory port for tests that need no TAP: frames written
// by the device land in out; frames put in in are read by the device.
type memPort struct {
	in     chan []byte
	mu     sync.Mutex
	out    [][]byte
	closed chan struct{}
	once   sync.Once
	reads  atomic.Int32 // Read calls entered
}

func newMemPort() *memPort {
	return &memPort{in: make(chan []byte, 64), closed: make(chan struct{})}
}

func (p *memPort) Read(b []byte) (int, error) {
	p.reads.Add(1)
	select {
	case f := <-p.in:
		return copy(b, f), nil
	case <-p.closed:
		return 0, os.ErrClosed
	}
}

func (p *memPort) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.out = append(p.out, bytes.Clone(b))
	return len(b), nil
}

func (p *memPort) Close() error { p.once.Do(func() { close(p.closed) }); return nil }

func (p *memPort) written() [][]byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([][]byte(nil), p.out...)
}

// harness is a device activated on mock queues in two regions of guest
// memory (one per queue, as each mock driver uses its region as heap).
type harness struct {
	t      testing.TB
	mem    *memory.Memory
	rx, tx *queuetest.Driver
	dev    *Device
	irq    *irqCounter

	txFree             []memory.GuestAddr // feedTx's idle buffers
	txAddrOf, rxAddrOf []memory.GuestAddr // buffer of each head in flight
}

const (
	rxBase = 0x0
	txBase = 0x400000
	region = 0x400000
)

func newHarness(t testing.TB, cfg Config, eventIdx bool) *harness {
	t.Helper()
	mem, err := memory.New(memory.Range{Base: rxBase, Size: region}, memory.Range{Base: txBase, Size: region})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, mem: mem, irq: &irqCounter{kick: make(chan struct{}, 1)}}
	if cfg.MAC == nil {
		cfg.MAC = testMAC
	}
	if h.dev, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	if h.rx, err = queuetest.New(mem, rxBase, 256); err != nil {
		t.Fatal(err)
	}
	if h.tx, err = queuetest.New(mem, txBase, 256); err != nil {
		t.Fatal(err)
	}
	h.rx.EventIdx, h.tx.EventIdx = eventIdx, eventIdx
	h.rx.Indirect, h.tx.Indirect = true, true
	feat := h.dev.Features()
	if !eventIdx {
		feat &^= virtio.FeatureRingEventIdx
	}
	h.dev.Ack(feat)
	rxq, err := queue.New(mem, 256, h.rx.Config())
	if err != nil {
		t.Fatal(err)
	}
	txq, err := queue.New(mem, 256, h.tx.Config())
	if err != nil {
		t.Fatal(err)
	}
	if err := h.dev.Activate(mem, h.irq, []*queue.Queue{rxq, txq}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.dev.Close()
		if c, ok := cfg.Port.(interface{ Close() error }); ok {
			c.Close()
		}
		mem.Close()
	})
	return h
}

// send puts header+frame in one buffer on the transmit queue and kicks.
func (h *harness) send(frame []byte) uint16 {
	h.t.Helper()
	a, err := h.tx.Alloc(uint64(HeaderLen + len(frame)))
	if err != nil {
		h.t.Fatal(err)
	}
	buf := make([]byte, HeaderLen+len(frame))
	copy(buf[HeaderLen:], frame)
	if err := h.mem.Write(a, buf); err != nil {
		h.t.Fatal(err)
	}
	head, err := h.tx.Add(queuetest.Buf{Addr: a, Len: uint32(len(buf))})
	if err != nil {
		h.t.Fatal(err)
	}
	h.dev.Notify(TxQueue)
	return head
}

// postRx posts one device-writable receive buffer of n bytes.
func (h *harness) postRx(n uint32) (uint16, memory.GuestAddr) {
	h.t.Helper()
	a, err := h.rx.Alloc(uint64(n))
	if err != nil {
		h.t.Fatal(err)
	}
	head, err := h.rx.Add(queuetest.Buf{Addr: a, Len: n, Write: true})
	if err != nil {
		h.t.Fatal(err)
	}
	h.dev.Notify(RxQueue)
	return head, a
}

// used waits for the next used element on d.
func (h *harness) used(d *queuetest.Driver, what string) (id, n uint32) {
	h.t.Helper()
	var ok bool
	var err error
	eventually(h.t, what, func() bool {
		id, n, ok, err = d.Used()
		if err != nil {
			h.t.Fatal(err)
		}
		return ok
	})
	return id, n
}

// eventually polls cond until it holds; the deadline only catches a lost
// event, it is no performance threshold.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 20s for %s", what)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// ethFrame is a frame of n bytes from testMAC with a test ethertype (or
// 802.1Q-tagged when vlan is not 0).
func ethFrame(n int, vlan uint16) []byte {
	f := make([]byte, max(n, 18))
	copy(f, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:], testMAC)
	if vlan != 0 {
		binary.BigEndian.PutUint16(f[12:], tpid8021Q)
		binary.BigEndian.PutUint16(f[14:], vlan)
		binary.BigEndian.PutUint16(f[16:], 0x88b5)
	} else {
		binary.BigEndian.PutUint16(f[12:], 0x88b5)
	}
	for i := 18; i < n; i++ {
		f[i] = byte(i)
	}
	return f[:n]
}

// feedTx keeps the transmit queue full of copies of frame, as a busy
// guest driver does, until count frames completed or stop is closed. It
// returns the number completed. It is the only user of h.tx meanwhile;
// calls may follow each other (the buffers are made once).
func (h *harness) feedTx(frame []byte, count int, stop <-chan struct{}) int {
	buf := make([]byte, HeaderLen+len(frame))
	copy(buf[HeaderLen:], frame)
	if h.txFree == nil {
		for range h.tx.Size {
			a, err := h.tx.Alloc(uint64(HeaderLen + maxFrameLen(1500)))
			if err != nil {
				h.t.Fatal(err)
			}
			h.txFree = append(h.txFree, a)
		}
		h.txAddrOf = make([]memory.GuestAddr, h.tx.Size)
	}
	for _, a := range h.txFree {
		h.mem.Write(a, buf)
	}
	queued, done := 0, 0
	for done < count {
		progress := false
		for {
			id, _, ok, err := h.tx.Used()
			if err != nil {
				h.t.Fatal(err)
			}
			if !ok {
				break
			}
			h.txFree = append(h.txFree, h.txAddrOf[id])
			done++
			progress = true
		}
		added := false
		for len(h.txFree) > 0 && queued < count {
			a := h.txFree[len(h.txFree)-1]
			h.txFree = h.txFree[:len(h.txFree)-1]
			head, err := h.tx.Add(queuetest.Buf{Addr: a, Len: uint32(len(buf))})
			if err != nil {
				h.t.Fatal(err)
			}
			h.txAddrOf[head] = a
			queued++
			added = true
		}
		if added {
			if kick, _ := h.tx.NeedsKick(); kick {
				h.dev.Notify(TxQueue)
			}
		}
		if !progress && !added {
			select {
			case <-h.irq.kick:
			case <-time.After(time.Millisecond):
			case <-stop:
				return done
			}
		}
	}
	return done
}

// flow counts frames received and lets a sender sleep until the count
// reaches a mark, without spinning.
type flow struct {
	got  atomic.Int64
	want atomic.Int64 // the sender sleeps until got >= want (0: not sleeping)
	wake chan struct{}
}

func newFlow() *flow { return &flow{wake: make(chan struct{}, 1)} }

// add counts n frames received.
func (f *flow) add(n int64) {
	g := f.got.Add(n)
	if w := f.want.Load(); w > 0 && g >= w && f.want.CompareAndSwap(w, 0) {
		f.wake <- struct{}{}
	}
}

// waitFor sleeps until got >= mark.
func (f *flow) waitFor(mark int64) {
	f.want.Store(mark)
	if f.got.Load() >= mark && f.want.CompareAndSwap(mark, 0) {
		return
	}
	<-f.wake
}

// consumeRx keeps the receive queue stocked with bufLen-byte buffers and
// counts the frames the device delivers in got, until count arrived or
// stop is closed. Calls may follow each other with the same bufLen.
func (h *harness) consumeRx(bufLen uint32, count int, got *flow, stop <-chan struct{}) {
	post := func(a memory.GuestAddr) {
		head, err := h.rx.Add(queuetest.Buf{Addr: a, Len: bufLen, Write: true})
		if err != nil {
			h.t.Fatal(err)
		}
		h.rxAddrOf[head] = a
	}
	if h.rxAddrOf == nil { // first call: stock the ring; later calls go on
		h.rxAddrOf = make([]memory.GuestAddr, h.rx.Size)
		for range h.rx.Size {
			a, err := h.rx.Alloc(uint64(bufLen))
			if err != nil {
				h.t.Fatal(err)
			}
			post(a)
		}
		h.dev.Notify(RxQueue)
	}
	for got.got.Load() < int64(count) {
		progress := false
		for {
			id, _, ok, err := h.rx.Used()
			if err != nil {
				h.t.Fatal(err)
			}
			if !ok {
				break
			}
			got.add(1)
			post(h.rxAddrOf[id])
			progress = true
		}
		if progress {
			if kick, _ := h.rx.NeedsKick(); kick {
				h.dev.Notify(RxQueue)
			}
			continue
		}
		select {
		case <-h.irq.kick:
		case <-time.After(time.Millisecond):
		case <-stop:
			return
		}
	}
}
