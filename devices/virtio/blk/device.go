// Package blk is the virtio-blk device (virtio 1.x §5.2): a guest block
// device backed by a storage.Disk.
//
// Requests are IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; a
// read-only disk offers VIRTIO_BLK_F_RO and answers writes with
// VIRTIO_BLK_S_IOERR. I/O runs on the device's own goroutines, started at
// Activate and stopped at Reset or Close, never on the vCPU thread that
// notifies it: one pops and parses requests and runs up to MaxInFlight of
// them at once (worker.go), and they complete in whatever order they
// finish, as virtio allows. A FLUSH completes only after every write
// popped before it has completed, and then makes them durable. Reset
// cancels the backend calls in flight through their context, so a
// backend that hangs (an NBD replica) cannot hold the vCPU thread that
// resets the device. Request parsing is strict and overflow-checked (request.go);
// every malformed request is completed with an error status where one can
// be written, counted (metrics.go) and logged through a rate-limited
// logger; nothing a guest does panics the VMM. Optional token-bucket rate
// limiters for operations and bytes throttle the device goroutine, and the
// time spent throttled is counted.
package blk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Feature bits (virtio 1.x §5.2.3).
const (
	FeatureSegMax      uint64 = 1 << 2
	FeatureRO          uint64 = 1 << 5
	FeatureBlkSize     uint64 = 1 << 6
	FeatureFlush       uint64 = 1 << 9
	FeatureDiscard     uint64 = 1 << 13
	FeatureWriteZeroes uint64 = 1 << 14
)

// Defaults.
const (
	DefaultQueueSize = 256
	// DefaultMaxInFlight is how many requests a device runs at once by
	// default: enough to keep an NBD replica's pipe or a local SSD busy,
	// few enough that the goroutines (and, for local files, the OS
	// threads blocked in pread) stay cheap.
	DefaultMaxInFlight = 16
	// MaxRanges is max_discard_seg and max_write_zeroes_seg.
	MaxRanges = 32
	// maxRangeSectors is max_discard_sectors and max_write_zeroes_sectors.
	maxRangeSectors = 1<<32 - 1
)

// Config space layout (struct virtio_blk_config).
const (
	cfgCapacity          = 0
	cfgSegMax            = 12
	cfgBlkSize           = 20
	cfgMaxDiscardSectors = 36
	cfgMaxDiscardSeg     = 40
	cfgDiscardAlign      = 44
	cfgMaxWZSectors      = 48
	cfgMaxWZSeg          = 52
	cfgWZMayUnmap        = 56
	configLen            = 60
)

// Limiter throttles requests by count and bytes (*ratelimit.Limiter fits):
// Wait charges one operation and n bytes, blocking until both buckets can
// pay or ctx ends, and returns how long it waited.
type Limiter interface {
	Wait(ctx context.Context, n uint64) (time.Duration, error)
}

// Config describes one virtio-blk device.
type Config struct {
	// Disk is the backend. The device does not close it.
	Disk storage.Disk
	// ReadOnly offers VIRTIO_BLK_F_RO and refuses writes.
	ReadOnly bool
	// Serial is the GET_ID string, at most 20 bytes.
	Serial string
	// QueueSize is the maximum queue size (a power of two); 0 means
	// DefaultQueueSize.
	QueueSize uint16
	// RateLimit throttles requests: every request is one operation, and
	// reads and writes also pay their data bytes. nil means unlimited.
	RateLimit Limiter
	// MaxInFlight bounds how many requests run against the disk at once
	// (0 means DefaultMaxInFlight; 1 runs them one by one on the device
	// goroutine).
	MaxInFlight int
	// Log receives rate-limited warnings about bad requests. nil discards.
	Log *slog.Logger
}

// Device is a virtio-blk device.
type Device struct {
	disk      storage.Disk
	discarder storage.Discarder
	zeroer    storage.ZeroWriter
	cfg       Config
	features  uint64
	config    [configLen]byte
	lim       limits
	metrics   Metrics
	log       *slog.Logger
	kick      chan struct{} // one pending notification, never blocks Notify

	mu     sync.Mutex // guards acked and the running worker
	acked  uint64
	cancel context.CancelFunc
	done   chan struct{}
	closed bool
}

var _ virtio.Device = (*Device)(nil)

