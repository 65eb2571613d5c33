package net

import (
	"bytes"
	"encoding/binary"
	"sync/atomic"
	"testing"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

func TestConfigSpace(t *testing.T) {
	d, err := New(Config{MAC: testMAC, MTU: 1450, Port: newMemPort()})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []uint64{virtio.FeatureVersion1, FeatureMAC, FeatureMTU, FeatureStatus, virtio.FeatureRingEventIdx} {
		if d.Features()&f == 0 {
			t.Fatalf("feature %#x not offered", f)
		}
	}
	d.Ack(^uint64(0))
	if d.acked.Load() != d.Features() {
		t.Fatal("Ack kept bits that were not offered")
	}
	tests := []struct {
		name string
		off  uint64
		n    int
		want []byte
	}{
		{"mac", 0, 6, testMAC},
		{"status link up", 6, 2, []byte{1, 0}},
		{"queue pairs", 8, 2, []byte{1, 0}},
		{"mtu", 10, 2, []byte{0xaa, 0x05}},
		{"mac tail and status", 4, 4, []byte{0, 0x42, 1, 0}},
		{"past the end", 12, 4, []byte{0, 0, 0, 0}},
		{"far past the end", 1 << 40, 4, []byte{0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := bytes.Repeat([]byte{0xee}, tt.n)
			d.ReadConfig(tt.off, p)
			if !bytes.Equal(p, tt.want) {
				t.Fatalf("ReadConfig(%d) = %x, want %x", tt.off, p, tt.want)
			}
		})
	}
	d.WriteConfig(0, []byte{1, 2, 3, 4, 5, 6})
	p := make([]byte, 6)
	d.ReadConfig(0, p)
	if !bytes.Equal(p, testMAC) || d.metrics.ConfigWrites.Load() != 1 {
		t.Fatalf("config write changed the MAC to %x", p)
	}
	for _, bad := range []struct {
		name string
		cfg  Config
	}{
		{"short MAC", Config{MAC: testMAC[:5], Port: newMemPort()}},
		{"no port", Config{MAC: testMAC}},
		{"MTU below 68", Config{MAC: testMAC, MTU: 10, Port: newMemPort()}},
		// A split virtqueue's size is a power of two (virtio 1.x §2.7):
		// Linux refuses to set up a queue whose QueueNumMax is not one.
		{"queue size not a power of two", Config{MAC: testMAC, Port: newMemPort(), QueueSize: 100}},
		{"queue size 2^16-1", Config{MAC: testMAC, Port: newMemPort(), QueueSize: 0xffff}},
	} {
		if _, err := New(bad.cfg); err == nil {
			t.Fatalf("%s: New(%+v) accepted", bad.name, bad.cfg)
		}
	}
}

func TestLinkStatus(t *testing.T) {
	h := newHarness(t, Config{Port: newMemPort()}, true)
	h.dev.SetLink(false)
	p := make([]byte, 2)
	h.dev.ReadConfig(6, p)
	if p[0] != 0 || h.irq.config.Load() != 1 {
		t.Fatalf("link down: status %x, config interrupts %d", p, h.irq.config.Load())
	}
	h.dev.SetLink(false)
	h.dev.SetLink(true)
	h.dev.ReadConfig(6, p)
	if p[0] != 1 || h.irq.config.Load() != 2 {
		t.Fatalf("link up: status %x, config interrupts %d", p, h.irq.config.Load())
	}
}

// counter picks one metric.
type counter func(*Metrics) *atomic.Uint64

func TestTransmit(t *testing.T) {
	hdr := func(frame []byte, h0, h1 byte) []byte {
		b := make([]byte, HeaderLen+len(frame))
		b[0], b[1] = h0, h1
		copy(b[HeaderLen:], frame)
		return b
	}
	// add writes bufs (each a byte slice, device-readable) as one chain.
	add := func(h *harness, indirect bool, parts ...[]byte) {
		var bufs []queuetest.Buf
		for _, p := range parts {
			a, err := h.tx.Alloc(uint64(len(p)))
			if err != nil {
				t.Fatal(err)
			}
			h.mem.Write(a, p)
			bufs = append(bufs, queuetest.Buf{Addr: a, Len: uint32(len(p))})
		}
		var err error
		if indirect {
			_, err = h.tx.AddIndirect(bufs...)
		} else {
			_, err = h.tx.Add(bufs...)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name  string
		build func(h *harness)
		want  []byte  // frame the port must see, nil for a drop
		drop  counter // the drop counter that must count it
	}{
		{name: "one buffer", build: func(h *harness) { add(h, false, hdr(ethFrame(64, 0), 0, 0)) }, want: ethFrame(64, 0)},
		{name: "header and frame apart", build: func(h *harness) { add(h, false, make([]byte, HeaderLen), ethFrame(100, 0)) }, want: ethFrame(100, 0)},
		{name: "many pieces", build: func(h *harness) {
			b := hdr(ethFrame(300, 0), 0, 0)
			add(h, false, b[:5], b[5:20], b[20:21], b[21:])
		}, want: ethFrame(300, 0)},
		{name: "indirect", build: func(h *harness) { add(h, true, make([]byte, HeaderLen), ethFrame(200, 0)) }, want: ethFrame(200, 0)},
		{name: "largest untagged", build: func(h *harness) { add(h, false, hdr(ethFrame(1514, 0), 0, 0)) }, want: ethFrame(1514, 0)},
		{name: "largest tagged", build: func(h *harness) { add(h, false, hdr(ethFrame(1518, 10), 0, 0)) }, want: ethFrame(1518, 10)},
		{name: "untagged over MTU", build: func(h *harness) { add(h, false, hdr(ethFrame(1515, 0), 0, 0)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropTooBig }},
		{name: "tagged over MTU", build: func(h *harness) { add(h, false, hdr(ethFrame(1519, 10), 0, 0)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropTooBig }},
		{name: "64 KiB", build: func(h *harness) { add(h, false, hdr(ethFrame(65536, 0), 0, 0)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropTooBig }},
		{name: "runt", build: func(h *harness) { add(h, false, hdr(ethFrame(13, 0), 0, 0)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropRunt }},
		{name: "header only", build: func(h *harness) { add(h, false, make([]byte, HeaderLen)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropRunt }},
		{name: "short header", build: func(h *harness) { add(h, false, make([]byte, 8)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropRunt }},
		{name: "checksum offload", build: func(h *harness) { add(h, false, hdr(ethFrame(64, 0), 1, 0)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropOffload }},
		{name: "segmentation offload", build: func(h *harness) { add(h, false, hdr(ethFrame(64, 0), 0, 1)) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropOffload }},
		{name: "address outside memory", build: func(h *harness) {
			h.tx.Add(queuetest.Buf{Addr: 0x7000_0000, Len: 100})
		}, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropBadChain }},
		{name: "address wraps", build: func(h *harness) {
			h.tx.Add(queuetest.Buf{Addr: ^memory.GuestAddr(0) - 10, Len: 100})
		}, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropBadChain }},
		{name: "length past region", build: func(h *harness) {
			h.tx.Add(queuetest.Buf{Addr: txBase + region - 50, Len: 100})
		}, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropBadChain }},
		{name: "device-writable buffer", build: func(h *harness) {
			a, _ := h.tx.Alloc(100)
			h.tx.Add(queuetest.Buf{Addr: a, Len: 100, Write: true})
		}, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropBadChain }},
		{name: "descriptor loop", build: func(h *harness) {
			a, _ := h.tx.Alloc(64)
			h.tx.SetDesc(7, a, 64, queue.DescFNext, 7)
			h.tx.Publish(7)
		}, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropBadChain }},
		{name: "head out of range", build: func(h *harness) { h.tx.Publish(999) }, drop: func(m *Metrics) *atomic.Uint64 { return &m.TxDropBadChain }},
	}
	for _, tt := range tests {
		for _, eventIdx := range []bool{true, false} {
			name := tt.name
			if !eventIdx {
				name += "/no event idx"
			}
			t.Run(name, func(t *testing.T) {
				port := newMemPort()
				h := newHarness(t, Config{Port: port}, eventIdx)
				tt.build(h)
				h.dev.Notify(TxQueue)
				marker := ethFrame(61, 0)
				h.send(marker)
				eventually(t, "marker frame sent and counted", func() bool {
					w := port.written()
					return len(w) > 0 && bytes.Equal(w[len(w)-1], marker) && h.dev.Metrics().TxFrames.Load() == uint64(len(w))
				})
				w := port.written()
				if tt.want != nil {
					if len(w) != 2 || !bytes.Equal(w[0], tt.want) {
						t.Fatalf("port got %d frames, first %d bytes; want %d bytes", len(w), len(w[0]), len(tt.want))
					}
					if s := h.dev.Metrics().Snapshot(); s.TxFrames != 2 || s.TxBytes != uint64(len(tt.want)+len(marker)) {
						t.Fatalf("metrics %+v", s)
					}
				} else {
					if len(w) != 1 {
						t.Fatalf("port got %d frames, want only the marker", len(w))
					}
					if got := tt.drop(h.dev.Metrics()).Load(); got != 1 {
						t.Fatalf("drop counter = %d, want 1 (%+v)", got, h.dev.Metrics().Snapshot())
					}
				}
				if h.irq.resets.Load() != 0 {
					t.Fatal("device asked for a reset")
				}
			})
		}
	}
}

func TestReceive(t *testing.T) {
	type rxCase struct {
		name    string
		post    func(h *harness) (head uint16, bufs []queuetest.Buf)
		frame   []byte
		wantLen uint32  // used length; 0 with drop set means completed empty
		drop    counter // nil: delivered
		kept    bool    // the chain stays available (no used element)
	}
	post := func(h *harness, indirect bool, sizes ...uint32) (uint16, []queuetest.Buf) {
		var bufs []queuetest.Buf
		for _, n := range sizes {
			a, err := h.rx.Alloc(uint64(n))
			if err != nil {
				t.Fatal(err)
			}
			bufs = append(bufs, queuetest.Buf{Addr: a, Len: n, Write: true})
		}
		add := h.rx.Add
		if indirect {
			add = h.rx.AddIndirect
		}
		head, err := add(bufs...)
		if err != nil {
			t.Fatal(err)
		}
		return head, bufs
	}
	tests := []rxCase{
		{name: "one buffer", post: func(h *harness) (uint16, []queuetest.Buf) { return post(h, false, 2048) }, frame: ethFrame(60, 0), wantLen: 72},
		{name: "exact fit", post: func(h *harness) (uint16, []queuetest.Buf) { return post(h, false, 72) }, frame: ethFrame(60, 0), wantLen: 72},
		{name: "spread over buffers", post: func(h *harness) (uint16, []queuetest.Buf) { return post(h, false, 5, 0, 20, 1, 100) }, frame: ethFrame(100, 0), wantLen: 112},
		{name: "indirect", post: func(h *harness) (uint16, []queuetest.Buf) { return post(h, true, 12, 1514) }, frame: ethFrame(1514, 0), wantLen: 1526},
		{name: "largest tagged", post: func(h *harness) (uint16, []queuetest.Buf) { return post(h, false, 1530) }, frame: ethFrame(1518, 20), wantLen: 1530},
		{name: "buffer too small", post: func(h *harness) (uint16, []queuetest.Buf) { return post(h, false, 50) }, frame: ethFrame(100, 0),
			drop: func(m *Metrics) *atomic.Uint64 { return &m.RxDropSmallBuffer }, kept: true},
		{name: "frame over MTU", post: func(h *harness) (uint16, []queuetest.Buf) { return post(h, false, 4096) }, frame: ethFrame(1600, 0),
			drop: func(m *Metrics) *atomic.Uint64 { return &m.RxDropTooBig }, kept: true},
		{name: "read-only buffer", post: func(h *harness) (uint16, []queuetest.Buf) {
			a, _ := h.rx.Alloc(2048)
			head, _ := h.rx.Add(queuetest.Buf{Addr: a, Len: 2048})
			return head, nil
		}, frame: ethFrame(60, 0), drop: func(m *Metrics) *atomic.Uint64 { return &m.RxDropBadChain }},
		{name: "address outside memory", post: func(h *harness) (uint16, []queuetest.Buf) {
			head, _ := h.rx.Add(queuetest.Buf{Addr: 0x7000_0000, Len: 2048, Write: true})
			return head, nil
		}, frame: ethFrame(60, 0), drop: func(m *Metrics) *atomic.Uint64 { return &m.RxDropBadChain }},
		{name: "second buffer outside memory", post: func(h *harness) (uint16, []queuetest.Buf) {
			a, _ := h.rx.Alloc(20)
			head, _ := h.rx.Add(queuetest.Buf{Addr: a, Len: 20, Write: true}, queuetest.Buf{Addr: rxBase + region - 10, Len: 2048, Write: true})
			return head, nil
		}, frame: ethFrame(60, 0), drop: func(m *Metrics) *atomic.Uint64 { return &m.RxDropBadChain }},
		{name: "descriptor loop", post: func(h *harness) (uint16, []queuetest.Buf) {
			a, _ := h.rx.Alloc(4)
			h.rx.SetDesc(3, a, 4, queue.DescFNext|queue.DescFWrite, 3)
			h.rx.Publish(3)
			return 3, nil
		}, frame: ethFrame(60, 0), drop: func(m *Metrics) *atomic.Uint64 { return &m.RxDropBadChain }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			port := newMemPort()
			h := newHarness(t, Config{Port: port}, true)
			head, bufs := tt.post(h)
			h.dev.Notify(RxQueue)
			port.in <- tt.frame
			if tt.drop == nil {
				id, n := h.used(h.rx, "frame delivered")
				if id != uint32(head) || n != tt.wantLen {
					t.Fatalf("used (%d, %d), want (%d, %d)", id, n, head, tt.wantLen)
				}
				var got []byte
				for _, b := range bufs {
					p := make([]byte, b.Len)
					h.mem.Read(b.Addr, p)
					got = append(got, p...)
				}
				want := append([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0}, tt.frame...)
				if !bytes.Equal(got[:len(want)], want) {
					t.Fatalf("guest buffer %x, want %x", got[:len(want)], want)
				}
				eventually(t, "frame counted and interrupt raised", func() bool {
					return h.dev.Metrics().RxFrames.Load() == 1 && h.irq.used.Load() > 0
				})
				if s := h.dev.Metrics().Snapshot(); s.RxBytes != uint64(len(tt.frame)) {
					t.Fatalf("metrics %+v", s)
				}
				return
			}
			eventually(t, "frame dropped", func() bool { return tt.drop(h.dev.Metrics()).Load() == 1 })
			if tt.kept {
				// The chain is still there: a small frame fills it.
				small := ethFrame(20, 0)
				port.in <- small
				id, n := h.used(h.rx, "small frame into the kept chain")
				if id != uint32(head) || n != uint32(HeaderLen+len(small)) {
					t.Fatalf("used (%d, %d), want (%d, %d)", id, n, head, HeaderLen+len(small))
				}
				return
			}
			id, n := h.used(h.rx, "bad chain completed")
			if id != uint32(head) || n != 0 {
				t.Fatalf("used (%d, %d), want (%d, 0)", id, n, head)
			}
			// The device goes on: a good buffer gets the next frame.
			good, _ := post(h, false, 2048)
			h.dev.Notify(RxQueue)
			port.in <- ethFrame(60, 0)
			if id, _ := h.used(h.rx, "next frame"); id != uint32(good) {
				t.Fatalf("next frame went to %d, want %d", id, good)
			}
		})
	}
}

func TestBrokenAvailIndex(t *testing.T) {
	tests := []struct {
		name string
		drv  func(h *harness) *queuetest.Driver
		q    uint16
	}{
		{"transmit", func(h *harness) *queuetest.Driver { return h.tx }, TxQueue},
		{"receive", func(h *harness) *queuetest.Driver { return h.rx }, RxQueue},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, Config{Port: newMemPort()}, true)
			tt.drv(h).SetAvailIdx(1000)
			h.dev.Notify(tt.q)
			eventually(t, "reset requested", func() bool { return h.irq.resets.Load() == 1 })
			if h.dev.Metrics().QueueErrors.Load() != 1 {
				t.Fatalf("queue errors %d", h.dev.Metrics().QueueErrors.Load())
			}
			h.dev.Reset() // the driver's answer; must not hang
		})
	}
}

