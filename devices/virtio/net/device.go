// Package net is the virtio-net device (virtio 1.x §5.1): one receive and
// one transmit queue, the MAC address, link status and MTU in config space,
// and a Port behind it that reads and writes whole Ethernet frames (a TAP,
// or the VLAN trunk multiplexer of package network).
//
// Frames move on device goroutines, never on the vCPU thread that notifies:
// a receive goroutine that lives as long as the device (it may sit in a
// blocking Port.Read across driver resets, so it re-checks the activation
// after every frame) and a transmit goroutine per activation. Every frame
// has the 12-byte virtio_net_hdr_v1 in front of it; no offloads are offered,
// so the header must be all zero on transmit and is zero (num_buffers 1) on
// receive. Whatever the guest gets wrong — a chain with bad addresses or
// the wrong direction, a frame over the MTU, a receive buffer too small —
// is dropped and counted (see Metrics), never a host panic.
package net

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/ratelimit"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Feature bits of virtio-net (virtio 1.x §5.1.3) the device offers.
const (
	FeatureMTU    uint64 = 1 << 3  // VIRTIO_NET_F_MTU
	FeatureMAC    uint64 = 1 << 5  // VIRTIO_NET_F_MAC
	FeatureStatus uint64 = 1 << 16 // VIRTIO_NET_F_STATUS
)

// StatusLinkUp is VIRTIO_NET_S_LINK_UP in the config status field.
const StatusLinkUp uint16 = 1

// Queue indices.
const (
	RxQueue = 0
	TxQueue = 1
)

// DefaultQueueSize is the maximum size of each queue.
const DefaultQueueSize = 256

// Config space layout (struct virtio_net_config).
const (
	cfgMAC    = 0
	cfgStatus = 6
	cfgPairs  = 8
	cfgMTU    = 10
	cfgLen    = 12
)

// Port is the device's backend: Read returns one whole Ethernet frame,
// blocking until one arrives, and fails with an error wrapping os.ErrClosed
// (or io.EOF) once the port is closed; Write sends one frame.
// network.Port (a TAP or a VLAN trunk) is one.
type Port interface {
	Read(frame []byte) (int, error)
	Write(frame []byte) (int, error)
}

// TryReader is optionally implemented by a Port: TryRead reads a frame if
// one is waiting and returns ok false at once if none is. The device uses
// it to deliver the frames that queued up behind the one it blocked for
// before interrupting the driver once (network.TAP and network.Trunk
// implement it).
type TryReader interface {
	TryRead(frame []byte) (n int, ok bool, err error)
}

// Config describes a device.
type Config struct {
	MAC  net.HardwareAddr // required, 6 bytes
	MTU  int              // 0 means 1500
	Port Port             // required
	// RX limits frames toward the guest, TX frames from it (one op and
	// the frame's bytes per frame); nil is unlimited.
	RX, TX *ratelimit.Limiter
	// QueueSize is the maximum queue size (a power of two); 0 means
	// DefaultQueueSize.
	QueueSize uint16
	// Log receives rate-limited reports of what the guest got wrong.
	Log *slog.Logger
}

// Device is a virtio-net device.
type Device struct {
	port      Port
	mac       [6]byte
	mtu       int
	queueSize uint16
	rxLimit   *ratelimit.Limiter
	txLimit   *ratelimit.Limiter
	log       *slog.Logger
	metrics   Metrics

	acked  atomic.Uint64
	status atomic.Uint32 // config status field (link up)
	act    atomic.Pointer[activation]
	irq    atomic.Pointer[irqHolder] // the last activation's, for link changes

	rxOnce sync.Once
	wake   chan struct{} // an activation started (for the receive goroutine)
	closed chan struct{}
	close  sync.Once
}

type irqHolder struct{ virtio.Interrupt }

// activation is one DRIVER_OK..reset period: the queues and the
// goroutines' stop signal.
type activation struct {
	mem      *memory.Memory
	irq      virtio.Interrupt
	rxq, txq *queue.Queue
	rxKick   chan struct{}
	txKick   chan struct{}
	ctx      context.Context // cancelled by Reset (limiter waits)
	cancel   context.CancelFunc
	done     chan struct{} // closed by Reset
	txDone   chan struct{} // closed when the transmit goroutine ends

	// mu is held shared by the device goroutines around every access to
	// the queues and guest memory, and exclusively by Reset, so once
	// Reset returns nothing touches the driver's memory. Reset also waits
	// for the transmit goroutine; the receive goroutine and SetLink, which
	// it does not wait for, interrupt the driver only under mu.
	mu     sync.RWMutex
	dead   bool
	broken atomic.Bool // a ring is corrupt; idle until reset

	rxDescs, txDescs []queue.Descriptor // reused by the rx and tx goroutines
	rxUsed           bool               // rx chains completed since the last interrupt check
}

// New makes a device; it starts no goroutine until the driver activates
// it.
func New(cfg Config) (*Device, error) {
	if len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("virtio-net: MAC %q is not 6 bytes", cfg.MAC)
	}
	if cfg.Port == nil {
		return nil, errors.New("virtio-net: no port")
	}
	if cfg.MTU == 0 {
		cfg.MTU = 1500
	}
	if cfg.MTU < 68 || cfg.MTU > 65535-ethHeaderLen-vlanTagLen {
		return nil, fmt.Errorf("virtio-net: MTU %d out of range 68..%d", cfg.MTU, 65535-ethHeaderLen-vlanTagLen)
	}
	if cfg.QueueSize == 0 {
		cfg.QueueSize = DefaultQueueSize
	}
	if qs := cfg.QueueSize; qs&(qs-1) != 0 || qs > queue.MaxSize {
		return nil, fmt.Errorf("virtio-net: queue size %d is not a power of two in [1, %d]", qs, queue.MaxSize)
	}
	d := &Device{
		port: cfg.Port, mtu: cfg.MTU, queueSize: cfg.QueueSize,
		rxLimit: cfg.RX, txLimit: cfg.TX,
		log:    virtio.RateLimited(cfg.Log, time.Second, 10).With("device", "net", "mac", cfg.MAC.String()),
		wake:   make(chan struct{}, 1),
		closed: make(chan struct{}),
	}
	copy(d.mac[:], cfg.MAC)
	d.status.Store(uint32(StatusLinkUp))
	return d, nil
}

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.TypeNet }

