// Package mmio is the virtio-mmio version 2 transport (virtio 1.x §4.2):
// the register window a guest driver uses to discover a virtio device,
// negotiate features, set up queues and drive the device status state
// machine, plus the interrupt status the device raises interrupts through.
//
// A Transport is an MMIO bus device: the VMM registers it at a base
// address (Size bytes) and calls Read and Write with offsets relative to
// that base from vCPU threads. Neither blocks on device I/O. Queue
// notifications arrive either as writes to QueueNotify or, when the VMM
// wires an ioeventfd to base+NotifyOffset, through the QueueNotify method
// from the ioeventfd reader goroutine. Interrupts go out through an IRQ the
// VMM provides (KVM irqfd or KVM_IRQ_LINE) after InterruptStatus is set.
package mmio

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Size is the size of one device's register window (and the size in the
// kernel command line entry).
const Size = 0x1000

// Register offsets (virtio 1.x §4.2.2).
const (
	RegMagicValue        = 0x000
	RegVersion           = 0x004
	RegDeviceID          = 0x008
	RegVendorID          = 0x00c
	RegDeviceFeatures    = 0x010
	RegDeviceFeaturesSel = 0x014
	RegDriverFeatures    = 0x020
	RegDriverFeaturesSel = 0x024
	RegQueueSel          = 0x030
	RegQueueNumMax       = 0x034
	RegQueueNum          = 0x038
	RegQueueReady        = 0x044
	RegQueueNotify       = 0x050
	RegInterruptStatus   = 0x060
	RegInterruptACK      = 0x064
	RegStatus            = 0x070
	RegQueueDescLow      = 0x080
	RegQueueDescHigh     = 0x084
	RegQueueDriverLow    = 0x090
	RegQueueDriverHigh   = 0x094
	RegQueueDeviceLow    = 0x0a0
	RegQueueDeviceHigh   = 0x0a4
	RegConfigGeneration  = 0x0fc
	RegConfig            = 0x100
)

// NotifyOffset is where the VMM may attach an ioeventfd (4-byte writes;
// the value written is the queue index).
const NotifyOffset = RegQueueNotify

// Identity values.
const (
	MagicValue = 0x74726976 // "virt"
	Version    = 2
	VendorID   = 0x4d565952 // "RYVM"
)

// IRQ is the interrupt line the VMM gives a transport: Raise pulses (irqfd)
// or asserts it. It is called from device goroutines and must not block on
// the guest.
type IRQ interface {
	Raise() error
}

// LevelIRQ is an IRQ with a level (KVM_IRQ_LINE on a level-triggered
// pin): the transport lowers it when the driver has acknowledged every
// InterruptStatus bit, and on reset. An edge/pulse irqfd needs only IRQ.
type LevelIRQ interface {
	IRQ
	Lower() error
}

// Stats counts what the transport refused; a guest can trigger all of it.
type Stats struct {
	BadWidth      uint64 `json:"bad_width"`      // register access not 32 bits wide and aligned
	Ignored       uint64 `json:"ignored"`        // writes not allowed in the current status, unknown registers
	BadStatus     uint64 `json:"bad_status"`     // invalid status transitions and refused FEATURES_OK
	ActivateFails uint64 `json:"activate_fails"` // DRIVER_OK that ended in DEVICE_NEEDS_RESET
	BadNotify     uint64 `json:"bad_notify"`     // notifications for an inactive device or a bad queue
	IRQErrors     uint64 `json:"irq_errors"`     // IRQ.Raise failures
}

type queueRegs struct {
	max               uint16
	num               uint32
	ready             bool
	desc, avail, used uint64
}

// Transport is one virtio-mmio device window.
type Transport struct {
	dev virtio.Device
	mem *memory.Memory
	irq IRQ
	log *slog.Logger

	mu             sync.Mutex // serialises register accesses
	status         uint32
	devFeaturesSel uint32
	drvFeaturesSel uint32
	driverFeatures uint64
	queueSel       uint32
	queues         []queueRegs
	numQueues      uint32 // len(dev.QueueSizes()), fixed

	active     atomic.Bool   // the device is activated (DRIVER_OK accepted)
	needsReset atomic.Bool   // DEVICE_NEEDS_RESET
	isr        atomic.Uint32 // InterruptStatus
	configGen  atomic.Uint32

	badWidth, ignored, badStatus, activateFails, badNotify, irqErrors atomic.Uint64
}

