package blk

import (
	"context"
	"encoding/binary"
	"fmt"
	"golang.org/x/sys/unix"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// The benchmarks drive the device through the mock queue against a file
// in the test's temp dir, and do the same I/O with plain pread/pwrite on
// that file in the same run. They report the device's and the raw rate
// and their ratio (goal: >= 0.9); nothing is asserted about time.

const benchDiskSize = 64 << 20

func BenchmarkRandRead4K(b *testing.B)  { benchDepths(b, TypeIn, 4096, true, 1, 16) }
func BenchmarkRandWrite4K(b *testing.B) { benchDepths(b, TypeOut, 4096, true, 1, 16) }
func BenchmarkSeqRead1M(b *testing.B)   { benchDepths(b, TypeIn, 1<<20, false, 1, 4) }
func BenchmarkSeqWrite1M(b *testing.B)  { benchDepths(b, TypeOut, 1<<20, false, 1, 4) }

// benchDepths runs the device on its goroutine at each queue depth, and
// once inline: the driver calls the device's drain loop itself, so the
// ratio shows the device's own per-request cost without the cross-thread
// notification and interrupt hand-offs.
func benchDepths(b *testing.B, typ uint32, bs int, random bool, depths ...int) {
	for _, qd := range depths {
		b.Run(fmt.Sprintf("qd%d", qd), func(b *testing.B) { benchIO(b, typ, bs, random, qd, false) })
	}
	qd := depths[len(depths)-1]
	b.Run(fmt.Sprintf("inline-qd%d", qd), func(b *testing.B) { benchIO(b, typ, bs, random, qd, true) })
}

func benchIO(b *testing.B, typ uint32, bs int, random bool, qd int, inline bool) {
	dir := b.TempDir()
	path := filepath.Join(dir, "bench.raw")
	if err := os.WriteFile(path, pattern(benchDiskSize), 0o644); err != nil {
		b.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	disk := &fileDisk{f: f, size: benchDiskSize}

	n := b.N
	offs := make([]int64, n)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range offs {
		if random {
			offs[i] = rng.Int64N(benchDiskSize/int64(bs)) * int64(bs)
		} else {
			offs[i] = int64(i*bs) % benchDiskSize
		}
	}

	// Device: qd requests in flight through the mock driver.
	mem, err := memory.New(memory.Range{Base: 0, Size: uint64(1<<20 + qd*(bs+8192))})
	if err != nil {
		b.Fatal(err)
	}
	defer mem.Close()
	drv, err := queuetest.New(mem, 0, DefaultQueueSize)
	if err != nil {
		b.Fatal(err)
	}
	drv.EventIdx, drv.Indirect = true, true
	dev, err := New(Config{Disk: disk, QueueSize: DefaultQueueSize})
	if err != nil {
		b.Fatal(err)
	}
	defer dev.Close()
	dev.Ack(dev.Features())
	q, err := queue.New(mem, DefaultQueueSize, drv.Config())
	if err != nil {
		b.Fatal(err)
	}
	irq := &chanIRQ{make(chan struct{}, 1)}
	var w *worker
	if inline {
		w = dev.newWorker(context.Background(), mem, irq, q)
		w.pollWindow = 0 // nobody else will fill the ring while it polls
		w.maxExec = 0    // the driver's goroutine runs every request
	} else if err := dev.Activate(mem, irq, []*queue.Queue{q}); err != nil {
		b.Fatal(err)
	}
	type slot struct{ hdr, data, status memory.GuestAddr }
	slots := make([]slot, qd)
	free := make([]int, 0, qd)
	byHead := map[uint16]int{}
	for i := range slots {
		s := &slots[i]
		if s.hdr, err = drv.Alloc(16); err == nil {
			if s.status, err = drv.Alloc(1); err == nil {
				s.data, err = drv.Alloc(uint64(bs))
			}
		}
		if err != nil {
			b.Fatal(err)
		}
		free = append(free, i)
	}
	// Raw: the same I/O with pread/pwrite from one buffer.
	buf := pattern(bs)
	rawIO := func(offs []int64) {
		for _, off := range offs {
			if typ == TypeIn {
				_, err = f.ReadAt(buf, off)
			} else {
				_, err = f.WriteAt(buf, off)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	}
	devIO := func(offs []int64) {
		issued, done := 0, 0
		for done < len(offs) {
			for len(free) > 0 && issued < len(offs) {
				i := free[len(free)-1]
				free = free[:len(free)-1]
				s := slots[i]
				var h [16]byte
				binary.LittleEndian.PutUint32(h[0:], typ)
				binary.LittleEndian.PutUint64(h[8:], uint64(offs[issued]/SectorSize))
				_ = mem.Write(s.hdr, h[:])
				head, err := drv.Add(rd(s.hdr, 16), queuetest.Buf{Addr: s.data, Len: uint32(bs), Write: typ == TypeIn}, wr(s.status, 1))
				if err != nil {
					b.Fatal(err)
				}
				byHead[head] = i
				issued++
			}
			if w != nil {
				if err := w.drain(); err != nil {
					b.Fatal(err)
				}
			} else if kick, _ := drv.NeedsKick(); kick {
				dev.Notify(0)
			}
			reaped := false
			for {
				id, _, ok, err := drv.Used()
				if err != nil {
					b.Fatal(err)
				}
				if !ok {
					break
				}
				i := byHead[uint16(id)]
				if st, _ := mem.Slice(slots[i].status, 1); st[0] != StatusOK {
					b.Fatalf("request failed with status %d", st[0])
				}
				free = append(free, i)
				done++
				reaped = true
			}
			if !reaped {
				<-irq.c
			}
		}
	}
	// Interleave the two in rounds so that load from other processes on
	// the machine falls on both alike.
	var raw, dur, devCPU time.Duration
	const rounds = 10
	b.ResetTimer()
	for r := range rounds {
		part := offs[r*n/rounds : (r+1)*n/rounds]
		start := time.Now()
		rawIO(part)
		raw += time.Since(start)
		start = time.Now()
		c0 := cpuNow()
		devIO(part)
		devCPU += cpuNow() - c0
		dur += time.Since(start)
	}
	b.StopTimer()

	devRate, rawRate := float64(n)/dur.Seconds(), float64(n)/raw.Seconds()
	if random {
		b.ReportMetric(devRate, "iops")
		b.ReportMetric(rawRate, "raw-iops")
	} else {
		b.ReportMetric(devRate*float64(bs)/1e6, "MB/s")
		b.ReportMetric(rawRate*float64(bs)/1e6, "raw-MB/s")
	}
	b.ReportMetric(devRate/rawRate, "ratio")
	b.ReportMetric(float64(devCPU)/float64(dur), "cores")
	b.ReportMetric(float64(devCPU.Nanoseconds())/float64(n), "cpu-ns/req")
}

func cpuNow() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
