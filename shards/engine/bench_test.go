package engine

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// The benchmarks run the sharded data path (this engine, NBD over
// loopback TCP to in-process servers on raw files) with R = 1, 2 and 3
// strong replicas, and the same I/O with pread/pwrite on one local raw
// file, interleaved in rounds in the same run. qd is the number of
// requests in flight (goroutines): 1 is what the virtio-blk device issues
// today, 16 what a concurrent device will. ratio = sharded rate / raw
// rate. The servers share the machine's two cores with the client, so the
// ratios are a floor for separate storage hosts. Nothing is asserted.

const benchVolSize = 64 << 20

func BenchmarkRandRead4K(b *testing.B)  { benchReplicas(b, false, 4096, true) }
func BenchmarkRandWrite4K(b *testing.B) { benchReplicas(b, true, 4096, true) }
func BenchmarkSeqRead1M(b *testing.B)   { benchReplicas(b, false, 1<<20, false) }
func BenchmarkSeqWrite1M(b *testing.B)  { benchReplicas(b, true, 1<<20, false) }

func benchReplicas(b *testing.B, write bool, bs int, random bool) {
	for _, r := range []int{1, 2, 3} {
		for _, qd := range []int{1, 16} {
			if bs >= 1<<20 && qd > 4 {
				qd = 4
			}
			b.Run(fmt.Sprintf("r%d-qd%d", r, qd), func(b *testing.B) { benchIO(b, r, qd, write, bs, random) })
		}
	}
}

func benchIO(b *testing.B, replicas, qd int, write bool, bs int, random bool) {
	names := []string{"a", "b", "c"}[:replicas]
	c := newCluster(b, names, 4, benchVolSize/4, Strong, 1)
	v, err := Open(b.Context(), Config{Layout: c.layout, Dialer: c, Reporter: c})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	rawPath := filepath.Join(b.TempDir(), "raw")
	f, err := os.Create(rawPath)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	data := make([]byte, benchVolSize)
	for i := range data {
		data[i] = byte(i * 13)
	}
	if _, err := f.WriteAt(data, 0); err != nil {
		b.Fatal(err)
	}
	if _, err := v.WriteAt(context.Background(), data[:16<<20], 0); err != nil { // the same data, so reads read data, not holes
		b.Fatal(err)
	}
	for off := int64(16 << 20); off < benchVolSize; off += 16 << 20 {
		if _, err := v.WriteAt(context.Background(), data[off:off+16<<20], off); err != nil {
			b.Fatal(err)
		}
	}
	n := b.N
	offs := make([]int64, n)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range offs {
		if random {
			offs[i] = rng.Int64N(benchVolSize/int64(bs)) * int64(bs)
		} else {
			offs[i] = int64(i*bs) % benchVolSize
		}
	}
	// The engine is driven as the blk device drives it: with a context
	// that can end (a device reset), so its bounce buffers are in the
	// measurement.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type disk interface {
		ReadAt(ctx context.Context, p []byte, off int64) (int, error)
		WriteAt(ctx context.Context, p []byte, off int64) (int, error)
	}
	do := func(at disk, part []int64) time.Duration {
		var wg sync.WaitGroup
		start := time.Now()
		for g := range qd {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, bs)
				for i := g; i < len(part); i += qd {
					var err error
					if write {
						_, err = at.WriteAt(ctx, buf, part[i])
					} else {
						_, err = at.ReadAt(ctx, buf, part[i])
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		return time.Since(start)
	}
	var raw, dur time.Duration
	const rounds = 10
	b.ResetTimer()
	for r := range rounds {
		part := offs[r*n/rounds : (r+1)*n/rounds]
		raw += do(fileAt{f}, part)
		dur += do(v, part)
	}
	b.StopTimer()
	rate, rawRate := float64(n)/dur.Seconds(), float64(n)/raw.Seconds()
	if random {
		b.ReportMetric(rate, "iops")
		b.ReportMetric(rawRate, "raw-iops")
	} else {
		b.ReportMetric(rate*float64(bs)/1e6, "MB/s")
		b.ReportMetric(rawRate*float64(bs)/1e6, "raw-MB/s")
	}
	b.ReportMetric(rate/rawRate, "ratio")
}

// BenchmarkRebuildThrottle measures guest 4 KiB random writes (qd 1)
// alone and while a rebuild of one replica of every shard runs, in the
// same run: ratio = write rate during the rebuild / rate alone (goal:
// at least 0.5; the rebuild copies at most half the time while the guest
// does I/O).
func BenchmarkRebuildThrottle(b *testing.B) {
	c := newCluster(b, []string{"a", "b"}, 4, benchVolSize/4, Strong, 1)
	v, err := Open(b.Context(), Config{Layout: c.layout, Dialer: c, Reporter: c})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	buf := make([]byte, 4096)
	rng := rand.New(rand.NewPCG(3, 4))
	writes := func(n int) time.Duration {
		start := time.Now()
		for range n {
			if _, err := v.WriteAt(context.Background(), buf, rng.Int64N(benchVolSize/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(start)
	}
	n := max(b.N, 200)
	var alone, during time.Duration
	var copied int64
	b.ResetTimer()
	for range 3 {
		alone += writes(n)
		// Fail b's replicas and rebuild them while the writes run.
		for i := range 4 {
			c.mu.Lock()
			c.layout.Shards[i].MarkFailed("b")
			c.mu.Unlock()
			v.Drop(i, "b")
		}
		done := make(chan error, 1)
		go func() {
			for i := range 4 {
				c.mu.Lock()
				sh := &c.layout.Shards[i]
				sh.Replicas[sh.Find("b")].State = Rebuilding
				r := sh.Replicas[sh.Find("b")]
				c.mu.Unlock()
				if err := v.Rebuild(context.Background(), i, r); err != nil {
					done <- err
					return
				}
				copied += benchVolSize / 4
			}
			done <- nil
		}()
		during += writes(n)
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(3*n)/during.Seconds(), "iops")
	b.ReportMetric(float64(3*n)/alone.Seconds(), "raw-iops")
	b.ReportMetric(alone.Seconds()/during.Seconds(), "ratio")
}

// fileAt is a file with the engine's method set, for the raw side.
type fileAt struct{ f *os.File }

func (f fileAt) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	return f.f.ReadAt(p, off)
}

func (f fileAt) WriteAt(_ context.Context, p []byte, off int64) (int, error) {
	return f.f.WriteAt(p, off)
}
