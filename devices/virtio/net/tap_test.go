package net

import (
	"bytes"
	"context"
	"encoding/binary"
	"math"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/network"
	"github.com/rayvmm/rayvmm/network/nettest"
	"github.com/rayvmm/rayvmm/ratelimit"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// These tests put the device in front of a real TAP on a real bridge, in
// a network namespace of the test's own (192.0.2.0/24, host 192.0.2.1).

// tapEnv is a network with three NICs on its bridge: the device's, a peer
// the test reads and writes directly, and one for benchmarks' raw loops.
type tapEnv struct {
	ns             *nettest.NS
	dev, peer, raw *network.NIC
}

func newTapEnv(t testing.TB) *tapEnv {
	t.Helper()
	env := &tapEnv{ns: nettest.New(t)}
	dir := t.TempDir()
	ctx := context.Background()
	err := env.ns.Do(func() (err error) {
		if _, err := network.Create(ctx, dir, network.CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"}); err != nil {
			return err
		}
		if env.dev, err = network.Attach(ctx, dir, "devtest", 0, spec.NIC{Network: "lan"}); err != nil {
			return err
		}
		if env.peer, err = network.Attach(ctx, dir, "devtest", 1, spec.NIC{Network: "lan"}); err != nil {
			return err
		}
		env.raw, err = network.Attach(ctx, dir, "devtest", 2, spec.NIC{Network: "lan"})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { network.CloseAll([]*network.NIC{env.dev, env.peer, env.raw}) })
	return env
}

// noClose hides a port's Close from the harness, so several devices can
// use one TAP in turn.
type noClose struct{ Port }

// rxReader posts receive buffers and hands out the frames the device
// delivers into them.
type rxReader struct {
	h      *harness
	addrOf map[uint16]memory.GuestAddr
}

func newRxReader(h *harness, n int) *rxReader {
	r := &rxReader{h: h, addrOf: map[uint16]memory.GuestAddr{}}
	for range n {
		head, a := h.postRx(2048)
		r.addrOf[head] = a
	}
	return r
}

// next returns the next frame matching match (header stripped).
func (r *rxReader) next(t *testing.T, what string, match func([]byte) bool) []byte {
	t.Helper()
	for {
		id, n := r.h.used(r.h.rx, what)
		a := r.addrOf[uint16(id)]
		buf := make([]byte, n)
		r.h.mem.Read(a, buf)
		delete(r.addrOf, uint16(id))
		head, err := r.h.rx.Add(queuetest.Buf{Addr: a, Len: 2048, Write: true})
		if err != nil {
			t.Fatal(err)
		}
		r.addrOf[head] = a
		r.h.dev.Notify(RxQueue)
		if n >= HeaderLen && match(buf[HeaderLen:]) {
			return buf[HeaderLen:]
		}
	}
}

// TestTAPPingsHost plays a guest through the mock queues: it resolves the
// host's MAC with ARP and pings it; the host's replies come back through
// the TAP into the receive queue.
func TestTAPPingsHost(t *testing.T) {
	env := newTapEnv(t)
	h := newHarness(t, Config{Port: env.dev.Port(), MAC: env.dev.MAC}, true)
	rx := newRxReader(h, 16)
	me, host := net.ParseIP("192.0.2.10"), net.ParseIP("192.0.2.1")
	h.send(nettest.ARPRequest(env.dev.MAC, me, host))
	reply := rx.next(t, "ARP reply", func(f []byte) bool {
		return nettest.IsARPReply(f, env.dev.MAC) && bytes.Equal(f[28:32], host.To4())
	})
	hostMAC := net.HardwareAddr(reply[22:28])
	payload := []byte("rayvmm virtio-net ping")
	h.send(nettest.ICMPEcho(hostMAC, env.dev.MAC, me, host, 0x4242, payload))
	echo := rx.next(t, "ICMP echo reply", nettest.IsICMPEchoReply)
	if !bytes.Equal(echo[42:], payload) || binary.BigEndian.Uint16(echo[38:]) != 0x4242 {
		t.Fatalf("echo reply %x does not carry our id and payload", echo)
	}
	// The host can answer before the transmit goroutine, back from the
	// TAP write, has counted the frame: wait for the counter to settle.
	eventually(t, "the transmit counter to reach the 2 frames sent", func() bool { return h.dev.Metrics().Snapshot().TxFrames >= 2 })
	if s := h.dev.Metrics().Snapshot(); s.TxFrames != 2 || s.RxFrames < 1 {
		t.Fatalf("metrics %+v", s)
	}
}

// TestTxRateLimit sends as fast as a guest can through the mock queue to a
// TAP and counts the bytes arriving at a peer TAP on the same bridge. With
// a 1 MB/s transmit limit (a 1 MB bucket refilled in 1 s, starting full),
// more than the first bucket gets through (the bucket refills), yet never
// more than the bucket allows: 1 MB plus 1 MB for every second since the
// guest began. That bound holds however slowly the machine runs, as load
// only makes the elapsed time, and so the bound, larger. Without a limit
// the same guest passes far more than the bound; that run only waits for
// it, with a deadline, and measures no rate.
func TestTxRateLimit(t *testing.T) {
	env := newTapEnv(t)
	var got atomic.Int64
	go func() {
		buf := make([]byte, 65536)
		for {
			n, err := env.peer.Port().Read(buf)
			if err != nil {
				return
			}
			if n >= 12 && bytes.Equal(buf[6:12], env.dev.MAC) {
				got.Add(int64(n))
			}
		}
	}()
	const size, frameLen = 1_000_000, 1000 // bucket bytes (refilled per second), frame bytes
	frame := ethFrame(frameLen, 0)
	copy(frame[6:], env.dev.MAC)
	// allowed is what the bucket lets through in el: the full bucket,
	// what it earned since, and one frame for rounding.
	allowed := func(el time.Duration) int64 { return size + int64(el.Seconds()*size) + frameLen }
	// run feeds the device until done says so and returns the bytes the
	// peer saw, the time since just before the first frame could pass
	// (read after the bytes, so never shorter than their interval), and
	// the device's metrics.
	run := func(lim *ratelimit.Limiter, what string, done func(n int64, el time.Duration) bool) (int64, time.Duration, Snapshot) {
		h := newHarness(t, Config{Port: noClose{env.dev.Port()}, MAC: env.dev.MAC, TX: lim}, true)
		stop := make(chan struct{})
		fed := make(chan struct{})
		base, start := got.Load(), time.Now()
		go func() { defer close(fed); h.feedTx(frame, math.MaxInt, stop) }()
		var n int64
		var el time.Duration
		eventually(t, what, func() bool {
			n = got.Load() - base
			el = time.Since(start)
			return done(n, el)
		})
		close(stop)
		<-fed
		s := h.dev.Metrics().Snapshot()
		h.dev.Close()
		return n, el, s
	}
	lim, err := ratelimit.New(ratelimit.Config{Bandwidth: ratelimit.BucketConfig{Size: size, RefillTimeMs: 1000}})
	if err != nil {
		t.Fatal(err)
	}
	var refilled time.Duration
	n, el, s := run(lim, "1.2 MB through a 1 MB bucket, and 1 s more", func(n int64, el time.Duration) bool {
		if refilled == 0 && n >= 1_200_000 {
			refilled = el
		}
		return refilled != 0 && el >= refilled+time.Second
	})
	t.Logf("limited: %d bytes in %v (the bucket allows %d), throttled %v", n, el, allowed(el), time.Duration(s.TxThrottledNs))
	if n > allowed(el) {
		t.Fatalf("a 1 MB/s limit passed %d bytes in %v; its bucket allows at most %d", n, el, allowed(el))
	}
	if s.TxThrottledNs == 0 {
		t.Fatalf("the limited device never waited for its limiter (metrics %+v)", s)
	}
	n, el, s = run(nil, "the unlimited device to pass twice what the limit allows", func(n int64, el time.Duration) bool { return n > 2*allowed(el) })
	t.Logf("unlimited: %d bytes in %v", n, el)
	if s.TxThrottledNs != 0 {
		t.Fatalf("the unlimited device waited %v for a limiter", time.Duration(s.TxThrottledNs))
	}
}
