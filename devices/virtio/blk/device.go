// Package blk is the virtio-blk device (virtio 1.x §5.2): a guest block
// device backed by a storage.Disk.
//
// Requests are IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; a
// read-only disk offers VIRTIO_BLK_F_RO and answers writes with
// VIRTIO_BLK_S_IOERR. I/O runs on the device's own goroutine, started at
// Activate and stopped at Reset or Close, never on the vCPU thread that
// notifies it. Request parsing is strict and overflow-checked (request.go);
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
	"io"
	"log/slog"
	"runtime"
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
	w := d.newWorker(mem, irq, qs[0])
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel, d.done = cancel, make(chan struct{})
	select { // look at the ring once: the driver may have queued before DRIVER_OK
	case d.kick <- struct{}{}:
	default:
	}
	go w.run(ctx, d.done)
	return nil
}

// Notify implements virtio.Device. It never blocks.
func (d *Device) Notify(uint16) {
	select {
	case d.kick <- struct{}{}:
	default: // a notification is already pending
	}
}

// Reset implements virtio.Device: it cancels throttling waits, waits for
// the request in progress to finish, and forgets the negotiated features.
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

// newWorker prepares the I/O state for one activation; d.mu is held.
func (d *Device) newWorker(mem *memory.Memory, irq virtio.Interrupt, q *queue.Queue) *worker {
	lim := d.lim
	lim.discard = d.acked&FeatureDiscard != 0
	lim.zeroes = d.acked&FeatureWriteZeroes != 0
	return &worker{
		d: d, mem: mem, irq: irq, q: q, lim: lim,
		writeThrough: d.acked&FeatureFlush == 0,
		pollWindow:   pollWindow,
	}
}

// worker is the state of one activation: the I/O goroutine's.
type worker struct {
	d            *Device
	mem          *memory.Memory
	irq          virtio.Interrupt
	q            *queue.Queue
	lim          limits
	writeThrough bool // FLUSH not negotiated: writes are made durable before completion
	descs        []queue.Descriptor
	req          request
	unsignalled  int           // completions published since the last signal
	pollWindow   time.Duration // see pollWindow; 0 disables polling
	lastDone     time.Time     // when the last request completed, if the next one is popped at once
	// firstUnsignalled is when the oldest unsignalled completion finished.
	firstUnsignalled time.Time
}

func (w *worker) run(ctx context.Context, done chan struct{}) {
	defer close(done)
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.d.kick:
		}
		if err := w.drain(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			// The ring cannot be trusted: stop until the driver resets.
			w.d.metrics.countError(ErrQueue)
			w.d.log.Warn("virtio-blk: queue broken; device needs reset", "err", err)
			if nr, ok := w.irq.(virtio.NeedsResetter); ok {
				nr.NeedsReset()
			}
			<-ctx.Done()
			return
		}
	}
}

// drain processes every available chain, then re-enables notifications
// and drains again if chains raced in. Completions are signalled in
// batches, as Firecracker does: when the ring is empty, after signalBatch
// completions or signalDelay, and before a rate-limit wait, so a
// throttled device never sits on finished requests.
func (w *worker) drain(ctx context.Context) error {
	for {
		if err := w.q.DisableNotification(); err != nil {
			return err
		}
		w.lastDone = time.Time{}
		for {
			c, ok, err := w.q.Pop()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			if err := w.process(ctx, &c); err != nil {
				return err
			}
			if w.unsignalled >= signalBatch || w.lastDone.Sub(w.firstUnsignalled) >= signalDelay {
				if err := w.signal(); err != nil {
					return err
				}
			}
		}
		if err := w.signal(); err != nil {
			return err
		}
		if w.poll(ctx) {
			continue
		}
		more, err := w.q.EnableNotification()
		if err != nil || !more {
			return err
		}
	}
}

// pollWindow is how long the device keeps watching an empty ring, with
// notifications still off, before it goes to sleep (QEMU's iothreads poll
// the same way, up to 32 µs by default): a driver that submits again soon
// after a completion, the common case under load, is then served without a
// notification and a goroutine wake-up on either side.
const pollWindow = 25 * time.Microsecond

// poll reports whether chains became available within pollWindow.
func (w *worker) poll(ctx context.Context) bool {
	if w.pollWindow <= 0 {
		return false
	}
	deadline := time.Now().Add(w.pollWindow)
	for ctx.Err() == nil {
		if n, err := w.q.Pending(); err != nil || n > 0 {
			return true // an error surfaces on the next Pop
		}
		if time.Now().After(deadline) {
			return false
		}
		runtime.Gosched()
	}
	return false
}

// signalBatch and signalDelay bound how many completions, and for how
// long, wait for one interrupt: fast requests (page cache) are signalled
// in batches, slow ones (a real disk) one by one.
const (
	signalBatch = 16
	signalDelay = 50 * time.Microsecond
)

// signal interrupts the driver for the completions published since the
// last signal, if it asked for them (EVENT_IDX / NO_INTERRUPT).
func (w *worker) signal() error {
	if w.unsignalled == 0 {
		return nil
	}
	w.unsignalled = 0
	need, err := w.q.NeedsNotification()
	if err != nil {
		return err
	}
	if need {
		_ = w.irq.Trigger(virtio.InterruptUsedRing, 0) // the transport counts IRQ failures
	}
	return nil
}