// New builds the transport for dev over guest memory mem, interrupting
// through irq. Logs (rate-limited) go to log, which may be nil.
func New(dev virtio.Device, mem *memory.Memory, irq IRQ, log *slog.Logger) *Transport {
	t := &Transport{dev: dev, mem: mem, irq: irq, numQueues: uint32(len(dev.QueueSizes())),
		log: virtio.RateLimited(log, time.Second, 10).With("device", dev.Type().String())}
	t.resetRegs()
	return t
}

func (t *Transport) resetRegs() {
	t.status, t.devFeaturesSel, t.drvFeaturesSel, t.driverFeatures, t.queueSel = 0, 0, 0, 0, 0
	sizes := t.dev.QueueSizes()
	t.queues = make([]queueRegs, len(sizes))
	for i, s := range sizes {
		t.queues[i].max = s
	}
	t.isr.Store(0)
	t.needsReset.Store(false)
}

// Stats returns the transport's counters.
func (t *Transport) Stats() Stats {
	return Stats{
		BadWidth: t.badWidth.Load(), Ignored: t.ignored.Load(), BadStatus: t.badStatus.Load(),
		ActivateFails: t.activateFails.Load(), BadNotify: t.badNotify.Load(), IRQErrors: t.irqErrors.Load(),
	}
}

// Device is the device behind the transport.
func (t *Transport) Device() virtio.Device { return t.dev }

// Read handles a guest read at offset from the window's base.
func (t *Transport) Read(offset uint64, data []byte) {
	if offset >= RegConfig {
		t.dev.ReadConfig(offset-RegConfig, data)
		return
	}
	clear(data)
	if len(data) != 4 || offset%4 != 0 {
		t.badWidth.Add(1)
		t.log.Warn("virtio-mmio: register read is not 32-bit", "offset", offset, "len", len(data))
		return
	}
	t.mu.Lock()
	v := t.readReg(offset)
	t.mu.Unlock()
	binary.LittleEndian.PutUint32(data, v)
}

func (t *Transport) selected() *queueRegs {
	if t.queueSel < uint32(len(t.queues)) {
		return &t.queues[t.queueSel]
	}
	return nil
}

func (t *Transport) readReg(offset uint64) uint32 {
	switch offset {
	case RegMagicValue:
		return MagicValue
	case RegVersion:
		return Version
	case RegDeviceID:
		return uint32(t.dev.Type())
	case RegVendorID:
		return VendorID
	case RegDeviceFeatures:
		if t.devFeaturesSel > 1 {
			return 0
		}
		return uint32(t.dev.Features() >> (32 * t.devFeaturesSel))
	case RegQueueNumMax:
		if q := t.selected(); q != nil {
			return uint32(q.max)
		}
		return 0
	case RegQueueReady:
		if q := t.selected(); q != nil && q.ready {
			return 1
		}
		return 0
	case RegInterruptStatus:
		return t.isr.Load()
	case RegStatus:
		s := t.status
		if t.needsReset.Load() {
			s |= virtio.StatusDeviceNeedsReset
		}
		return s
	case RegConfigGeneration:
		return t.configGen.Load()
	}
	t.ignored.Add(1)
	return 0
}

