package ratelimit

import (
	"context"
	"errors"
	"math"
	"testing"
	"time"
)

// fakeClock moves only when told to, or by exactly the requested amount
// when Wait sleeps on it.
type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time          { return c.now }
func (c *fakeClock) Advance(d time.Duration) { c.now = c.now.Add(d) }
func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.Advance(d)
	ch := make(chan time.Time, 1)
	ch <- c.now
	return ch
}

func newFake() *fakeClock { return &fakeClock{now: time.Unix(1000, 0)} }

func mustNew(t *testing.T, cfg Config, clk Clock) *Limiter {
	t.Helper()
	l, err := NewWithClock(cfg, clk)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// step is a request at a point in (fake) time and what must happen.
type step struct {
	advance time.Duration
	bytes   uint64
	ok      bool
	wait    time.Duration // when !ok
}

func TestBytesBucket(t *testing.T) {
	tests := []struct {
		name   string
		bucket BucketConfig
		steps  []step
	}{
		{name: "starts full, then refills linearly", bucket: BucketConfig{Size: 1000, RefillTimeMs: 1000}, steps: []step{
			{bytes: 1000, ok: true},
			{bytes: 1, ok: false, wait: time.Millisecond},
			{advance: 500 * time.Millisecond, bytes: 600, ok: false, wait: 100 * time.Millisecond},
			{bytes: 500, ok: true},
			{bytes: 1, ok: false, wait: time.Millisecond},
		}},
		{name: "refill stops at size", bucket: BucketConfig{Size: 100, RefillTimeMs: 100}, steps: []step{
			{bytes: 100, ok: true},
			{advance: time.Hour, bytes: 101, ok: true}, // oversized and the bucket is full
			{advance: time.Hour, bytes: 100, ok: true},
			{bytes: 1, ok: false, wait: time.Millisecond},
		}},
		{name: "one-time burst is spent first and never refills", bucket: BucketConfig{Size: 100, OneTimeBurst: 50, RefillTimeMs: 1000}, steps: []step{
			{bytes: 30, ok: true}, // burst 50 -> 20
			{bytes: 50, ok: true}, // burst 20 -> 0, budget 100 -> 70
			{bytes: 70, ok: true}, // budget -> 0
			{bytes: 10, ok: false, wait: 100 * time.Millisecond},
			{advance: time.Hour, bytes: 100, ok: true},
			{bytes: 1, ok: false, wait: 10 * time.Millisecond},
		}},
		{name: "burst larger than size", bucket: BucketConfig{Size: 10, OneTimeBurst: 1000, RefillTimeMs: 1000}, steps: []step{
			{bytes: 1000, ok: true},
			{bytes: 10, ok: true},
			{bytes: 10, ok: false, wait: time.Second},
		}},
		{name: "oversized request waits for a full bucket and leaves a debt", bucket: BucketConfig{Size: 100, RefillTimeMs: 1000}, steps: []step{
			{bytes: 50, ok: true},
			{bytes: 250, ok: false, wait: 500 * time.Millisecond},
			{advance: 500 * time.Millisecond, bytes: 250, ok: true}, // budget 100 -> -150
			{bytes: 1, ok: false, wait: 1510 * time.Millisecond},
			{advance: 1510 * time.Millisecond, bytes: 1, ok: true},
		}},
		{name: "a debt too long for a time.Duration waits the longest one, not a nanosecond", bucket: BucketConfig{Size: 1, RefillTimeMs: 1000}, steps: []step{
			{bytes: 1 << 40, ok: true},
			{bytes: 1, ok: false, wait: math.MaxInt64},
		}},
		{name: "rounds waits up", bucket: BucketConfig{Size: 3, RefillTimeMs: 1}, steps: []step{
			{bytes: 3, ok: true},
			{bytes: 1, ok: false, wait: 333334 * time.Nanosecond},
			{advance: 333333 * time.Nanosecond, bytes: 1, ok: false, wait: 1},
			{advance: 1, bytes: 1, ok: true},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFake()
			l := mustNew(t, Config{Bandwidth: tt.bucket}, clk)
			for i, s := range tt.steps {
				clk.Advance(s.advance)
				ok, wait := l.Allow(s.bytes)
				if ok != s.ok || (!ok && wait != s.wait) {
					t.Fatalf("step %d (%d bytes): Allow = %v, %v; want %v, %v", i, s.bytes, ok, wait, s.ok, s.wait)
				}
			}
		})
	}
}

func TestOpsAndBytesTogether(t *testing.T) {
	clk := newFake()
	l := mustNew(t, Config{
		Bandwidth: BucketConfig{Size: 1000, RefillTimeMs: 1000},
		Ops:       BucketConfig{Size: 2, RefillTimeMs: 100},
	}, clk)
	if ok, _ := l.Allow(100); !ok {
		t.Fatal("first request refused")
	}
	if ok, _ := l.Allow(100); !ok {
		t.Fatal("second request refused")
	}
	// Out of ops: refused, and its bytes are not taken.
	if ok, wait := l.Allow(100); ok || wait != 50*time.Millisecond {
		t.Fatalf("third request: %v, %v; want refused for 50ms", ok, wait)
	}
	clk.Advance(50 * time.Millisecond)
	if ok, _ := l.Allow(850); !ok {
		t.Fatal("850 bytes after an op refilled: refused, so the refused request took bytes")
	}
	// Out of both: the longer wait wins.
	if ok, wait := l.Allow(500); ok || wait != 500*time.Millisecond {
		t.Fatalf("500 bytes: %v, %v; want refused for 500ms", ok, wait)
	}
}

func TestWaitKeepsTheRate(t *testing.T) {
	clk := newFake()
	l := mustNew(t, Config{Bandwidth: BucketConfig{Size: 100, RefillTimeMs: 1000}}, clk)
	var total time.Duration
	for range 100 {
		w, err := l.Wait(context.Background(), 10)
		if err != nil {
			t.Fatal(err)
		}
		total += w
	}
	// 1000 bytes at 100 bytes/s with 100 up front: 9 s of throttling.
	if total != 9*time.Second {
		t.Fatalf("throttled %v for 1000 bytes, want 9s", total)
	}
	// Oversized requests keep the same rate: 5 x 300 bytes = 1500 bytes,
	// the bucket is full after the wait for the first.
	total = 0
	for range 5 {
		w, _ := l.Wait(context.Background(), 300)
		total += w
	}
	if total != 13*time.Second {
		t.Fatalf("throttled %v for 5 x 300 bytes, want 13s", total)
	}
}

func TestWaitCancelled(t *testing.T) {
	clk := newFake()
	l := mustNew(t, Config{Ops: BucketConfig{Size: 1, RefillTimeMs: 1000}}, clk)
	l.Allow(0)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	l.clk = stuckClock{clk}
	if _, err := l.Wait(ctx, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait with a cancelled context: %v", err)
	}
}

// stuckClock never fires, so only the context can end a Wait.
type stuckClock struct{ *fakeClock }

func (stuckClock) After(time.Duration) <-chan time.Time { return nil }

func TestDisabledAndInvalid(t *testing.T) {
	l, err := New(Config{})
	if err != nil || l != nil {
		t.Fatalf("New(zero config) = %v, %v; want nil limiter", l, err)
	}
	if ok, _ := l.Allow(1 << 40); !ok {
		t.Fatal("nil limiter refused a request")
	}
	if w, err := l.Wait(context.Background(), 1<<40); w != 0 || err != nil {
		t.Fatalf("nil limiter Wait = %v, %v", w, err)
	}
	tests := []struct {
		name string
		cfg  Config
	}{
		{name: "size without refill", cfg: Config{Bandwidth: BucketConfig{Size: 10}}},
		{name: "refill without size", cfg: Config{Ops: BucketConfig{RefillTimeMs: 10}}},
		{name: "huge", cfg: Config{Ops: BucketConfig{Size: 1 << 63, RefillTimeMs: 10}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.cfg); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func TestRealClockWaits(t *testing.T) {
	l, err := New(Config{Ops: BucketConfig{Size: 1, RefillTimeMs: 20}})
	if err != nil {
		t.Fatal(err)
	}
	l.Allow(0)
	w, err := l.Wait(context.Background(), 0)
	if err != nil || w <= 0 {
		t.Fatalf("Wait on an empty bucket = %v, %v; want a positive wait", w, err)
	}
}

// waitingClock never fires; it reports each After call, which is a Wait
// going to sleep.
type waitingClock struct {
	*fakeClock
	sleeping chan time.Duration
}

func (c waitingClock) After(d time.Duration) <-chan time.Time {
	c.sleeping <- d
	return nil
}

// TestUpdate: a live change takes effect at once, wakes a request waiting
// under the old limits, and an invalid change leaves the old limits.
func TestUpdate(t *testing.T) {
	clk := waitingClock{newFake(), make(chan time.Duration, 1)}
	l, err := NewWithClock(Config{}, clk)
	if err != nil || l == nil {
		t.Fatalf("NewWithClock(unlimited) = %v, %v; want a limiter", l, err)
	}
	if ok, _ := l.Allow(1 << 40); !ok {
		t.Fatal("unlimited limiter refused a request")
	}
	// One byte per hour: the second request would wait an hour.
	if err := l.Update(Config{Bandwidth: BucketConfig{Size: 1, RefillTimeMs: 3600_000}}); err != nil {
		t.Fatal(err)
	}
	l.Allow(1)
	if ok, wait := l.Allow(1); ok || wait < time.Minute {
		t.Fatalf("after the update: ok %v, wait %v; want a wait of about an hour", ok, wait)
	}
	done := make(chan error, 1)
	go func() { _, err := l.Wait(context.Background(), 1); done <- err }()
	if d := <-clk.sleeping; d < time.Minute {
		t.Fatalf("Wait sleeps %v, want about an hour", d)
	}
	// The waiter sleeps on a timer that never fires: only Update can
	// wake it.
	if err := l.Update(Config{Bandwidth: BucketConfig{Size: 1 << 30, RefillTimeMs: 1000}}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case d := <-clk.sleeping:
		t.Fatalf("after the update the waiter went back to sleep for %v", d)
	case <-time.After(time.Minute):
		t.Fatal("a waiting request was not woken by Update")
	}
	if err := l.Update(Config{Ops: BucketConfig{Size: 10}}); err == nil {
		t.Fatal("invalid update accepted")
	}
	if ok, _ := l.Allow(1 << 20); !ok {
		t.Fatal("an invalid update changed the limits")
	}
	if err := l.Update(Config{}); err != nil || l.active.Load() {
		t.Fatalf("update to unlimited: %v, active %v", err, l.active.Load())
	}
}

// TestUpdateConcurrent runs Update against Allow and Wait (meant for -race).
func TestUpdateConcurrent(t *testing.T) {
	l, _ := NewUpdatable(Config{Ops: BucketConfig{Size: 1000, RefillTimeMs: 1}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 2000 {
			if _, err := l.Wait(ctx, 10); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := range 200 {
		cfg := Config{}
		if i%2 == 0 {
			cfg.Ops = BucketConfig{Size: uint64(100 + i), RefillTimeMs: 1}
		}
		if err := l.Update(cfg); err != nil {
			t.Fatal(err)
		}
	}
	<-done
}
