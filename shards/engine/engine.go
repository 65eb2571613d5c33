package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rayvmm/rayvmm/shards/nbd"
)

// Dialer gives the engine connections to replicas. In the VM process it
// asks the control plane, which connects, negotiates and passes the socket
// over (see shards/link); the engine never needs to know node addresses.
type Dialer interface {
	Dial(ctx context.Context, shard int, r Replica) (*nbd.Client, error)
}

// Reporter records replica state changes in the cluster metadata and
// returns the shard as recorded. Failed must not return before the change
// is durable: a Strong write waits for it.
type Reporter interface {
	Failed(ctx context.Context, shard int, node, reason string) (Shard, error)
	Rebuilt(ctx context.Context, shard int, node string) (Shard, error)
	// Progress is best effort and must not block for long.
	Progress(shard int, node string, copied int64)
}

// Config configures Open.
type Config struct {
	Layout   Layout
	Dialer   Dialer
	Reporter Reporter
	// Timeout bounds every replica request (default 3 s); a replica
	// that does not answer in time is failed.
	Timeout time.Duration
	// ReportTimeout bounds how long a write waits for a replica failure
	// to be recorded (default 4 s) before it fails with an I/O error;
	// the report itself goes on being retried.
	ReportTimeout time.Duration
	// MaxLag bounds the requests a replica may have outstanding (the
	// Eventual lag); a write waits when one of its replicas is that far
	// behind. Default 64.
	MaxLag int
	// ChunkSize is the rebuild copy unit (default 1 MiB).
	ChunkSize int64
	// Resync says the volume was not closed cleanly: every shard reads
	// from one replica until Resync has made the others equal to it.
	Resync bool
	Log    *slog.Logger
}

// testHookWrite, when set by a test, runs at the start of every
// replica write of a guest request, before it is sent (a test holds one
// replica back with it).
var testHookWrite func(node string)

// ErrIO is wrapped by every error a guest request gets.
var ErrIO = errors.New("sharded volume I/O error")

// Volume is an open sharded volume; it implements storage.Disk,
// storage.Discarder and storage.ZeroWriter and is safe for concurrent
// use.
type Volume struct {
	cfg    Config
	log    *slog.Logger
	shards []*shard
	closed atomic.Bool
	fenced atomic.Pointer[error]
	bg     background // reports, lagging writes, rebuilds, resyncs
	stop   chan struct{}

	guestOps atomic.Uint64 // guest requests seen, for rebuild throttling
	// Counters.
	ReplicaFailures atomic.Int64
	ReadFailovers   atomic.Int64
	Resynced        atomic.Int64 // chunks a resync rewrote
}

type shard struct {
	idx    int
	length int64
	chunks []sync.RWMutex // guest writes share, a rebuild copy owns

	mu      sync.Mutex
	gen     uint64
	reps    []*replica // healthy and rebuilding
	opening []*replica // Open: being dialled, in layout order
	pending []*report  // failure reports not yet recorded
	rr      atomic.Uint32
	resync  atomic.Bool // reads use the primary only (see Resync)
	layout  Shard       // last recorded state
}

type replica struct {
	Replica
	c *nbd.Client

	omu         sync.Mutex
	outstanding []*op // writes not yet completed, in submission order
	lag         chan struct{}

	state  atomic.Value // State
	report *report      // set once failed
}

func (r *replica) st() State { return r.state.Load().(State) }

type report struct {
	done chan struct{}
	err  error
}

type op struct {
	off, n int64
	done   chan struct{}
}

