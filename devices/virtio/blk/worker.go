package blk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// One activation of the device runs a dispatcher goroutine and up to
// MaxInFlight-1 executor goroutines:
//
//   - The dispatcher (run, drain) owns the avail side of the queue: it
//     pops every available chain, walks and parses each into a request and
//     waits for the rate limiter; then the requests run (pool.go).
//   - Executors run requests against the disk and complete them in the
//     order they finish. The dispatcher runs requests itself too while the
//     disk is fast (a page-cache read: a lone request, the common case at
//     queue depth 1, then costs no hand-off at all), and leaves them all
//     to the executors while it is slow (an NBD replica: the dispatcher
//     stays free to pop what the driver queues meanwhile); see helpLimit.
//   - The used side of the queue (AddUsed, the interrupt decision) is
//     shared by whoever completes a request, under umu. Pop and AddUsed
//     touch disjoint queue state (see queue.Queue), so the dispatcher pops
//     while executors complete.
//
// FLUSH is a barrier for writes: the writes (OUT, DISCARD, WRITE_ZEROES)
// popped before a flush belong to one epoch, and the flush waits until
// every one of them has returned from the disk before it flushes, so that
// it makes durable every write completed before it, also those completed
// out of order.
//
// A request is a *req from a free list of at most the queue size: a driver
// cannot have more chains in flight than descriptors, and a hostile one
// that publishes chains it never gave back is stopped at that bound.

// req is one request in flight, with buffers reused from one request to
// the next.
type req struct {
	request
	descs []queue.Descriptor
	head  uint16
	start time.Time
	// epoch: for a write, the epoch it is counted in (Done when its disk
	// call returned); for a flush, the epoch it waits for.
	epoch *sync.WaitGroup
}

// newWorker prepares the I/O state for one activation; d.mu is held.
func (d *Device) newWorker(ctx context.Context, mem *memory.Memory, irq virtio.Interrupt, q *queue.Queue) *worker {
	lim := d.lim
	lim.discard = d.acked&FeatureDiscard != 0
	lim.zeroes = d.acked&FeatureWriteZeroes != 0
	w := &worker{
		d: d, ctx: ctx, mem: mem, irq: irq, q: q, lim: lim,
		writeThrough: d.acked&FeatureFlush == 0,
		pollWindow:   pollWindow,
		maxExec:      d.cfg.MaxInFlight,
		epoch:        new(sync.WaitGroup),
		freed:        make(chan struct{}, 1),
	}
	w.pool = newPool(w.maxExec, w.execute)
	w.service.Store(int64(2 * helpLimit)) // not known to be fast until measured
	w.timer = time.AfterFunc(time.Hour, w.timerFired)
	w.timer.Stop()
	return w
}

// worker is the state of one activation.
type worker struct {
	d            *Device
	mem          *memory.Memory
	irq          virtio.Interrupt
	q            *queue.Queue
	lim          limits
	writeThrough bool            // FLUSH not negotiated: writes are made durable before completion
	ctx          context.Context // cancelled by Reset and Close; every disk call gets it

	// The dispatcher's.
	pollWindow time.Duration   // see pollWindow; 0 disables polling
	epoch      *sync.WaitGroup // writes popped since the last flush
	maxExec    int             // requests running at once; 0: every one on the dispatcher, one by one

	pool  *pool
	keep  int    // requests of a pass the dispatcher takes itself (see runPopped)
	local []*req // free requests, the dispatcher's; refilled from free

	service  atomic.Int64  // a moving average of how long a request takes the disk, in ns
	sampled  atomic.Uint32 // requests executed, for sampling their disk time
	inFlight atomic.Int32  // popped, not yet completed or dropped
	freed    chan struct{} // a request slot was freed while the dispatcher waited for one

	umu              sync.Mutex // the used side, and what follows
	free             []*req     // requests given back by complete and drop
	waitingSlot      bool
	unsignalled      int       // completions published since the last interrupt
	firstUnsignalled time.Time // when the oldest of them was published
	timer            *time.Timer
	timerArmed       bool
	broken           error // the used ring could not be written
}

