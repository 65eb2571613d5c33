package mmio

import (
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// fakeDev is a virtio device that records what the transport asks of it.
type fakeDev struct {
	features    uint64
	acked       uint64
	config      []byte
	activated   []*queue.Queue
	activateErr error
	resets      int
	notified    atomic.Int32
	lastNotify  atomic.Int32
	irq         virtio.Interrupt
}

func (d *fakeDev) Type() virtio.DeviceType { return virtio.TypeBlock }
func (d *fakeDev) Features() uint64        { return d.features }
func (d *fakeDev) Ack(f uint64)            { d.acked = f & d.features }
func (d *fakeDev) QueueSizes() []uint16    { return []uint16{256, 64} }
func (d *fakeDev) ReadConfig(off uint64, p []byte) {
	clear(p)
	if off < uint64(len(d.config)) {
		copy(p, d.config[off:])
	}
}
func (d *fakeDev) WriteConfig(off uint64, p []byte) {
	if off < uint64(len(d.config)) {
		copy(d.config[off:], p)
	}
}
func (d *fakeDev) Activate(mem *memory.Memory, irq virtio.Interrupt, qs []*queue.Queue) error {
	if d.activateErr != nil {
		return d.activateErr
	}
	d.activated, d.irq = qs, irq
	return nil
}
func (d *fakeDev) Notify(q uint16) { d.notified.Add(1); d.lastNotify.Store(int32(q)) }
func (d *fakeDev) Reset()          { d.resets++; d.activated = nil; d.acked = 0 }

type countIRQ struct{ n atomic.Int32 }

func (c *countIRQ) Raise() error { c.n.Add(1); return nil }

const offered = virtio.FeatureVersion1 | virtio.FeatureRingEventIdx | 1<<9

type rig struct {
	t   *testing.T
	tr  *Transport
	dev *fakeDev
	irq *countIRQ
	mem *memory.Memory
}

func newRig(t *testing.T) *rig {
	mem := memory.FromBytes(0, make([]byte, 1<<20))
	dev := &fakeDev{features: offered, config: []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}}
	irq := &countIRQ{}
	return &rig{t: t, tr: New(dev, mem, irq, nil), dev: dev, irq: irq, mem: mem}
}

func (r *rig) rd(off uint64) uint32 {
	var b [4]byte
	r.tr.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

func (r *rig) wr(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	r.tr.Write(off, b[:])
}

// negotiate runs the driver init sequence up to FEATURES_OK and reports
// whether the device accepted the features.
func (r *rig) negotiate(features uint64) bool {
	r.wr(RegStatus, 0)
	r.wr(RegStatus, 1)
	r.wr(RegStatus, 3)
	r.wr(RegDriverFeaturesSel, 0)
	r.wr(RegDriverFeatures, uint32(features))
	r.wr(RegDriverFeaturesSel, 1)
	r.wr(RegDriverFeatures, uint32(features>>32))
	r.wr(RegStatus, 3|8)
	return r.rd(RegStatus)&8 != 0
}

func (r *rig) setupQueue(sel uint32, cfg queue.Config) {
	r.wr(RegQueueSel, sel)
	r.wr(RegQueueNum, uint32(cfg.Size))
	r.wr(RegQueueDescLow, uint32(cfg.Desc))
	r.wr(RegQueueDescHigh, uint32(cfg.Desc>>32))
	r.wr(RegQueueDriverLow, uint32(cfg.Avail))
	r.wr(RegQueueDriverHigh, uint32(cfg.Avail>>32))
	r.wr(RegQueueDeviceLow, uint32(cfg.Used))
	r.wr(RegQueueDeviceHigh, uint32(cfg.Used>>32))
	r.wr(RegQueueReady, 1)
}

func TestIdentity(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name string
		off  uint64
		want uint32
	}{
		{"magic", RegMagicValue, 0x74726976},
		{"version", RegVersion, 2},
		{"device id", RegDeviceID, 2},
		{"vendor", RegVendorID, VendorID},
		{"queue num max 0", RegQueueNumMax, 256},
		{"status after reset", RegStatus, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := r.rd(tc.off); got != tc.want {
				t.Fatalf("read %#x = %#x, want %#x", tc.off, got, tc.want)
			}
		})
	}
	r.wr(RegDeviceFeaturesSel, 1)
	if got := r.rd(RegDeviceFeatures); uint64(got) != offered>>32 {
		t.Fatalf("features high = %#x", got)
	}
	r.wr(RegDeviceFeaturesSel, 0)
	if got := r.rd(RegDeviceFeatures); uint64(got) != offered&0xffffffff {
		t.Fatalf("features low = %#x", got)
	}
	r.wr(RegDeviceFeaturesSel, 2)
	if got := r.rd(RegDeviceFeatures); got != 0 {
		t.Fatalf("features word 2 = %#x", got)
	}
	r.wr(RegQueueSel, 1)
	if got := r.rd(RegQueueNumMax); got != 64 {
		t.Fatalf("queue 1 num max = %d", got)
	}
	r.wr(RegQueueSel, 2)
	if got := r.rd(RegQueueNumMax); got != 0 {
		t.Fatalf("nonexistent queue num max = %d", got)
	}
}

