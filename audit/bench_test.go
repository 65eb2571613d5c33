package audit

import (
	"context"
	"os"
	"syscall"
	"testing"
	"time"
)

// Appends from one goroutine, one by one: each is a write and an
// fdatasync (the CLI's and `rayvmm boot`'s path).
func BenchmarkAppendOneWriter(b *testing.B) {
	tl := newTestLog(b)
	l := tl.open(b, 0, 0)
	defer l.Close()
	e := entry(1)
	before := Syncs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := l.Append(context.Background(), e); err != nil {
			b.Fatal(err)
		}
	}
	reportAppends(b, b.N, before)
}

// Appends from 64 goroutines sharing one Log: group commit, the path of a
// daemon that serializes its own writers.
func BenchmarkAppendDaemonPath(b *testing.B) {
	tl := newTestLog(b)
	l := tl.open(b, 0, 0)
	defer l.Close()
	e := entry(1)
	before := Syncs()
	b.SetParallelism(32) // 64 goroutines on 2 CPUs
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := l.Append(context.Background(), e); err != nil {
				b.Error(err)
			}
		}
	})
	reportAppends(b, b.N, before)
}

// Appends from 8 processes at once, one by one each, serialized by the
// flock: the path of CLI commands and `rayvmm boot`s running together.
func BenchmarkAppend8Processes(b *testing.B) {
	tl := newTestLog(b)
	n := max(b.N/8, 1)
	var ps []*proc
	for i := range 8 {
		ps = append(ps, startHelper(b, "append", helperEnv{Dir: tl.dir, Keys: tl.keys, N: n, ID: i, SealEvery: DefaultSealEvery}))
	}
	for _, p := range ps {
		p.waitFor(b, "ready", nil)
	}
	b.ResetTimer()
	start := time.Now()
	for _, p := range ps {
		p.go_(b)
	}
	var syncs int64
	for _, p := range ps {
		syncs += p.finish(b).Syncs.Log
	}
	el := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(8*n)/el.Seconds(), "appends/s")
	b.ReportMetric(float64(syncs)/float64(8*n), "fdatasyncs/append")
}

func reportAppends(b *testing.B, n int, before SyncCounts) {
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "appends/s")
	b.ReportMetric(float64(Syncs().Log-before.Log)/float64(n), "fdatasyncs/append")
}

// Verify a log of 1 million records (sealed every 256, 8 MiB files),
// written in the setup.
func BenchmarkVerify1M(b *testing.B) {
	const records = 1_000_000
	tl := newTestLog(b)
	l := tl.open(b, 0, 0)
	batch := make([]Entry, 10_000)
	for i := range batch {
		batch[i] = entry(i)
	}
	for range records / len(batch) {
		if _, err := l.Append(context.Background(), batch...); err != nil {
			b.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		b.Fatal(err)
	}
	var size int64
	files, _ := listFiles(tl.dir)
	for _, n := range files {
		fi, _ := os.Stat(tl.file(n))
		size += fi.Size()
	}
	cpu0 := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		s, err := tl.verify()
		if err != nil {
			b.Fatal(err)
		}
		if s.Records != records {
			b.Fatalf("%+v", s)
		}
	}
	b.ReportMetric(b.Elapsed().Seconds()/float64(b.N), "s/1M-records")
	b.ReportMetric((cpuTime()-cpu0).Seconds()/float64(b.N), "cpu-s/1M-records")
	b.ReportMetric(float64(size)/1e6, "MB")
	b.ReportMetric(float64(len(files)), "files")
}

// cpuTime is the CPU time (user and system) this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
