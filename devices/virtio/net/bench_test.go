package net

import (
	"fmt"
	"math"
	"testing"
	"time"
)

// The benchmarks move frames between the mock queue and a TAP on a bridge
// in a namespace, and in the same run do the same with a raw read/write
// loop on another TAP of that bridge, reporting both and their ratio
// (device/raw: 1.0 means the device costs nothing over the TAP itself):
//
//	go test -run XXX -bench . -benchtime 200000x ./devices/virtio/net
//
// The two alternate in rounds, so both see the same load on a shared
// machine. Transmit: frames go to the peer TAP's learned MAC (nobody reads
// the peer, so the kernel drops them at its queue: the cost measured is
// the path into the kernel). Receive: the peer TAP sends to the device's
// (or the raw TAP's) MAC, at most rxWindow frames in flight.

var benchSizes = []int{64, 1500}

const (
	rxWindow    = 128
	benchRounds = 10
)

func BenchmarkTx(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			env := newTapEnv(b)
			learn(b, env.peer.Port(), env.peer.MAC)
			frame := ethFrame(size, 0)
			copy(frame, env.peer.MAC)
			h := newHarness(b, Config{Port: noClose{env.dev.Port()}, MAC: env.dev.MAC}, true)
			var raw, dev time.Duration
			b.ResetTimer()
			for _, n := range rounds(b.N) {
				copy(frame[6:], env.raw.MAC)
				start := time.Now()
				for range n {
					if _, err := env.raw.Port().Write(frame); err != nil {
						b.Fatal(err)
					}
				}
				raw += time.Since(start)
				copy(frame[6:], env.dev.MAC)
				start = time.Now()
				if got := h.feedTx(frame, n, nil); got != n {
					b.Fatalf("sent %d of %d", got, n)
				}
				dev += time.Since(start)
			}
			b.StopTimer()
			if s := h.dev.Metrics().Snapshot(); s.TxFrames != uint64(b.N) {
				b.Fatalf("device sent %d frames of %d (%+v)", s.TxFrames, b.N, s)
			}
			report(b, size, dev, raw)
		})
	}
}

func BenchmarkRx(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			env := newTapEnv(b)
			learn(b, env.dev.Port(), env.dev.MAC)
			learn(b, env.raw.Port(), env.raw.MAC)
			toDev, toRaw := ethFrame(size, 0), ethFrame(size, 0)
			copy(toDev, env.dev.MAC)
			copy(toRaw, env.raw.MAC)
			h := newHarness(b, Config{Port: noClose{env.dev.Port()}, MAC: env.dev.MAC}, true)
			buf := make([]byte, 65536)
			var raw, dev time.Duration
			b.ResetTimer()
			for _, n := range rounds(b.N) {
				got := newFlow()
				start := time.Now()
				go inject(b, env.peer.Port(), toRaw, n, got)
				for range n {
					if _, err := env.raw.Port().Read(buf); err != nil {
						b.Fatal(err)
					}
					got.add(1)
				}
				raw += time.Since(start)
				got = newFlow()
				start = time.Now()
				go inject(b, env.peer.Port(), toDev, n, got)
				h.consumeRx(2048, n, got, nil)
				dev += time.Since(start)
			}
			b.StopTimer()
			report(b, size, dev, raw)
		})
	}
}

// rounds splits n frames into benchRounds rounds.
func rounds(n int) []int {
	r := make([]int, 0, benchRounds)
	for i := range benchRounds {
		if k := n*(i+1)/benchRounds - n*i/benchRounds; k > 0 {
			r = append(r, k)
		}
	}
	return r
}

// learn sends one frame from mac through port so the bridge learns where
// mac lives and forwards frames for it to that port only.
func learn(b *testing.B, port Port, mac []byte) {
	f := ethFrame(64, 0)
	copy(f[6:], mac)
	if _, err := port.Write(f); err != nil {
		b.Fatal(err)
	}
}

// inject writes n frames to port, keeping at most rxWindow ahead of got so
// no queue on the way overflows.
func inject(b *testing.B, port Port, frame []byte, n int, got *flow) {
	for sent := 0; sent < n; {
		if int64(sent)-got.got.Load() >= rxWindow {
			got.waitFor(int64(sent) - rxWindow/2)
			continue
		}
		if _, err := port.Write(frame); err != nil {
			b.Error(err)
			return
		}
		sent++
	}
}

func report(b *testing.B, size int, dev, raw time.Duration) {
	fps := func(d time.Duration) float64 { return float64(b.N) / d.Seconds() }
	b.ReportMetric(fps(dev), "frames/s")
	b.ReportMetric(fps(dev)*float64(size)/1e6, "MB/s")
	b.ReportMetric(fps(raw), "raw-frames/s")
	b.ReportMetric(fps(raw)*float64(size)/1e6, "raw-MB/s")
	b.ReportMetric(math.Round(100*raw.Seconds()/dev.Seconds())/100, "ratio")
}
