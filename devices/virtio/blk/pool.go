package blk

import "sync"

// pool is the requests waiting to run and the executor goroutines that
// run them. The dispatcher pushes every request it pops; each push wakes
// an executor only while there are more requests queued than executors
// awake and idle plus the ones the dispatcher will take itself (keep),
// so that executors wake while the dispatcher is still popping; then the
// dispatcher takes requests from the same queue (see worker.runPopped).
// An awake executor takes request after request without a hand-off; a
// hand-off (waking a parked goroutine, often a futex wake of an idle
// thread: a few microseconds, longer than a page-cache read) is paid only
// for parallelism that is used. At most max requests run at once,
// counting the dispatcher's.
type pool struct {
	mu       sync.Mutex
	reqs     []*req // FIFO: reqs[head:]
	head     int
	sleeping int // executors waiting on wake
	busy     int // executors running a request
	running  int // requests running, the dispatcher's included
	started  int
	max      int
	closed   bool
	wake     chan struct{} // one token per executor woken; never full
	wg       sync.WaitGroup
	run      func(*req)
}

func newPool(max int, run func(*req)) *pool {
	return &pool{max: max, run: run, wake: make(chan struct{}, max)}
}

// push queues r, waking an executor if the queue outgrows the idle awake
// executors and the keep requests the caller will take itself.
func (p *pool) push(r *req, keep int) {
	p.mu.Lock()
	p.reqs = append(p.reqs, r)
	p.helpLocked(keep)
}

// take returns the next queued request, or nil, whatever runs: for
// dropping what is left when the device stops.
func (p *pool) take() *req {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.takeLocked()
}

func (p *pool) takeLocked() *req {
	if p.head == len(p.reqs) {
		return nil
	}
	r := p.reqs[p.head]
	p.reqs[p.head] = nil
	p.head++
	if p.head == len(p.reqs) {
		p.reqs, p.head = p.reqs[:0], 0
	}
	return r
}

// runOne runs the next queued request on the caller's goroutine, if ok
// says the caller may take it and fewer than max run; it reports whether
// it ran one.
func (p *pool) runOne(ok func(*req) bool) bool {
	p.mu.Lock()
	if p.head == len(p.reqs) || p.running >= p.max || !ok(p.reqs[p.head]) {
		p.mu.Unlock()
		return false
	}
	r := p.takeLocked()
	p.running++
	p.mu.Unlock()
	p.run(r)
	p.mu.Lock()
	p.running--
	p.mu.Unlock()
	return true
}

// help wakes (or starts) executors for the queued requests beyond keep,
// the ones the caller will take itself, and beyond the executors that are
// awake and not running a request (they take the next one anyway).
func (p *pool) help(keep int) {
	p.mu.Lock()
	p.helpLocked(keep)
}

// helpLocked is help with mu held; it unlocks mu.
func (p *pool) helpLocked(keep int) {
	want := len(p.reqs) - p.head - keep - (p.started - p.sleeping - p.busy)
	if want <= 0 {
		p.mu.Unlock()
		return
	}
	woken := min(want, p.sleeping)
	p.sleeping -= woken
	want -= woken
	start := min(want, p.max-p.started)
	p.started += start
	p.wg.Add(start)
	p.mu.Unlock()
	for range woken {
		p.wake <- struct{}{}
	}
	for range start {
		go p.executor()
	}
}

func (p *pool) executor() {
	defer p.wg.Done()
	p.mu.Lock()
	for {
		if p.head < len(p.reqs) && p.running < p.max {
			r := p.takeLocked()
			p.busy++
			p.running++
			p.mu.Unlock()
			p.run(r)
			p.mu.Lock()
			p.busy--
			p.running--
			continue
		}
		if p.closed {
			p.mu.Unlock()
			return
		}
		// Nothing to take, or max running: whoever finishes takes the
		// next one.
		p.sleeping++
		p.mu.Unlock()
		<-p.wake
		p.mu.Lock()
	}
}

// close ends the executors once they have run what they can of the
// queue, and waits for them; the caller drops what is left (take).
func (p *pool) close() {
	p.mu.Lock()
	p.closed = true
	n := p.sleeping
	p.sleeping = 0
	p.mu.Unlock()
	for range n {
		p.wake <- struct{}{}
	}
	p.wg.Wait()
}
