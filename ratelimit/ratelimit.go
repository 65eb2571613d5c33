// Package ratelimit is the token-bucket I/O throttle for virtio devices,
// with Firecracker's semantics: a bucket has a size, a refill time (the
// time to refill an empty bucket to its size, linearly) and a one-time
// burst, an extra budget that is consumed first and never refills. A
// Limiter pairs a bytes bucket with an operations bucket and admits a
// request only when both can pay for it.
//
// A request larger than a bucket's size can never be paid for in one go;
// like Firecracker, rayvmm still lets it through rather than stall the
// device forever: it passes once the bucket is full, empties it and leaves
// the excess as a debt that the refill pays off before anything else
// passes. (Firecracker admits such a request at once and then blocks the
// limiter for the excess' refill time while still refilling the bucket,
// which over-admits by up to one bucket per oversized request; a debt
// keeps the long-run rate exact.)
//
// A Limiter's buckets can be replaced while requests go through it
// (Update, for the VM API's live rate-limit changes): the new buckets start
// full, as Firecracker's PATCH makes them, and a request waiting under the
// old limits is woken to try again under the new ones.
//
// Why not golang.org/x/time/rate: its Limiter has one burst that is both
// the starting budget and the refill cap, so a one-time burst on top of a
// smaller refilling bucket cannot be expressed; and WaitN/ReserveN refuse
// outright any request larger than the burst, where Firecracker's bucket
// admits it. Both are observable to a guest (a boot-time burst, large
// virtio-blk requests), so the bucket is implemented here, with integer
// arithmetic and an injectable clock.
package ratelimit

import (
	"context"
	"fmt"
	"math"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
)

// BucketConfig configures one token bucket; the JSON names are
// Firecracker's. A zero Size or RefillTime disables the bucket.
type BucketConfig struct {
	// Size is the bucket's capacity in tokens (bytes or operations).
	Size uint64 `json:"size"`
	// OneTimeBurst is an initial extra budget that does not refill.
	OneTimeBurst uint64 `json:"one_time_burst,omitempty"`
	// RefillTimeMs is how long an empty bucket takes to refill to Size.
	RefillTimeMs uint64 `json:"refill_time"`
}

// Enabled reports whether the configuration limits anything.
func (c BucketConfig) Enabled() bool { return c.Size > 0 && c.RefillTimeMs > 0 }

// Validate reports a configuration that cannot be used.
func (c BucketConfig) Validate() error {
	if (c.Size == 0) != (c.RefillTimeMs == 0) {
		return fmt.Errorf("rate limit bucket: size %d and refill_time %d ms must both be set or both be 0", c.Size, c.RefillTimeMs)
	}
	if c.Size > math.MaxInt64 || c.OneTimeBurst > math.MaxInt64 || c.RefillTimeMs > math.MaxInt64/uint64(time.Millisecond) {
		return fmt.Errorf("rate limit bucket: value too large")
	}
	return nil
}