// run is the dispatcher goroutine of one activation; it ends when the
// activation's context is cancelled.
func (w *worker) run(done chan struct{}) {
	ctx := w.ctx
	defer close(done)
	defer w.stopExecutors()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.d.kick:
		}
		if err := w.drain(); err != nil {
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

// stopExecutors ends the executors once the dispatcher has stopped: they
// drop what is queued (the context is cancelled) and finish what runs.
func (w *worker) stopExecutors() {
	w.pool.close()
	for r := w.pool.take(); r != nil; r = w.pool.take() {
		w.execute(r) // dropped: the context is cancelled
	}
	w.timer.Stop()
}

// drain processes every available chain, then re-enables notifications
// and drains again if chains raced in. Completions are signalled by
// whoever completes them (complete); what is left unsignalled when the
// ring is empty is signalled here.
func (w *worker) drain() error {
	for {
		if err := w.q.DisableNotification(); err != nil {
			return err
		}
		w.keep = 0
		if time.Duration(w.service.Load()) < helpLimit {
			w.keep = 1
		}
		for {
			if err := w.waitSlot(); err != nil {
				return err
			}
			if err := w.usedErr(); err != nil {
				return err
			}
			c, ok, err := w.q.Pop()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			if err := w.dispatch(&c); err != nil {
				return err
			}
		}
		w.runPopped()
		w.signal()
		if w.poll() {
			continue
		}
		more, err := w.q.EnableNotification()
		if err != nil || !more {
			return err
		}
	}
}

// waitSlot waits until a request may be popped: fewer than the queue size
// in flight. It fails when the used ring broke or the device is stopping.
func (w *worker) waitSlot() error {
	for {
		if w.inFlight.Load() < int32(w.q.Size()) {
			return nil
		}
		w.umu.Lock()
		if w.inFlight.Load() < int32(w.q.Size()) {
			w.umu.Unlock()
			return nil
		}
		w.waitingSlot = true
		w.umu.Unlock()
		w.pool.help(0) // what is queued must run for a slot to free
		select {
		case <-w.freed:
		case <-w.ctx.Done():
			return w.ctx.Err()
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
func (w *worker) poll() bool {
	if w.pollWindow <= 0 {
		return false
	}
	deadline := time.Now().Add(w.pollWindow)
	for w.ctx.Err() == nil {
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
// in batches, slow ones (a real disk, a replica) one by one.
const (
	signalBatch = 16
	signalDelay = 50 * time.Microsecond
)

// dispatch turns a popped chain into a request and queues it (or
// completes it at once with an error status). It returns an error only
// when the device must stop.
func (w *worker) dispatch(c *queue.Chain) error {
	r := w.newReq()
	r.head, r.start = c.Head(), time.Now()
	var err error
	r.descs, err = c.Collect(r.descs[:0])
	if err != nil {
		w.d.metrics.countError(ErrInvalidChain)
		w.d.log.Warn("virtio-blk: bad descriptor chain", "err", err)
		w.complete(r, 0, false)
		return nil
	}
	if perr := parse(w.mem, r.descs, &w.lim, &r.request); perr != nil {
		w.refuse(r, perr)
		return nil
	}
	if err := w.throttle(&r.request); err != nil {
		w.drop(r)
		return err // reset in progress: the driver will not look at this chain
	}
	switch r.typ {
	case TypeOut, TypeDiscard, TypeWriteZeroes:
		r.epoch = w.epoch
		r.epoch.Add(1)
	case TypeFlush:
		r.epoch, w.epoch = w.epoch, new(sync.WaitGroup)
	}
	if w.maxExec == 0 {
		w.execute(r)
		return nil
	}
	w.pool.push(r, w.keep)
	return nil
}

// helpLimit is the average disk time of a request below which the
// dispatcher runs requests itself: a page-cache read or write (1-10 µs)
// is over before a parked executor would even have woken, while a
// replica's round trip (30 µs and more) would keep the dispatcher from
// popping what the driver queues meanwhile. A disk counts as slow until
// its first requests were measured, and the dispatcher never takes a
// FLUSH (an fdatasync takes milliseconds).
const helpLimit = 20 * time.Microsecond

// runPopped runs the requests popped in this pass: executors for those
// the dispatcher does not take, and the dispatcher takes them while the
// disk is fast.
func (w *worker) runPopped() {
	if w.maxExec == 0 {
		return // dispatch ran them
	}
	w.pool.help(w.keep)
	if w.keep == 0 {
		return
	}
	for w.pool.runOne(notFlush) {
	}
	w.pool.help(0) // a FLUSH left at the head, or more than can run, goes to the executors
}

func notFlush(r *req) bool { return r.typ != TypeFlush }

// sample says whether to time this request's disk call for the moving
// average: one in 16 (a clock read costs 20-70 ns here, as much as the
// rest of a request's bookkeeping) and every one while the average is
// not known yet.
func (w *worker) sample() bool {
	n := w.sampled.Add(1)
	return n%16 == 1 || n < 16
}

// execute runs a request against the disk and completes it, unless the
// device is being reset: then it is dropped.
func (w *worker) execute(r *req) {
	var used uint32
	var perr *reqError
	if w.ctx.Err() == nil {
		if w.sample() {
			t := time.Now()
			used, perr = w.perform(r)
			// A moving average over about 8 samples; races between
			// executors lose an update now and then, which does not
			// matter.
			avg := w.service.Load()
			w.service.Store(avg + (int64(time.Since(t))-avg)/8)
		} else {
			used, perr = w.perform(r)
		}
	}
	if r.epoch != nil && r.typ != TypeFlush {
		r.epoch.Done()
	}
	if w.ctx.Err() != nil {
		w.drop(r)
		return
	}
	if perr != nil {
		w.refuse(r, perr)
		return
	}
	r.status[0] = StatusOK
	w.complete(r, used, true)
}

// usedErr is why the used ring cannot be written, or nil.
func (w *worker) usedErr() error {
	w.umu.Lock()
	defer w.umu.Unlock()
	return w.broken
}

// newReq takes a free request (the dispatcher only).
func (w *worker) newReq() *req {
	w.inFlight.Add(1)
	if len(w.local) == 0 {
		w.umu.Lock()
		w.local, w.free = w.free, w.local[:0]
		w.umu.Unlock()
	}
	if n := len(w.local); n > 0 {
		r := w.local[n-1]
		w.local = w.local[:n-1]
		return r
	}
	return &req{}
}

// release returns r to the free list; umu is held.
func (w *worker) release(r *req) {
	r.epoch = nil
	w.free = append(w.free, r)
	w.inFlight.Add(-1)
	if w.waitingSlot {
		w.waitingSlot = false
		select {
		case w.freed <- struct{}{}:
		default:
		}
	}
}

// drop forgets a request that will not be completed (the device is being
// reset).
func (w *worker) drop(r *req) {
	w.umu.Lock()
	w.release(r)
	w.umu.Unlock()
}

func (w *worker) refuse(r *req, e *reqError) {
	w.d.metrics.countError(e.kind)
	w.d.log.Warn("virtio-blk: request failed", "kind", e.kind.String(), "err", e.msg)
	if r.status == nil {
		w.complete(r, 0, false)
		return
	}
	r.status[0] = e.status
	w.complete(r, 1, true)
}

// complete returns the chain to the driver and interrupts it when the
// batch rules say so (see signalBatch): at once when nothing else is in
// flight, when the request was slow, or when enough completions or time
// have piled up; otherwise a timer makes sure no completion waits longer
// than signalDelay for its interrupt.
func (w *worker) complete(r *req, used uint32, withStatus bool) {
	if !withStatus {
		w.d.metrics.noStatus.Add(1)
	}
	now := time.Now()
	w.umu.Lock()
	head, start := r.head, r.start
	w.release(r)
	if head >= w.q.Size() || w.broken != nil {
		w.umu.Unlock()
		return // nothing can be returned for a head outside the ring
	}
	if err := w.q.AddUsed(head, used); err != nil {
		w.broken = fmt.Errorf("used ring: %w", err)
		w.umu.Unlock()
		w.d.Notify(0) // the dispatcher sees it and stops
		return
	}
	w.d.metrics.observe(now.Sub(start))
	if w.unsignalled == 0 {
		w.firstUnsignalled = now
	}
	w.unsignalled++
	var need bool
	if w.inFlight.Load() == 0 || w.unsignalled >= signalBatch || now.Sub(w.firstUnsignalled) >= signalDelay || now.Sub(start) >= signalDelay {
		need = w.needsSignal()
	} else if !w.timerArmed {
		w.timerArmed = true
		w.timer.Reset(signalDelay)
	}
	w.umu.Unlock()
	if need {
		_ = w.irq.Trigger(virtio.InterruptUsedRing, 0) // the transport counts IRQ failures
	}
}

// needsSignal decides whether the driver wants an interrupt for the
// completions published since the last one (EVENT_IDX / NO_INTERRUPT) and
// starts a new batch; umu is held.
func (w *worker) needsSignal() bool {
	if w.unsignalled == 0 {
		return false
	}
	w.unsignalled = 0
	if w.timerArmed {
		w.timerArmed = false
		w.timer.Stop()
	}
	need, err := w.q.NeedsNotification()
	return need || err != nil
}

// signal interrupts the driver for what is unsignalled.
func (w *worker) signal() {
	w.umu.Lock()
	need := w.needsSignal()
	w.umu.Unlock()
	if need {
		_ = w.irq.Trigger(virtio.InterruptUsedRing, 0)
	}
}

func (w *worker) timerFired() {
	if w.ctx.Err() != nil {
		return // stopping: the driver is resetting its rings
	}
	w.umu.Lock()
	w.timerArmed = false
	need := w.needsSignal()
	w.umu.Unlock()
	if need {
		_ = w.irq.Trigger(virtio.InterruptUsedRing, 0)
	}
}

// throttle waits for the rate limiter. It blocks the dispatcher only; the
// time is counted.
func (w *worker) throttle(r *request) error {
	l := w.d.cfg.RateLimit
	if l == nil {
		return nil
	}
	var n uint64
	if r.typ == TypeIn || r.typ == TypeOut {
		n = r.dataLen
	}
	w.signal()     // do not hold completions while waiting
	w.pool.help(0) // nor requests popped before
	waited, err := l.Wait(w.ctx, n)
	if waited > 0 {
		w.d.metrics.throttledNanos.Add(uint64(waited))
	}
	return err
}

// perform runs a parsed request against the disk and returns the used
// length (bytes written to device-writable buffers, status included).
func (w *worker) perform(r *req) (uint32, *reqError) {
	ctx := w.ctx
	m := &w.d.metrics
	disk := w.d.disk
	off := int64(r.sector) * SectorSize // < capacity*512, checked by parse
	switch r.typ {
	case TypeIn:
		for _, s := range r.data {
			n, err := disk.ReadAt(ctx, s.buf, off)
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
			if _, err := disk.WriteAt(ctx, s.buf, off); err != nil {
				return 0, refuse(ErrIO, "write %d bytes at %d: %v", len(s.buf), off, err)
			}
			off += int64(len(s.buf))
		}
		if w.writeThrough {
			if err := disk.Flush(ctx); err != nil {
				return 0, refuse(ErrIO, "flush after write: %v", err)
			}
		}
		m.writeOps.Add(1)
		m.writeBytes.Add(r.dataLen)
		return 1, nil
	case TypeFlush:
		r.epoch.Wait() // every write popped before the flush has returned
		if err := disk.Flush(ctx); err != nil {
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
				err = w.d.discarder.Discard(ctx, o, n)
			} else {
				err = w.d.zeroer.WriteZeroes(ctx, o, n, e.unmap)
			}
			if err != nil {
				return 0, refuse(ErrIO, "type %d at %d+%d: %v", r.typ, o, n, err)
			}
		}
		if w.writeThrough {
			if err := disk.Flush(ctx); err != nil {
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
