package nbd

import (
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/storage/raw"
)

// The server benchmarks serve one 64 MiB raw file twice, by rayvmm's
// server and by qemu-nbd, and drive both with the same client in the same
// run, interleaved in rounds: qemu-img bench (qemu's NBD client, 16
// requests in flight) and rayvmm's Client. ratio = qemu-nbd time /
// rayvmm time (above 1: rayvmm's server is faster). Nothing is asserted.

const benchFileSize = 64 << 20

func BenchmarkServerQemuImg(b *testing.B) {
	for _, c := range []struct {
		name  string
		write bool
		bs    int
	}{{"randread4k", false, 4096}, {"randwrite4k", true, 4096}, {"seqread1m", false, 1 << 20}, {"seqwrite1m", true, 1 << 20}} {
		b.Run(c.name, func(b *testing.B) {
			ours, theirs := benchServers(b)
			count := b.N
			args := func(addr string) []string {
				a := []string{"bench", "-f", "raw", "-c", strconv.Itoa(count), "-d", "16", "-s", strconv.Itoa(c.bs), "-t", "none"}
				if c.bs == 4096 {
					a = append(a, "-S", "4096") // qemu-img bench steps sequentially; 4k steps over 64 MiB
				}
				if c.write {
					a = append(a, "-w")
				}
				return append(a, "nbd://"+addr+"/e")
			}
			run := func(addr string) time.Duration {
				start := time.Now()
				if out, err := exec.Command("qemu-img", args(addr)...).CombinedOutput(); err != nil {
					b.Fatalf("qemu-img bench: %v\n%s", err, out)
				}
				return time.Since(start)
			}
			var tOurs, tTheirs time.Duration
			b.ResetTimer()
			for range 3 {
				tOurs += run(ours)
				tTheirs += run(theirs)
			}
			b.StopTimer()
			report(b, c.bs, 3*count, tOurs, tTheirs)
		})
	}
}

func BenchmarkServerGoClient(b *testing.B) {
	for _, c := range []struct {
		name  string
		write bool
		bs    int
		qd    int
	}{{"randread4k-qd1", false, 4096, 1}, {"randread4k-qd16", false, 4096, 16}, {"randwrite4k-qd16", true, 4096, 16}, {"seqread1m-qd4", false, 1 << 20, 4}} {
		b.Run(c.name, func(b *testing.B) {
			ours, theirs := benchServers(b)
			ctx := context.Background()
			co, err := Dial(ctx, ours, "e")
			if err != nil {
				b.Fatal(err)
			}
			defer co.Close()
			ct, err := Dial(ctx, theirs, "e")
			if err != nil {
				b.Fatal(err)
			}
			defer ct.Close()
			run := func(cl *Client, n int) time.Duration {
				var wg sync.WaitGroup
				start := time.Now()
				for g := range c.qd {
					wg.Add(1)
					go func() {
						defer wg.Done()
						rng := rand.New(rand.NewPCG(uint64(g), 9))
						buf := make([]byte, c.bs)
						for i := g; i < n; i += c.qd {
							off := rng.Int64N(benchFileSize/int64(c.bs)) * int64(c.bs)
							var err error
							if c.write {
								err = cl.WriteAt(ctx, buf, off, false)
							} else {
								err = cl.ReadAt(ctx, buf, off)
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
			var tOurs, tTheirs time.Duration
			b.ResetTimer()
			const rounds = 5
			for range rounds {
				tOurs += run(co, b.N/rounds+1)
				tTheirs += run(ct, b.N/rounds+1)
			}
			b.StopTimer()
			report(b, c.bs, rounds*(b.N/rounds+1), tOurs, tTheirs)
		})
	}
}

func report(b *testing.B, bs, n int, ours, theirs time.Duration) {
	if bs >= 1<<20 {
		b.ReportMetric(float64(n*bs)/1e6/ours.Seconds(), "MB/s")
		b.ReportMetric(float64(n*bs)/1e6/theirs.Seconds(), "qemu-nbd-MB/s")
	} else {
		b.ReportMetric(float64(n)/ours.Seconds(), "iops")
		b.ReportMetric(float64(n)/theirs.Seconds(), "qemu-nbd-iops")
	}
	b.ReportMetric(theirs.Seconds()/ours.Seconds(), "ratio")
}

// benchServers serves two copies of the same 64 MiB of data on the same
// file system, one by rayvmm's server (in this process) and one by
// qemu-nbd.
func benchServers(b *testing.B) (ours, theirs string) {
	testenv.RequireTool(b, "qemu-nbd")
	testenv.RequireTool(b, "qemu-img")
	data := make([]byte, benchFileSize)
	for i := range data {
		data[i] = byte(i * 7)
	}
	dir := b.TempDir()
	p, q := filepath.Join(dir, "ours.raw"), filepath.Join(dir, "theirs.raw")
	for _, f := range []string{p, q} {
		if err := os.WriteFile(f, data, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	f, err := raw.Open(p, false)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	_, ours = startServer(b, StaticExports{"e": {Name: "e", Backend: f}})
	return ours, QemuNBD(b, q, "e")
}