// TestDriverInit runs a Linux-style initialisation to DRIVER_OK, then a
// notification, an interrupt and its acknowledgement, then a reset.
func TestDriverInit(t *testing.T) {
	r := newRig(t)
	drv, err := queuetest.New(r.mem, 0x10000, 128)
	if err != nil {
		t.Fatal(err)
	}
	// Bit 40 was never offered: the device must not see it.
	if !r.negotiate(offered | 1<<40) {
		t.Fatal("FEATURES_OK refused with VERSION_1 accepted")
	}
	if r.dev.acked != offered {
		t.Fatalf("device acked %#x, want %#x (only offered bits)", r.dev.acked, offered)
	}
	r.setupQueue(0, drv.Config())
	if r.rd(RegQueueReady) != 1 {
		t.Fatal("queue 0 not ready")
	}
	r.wr(RegStatus, 0xf)
	if got := r.rd(RegStatus); got != 0xf {
		t.Fatalf("status %#x after DRIVER_OK, want 0xf", got)
	}
	if len(r.dev.activated) != 2 || r.dev.activated[0] == nil || r.dev.activated[1] != nil {
		t.Fatalf("activated with %v, want [queue, nil]", r.dev.activated)
	}
	if r.dev.activated[0].Size() != 128 {
		t.Fatalf("queue size %d", r.dev.activated[0].Size())
	}
	// Queue registers are frozen after DRIVER_OK.
	r.wr(RegQueueNum, 16)
	if r.dev.activated[0].Size() != 128 || r.tr.Stats().Ignored == 0 {
		t.Fatal("queue write after DRIVER_OK was not ignored")
	}

	r.wr(RegQueueNotify, 0)
	r.tr.QueueNotify(0)
	if r.dev.notified.Load() != 2 {
		t.Fatalf("device saw %d notifications, want 2", r.dev.notified.Load())
	}
	r.tr.QueueNotify(7) // no such queue
	if r.dev.notified.Load() != 2 || r.tr.Stats().BadNotify != 1 {
		t.Fatal("notification for a nonexistent queue reached the device")
	}

	if err := r.dev.irq.Trigger(virtio.InterruptUsedRing, 0); err != nil {
		t.Fatal(err)
	}
	if r.rd(RegInterruptStatus) != 1 || r.irq.n.Load() != 1 {
		t.Fatalf("interrupt status %d, irq raised %d times", r.rd(RegInterruptStatus), r.irq.n.Load())
	}
	gen := r.rd(RegConfigGeneration)
	_ = r.dev.irq.Trigger(virtio.InterruptConfigChange, 0)
	if r.rd(RegInterruptStatus) != 3 || r.rd(RegConfigGeneration) == gen {
		t.Fatal("config change did not set bit 1 and bump ConfigGeneration")
	}
	r.wr(RegInterruptACK, 1)
	if r.rd(RegInterruptStatus) != 2 {
		t.Fatalf("interrupt status %d after ACK of bit 0", r.rd(RegInterruptStatus))
	}

	r.wr(RegStatus, 0)
	if r.dev.resets == 0 || r.rd(RegStatus) != 0 || r.rd(RegInterruptStatus) != 0 || r.rd(RegQueueReady) != 0 {
		t.Fatal("reset did not reset the device, status, interrupt status and queues")
	}
	r.tr.QueueNotify(0)
	if r.dev.notified.Load() != 2 {
		t.Fatal("notification after reset reached the device")
	}
}