// process runs one request and completes it. It returns an error only
// when the device must stop (ctx cancelled, used ring unwritable).
func (w *worker) process(ctx context.Context, c *queue.Chain) error {
	start := w.lastDone // the previous request's completion, when popped right after it
	if start.IsZero() {
		start = time.Now()
	}
	w.lastDone = time.Time{}
	m := &w.d.metrics
	var err error
	w.descs, err = c.Collect(w.descs[:0])
	if err != nil {
		m.countError(ErrInvalidChain)
		w.d.log.Warn("virtio-blk: bad descriptor chain", "err", err)
		return w.complete(c.Head(), 0, start, false)
	}
	r := &w.req
	if perr := parse(w.mem, w.descs, &w.lim, r); perr != nil {
		return w.refuse(c.Head(), perr, start)
	}
	if err := w.throttle(ctx, r); err != nil {
		return err // reset in progress: the driver will not look at this chain
	}
	used, perr := w.execute(r)
	if perr != nil {
		return w.refuse(c.Head(), perr, start)
	}
	r.status[0] = StatusOK
	return w.complete(c.Head(), used, start, true)
}

func (w *worker) refuse(head uint16, e *reqError, start time.Time) error {
	w.d.metrics.countError(e.kind)
	w.d.log.Warn("virtio-blk: request failed", "kind", e.kind.String(), "err", e.msg)
	if w.req.status == nil {
		return w.complete(head, 0, start, false)
	}
	w.req.status[0] = e.status
	return w.complete(head, 1, start, true)
}

// complete returns the chain to the driver and interrupts it if it asked.
func (w *worker) complete(head uint16, used uint32, start time.Time, withStatus bool) error {
	if !withStatus {
		w.d.metrics.noStatus.Add(1)
	}
	if head >= w.q.Size() {
		return nil // nothing can be returned for a head outside the ring
	}
	if err := w.q.AddUsed(head, used); err != nil {
		return err
	}
	now := time.Now()
	w.d.metrics.observe(now.Sub(start))
	w.lastDone = now
	if w.unsignalled == 0 {
		w.firstUnsignalled = now
	}
	w.unsignalled++
	return nil
}

// throttle waits for the rate limiter. It blocks the device goroutine
// only; the time is counted.
func (w *worker) throttle(ctx context.Context, r *request) error {
	l := w.d.cfg.RateLimit
	if l == nil {
		return nil
	}
	var n uint64
	if r.typ == TypeIn || r.typ == TypeOut {
		n = r.dataLen
	}
	if err := w.signal(); err != nil { // do not hold completions while waiting
		return err
	}
	waited, err := l.Wait(ctx, n)
	if waited > 0 {
		w.d.metrics.throttledNanos.Add(uint64(waited))
	}
	return err
}

// execute performs a parsed request against the disk and returns the used
// length (bytes written to device-writable buffers, status included).
func (w *worker) execute(r *request) (uint32, *reqError) {
	m := &w.d.metrics
	disk := w.d.disk
	off := int64(r.sector) * SectorSize // < capacity*512, checked by parse
	switch r.typ {
	case TypeIn:
		for _, s := range r.data {
			n, err := disk.ReadAt(s.buf, off)
			if err != nil && !(errors.Is(err, io.EOF) && n == len(s.buf)) {
				return 0, refuse(ErrIO, "read %d bytes at %d: %v", len(s.buf), off, err)
			}
			off += int64(len(s.buf))
		}
		m.readOps.Add(1)
		m.readBytes.Add(r.dataLen)
		return uint32(r.dataLen) + 1, nil
	case TypeOut:
		for _, s := range r.data {
			if _, err := disk.WriteAt(s.buf, off); err != nil {
				return 0, refuse(ErrIO, "write %d bytes at %d: %v", len(s.buf), off, err)
			}
			off += int64(len(s.buf))
		}
		if w.writeThrough {
			if err := disk.Flush(); err != nil {
				return 0, refuse(ErrIO, "flush after write: %v", err)
			}
		}
		m.writeOps.Add(1)
		m.writeBytes.Add(r.dataLen)
		return 1, nil
	case TypeFlush:
		if err := disk.Flush(); err != nil {
			return 0, refuse(ErrIO, "flush: %v", err)
		}
		m.flushOps.Add(1)
		return 1, nil
	case TypeGetID:
		var id [idLen]byte
		copy(id[:], w.d.cfg.Serial)
		n := 0
		for _, s := range r.data {
			if n == idLen {
				break
			}
			n += copy(s.buf, id[n:])
		}
		m.getIDOps.Add(1)
		return uint32(n) + 1, nil
	case TypeDiscard, TypeWriteZeroes:
		for _, e := range r.ranges {
			o, n := int64(e.sector)*SectorSize, int64(e.sectors)*SectorSize
			var err error
			if r.typ == TypeDiscard {
				err = w.d.discarder.Discard(o, n)
			} else {
				err = w.d.zeroer.WriteZeroes(o, n, e.unmap)
			}
			if err != nil {
				return 0, refuse(ErrIO, "type %d at %d+%d: %v", r.typ, o, n, err)
			}
		}
		if w.writeThrough {
			if err := disk.Flush(); err != nil {
				return 0, refuse(ErrIO, "flush after type %d: %v", r.typ, err)
			}
		}
		if r.typ == TypeDiscard {
			m.discardOps.Add(1)
		} else {
			m.writeZeroesOps.Add(1)
		}
		return 1, nil
	}
	return 0, refuse(ErrUnsupported, "request type %d", r.typ) // parse admits no other type
}