// Open connects to the readable replicas of every shard (in parallel) and
// returns the volume. A replica that cannot be reached is reported failed
// first; a shard left without a readable replica still opens, and its
// I/O fails.
func Open(ctx context.Context, cfg Config) (*Volume, error) {
	l := cfg.Layout
	if err := l.Check(); err != nil {
		return nil, err
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 3 * time.Second
	}
	if cfg.ReportTimeout <= 0 {
		cfg.ReportTimeout = 4 * time.Second
	}
	if cfg.MaxLag <= 0 {
		cfg.MaxLag = 64
	}
	if cfg.ChunkSize <= 0 {
		cfg.ChunkSize = 1 << 20
	}
	v := &Volume{cfg: cfg, log: cfg.Log, stop: make(chan struct{})}
	if v.log == nil {
		v.log = slog.New(slog.DiscardHandler)
	}
	type dialed struct {
		s   *shard
		r   *replica
		err error
	}
	results := make(chan dialed)
	n := 0
	for i, ls := range l.Shards {
		s := &shard{idx: i, length: l.ShardLen(i), gen: ls.Gen, layout: ls}
		s.chunks = make([]sync.RWMutex, (s.length+cfg.ChunkSize-1)/cfg.ChunkSize)
		s.resync.Store(cfg.Resync)
		v.shards = append(v.shards, s)
		for _, lr := range ls.Replicas {
			if !ls.Readable(lr) {
				continue
			}
			r := v.newReplica(lr, Healthy)
			s.opening = append(s.opening, r)
			n++
			go func() {
				dctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
				defer cancel()
				c, err := v.dial(dctx, s, lr)
				r.c = c
				results <- dialed{s, r, err}
			}()
		}
	}
	var failed []dialed
	ok := map[*replica]bool{}
	for range n {
		d := <-results
		if d.err != nil {
			failed = append(failed, d)
			continue
		}
		ok[d.r] = true
	}
	// In service in the layout's order: the first is the primary a
	// resync reads from, the same in every process that opens it.
	for _, s := range v.shards {
		for _, r := range s.opening {
			if ok[r] {
				s.reps = append(s.reps, r)
				v.watchConn(s, r)
			}
		}
		s.opening = nil
	}
	for _, d := range failed {
		v.log.Warn("replica unreachable at open", "shard", d.s.idx, "node", d.r.Node, "err", d.err)
		if _, err := cfg.Reporter.Failed(ctx, d.s.idx, d.r.Node, d.err.Error()); err != nil {
			v.closeConns()
			return nil, fmt.Errorf("open sharded volume: record shard %d replica on %s as failed: %w", d.s.idx, d.r.Node, err)
		}
		v.ReplicaFailures.Add(1)
	}
	return v, nil
}

// watchConn fails r as soon as its connection breaks (its node died or
// closed it), not only at its next request: an idle volume notices a dead
// node too, and the repair loop can start rebuilding it.
func (v *Volume) watchConn(s *shard, r *replica) {
	go func() {
		select {
		case <-r.c.Done():
		case <-v.stop:
			return
		}
		if v.closed.Load() || r.st() == Failed {
			return
		}
		v.fail(s, r, fmt.Errorf("connection lost: %w", r.c.Err()))
	}()
}

func (v *Volume) newReplica(r Replica, st State) *replica {
	nr := &replica{Replica: r, lag: make(chan struct{}, v.cfg.MaxLag)}
	nr.state.Store(st)
	return nr
}

func (v *Volume) dial(ctx context.Context, s *shard, r Replica) (*nbd.Client, error) {
	c, err := v.cfg.Dialer.Dial(ctx, s.idx, r)
	if err != nil {
		return nil, err
	}
	if c.Size() != s.length {
		c.Close()
		return nil, fmt.Errorf("replica of shard %d on %s is %d bytes, want %d", s.idx, r.Node, c.Size(), s.length)
	}
	return c, nil
}

// Fence makes every later request fail with err: the control plane
// calls it when this process may no longer write the volume (its
// ownership lease expired, and another process may own it now).
func (v *Volume) Fence(err error) { v.fenced.Store(&err) }

func (v *Volume) usable() error {
	if v.closed.Load() {
		return fmt.Errorf("volume closed: %w", ErrIO)
	}
	if e := v.fenced.Load(); e != nil {
		return fmt.Errorf("%w (%w)", *e, ErrIO)
	}
	return nil
}

// Size is the volume's size in bytes.
func (v *Volume) Size() int64 { return v.cfg.Layout.Size }

// piece is the part of a guest request inside one shard.
type piece struct {
	s      *shard
	off    int64 // within the shard
	p      []byte
	n      int64
	bufOff int64 // within the request
}