// New builds a device over cfg.Disk.
func New(cfg Config) (*Device, error) {
	if cfg.Disk == nil {
		return nil, errors.New("virtio-blk: no disk")
	}
	if len(cfg.Serial) > idLen {
		return nil, fmt.Errorf("virtio-blk: serial %q is longer than %d bytes", cfg.Serial, idLen)
	}
	if cfg.QueueSize == 0 {
		cfg.QueueSize = DefaultQueueSize
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if qs := cfg.QueueSize; qs < 4 || qs&(qs-1) != 0 || qs > queue.MaxSize {
		return nil, fmt.Errorf("virtio-blk: queue size %d is not a power of two in [4, %d]", qs, queue.MaxSize)
	}
	size := cfg.Disk.Size()
	if size < SectorSize {
		return nil, fmt.Errorf("virtio-blk: disk of %d bytes is smaller than a sector", size)
	}
	d := &Device{
		disk: cfg.Disk, cfg: cfg,
		log:  virtio.RateLimited(cfg.Log, time.Second, 10).With("device", "virtio-blk", "serial", cfg.Serial),
		kick: make(chan struct{}, 1),
	}
	d.lim = limits{
		capacity:          uint64(size) / SectorSize,
		segMax:            uint32(cfg.QueueSize) - 2,
		maxDiscardSectors: maxRangeSectors,
		maxRanges:         MaxRanges,
		readOnly:          cfg.ReadOnly,
	}
	d.features = virtio.FeatureVersion1 | virtio.FeatureRingEventIdx | virtio.FeatureRingIndirectDesc |
		FeatureSegMax | FeatureBlkSize | FeatureFlush
	le := func(off int, v uint64, n int) {
		for i := range n {
			d.config[off+i] = byte(v >> (8 * i))
		}
	}
	le(cfgCapacity, d.lim.capacity, 8)
	le(cfgSegMax, uint64(d.lim.segMax), 4)
	le(cfgBlkSize, SectorSize, 4)
	if cfg.ReadOnly {
		d.features |= FeatureRO
	} else {
		if dc, ok := cfg.Disk.(storage.Discarder); ok {
			d.discarder = dc
			d.features |= FeatureDiscard
			le(cfgMaxDiscardSectors, maxRangeSectors, 4)
			le(cfgMaxDiscardSeg, MaxRanges, 4)
			le(cfgDiscardAlign, 1, 4)
		}
		if zw, ok := cfg.Disk.(storage.ZeroWriter); ok {
			d.zeroer = zw
			d.features |= FeatureWriteZeroes
			le(cfgMaxWZSectors, maxRangeSectors, 4)
			le(cfgMaxWZSeg, MaxRanges, 4)
			le(cfgWZMayUnmap, 1, 1)
		}
	}
	return d, nil
}

// Metrics are the device's counters.
func (d *Device) Metrics() *Metrics { return &d.metrics }

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.TypeBlock }

// Features implements virtio.Device.
func (d *Device) Features() uint64 { return d.features }

// Ack implements virtio.Device.
func (d *Device) Ack(f uint64) {
	d.mu.Lock()
	d.acked = f & d.features
	d.mu.Unlock()
}

// QueueSizes implements virtio.Device: one request queue.
func (d *Device) QueueSizes() []uint16 { return []uint16{d.cfg.QueueSize} }

// ReadConfig implements virtio.Device.
func (d *Device) ReadConfig(off uint64, p []byte) {
	clear(p)
	if off < configLen {
		copy(p, d.config[off:])
	}
}

// WriteConfig implements virtio.Device; every field is read-only (no
// CONFIG_WCE), so writes are ignored.
func (d *Device) WriteConfig(off uint64, p []byte) {
	d.log.Debug("config write ignored", "offset", off, "len", len(p))
}

// Activate implements virtio.Device: it starts the I/O goroutine.
func (d *Device) Activate(mem *memory.Memory, irq virtio.Interrupt, qs []*queue.Queue) error {
	if len(qs) != 1 || qs[0] == nil {
		return errors.New("virtio-blk: activate: request queue 0 is not set up")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.closed:
		return errors.New("virtio-blk: activate: device is closed")
	case d.cancel != nil:
		return errors.New("virtio-blk: activate: already active")
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := d.newWorker(ctx, mem, irq, qs[0])
	d.cancel, d.done = cancel, make(chan struct{})
	select { // look at the ring once: the driver may have queued before DRIVER_OK
	case d.kick <- struct{}{}:
	default:
	}
	go w.run(d.done)
	return nil
}

// Notify implements virtio.Device. It never blocks.
func (d *Device) Notify(uint16) {
	select {
	case d.kick <- struct{}{}:
	default: // a notification is already pending
	}
}

// Reset implements virtio.Device: it cancels throttling waits and the
// backend calls in flight (through their context), waits for the
// device's goroutines to stop, and forgets the negotiated features.
// Requests that did not complete are never completed: the driver has
// given up its rings.
func (d *Device) Reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stop()
	d.acked = 0
}

func (d *Device) stop() {
	if d.cancel == nil {
		return
	}
	d.cancel()
	<-d.done
	d.cancel, d.done = nil, nil
	select { // drop a stale notification
	case <-d.kick:
	default:
	}
}

// Close stops the device for good. It does not close the disk.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stop()
	d.closed = true
	return nil
}