func TestStatusMachine(t *testing.T) {
	tests := []struct {
		name   string
		writes []uint32
		want   uint32
	}{
		{"driver ok from reset", []uint32{0xf}, 0},
		{"skip acknowledge", []uint32{2}, 0},
		{"features ok before driver", []uint32{1, 9}, 1},
		{"driver ok before features ok", []uint32{1, 3, 7}, 3},
		{"failed at any time", []uint32{1, 3, 0x83}, 0x83},
		{"clearing a bit", []uint32{1, 3, 1}, 3},
		{"repeat is harmless", []uint32{1, 1, 3, 3}, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			for _, v := range tc.writes {
				r.wr(RegStatus, v)
			}
			if got := r.rd(RegStatus); got != tc.want {
				t.Fatalf("status %#x after %v, want %#x", got, tc.writes, tc.want)
			}
			if len(r.dev.activated) != 0 {
				t.Fatal("device activated")
			}
		})
	}
}

func TestFeaturesOKNeedsVersion1(t *testing.T) {
	r := newRig(t)
	if r.negotiate(virtio.FeatureRingEventIdx) {
		t.Fatal("FEATURES_OK accepted without VIRTIO_F_VERSION_1")
	}
	if r.tr.Stats().BadStatus != 1 || r.dev.acked != 0 {
		t.Fatalf("refusal not counted (%+v) or features acked %#x", r.tr.Stats(), r.dev.acked)
	}
	// Feature writes are refused once FEATURES_OK is set.
	if !r.negotiate(virtio.FeatureVersion1) {
		t.Fatal("FEATURES_OK refused")
	}
	r.wr(RegDriverFeaturesSel, 0)
	r.wr(RegDriverFeatures, uint32(virtio.FeatureRingEventIdx))
	r.setupQueue(0, queue.Config{Size: 16, Desc: 0x1000, Avail: 0x2000, Used: 0x3000})
	r.wr(RegStatus, 0xf)
	if r.dev.acked != virtio.FeatureVersion1 || r.dev.activated == nil {
		t.Fatalf("acked %#x after a late feature write", r.dev.acked)
	}
}

func TestActivationFailure(t *testing.T) {
	tests := []struct {
		name string
		cfg  queue.Config
		err  error
	}{
		{"desc outside memory", queue.Config{Size: 16, Desc: 1 << 40, Avail: 0x2000, Used: 0x3000}, nil},
		{"size not power of two", queue.Config{Size: 17, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}, nil},
		{"size above max", queue.Config{Size: 512, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}, nil},
		{"used misaligned", queue.Config{Size: 16, Desc: 0x1000, Avail: 0x2000, Used: 0x3001}, nil},
		{"device refuses", queue.Config{Size: 16, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}, errors.New("no backend")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.dev.activateErr = tc.err
			r.negotiate(offered)
			r.setupQueue(0, tc.cfg)
			r.wr(RegStatus, 0xf)
			st := r.rd(RegStatus)
			if st&virtio.StatusDeviceNeedsReset == 0 || r.dev.activated != nil {
				t.Fatalf("status %#x, activated %v: want DEVICE_NEEDS_RESET and no activation", st, r.dev.activated)
			}
			if r.rd(RegInterruptStatus)&2 == 0 || r.irq.n.Load() == 0 {
				t.Fatal("no config change interrupt")
			}
			r.tr.QueueNotify(0)
			if r.dev.notified.Load() != 0 {
				t.Fatal("inactive device was notified")
			}
			r.wr(RegStatus, 0) // the driver resets and may try again
			if r.rd(RegStatus) != 0 {
				t.Fatal("reset did not clear DEVICE_NEEDS_RESET")
			}
		})
	}
}

func TestDeviceNeedsReset(t *testing.T) {
	r := newRig(t)
	r.negotiate(offered)
	r.setupQueue(0, queue.Config{Size: 16, Desc: 0x1000, Avail: 0x2000, Used: 0x3000})
	r.wr(RegStatus, 0xf)
	r.dev.irq.(virtio.NeedsResetter).NeedsReset()
	if r.rd(RegStatus) != 0x4f || r.rd(RegInterruptStatus) != 2 {
		t.Fatalf("status %#x isr %#x", r.rd(RegStatus), r.rd(RegInterruptStatus))
	}
	r.wr(RegStatus, 0x4f) // the driver echoing the status back changes nothing
	if r.rd(RegStatus) != 0x4f {
		t.Fatalf("status %#x", r.rd(RegStatus))
	}
}