// Features implements virtio.Device.
func (d *Device) Features() uint64 {
	return virtio.FeatureVersion1 | virtio.FeatureRingEventIdx | virtio.FeatureRingIndirectDesc |
		FeatureMAC | FeatureMTU | FeatureStatus
}

// Ack implements virtio.Device.
func (d *Device) Ack(features uint64) { d.acked.Store(features & d.Features()) }

// QueueSizes implements virtio.Device: receive, transmit.
func (d *Device) QueueSizes() []uint16 { return []uint16{d.queueSize, d.queueSize} }

func (d *Device) config() [cfgLen]byte {
	var c [cfgLen]byte
	copy(c[cfgMAC:], d.mac[:])
	binary.LittleEndian.PutUint16(c[cfgStatus:], uint16(d.status.Load()))
	binary.LittleEndian.PutUint16(c[cfgPairs:], 1)
	binary.LittleEndian.PutUint16(c[cfgMTU:], uint16(d.mtu))
	return c
}

// ReadConfig implements virtio.Device.
func (d *Device) ReadConfig(off uint64, p []byte) {
	clear(p)
	c := d.config()
	if off < cfgLen {
		copy(p, c[off:])
	}
}

// WriteConfig implements virtio.Device: every field is read-only for a
// VERSION_1 driver.
func (d *Device) WriteConfig(off uint64, p []byte) {
	d.metrics.ConfigWrites.Add(1)
}

// SetLink sets the link status the guest sees and, when active, tells the
// driver with a config change interrupt.
func (d *Device) SetLink(up bool) {
	var v uint32
	if up {
		v = uint32(StatusLinkUp)
	}
	if d.status.Swap(v) == v {
		return
	}
	a := d.act.Load()
	if a == nil {
		return
	}
	a.mu.RLock() // not once Reset has returned: the driver may be re-initialising
	defer a.mu.RUnlock()
	if !a.dead {
		_ = a.irq.Trigger(virtio.InterruptConfigChange, 0)
	}
}

// Activate implements virtio.Device.
func (d *Device) Activate(mem *memory.Memory, irq virtio.Interrupt, qs []*queue.Queue) error {
	if len(qs) != 2 || qs[RxQueue] == nil || qs[TxQueue] == nil {
		return errors.New("virtio-net: the driver must set up both the receive and the transmit queue")
	}
	select {
	case <-d.closed:
		return errors.New("virtio-net: device closed")
	default:
	}
	d.Reset()
	ctx, cancel := context.WithCancel(context.Background())
	a := &activation{
		mem: mem, irq: irq, rxq: qs[RxQueue], txq: qs[TxQueue],
		rxKick: make(chan struct{}, 1), txKick: make(chan struct{}, 1),
		ctx: ctx, cancel: cancel, done: make(chan struct{}), txDone: make(chan struct{}),
	}
	d.act.Store(a)
	go d.txLoop(a)
	d.rxOnce.Do(func() { go d.rxLoop() })
	select {
	case d.wake <- struct{}{}:
	default:
	}
	return nil
}

// Notify implements virtio.Device.
func (d *Device) Notify(q uint16) {
	a := d.act.Load()
	if a == nil {
		return
	}
	var c chan struct{}
	switch q {
	case RxQueue:
		c = a.rxKick
	case TxQueue:
		c = a.txKick
	default:
		return
	}
	select {
	case c <- struct{}{}:
	default:
	}
}

// Reset implements virtio.Device: it stops the transmit goroutine and waits
// until the receive goroutine no longer touches the queues.
func (d *Device) Reset() {
	a := d.act.Swap(nil)
	if a == nil {
		return
	}
	a.cancel()
	close(a.done)
	a.mu.Lock()
	a.dead = true
	a.mu.Unlock()
	<-a.txDone
}

// Close resets the device and ends its goroutines. A receive goroutine
// blocked in Port.Read ends when the port is closed, which is the port
// owner's job (network.NIC.Close).
func (d *Device) Close() {
	d.close.Do(func() {
		d.Reset()
		close(d.closed)
	})
}

// Metrics returns the device's counters.
func (d *Device) Metrics() *Metrics { return &d.metrics }

// broken marks a's rings as corrupt and asks the driver for a reset.
func (d *Device) broken(a *activation, err error) {
	if a.broken.Swap(true) {
		return
	}
	d.metrics.QueueErrors.Add(1)
	d.log.Warn("virtio-net: queue broken; device needs reset", "err", err)
	if r, ok := a.irq.(virtio.NeedsResetter); ok {
		r.NeedsReset()
	}
}

// interrupt raises a used-ring interrupt on q if the driver wants one.
func (d *Device) interrupt(a *activation, q *queue.Queue, idx uint16) {
	need, err := q.NeedsNotification()
	if err != nil {
		d.broken(a, err)
		return
	}
	if !need {
		return
	}
	d.metrics.Interrupts.Add(1)
	if err := a.irq.Trigger(virtio.InterruptUsedRing, idx); err != nil {
		d.metrics.InterruptErrors.Add(1)
	}
}

// isClosed reports whether a Port error means the port is gone for good.
func isClosed(err error) bool {
	return errors.Is(err, os.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)
}