func (v *Volume) split(off, n int64, p []byte) ([]piece, error) {
	if off < 0 || n < 0 || off > v.Size() || n > v.Size()-off {
		return nil, fmt.Errorf("request at %d+%d beyond the volume's %d bytes: %w", off, n, v.Size(), ErrIO)
	}
	if err := v.usable(); err != nil {
		return nil, err
	}
	v.guestOps.Add(1)
	ss := v.cfg.Layout.ShardSize
	var out []piece
	for done := int64(0); done < n; {
		abs := off + done
		s := v.shards[abs/ss]
		so := abs % ss
		c := min(n-done, s.length-so)
		pc := piece{s: s, off: so, n: c, bufOff: done}
		if p != nil {
			pc.p = p[done : done+c]
		}
		out = append(out, pc)
		done += c
	}
	return out, nil
}

// each runs f on every piece in parallel and joins the errors.
func each(pieces []piece, f func(piece) error) error {
	if len(pieces) == 1 {
		return f(pieces[0])
	}
	errs := make([]error, len(pieces))
	var wg sync.WaitGroup
	for i, pc := range pieces {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(pc)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// ReadAt reads len(p) bytes at off (storage.Disk). When ctx ends first
// it returns at once; the replica reads go on into a buffer of the
// engine's, never into p.
func (v *Volume) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if ctx.Done() == nil { // a context that cannot end: read in place
		if err := v.read(p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	b := getBuf(len(p))
	if err := v.bounded(ctx, "read", func() error { return v.read(b.b, off) }); err != nil {
		return 0, err // b is dropped: a read abandoned may still fill it
	}
	copy(p, b.b)
	putBuf(b)
	return len(p), nil
}

func (v *Volume) read(p []byte, off int64) error {
	pieces, err := v.split(off, int64(len(p)), p)
	if err != nil {
		return err
	}
	return each(pieces, v.readPiece)
}

// bounded runs f, an operation on the replicas that is bounded by the
// replica timeouts, and waits for it until ctx ends: a guest request
// must not hold a device reset for as long as a replica takes to time
// out. An operation left behind carries on in the background (Close
// waits for it), so a write reaches every replica or fails them.
func (v *Volume) bounded(ctx context.Context, what string, f func() error) error {
	if ctx.Done() == nil {
		return f()
	}
	done := make(chan error, 1)
	if !v.bg.start(func() { done <- f() }) {
		return fmt.Errorf("%s: volume closed: %w", what, ErrIO)
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%s: %w (it goes on in the background)", what, context.Cause(ctx))
	}
}

func (v *Volume) readPiece(pc piece) error {
	s := pc.s
	tried := map[*replica]bool{}
	var lastErr error
	for {
		s.mu.Lock()
		var cands []*replica
		for _, r := range s.reps {
			if r.st() == Healthy && !tried[r] {
				cands = append(cands, r)
			}
		}
		s.mu.Unlock()
		if len(cands) == 0 {
			if lastErr == nil {
				return fmt.Errorf("read shard %d: no healthy replica: %w", s.idx, ErrIO)
			}
			return fmt.Errorf("read shard %d: every healthy replica failed, last: %w (%w)", s.idx, lastErr, ErrIO)
		}
		var r *replica
		if s.resync.Load() {
			r = cands[0] // the primary, or the next one after it failed
		} else {
			// Round-robin, but past replicas that still have a write to
			// these bytes outstanding (an Eventual write acknowledged by
			// another replica): a replica that has it serves the read at
			// once. When all of them are busy, replicaOp waits for it.
			i := int(s.rr.Add(1))
			r = cands[i%len(cands)]
			for k := range cands {
				if c := cands[(i+k)%len(cands)]; !c.busy(pc.off, pc.n) {
					r = c
					break
				}
			}
		}
		tried[r] = true
		err := v.replicaOp(s, r, pc.off, pc.n, false, func(ctx context.Context) error {
			return r.c.ReadAt(ctx, pc.p, pc.off)
		})
		if err == nil {
			return nil
		}
		lastErr = err
		v.ReadFailovers.Add(1)
		v.fail(s, r, err)
	}
}

// replicaOp runs f against r with the request timeout, after every
// earlier outstanding write to r that overlaps [off, off+n) (n = -1: the
// whole replica); see enqueue and run.
func (v *Volume) replicaOp(s *shard, r *replica, off, n int64, write bool, f func(context.Context) error) error {
	self, deps := r.enqueue(off, n, write)
	return v.run(s, r, self, deps, f)
}

// enqueue collects the earlier outstanding writes to r that overlap
// [off, off+n), and for a write records it as outstanding until run
// finishes it: later requests to the same bytes on this replica are
// ordered after it. A guest write enqueues itself on every replica before
// any of them can acknowledge it (see mutate), so a read or flush that
// starts after the acknowledgement always finds it.
func (r *replica) enqueue(off, n int64, write bool) (*op, []chan struct{}) {
	var deps []chan struct{}
	var self *op
	r.omu.Lock()
	defer r.omu.Unlock()
	for _, o := range r.outstanding {
		if n == -1 || o.n == -1 || (o.off < off+n && off < o.off+o.n) {
			deps = append(deps, o.done)
		}
	}
	if write {
		self = &op{off: off, n: n, done: make(chan struct{})}
		r.outstanding = append(r.outstanding, self)
	}
	return self, deps
}

// busy reports whether r has an outstanding write overlapping [off, off+n).
func (r *replica) busy(off, n int64) bool {
	r.omu.Lock()
	defer r.omu.Unlock()
	for _, o := range r.outstanding {
		if o.n == -1 || (o.off < off+n && off < o.off+o.n) {
			return true
		}
	}
	return false
}

// run waits for deps, then runs f against r with the request timeout,
// and finishes self (the write enqueue recorded, or nil). A replica whose
// request fails is failed before self is finished, so a read that waited
// for this write never reads a replica that missed it.
func (v *Volume) run(s *shard, r *replica, self *op, deps []chan struct{}, f func(context.Context) error) (err error) {
	if self != nil {
		defer func() {
			if err != nil {
				v.fail(s, r, err)
			}
			r.omu.Lock()
			for i, o := range r.outstanding {
				if o == self {
					r.outstanding = append(r.outstanding[:i], r.outstanding[i+1:]...)
					break
				}
			}
			r.omu.Unlock()
			close(self.done)
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), v.cfg.Timeout)
	defer cancel()
	for _, d := range deps {
		select {
		case <-d:
		case <-ctx.Done():
			return fmt.Errorf("replica %s: waiting for earlier writes: %w", r.Node, ctx.Err())
		}
	}
	if r.st() == Failed {
		return fmt.Errorf("replica %s has failed", r.Node)
	}
	return f(ctx)
}

// fail takes r out of service: later I/O skips it, its connection is
// closed, and the failure is reported (retried until recorded). Writes to
// the shard that complete from now on wait for the report.
func (v *Volume) fail(s *shard, r *replica, cause error) *report {
	s.mu.Lock()
	if r.report != nil {
		rep := r.report
		s.mu.Unlock()
		return rep
	}
	wasHealthy := r.st() == Healthy
	r.state.Store(Failed)
	rep := &report{done: make(chan struct{})}
	r.report = rep
	for i, x := range s.reps {
		if x == r {
			s.reps = append(s.reps[:i], s.reps[i+1:]...)
			break
		}
	}
	if wasHealthy {
		s.pending = append(s.pending, rep)
	}
	s.mu.Unlock()
	v.ReplicaFailures.Add(1)
	v.log.Warn("replica failed", "shard", s.idx, "node", r.Node, "healthy_before", wasHealthy, "err", cause)
	if r.c != nil {
		go r.c.Close() // Close waits for the reader; in-flight requests on it fail
	}
	report := func() {
		rep.err = v.retry(fmt.Sprintf("record shard %d replica on %s as failed", s.idx, r.Node), func(ctx context.Context) error {
			ls, err := v.cfg.Reporter.Failed(ctx, s.idx, r.Node, cause.Error())
			if err == nil {
				s.mu.Lock()
				s.gen, s.layout = ls.Gen, ls
				s.mu.Unlock()
			}
			return err
		})
		s.mu.Lock()
		for i, x := range s.pending {
			if x == rep {
				s.pending = append(s.pending[:i], s.pending[i+1:]...)
				break
			}
		}
		s.mu.Unlock()
		close(rep.done)
	}
	if !v.bg.start(report) {
		rep.err = fmt.Errorf("record shard %d replica on %s as failed: volume closed", s.idx, r.Node)
		close(rep.done)
	}
	return rep
}

// retry runs f until it succeeds or the volume is closed, backing off up
// to 2 s between attempts: metadata changes wait out an etcd restart.
func (v *Volume) retry(what string, f func(context.Context) error) error {
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := f(ctx)
		cancel()
		if err == nil {
			if attempt > 1 {
				v.log.Info("metadata change recorded after retries", "what", what, "attempts", attempt)
			}
			return nil
		}
		if attempt == 1 || attempt%10 == 0 {
			v.log.Warn("metadata change failed, retrying", "what", what, "attempt", attempt, "err", err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-v.stop:
			t.Stop()
			return fmt.Errorf("%s: volume closed before it was recorded: %w", what, err)
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// awaitReports waits until every failure report of s that was pending
// when it is called has been recorded.
func (v *Volume) awaitReports(s *shard) error {
	s.mu.Lock()
	pending := append([]*report(nil), s.pending...)
	s.mu.Unlock()
	if len(pending) == 0 {
		return nil
	}
	t := time.NewTimer(v.cfg.ReportTimeout)
	defer t.Stop()
	for _, rep := range pending {
		select {
		case <-rep.done:
			if rep.err != nil {
				return fmt.Errorf("shard %d: %w (%w)", s.idx, rep.err, ErrIO)
			}
		case <-t.C:
			return fmt.Errorf("shard %d: a replica failure was not recorded within %v: %w", s.idx, v.cfg.ReportTimeout, ErrIO)
		}
	}
	return nil
}

// WriteAt writes p at off (storage.Disk). Every replica gets the same
// bytes: they are sent from a copy of p, kept until the last replica has
// the write, so that neither an Eventual write's lagging replicas nor a
// write left behind when ctx ends (and carried on by the engine) can see
// p change or be reused and give two replicas different data. A Strong
// write whose ctx cannot end is on every replica when it returns, and is
// sent from p itself.
func (v *Volume) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if ctx.Done() == nil && v.cfg.Layout.Consistency != Eventual {
		if err := v.write(p, off, func() {}); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	b := getBuf(len(p))
	copy(b.b, p)
	if err := v.bounded(ctx, "write", func() error { return v.write(b.b, off, func() { putBuf(b) }) }); err != nil {
		return 0, err
	}
	return len(p), nil
}

// write writes p at off; landed runs once no replica request reads p any
// more (see mutate).
func (v *Volume) write(p []byte, off int64, landed func()) error {
	pieces, err := v.split(off, int64(len(p)), p)
	if err != nil {
		landed()
		return err
	}
	if len(pieces) == 0 {
		landed()
		return nil
	}
	var left atomic.Int32
	left.Store(int32(len(pieces)))
	pieceLanded := func() {
		if left.Add(-1) == 0 {
			landed()
		}
	}
	return each(pieces, func(pc piece) error {
		return v.mutate(pc, "write", func(ctx context.Context, r *replica) error {
			return r.c.WriteAt(ctx, pc.p, pc.off, false)
		}, pieceLanded)
	})
}

// Discard deallocates a range (NBD TRIM on every replica).
func (v *Volume) Discard(ctx context.Context, off, n int64) error {
	return v.mutateRange(ctx, "discard", off, n, func(ctx context.Context, r *replica, pc piece) error {
		return r.c.Trim(ctx, pc.off, pc.n)
	})
}

// WriteZeroes zeroes a range on every replica.
func (v *Volume) WriteZeroes(ctx context.Context, off, n int64, unmap bool) error {
	return v.mutateRange(ctx, "write zeroes", off, n, func(ctx context.Context, r *replica, pc piece) error {
		return r.c.WriteZeroes(ctx, pc.off, pc.n, !unmap)
	})
}

// mutateRange runs a write-like request without data on every piece of
// [off, off+n).
func (v *Volume) mutateRange(ctx context.Context, what string, off, n int64, f func(context.Context, *replica, piece) error) error {
	return v.bounded(ctx, what, func() error {
		pieces, err := v.split(off, n, nil)
		if err != nil {
			return err
		}
		return each(pieces, func(pc piece) error {
			return v.mutate(pc, what, func(ctx context.Context, r *replica) error { return f(ctx, r, pc) }, func() {})
		})
	})
}

// chunkRange returns the rebuild chunks a piece touches.
func (v *Volume) chunkRange(pc piece) (int, int) {
	cs := v.cfg.ChunkSize
	return int(pc.off / cs), int((pc.off + max(pc.n, 1) - 1) / cs)
}

// mutate sends one write-like request to every healthy and rebuilding
// replica of the piece's shard and waits as the consistency mode says.
//
// landed runs once no replica request of this piece runs any more: under
// Eventual that may be after mutate has returned, and until then the
// piece's bytes must not change.
func (v *Volume) mutate(pc piece, what string, f func(context.Context, *replica) error, landed func()) error {
	s := pc.s
	first, last := v.chunkRange(pc)
	for c := first; c <= last; c++ {
		s.chunks[c].RLock()
	}
	unlock := func() {
		for c := first; c <= last; c++ {
			s.chunks[c].RUnlock()
		}
	}
	s.mu.Lock()
	targets := append([]*replica(nil), s.reps...)
	s.mu.Unlock()
	healthy := 0
	for _, r := range targets {
		if r.st() == Healthy {
			healthy++
		}
	}
	if healthy < v.cfg.Layout.MinReplicas {
		unlock()
		landed()
		if err := v.awaitReports(s); err != nil {
			return fmt.Errorf("%s shard %d: %w", what, s.idx, err)
		}
		return fmt.Errorf("%s shard %d: %d healthy replicas, %d needed: %w", what, s.idx, healthy, v.cfg.Layout.MinReplicas, ErrIO)
	}
	type result struct {
		r   *replica
		err error
	}
	results := make(chan result, len(targets))
	// Lag slots are taken in the order of the replicas' nodes, so that
	// writes waiting for slots on several replicas cannot wait for each
	// other in a cycle.
	slices.SortFunc(targets, func(a, b *replica) int { return strings.Compare(a.Node, b.Node) })
	type job struct {
		r    *replica
		self *op
		deps []chan struct{}
	}
	jobs := make([]job, 0, len(targets))
	for _, r := range targets {
		if !v.acquireLag(s, r) {
			results <- result{r, errors.New("lagging")}
			continue
		}
		jobs = append(jobs, job{r: r})
	}
	// The write is enqueued on every replica at once, under the shard's
	// lock: it is outstanding on all of them before any can acknowledge
	// it (a later read or flush waits for it wherever it goes), and two
	// overlapping writes are ordered the same way on every replica, so
	// the replicas cannot end up with different data.
	s.mu.Lock()
	for i := range jobs {
		jobs[i].self, jobs[i].deps = jobs[i].r.enqueue(pc.off, pc.n, true)
	}
	s.mu.Unlock()
	for _, j := range jobs {
		go func() {
			if testHookWrite != nil {
				testHookWrite(j.r.Node)
			}
			err := v.run(s, j.r, j.self, j.deps, func(ctx context.Context) error { return f(ctx, j.r) })
			<-j.r.lag
			results <- result{j.r, err}
		}()
	}
	acked, pendingN := 0, len(targets)
	wait := func() result { pendingN--; return <-results }
	if v.cfg.Layout.Consistency == Eventual {
		for pendingN > 0 && acked == 0 {
			if res := wait(); res.err == nil && res.r.st() == Healthy {
				acked++
			}
		}
		// The others follow; the chunk locks are held until they land
		// so that a rebuild copy cannot slip between them.
		rest := func() {
			for pendingN > 0 {
				wait()
			}
			unlock()
			landed()
		}
		if !v.bg.start(rest) {
			rest() // closing: no goroutine may start, so wait here
		}
	} else {
		for pendingN > 0 {
			if res := wait(); res.err == nil && res.r.st() == Healthy {
				acked++
			}
		}
		unlock()
		landed()
	}
	if err := v.awaitReports(s); err != nil {
		return fmt.Errorf("%s shard %d: %w", what, s.idx, err)
	}
	need := v.cfg.Layout.MinReplicas
	if v.cfg.Layout.Consistency == Eventual {
		need = 1
	}
	if acked < need {
		return fmt.Errorf("%s shard %d: %d of %d healthy replicas acknowledged, %d needed: %w", what, s.idx, acked, healthy, need, ErrIO)
	}
	return nil
}

// acquireLag takes one of r's MaxLag slots; a replica that stays MaxLag
// requests behind for the request timeout is failed.
func (v *Volume) acquireLag(s *shard, r *replica) bool {
	select {
	case r.lag <- struct{}{}:
		return true
	default:
	}
	t := time.NewTimer(v.cfg.Timeout)
	defer t.Stop()
	select {
	case r.lag <- struct{}{}:
		return true
	case <-t.C:
		v.fail(s, r, fmt.Errorf("%d requests behind for %v", v.cfg.MaxLag, v.cfg.Timeout))
		return false
	}
}

// Flush waits until every replica has every write the guest has been
// acknowledged, then flushes all of them.
func (v *Volume) Flush(ctx context.Context) error {
	return v.bounded(ctx, "flush", v.flush)
}

func (v *Volume) flush() error {
	if err := v.usable(); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	v.guestOps.Add(1)
	errs := make([]error, len(v.shards))
	var wg sync.WaitGroup
	for i, s := range v.shards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = v.flushShard(s)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (v *Volume) flushShard(s *shard) error {
	s.mu.Lock()
	targets := append([]*replica(nil), s.reps...)
	s.mu.Unlock()
	var wg sync.WaitGroup
	var acked atomic.Int32
	for _, r := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// n = -1 orders the flush after every outstanding write.
			err := v.replicaOp(s, r, 0, -1, false, func(ctx context.Context) error { return r.c.Flush(ctx) })
			if err != nil {
				v.fail(s, r, err)
			} else if r.st() == Healthy {
				acked.Add(1)
			}
		}()
	}
	wg.Wait()
	if err := v.awaitReports(s); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	if int(acked.Load()) < v.cfg.Layout.MinReplicas {
		return fmt.Errorf("flush shard %d: %d healthy replicas flushed, %d needed: %w", s.idx, acked.Load(), v.cfg.Layout.MinReplicas, ErrIO)
	}
	return nil
}

// Close waits for lagging writes and reports, then closes every
// connection. It does not flush: call Flush first.
func (v *Volume) Close() error {
	if v.closed.Swap(true) {
		return nil
	}
	v.bg.wait(v.cfg.Timeout + v.cfg.ReportTimeout) // lagging writes land, reports are made
	v.bg.close()
	close(v.stop) // retries, rebuilds and resyncs give up
	v.bg.wait(-1)
	v.closeConns()
	return nil
}

// background counts the volume's goroutines; once closed it starts no
// more, so Close can wait for all of them.
type background struct {
	mu     sync.Mutex
	n      int
	closed bool
	idle   chan struct{} // closed when n drops to 0
}

// start runs f on a goroutine, or reports false once closed.
func (b *background) start(f func()) bool {
	if !b.enter() {
		return false
	}
	go func() {
		defer b.leave()
		f()
	}()
	return true
}

func (b *background) enter() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	if b.n == 0 {
		b.idle = make(chan struct{})
	}
	b.n++
	return true
}

func (b *background) leave() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.n--; b.n == 0 {
		close(b.idle)
	}
}

func (b *background) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
}

// wait waits until nothing runs, at most d (d < 0: for ever).
func (b *background) wait(d time.Duration) {
	b.mu.Lock()
	if b.n == 0 {
		b.mu.Unlock()
		return
	}
	idle := b.idle
	b.mu.Unlock()
	if d < 0 {
		<-idle
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-idle:
	case <-t.C:
	}
}

func (v *Volume) closeConns() {
	for _, s := range v.shards {
		s.mu.Lock()
		reps := s.reps
		s.mu.Unlock()
		for _, r := range reps {
			if r.c != nil {
				r.c.Close()
			}
		}
	}
}

// Layout returns the shard map as this engine sees it now.
func (v *Volume) Layout() Layout {
	l := v.cfg.Layout
	l.Shards = make([]Shard, len(v.shards))
	for i, s := range v.shards {
		s.mu.Lock()
		l.Shards[i] = s.layout
		l.Shards[i].Replicas = append([]Replica(nil), s.layout.Replicas...)
		s.mu.Unlock()
	}
	return l
}