func TestAccessWidths(t *testing.T) {
	r := newRig(t)
	r.wr(RegStatus, 1)
	tests := []struct {
		name  string
		off   uint64
		n     int
		write bool
	}{
		{"byte status write", RegStatus, 1, true},
		{"halfword status write", RegStatus, 2, true},
		{"quad status write", RegStatus, 8, true},
		{"unaligned write", RegStatus + 1, 4, true},
		{"byte magic read", RegMagicValue, 1, false},
		{"quad magic read", RegMagicValue, 8, false},
		{"unaligned read", RegMagicValue + 2, 4, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := r.tr.Stats().BadWidth
			b := make([]byte, tc.n)
			for i := range b {
				b[i] = 0xff
			}
			if tc.write {
				r.tr.Write(tc.off, b)
				if r.rd(RegStatus) != 1 {
					t.Fatalf("status changed to %#x", r.rd(RegStatus))
				}
			} else {
				r.tr.Read(tc.off, b)
				for _, x := range b {
					if x != 0 {
						t.Fatalf("read returned %x, want zeroes", b)
					}
				}
			}
			if r.tr.Stats().BadWidth != before+1 {
				t.Fatal("access not counted")
			}
		})
	}
}

func TestConfigSpace(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name string
		off  uint64
		n    int
		want []byte
	}{
		{"byte", 0, 1, []byte{1}},
		{"halfword", 2, 2, []byte{3, 4}},
		{"word", 4, 4, []byte{5, 6, 7, 8}},
		{"quad", 0, 8, []byte{1, 2, 3, 4, 5, 6, 7, 8}},
		{"past end", 8, 4, []byte{9, 10, 0, 0}},
		{"far past end", 0xe00, 4, []byte{0, 0, 0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := make([]byte, tc.n)
			r.tr.Read(RegConfig+tc.off, b)
			if string(b) != string(tc.want) {
				t.Fatalf("config[%d:+%d] = %v, want %v", tc.off, tc.n, b, tc.want)
			}
		})
	}
	r.tr.Write(RegConfig, []byte{0xaa})
	if r.dev.config[0] != 1 {
		t.Fatal("config write accepted before DRIVER")
	}
	r.wr(RegStatus, 1)
	r.wr(RegStatus, 3)
	r.tr.Write(RegConfig, []byte{0xaa})
	if r.dev.config[0] != 0xaa {
		t.Fatal("config write refused after DRIVER")
	}
}

func TestCmdlineArg(t *testing.T) {
	for _, tc := range []struct {
		name string
		base uint64
		size uint64
		irq  uint32
		want string
	}{
		{"firecracker style", 0xd0000000, Size, 5, "virtio_mmio.device=4K@0xd0000000:5"},
		{"megabyte", 0xd0001000, 1 << 20, 6, "virtio_mmio.device=1M@0xd0001000:6"},
		{"odd size", 0x1000, 0x200, 12, "virtio_mmio.device=512@0x1000:12"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := CmdlineArg(tc.base, tc.size, tc.irq); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}

type levelIRQ struct{ up, raises, lowers int }

func (l *levelIRQ) Raise() error { l.up, l.raises = 1, l.raises+1; return nil }
func (l *levelIRQ) Lower() error { l.up, l.lowers = 0, l.lowers+1; return nil }

// TestLevelIRQ: a level-triggered line stays up until the driver has
// acknowledged every pending bit.
func TestLevelIRQ(t *testing.T) {
	r := newRig(t)
	irq := &levelIRQ{}
	r.tr = New(r.dev, r.mem, irq, nil)
	_ = r.tr.Trigger(virtio.InterruptUsedRing, 0)
	_ = r.tr.Trigger(virtio.InterruptConfigChange, 0)
	r.wr(RegInterruptACK, 1)
	if irq.up != 1 {
		t.Fatal("line lowered while the config-change bit is pending")
	}
	r.wr(RegInterruptACK, 2)
	if irq.up != 0 || r.rd(RegInterruptStatus) != 0 {
		t.Fatalf("line %d, status %d after acknowledging everything", irq.up, r.rd(RegInterruptStatus))
	}
	_ = r.tr.Trigger(virtio.InterruptUsedRing, 0)
	r.wr(RegStatus, 0)
	if irq.up != 0 {
		t.Fatal("reset left the line up")
	}
}
