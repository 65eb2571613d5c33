package vsock

import (
	"fmt"
	"io"
	"math"
	"net"
	"testing"
	"time"
)

// The benchmarks move a byte stream through the device between a host
// Unix socket (after the CONNECT handshake) and the mock guest, and in the
// same run copy the same bytes through a plain connected pair of Unix
// sockets, reporting both and their ratio (device/raw: 1.0 means the
// device costs nothing over the socket itself):
//
//	go test -run XXX -bench . -benchtime 2000x ./devices/virtio/vsock
//
// One iteration is one chunk of the stream: the guest's receive buffers
// and packets, and the raw side's writes and reads, are chunk-sized (the
// guest has 1 MiB of receive buffers). The two alternate in rounds, so
// both see the same load on a shared machine. The
// mock guest counts the data it receives without copying it out (as an
// application consuming in place) and sends what its transmit buffers hold
// without copying data in (an application producing in place), so only
// the device's work and the protocol's round trips are measured; it posts
// receive buffers of the chunk size, and sends one descriptor per packet.
//
// GuestToHost with 64 KiB chunks is stop-and-wait by protocol: one packet
// uses the whole 64 KiB credit the device grants (BufSize), so each waits
// for the device's credit update; smaller packets pipeline within it.

var benchChunks = []int{4096, 65536}

const benchRounds = 10

func BenchmarkHostToGuest(b *testing.B) {
	for _, size := range benchChunks {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			g := newGuest(b, guestOpts{rxSize: uint32(size), rxBufs: min(256, (1<<20)/size), eventIdx: true})
			c, s, _ := g.hostConnect(52)
			s.discard = true
			a, z := rawPair(b)
			chunk := pattern(size, 1)
			buf := make([]byte, size)
			var raw, dev time.Duration
			b.ResetTimer()
			for _, n := range rounds(b.N) {
				total := n * size
				start := time.Now()
				go writeN(b, a, chunk, n)
				for got := 0; got < total; {
					k, err := z.Read(buf)
					if err != nil {
						b.Fatal(err)
					}
					got += k
				}
				raw += time.Since(start)
				start = time.Now()
				want := s.rxCnt + uint32(total)
				go writeN(b, c, chunk, n)
				g.wait("data", func() bool { return s.rxCnt == want })
				dev += time.Since(start)
			}
			b.StopTimer()
			if s.overCredit != 0 {
				b.Fatalf("device overran the guest's buffer by %d", s.overCredit)
			}
			report(b, size, dev, raw)
		})
	}
}

func BenchmarkGuestToHost(b *testing.B) {
	for _, size := range benchChunks {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			g := newGuest(b, guestOpts{eventIdx: true})
			c, s, _ := g.hostConnect(52)
			a, z := rawPair(b)
			data := pattern(size, 2)
			var raw, dev time.Duration
			b.ResetTimer()
			for _, n := range rounds(b.N) {
				total := n * size
				start := time.Now()
				done := readN(b, z, total, size)
				go writeN(b, a, data, n)
				<-done
				raw += time.Since(start)
				start = time.Now()
				done = readN(b, c, total, size)
				s.writeInPlace(total, size)
				<-done // everything was sent; the device needs nothing more from the guest
				dev += time.Since(start)
			}
			b.StopTimer()
			report(b, size, dev, raw)
		})
	}
}

// rawPair is two connected Unix stream sockets, the peer path.
func rawPair(b *testing.B) (*net.UnixConn, *net.UnixConn) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: b.TempDir() + "/raw.sock", Net: "unix"})
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	a, err := net.DialUnix("unix", nil, ln.Addr().(*net.UnixAddr))
	if err != nil {
		b.Fatal(err)
	}
	z, err := ln.AcceptUnix()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { a.Close(); z.Close() })
	return a, z
}

func writeN(b *testing.B, w io.Writer, chunk []byte, n int) {
	for range n {
		if _, err := w.Write(chunk); err != nil {
			b.Error(err)
			return
		}
	}
}

// readN reads total bytes from r, chunk bytes at a time, on a goroutine
// and closes the channel.
func readN(b *testing.B, r io.Reader, total, chunk int) chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, chunk)
		for got := 0; got < total; {
			k, err := r.Read(buf)
			if err != nil {
				b.Error(err)
				return
			}
			got += k
		}
	}()
	return done
}

// rounds splits n iterations into benchRounds rounds.
func rounds(n int) []int {
	r := make([]int, 0, benchRounds)
	for i := range benchRounds {
		if k := n*(i+1)/benchRounds - n*i/benchRounds; k > 0 {
			r = append(r, k)
		}
	}
	return r
}

func report(b *testing.B, size int, dev, raw time.Duration) {
	mbs := func(d time.Duration) float64 { return float64(b.N) * float64(size) / d.Seconds() / 1e6 }
	b.ReportMetric(mbs(dev), "MB/s")
	b.ReportMetric(mbs(raw), "raw-MB/s")
	b.ReportMetric(math.Round(100*raw.Seconds()/dev.Seconds())/100, "ratio")
}