// TestResetStopsGuestAccess: after Reset returns, a frame arriving from the
// port is not written into the old queue's buffers; a new activation gets
// the next one.
func TestResetStopsGuestAccess(t *testing.T) {
	port := newMemPort()
	h := newHarness(t, Config{Port: port}, true)
	_, a := h.postRx(2048)
	h.dev.Notify(RxQueue)
	// Make sure the receive goroutine sits in Port.Read with the buffer seen.
	port.in <- ethFrame(60, 0)
	h.used(h.rx, "first frame")
	h.postRx(2048)
	h.dev.Notify(RxQueue)
	eventually(t, "device waits in Port.Read", func() bool { return port.reads.Load() == 2 })
	h.dev.Reset()
	h.mem.Zero(rxBase, region)
	port.in <- ethFrame(60, 0)
	eventually(t, "frame after reset dropped", func() bool { return h.dev.Metrics().RxDropInactive.Load() == 1 })
	raw, _ := h.mem.Slice(rxBase, region)
	if !bytes.Equal(raw, make([]byte, region)) {
		t.Fatal("device wrote guest memory after Reset")
	}
	_ = a
	// Activate again on fresh rings.
	rx, _ := queuetest.New(h.mem, rxBase, 256)
	tx, _ := queuetest.New(h.mem, txBase, 256)
	rx.EventIdx, tx.EventIdx = true, true
	rxq, _ := queue.New(h.mem, 256, rx.Config())
	txq, _ := queue.New(h.mem, 256, tx.Config())
	if err := h.dev.Activate(h.mem, h.irq, []*queue.Queue{rxq, txq}); err != nil {
		t.Fatal(err)
	}
	h.rx, h.tx = rx, tx
	head, _ := h.postRx(2048)
	port.in <- ethFrame(80, 0)
	if id, n := h.used(h.rx, "frame after re-activation"); id != uint32(head) || n != 92 {
		t.Fatalf("used (%d, %d)", id, n)
	}
	if err := h.dev.Activate(h.mem, h.irq, []*queue.Queue{rxq, nil}); err == nil {
		t.Fatal("Activate without a transmit queue succeeded")
	}
}

func TestCheckTx(t *testing.T) {
	hdr := make([]byte, HeaderLen)
	tests := []struct {
		name string
		buf  []byte
		mtu  int
		err  error
	}{
		{"ok", append(hdr, ethFrame(100, 0)...), 1500, nil},
		{"small mtu", append(hdr, ethFrame(100, 0)...), 68, errTooBig},
		{"tagged at small mtu", append(hdr, ethFrame(86, 5)...), 68, nil},
		{"short", hdr[:11], 1500, errShortHdr},
		{"runt", append(hdr, 1, 2, 3), 1500, errRunt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := checkTx(tt.buf, tt.mtu); err != tt.err {
				t.Fatalf("checkTx = %v, want %v", err, tt.err)
			}
		})
	}
	var b [HeaderLen]byte
	rxHeader(b[:])
	if binary.LittleEndian.Uint16(b[10:]) != 1 {
		t.Fatal("num_buffers is not 1")
	}
}