// Write handles a guest write at offset from the window's base.
func (t *Transport) Write(offset uint64, data []byte) {
	if offset >= RegConfig {
		t.mu.Lock()
		ok := t.status&virtio.StatusDriver != 0 && t.status&virtio.StatusFailed == 0
		t.mu.Unlock()
		if !ok {
			t.ignored.Add(1)
			return
		}
		t.dev.WriteConfig(offset-RegConfig, data)
		return
	}
	if len(data) != 4 || offset%4 != 0 {
		t.badWidth.Add(1)
		t.log.Warn("virtio-mmio: register write is not 32-bit", "offset", offset, "len", len(data))
		return
	}
	v := binary.LittleEndian.Uint32(data)
	if offset == RegQueueNotify {
		t.QueueNotify(v)
		return
	}
	if offset == RegInterruptACK {
		if t.isr.And(^v)&^v == 0 {
			t.lower()
		}
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.writeReg(offset, v)
}

// Driver-writable register groups are only writable in the status where
// the driver initialisation sequence (§3.1.1) uses them.
func (t *Transport) inStatus(set, clear uint32) bool {
	return t.status&set == set && t.status&clear == 0
}

func (t *Transport) writeReg(offset uint64, v uint32) {
	switch offset {
	case RegDeviceFeaturesSel:
		t.devFeaturesSel = v
		return
	case RegDriverFeaturesSel:
		t.drvFeaturesSel = v
		return
	case RegQueueSel:
		t.queueSel = v
		return
	case RegStatus:
		t.setStatus(v)
		return
	case RegDriverFeatures:
		if !t.inStatus(virtio.StatusDriver, virtio.StatusFeaturesOK|virtio.StatusFailed) || t.drvFeaturesSel > 1 {
			break
		}
		sh := 32 * t.drvFeaturesSel
		f := t.driverFeatures&^(0xffffffff<<sh) | uint64(v)<<sh
		t.driverFeatures = f & t.dev.Features() // only offered bits
		return
	case RegQueueNum, RegQueueReady, RegQueueDescLow, RegQueueDescHigh,
		RegQueueDriverLow, RegQueueDriverHigh, RegQueueDeviceLow, RegQueueDeviceHigh:
		q := t.selected()
		if q == nil || !t.inStatus(virtio.StatusFeaturesOK, virtio.StatusDriverOK|virtio.StatusFailed) {
			break
		}
		if q.ready && offset != RegQueueReady {
			break // §4.2.2.2: the queue must not be changed while ready
		}
		switch offset {
		case RegQueueNum:
			q.num = v
		case RegQueueReady:
			q.ready = v&1 != 0
		case RegQueueDescLow:
			q.desc = q.desc&^0xffffffff | uint64(v)
		case RegQueueDescHigh:
			q.desc = q.desc&0xffffffff | uint64(v)<<32
		case RegQueueDriverLow:
			q.avail = q.avail&^0xffffffff | uint64(v)
		case RegQueueDriverHigh:
			q.avail = q.avail&0xffffffff | uint64(v)<<32
		case RegQueueDeviceLow:
			q.used = q.used&^0xffffffff | uint64(v)
		case RegQueueDeviceHigh:
			q.used = q.used&0xffffffff | uint64(v)<<32
		}
		return
	}
	t.ignored.Add(1)
	t.log.Warn("virtio-mmio: register write ignored", "offset", offset, "value", v, "status", t.status)
}

// setStatus runs the status state machine (§2.1, §3.1.1): 0 resets;
// FAILED may be set at any time; otherwise each write must add exactly the
// next bit of ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK.
func (t *Transport) setStatus(v uint32) {
	if v == 0 {
		t.reset()
		return
	}
	v &^= virtio.StatusDeviceNeedsReset // device-owned; the driver echoes it back
	if v&virtio.StatusFailed != 0 {
		t.status |= virtio.StatusFailed
		return
	}
	const (
		ack = virtio.StatusAcknowledge
		drv = ack | virtio.StatusDriver
		fok = drv | virtio.StatusFeaturesOK
		dok = fok | virtio.StatusDriverOK
	)
	switch {
	case v == t.status:
		return // rewriting the same status is harmless
	case t.status == 0 && v == ack, t.status == ack && v == drv:
		t.status = v
	case t.status == drv && v == fok:
		if t.driverFeatures&virtio.FeatureVersion1 == 0 {
			t.badStatus.Add(1)
			t.log.Warn("virtio-mmio: FEATURES_OK refused: driver did not accept VIRTIO_F_VERSION_1",
				"features", fmt.Sprintf("%#x", t.driverFeatures))
			return
		}
		t.dev.Ack(t.driverFeatures)
		t.status = v
	case t.status == fok && v == dok:
		t.status = v
		if err := t.activate(); err != nil {
			t.activateFails.Add(1)
			t.log.Warn("virtio-mmio: activation failed; device needs reset", "err", err)
			t.NeedsReset()
		}
	default:
		t.badStatus.Add(1)
		t.log.Warn("virtio-mmio: invalid status transition", "from", t.status, "to", v)
	}
}

func (t *Transport) activate() error {
	qs := make([]*queue.Queue, len(t.queues))
	for i, r := range t.queues {
		if !r.ready {
			continue
		}
		if r.num > 0xffff {
			return fmt.Errorf("queue %d: size %d: %w", i, r.num, queue.ErrInvalidQueue)
		}
		q, err := queue.New(t.mem, r.max, queue.Config{
			Size: uint16(r.num), Desc: memory.GuestAddr(r.desc),
			Avail: memory.GuestAddr(r.avail), Used: memory.GuestAddr(r.used),
			EventIdx: t.driverFeatures&virtio.FeatureRingEventIdx != 0,
			Indirect: t.driverFeatures&virtio.FeatureRingIndirectDesc != 0,
		})
		if err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
		qs[i] = q
	}
	if err := t.dev.Activate(t.mem, t, qs); err != nil {
		return fmt.Errorf("activate %s device: %w", t.dev.Type(), err)
	}
	t.active.Store(true)
	return nil
}

func (t *Transport) reset() {
	t.active.Store(false)
	t.dev.Reset() // waits for the device's goroutine, so no late used-ring writes
	t.resetRegs()
	t.lower()
}

// lower deasserts a level IRQ, then raises it again if a Trigger set a
// bit in between, so the line is never left low with a bit pending.
func (t *Transport) lower() {
	l, ok := t.irq.(LevelIRQ)
	if !ok {
		return
	}
	if err := l.Lower(); err != nil {
		t.irqErrors.Add(1)
	}
	if t.isr.Load() != 0 {
		if err := l.Raise(); err != nil {
			t.irqErrors.Add(1)
		}
	}
}

// QueueNotify tells the device the driver notified queue q. It is the
// ioeventfd path (call it from the eventfd reader goroutine) and what a
// QueueNotify register write does. It never blocks.
func (t *Transport) QueueNotify(q uint32) {
	if !t.active.Load() || q >= t.numQueues {
		t.badNotify.Add(1)
		return
	}
	t.dev.Notify(uint16(q))
}

// Trigger implements virtio.Interrupt: it sets the kind's bit in
// InterruptStatus and raises the IRQ. A config change also bumps
// ConfigGeneration.
func (t *Transport) Trigger(kind virtio.InterruptKind, _ uint16) error {
	if kind == virtio.InterruptConfigChange {
		t.configGen.Add(1)
	}
	t.isr.Or(uint32(kind))
	if t.irq == nil {
		return nil
	}
	if err := t.irq.Raise(); err != nil {
		t.irqErrors.Add(1)
		return fmt.Errorf("virtio-mmio: raise irq: %w", err)
	}
	return nil
}

// NeedsReset implements virtio.NeedsResetter: it sets DEVICE_NEEDS_RESET
// and notifies a config change (§2.1.2; DRIVER_OK is always set by then:
// devices call it once active, the transport when activation fails).
// Callable from any goroutine; it takes no transport lock.
func (t *Transport) NeedsReset() {
	t.needsReset.Store(true)
	_ = t.Trigger(virtio.InterruptConfigChange, 0)
}

// CmdlineArg formats the Linux kernel command line entry that advertises a
// virtio-mmio device: virtio_mmio.device=<size>@<base>:<irq>.
func CmdlineArg(base, size uint64, irq uint32) string {
	return fmt.Sprintf("virtio_mmio.device=%s@%#x:%d", memSize(size), base, irq)
}

// memSize formats n the way Linux's memparse reads it back.
func memSize(n uint64) string {
	for _, u := range []struct {
		suffix string
		shift  uint
	}{{"G", 30}, {"M", 20}, {"K", 10}} {
		if n != 0 && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d%s", n>>u.shift, u.suffix)
		}
	}
	return fmt.Sprintf("%d", n)
}
