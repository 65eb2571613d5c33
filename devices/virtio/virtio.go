// Package virtio holds what every virtio device and transport in rayvmm
// shares: device types, feature bits, the interrupt kinds, the Interrupt
// interface a device raises interrupts through, and the Device contract a
// transport drives (after Firecracker's VirtioDevice): features, ack, queue
// sizes, config space, activate and reset, plus Notify for queue
// notifications.
//
// Layering (after rust-vmm): vmm/memory is the only way to touch guest
// memory; devices/virtio/queue knows only guest memory; a transport
// (devices/virtio/mmio) knows a Device and its queues; a device (blk, net)
// knows its queues and its backend. Nothing here imports vmm/ other than
// vmm/memory.
package virtio

import (
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// DeviceType is the virtio device ID (virtio 1.x §5).
type DeviceType uint32

// Device IDs rayvmm implements.
const (
	TypeNet   DeviceType = 1
	TypeBlock DeviceType = 2
	TypeVsock DeviceType = 19
)

func (t DeviceType) String() string {
	switch t {
	case TypeNet:
		return "net"
	case TypeBlock:
		return "block"
	case TypeVsock:
		return "vsock"
	}
	return "unknown"
}

// Device-independent feature bits (virtio 1.x §6).
const (
	FeatureRingIndirectDesc uint64 = 1 << 28 // VIRTIO_F_RING_INDIRECT_DESC
	FeatureRingEventIdx     uint64 = 1 << 29 // VIRTIO_F_RING_EVENT_IDX
	FeatureVersion1         uint64 = 1 << 32 // VIRTIO_F_VERSION_1
)

// Device status bits (virtio 1.x §2.1).
const (
	StatusAcknowledge      uint32 = 1
	StatusDriver           uint32 = 2
	StatusDriverOK         uint32 = 4
	StatusFeaturesOK       uint32 = 8
	StatusDeviceNeedsReset uint32 = 0x40
	StatusFailed           uint32 = 0x80
)

// InterruptKind says why a device interrupts the driver. Its value is the
// bit the virtio-mmio transport sets in InterruptStatus.
type InterruptKind uint32

// Interrupt kinds.
const (
	InterruptUsedRing     InterruptKind = 1 // a queue's used ring was updated
	InterruptConfigChange InterruptKind = 2 // the configuration space changed
)

func (k InterruptKind) String() string {
	switch k {
	case InterruptUsedRing:
		return "used-ring"
	case InterruptConfigChange:
		return "config-change"
	}
	return "unknown"
}

// Interrupt is how a device interrupts the driver; the transport implements
// it. Trigger may be called from any goroutine and must not block on the
// guest.
type Interrupt interface {
	Trigger(kind InterruptKind, queue uint16) error
}

// NeedsResetter is optionally implemented by an Interrupt: a device that
// meets an error it cannot recover from without a driver reset (say, an
// avail index that runs more than a queue size ahead) calls NeedsReset, and
// the transport sets DEVICE_NEEDS_RESET and notifies a config change
// (virtio 1.x §2.1.2).
type NeedsResetter interface {
	NeedsReset()
}

// Device is a virtio device as a transport sees it.
//
// The transport calls Features, Ack, QueueSizes, ReadConfig, WriteConfig,
// Activate and Reset from the goroutine that handles the driver's register
// accesses (a vCPU thread), serialised; none of them may block on device
// I/O. Notify may be called from any goroutine at any time (an ioeventfd
// reader, a vCPU thread) and must return at once.
type Device interface {
	// Type is the virtio device ID.
	Type() DeviceType
	// Features is the set of feature bits the device offers.
	Features() uint64
	// Ack records the features the driver accepted; it keeps only bits
	// that were offered.
	Ack(features uint64)
	// QueueSizes is the maximum size of each queue; its length is the
	// number of queues.
	QueueSizes() []uint16
	// ReadConfig fills p from the device config space at off; bytes past
	// the end read as zero.
	ReadConfig(off uint64, p []byte)
	// WriteConfig writes p to the device config space at off; read-only
	// fields ignore writes.
	WriteConfig(off uint64, p []byte)
	// Activate starts the device on the driver's queues: qs[i] is queue i,
	// or nil if the driver did not set it up. It starts the device's own
	// goroutines and returns without waiting for I/O.
	Activate(mem *memory.Memory, irq Interrupt, qs []*queue.Queue) error
	// Notify tells the device the driver made buffers available on a
	// queue. It never blocks.
	Notify(queue uint16)
	// Reset stops the device (cancelling waits, letting in-flight disk or
	// network I/O finish) and returns it to its pre-activation state, so
	// the driver may reuse the queue memory. Safe to call when not active.
	Reset()
}
