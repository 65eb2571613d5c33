package net

import (
	"fmt"
	"math"
	"testing"
	"time"
)

// The benchmarks move frames between the mock queue and a TAP on a bridge
// in a namespace, and in the same run do the same with a raw read/write
// loop on the TAP, reporting both and their ratio (device/raw, 1.0 means
// the device costs nothing over the TAP itself):
//
//	go test -bench . -benchtime 200000x ./devices/virtio/net
//
// Transmit: the device's TAP sends to the peer TAP's learned MAC (nobody
// reads the peer, so the kernel drops at its queue: the cost measured is
// the path into the kernel). Receive: the peer TAP sends to the device's
// MAC, at most rxWindow frames in flight, and the device (or the raw loop)
// reads them from its TAP.

var benchSizes = []int{64, 1500}

const rxWindow = 128

func BenchmarkTx(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			env := newTapEnv(b)
			learn(b, env.peer.Port, env.peer.MAC)
			frame := ethFrame(size, 0)
			copy(frame, env.peer.MAC)
			copy(frame[6:], env.dev.MAC)

			start := time.Now()
			for range b.N {
				if _, err := env.dev.Port.Write(frame); err != nil {
					b.Fatal(err)
				}
			}
			raw := time.Since(start)

			h := newHarness(b, Config{Port: noClose{env.dev.Port}, MAC: env.dev.MAC}, true)
			b.ResetTimer()
			start = time.Now()
			if n := h.feedTx(frame, b.N, nil); n != b.N {
				b.Fatalf("sent %d of %d", n, b.N)
			}
			dev := time.Since(start)
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
			learn(b, env.dev.Port, env.dev.MAC)
			frame := ethFrame(size, 0)
			copy(frame, env.dev.MAC)
			copy(frame[6:], env.peer.MAC)

			got := newFlow()
			go inject(b, env.peer.Port, frame, b.N, got)
			start := time.Now()
			buf := make([]byte, 65536)
			for range b.N {
				if _, err := env.dev.Port.Read(buf); err != nil {
					b.Fatal(err)
				}
				got.add(1)
			}
			raw := time.Since(start)

			got = newFlow()
			h := newHarness(b, Config{Port: noClose{env.dev.Port}, MAC: env.dev.MAC}, true)
			b.ResetTimer()
			start = time.Now()
			go inject(b, env.peer.Port, frame, b.N, got)
			h.consumeRx(2048, b.N, got, nil)
			dev := time.Since(start)
			b.StopTimer()
			report(b, size, dev, raw)
		})
	}
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