// Clock is the time source; tests use a fake one.
type Clock interface {
	Now() time.Time
	// After returns a channel that receives once d has passed.
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Bucket is one token bucket. It is not safe for concurrent use on its
// own; a Limiter serialises access.
type Bucket struct {
	size     int64
	refillNs int64
	burst    int64 // one-time burst left
	budget   int64 // may be negative: debt from an oversized request
	last     time.Time
}

func newBucket(c BucketConfig, now time.Time) *Bucket {
	if !c.Enabled() {
		return nil
	}
	return &Bucket{
		size:     int64(c.Size),
		refillNs: int64(c.RefillTimeMs) * int64(time.Millisecond),
		burst:    int64(c.OneTimeBurst),
		budget:   int64(c.Size),
		last:     now,
	}
}

// mulDiv is floor(a*b/c) without overflow in the product, saturating.
func mulDiv(a, b, c uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	if hi >= c {
		return math.MaxInt64
	}
	q, _ := bits.Div64(hi, lo, c)
	return min(q, math.MaxInt64)
}

// refill adds the tokens earned since the last refill, up to size.
func (b *Bucket) refill(now time.Time) {
	e := now.Sub(b.last)
	if e <= 0 {
		return
	}
	missing := uint64(b.size - b.budget)
	if missing == 0 {
		b.last = now
		return
	}
	add := mulDiv(uint64(e), uint64(b.size), uint64(b.refillNs))
	if add >= missing {
		b.budget = b.size
		b.last = now
		return
	}
	b.budget += int64(add)
	// Advance by the time those tokens took, keeping the remainder.
	b.last = b.last.Add(time.Duration((mulDiv(add, uint64(b.refillNs), uint64(b.size)))))
}

// timeFor is how long from now the refill takes to bring the budget up to
// target. The budget is what it was at b.last (refill keeps it so).
func (b *Bucket) timeFor(target int64, now time.Time) time.Duration {
	deficit := uint64(target - b.budget)
	d := mulDiv(deficit, uint64(b.refillNs), uint64(b.size))
	if d < math.MaxInt64 && mulDiv(d, uint64(b.size), uint64(b.refillNs)) < deficit {
		d++ // round up so that waiting d is always enough (a saturated d is)
	}
	return max(1, time.Duration(d)-now.Sub(b.last))
}

// check reports whether n tokens can be taken now, or how long until they
// can. It changes nothing but the refill.
func (b *Bucket) check(n int64, now time.Time) (bool, time.Duration) {
	if b == nil {
		return true, 0
	}
	b.refill(now)
	if n <= b.burst {
		return true, 0
	}
	need := n - b.burst
	if need > b.size {
		// Oversized: passes once the bucket is full.
		if b.budget >= b.size {
			return true, 0
		}
		return false, b.timeFor(b.size, now)
	}
	if need <= b.budget {
		return true, 0
	}
	return false, b.timeFor(need, now)
}

// take removes n tokens that check allowed: the one-time burst first.
func (b *Bucket) take(n int64) {
	if b == nil {
		return
	}
	if n <= b.burst {
		b.burst -= n
		return
	}
	n -= b.burst
	b.burst = 0
	b.budget -= n
}

// Config configures a Limiter; either bucket may be disabled.
type Config struct {
	Bandwidth BucketConfig `json:"bandwidth"`
	Ops       BucketConfig `json:"ops"`
}

// Limiter throttles requests by bytes and by count. A nil *Limiter
// admits everything. It is safe for concurrent use, and Update changes its
// buckets while requests go through it.
type Limiter struct {
	mu      sync.Mutex
	clk     Clock
	bytes   *Bucket
	ops     *Bucket
	changed chan struct{} // closed and replaced by Update, to wake Wait
	// active is false while both buckets are disabled, so that an
	// unlimited Limiter (one kept for a later Update) costs no lock.
	active atomic.Bool
}

// New returns a Limiter on the real clock, or nil if cfg limits nothing.
func New(cfg Config) (*Limiter, error) {
	l, err := NewWithClock(cfg, realClock{})
	if err != nil || !l.active.Load() {
		return nil, err
	}
	return l, nil
}

// NewUpdatable returns a Limiter on the real clock even when cfg limits
// nothing, so that Update can add limits later (a live API change).
func NewUpdatable(cfg Config) (*Limiter, error) { return NewWithClock(cfg, realClock{}) }

// NewWithClock is NewUpdatable with a given clock.
func NewWithClock(cfg Config, clk Clock) (*Limiter, error) {
	l := &Limiter{clk: clk, changed: make(chan struct{})}
	if err := l.Update(cfg); err != nil {
		return nil, err
	}
	return l, nil
}

// Update replaces the buckets with new ones built from cfg, full, as
// Firecracker's PATCH does; a request waiting in Wait retries at once
// under the new limits. An invalid cfg changes nothing.
func (l *Limiter) Update(cfg Config) error {
	if err := cfg.Bandwidth.Validate(); err != nil {
		return fmt.Errorf("bandwidth: %w", err)
	}
	if err := cfg.Ops.Validate(); err != nil {
		return fmt.Errorf("ops: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clk.Now()
	l.bytes, l.ops = newBucket(cfg.Bandwidth, now), newBucket(cfg.Ops, now)
	l.active.Store(l.bytes != nil || l.ops != nil)
	close(l.changed)
	l.changed = make(chan struct{})
	return nil
}

// Allow admits one request of n bytes if both buckets can pay for it now,
// taking the tokens; otherwise it takes nothing and reports how long to
// wait before trying again.
func (l *Limiter) Allow(n uint64) (ok bool, retryAfter time.Duration) {
	ok, retryAfter, _ = l.allow(n)
	return ok, retryAfter
}

// allow is Allow, also returning the channel an Update closes.
func (l *Limiter) allow(n uint64) (bool, time.Duration, <-chan struct{}) {
	if l == nil || !l.active.Load() {
		return true, 0, nil
	}
	bytesN := int64(min(n, math.MaxInt64))
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clk.Now()
	okB, waitB := l.bytes.check(bytesN, now)
	okO, waitO := l.ops.check(1, now)
	if !okB || !okO {
		return false, max(waitB, waitO), l.changed
	}
	l.bytes.take(bytesN)
	l.ops.take(1)
	return true, 0, nil
}

// Wait blocks until a request of n bytes is admitted, or ctx ends. It
// returns how long it was throttled (for the throttled-time metric).
func (l *Limiter) Wait(ctx context.Context, n uint64) (time.Duration, error) {
	if l == nil || !l.active.Load() {
		return 0, nil
	}
	start := l.clk.Now()
	for {
		ok, d, changed := l.allow(n)
		if ok {
			return l.clk.Now().Sub(start), nil
		}
		select {
		case <-ctx.Done():
			return l.clk.Now().Sub(start), fmt.Errorf("rate limit wait: %w", ctx.Err())
		case <-changed:
		case <-l.clk.After(d):
		}
	}
}
