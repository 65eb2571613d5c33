package vsock

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// The mock guest is a driver-side vsock stack over queuetest queues: it
// keeps the receive queue full of buffers, speaks the packet protocol with
// credit accounting, and exposes sockets a test drives from its own
// goroutine (the device runs on its own; they share only guest memory). Raw
// packet sends let a test lie about anything.

const testCID = 3

// chanIRQ wakes the mock guest on every interrupt.
type chanIRQ struct {
	c      chan struct{}
	resets atomic.Int32
}

func (i *chanIRQ) Trigger(virtio.InterruptKind, uint16) error {
	select {
	case i.c <- struct{}{}:
	default:
	}
	return nil
}

func (i *chanIRQ) NeedsReset() { i.resets.Add(1) }

// gkey names a guest socket: the guest's port and the host's.
type gkey struct{ local, peer uint32 }

// gsock is one guest-side connection.
type gsock struct {
	g          *mockGuest
	key        gkey
	connected  bool
	rst        bool   // the device reset it
	peerShut   uint32 // SHUTDOWN flags received
	data       []byte // received, not yet read
	bufAlloc   uint32 // what the guest advertises
	rxCnt      uint32 // data bytes received
	fwdCnt     uint32 // ... consumed (read)
	lastFwd    uint32 // fwdCnt as last sent
	txCnt      uint32 // data bytes sent
	peerAlloc  uint32
	peerFwd    uint32
	ops        map[Op]int // packets received, by op
	discard    bool       // count received data without keeping it (benchmarks)
	noAutoRst  bool       // do not answer a full SHUTDOWN with RST
	overCredit int        // bytes the device sent past the guest's buffer
}

// credit is how much more the device takes from this socket.
func (s *gsock) credit() uint32 {
	if f := s.txCnt - s.peerFwd; f < s.peerAlloc {
		return s.peerAlloc - f
	}
	return 0
}

type mockGuest struct {
	t          testing.TB
	mem        *memory.Memory
	rx, tx, ev *queuetest.Driver
	dev        *Device
	irq        *chanIRQ
	path       string
	ln         *net.UnixListener

	rxSize  uint32
	rxAddr  map[uint32]memory.GuestAddr // posted receive buffers by head
	txFree  []memory.GuestAddr
	txAddr  map[uint32]memory.GuestAddr
	txSize  uint32
	listen  map[uint32]bool
	socks   map[gkey]*gsock
	backlog []*gsock
	unknown []Header // packets for no socket
	ignore  bool     // do not answer REQUESTs (a hung guest)
	port    uint32
	bufDef  uint32 // buf_alloc of new sockets
	twoDesc bool   // send header and data in separate descriptors
	inPlace bool   // data is already in the transmit buffer (writeInPlace)
	zeros   []byte
}

type guestOpts struct {
	rxSize    uint32 // data bytes per receive buffer (default 4096)
	rxBufs    int    // receive buffers posted (default 64)
	queueSize uint16 // default 256
	cfg       Config // timeouts
	eventIdx  bool
}

const (
	rxBase    = 0x0
	txBase    = 0x1000000
	evBase    = 0x2000000
	regionLen = 0x1000000
)

// newGuest makes a listener in a temp dir, a device on it, and the mock
// guest driving it.
func newGuest(t testing.TB, o guestOpts) *mockGuest {
	t.Helper()
	if o.rxSize == 0 {
		o.rxSize = 4096
	}
	if o.rxBufs == 0 {
		o.rxBufs = 64
	}
	if o.queueSize == 0 {
		o.queueSize = 256
	}
	path := filepath.Join(t.TempDir(), "v.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	cfg := o.cfg
	cfg.CID, cfg.Listener, cfg.Path, cfg.QueueSize = testCID, ln, path, o.queueSize
	dev, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := memory.New(memory.Range{Base: rxBase, Size: regionLen}, memory.Range{Base: txBase, Size: regionLen},
		memory.Range{Base: evBase, Size: regionLen})
	if err != nil {
		t.Fatal(err)
	}
	g := &mockGuest{t: t, mem: mem, dev: dev, irq: &chanIRQ{c: make(chan struct{}, 1)}, path: path, ln: ln,
		rxSize: o.rxSize, rxAddr: map[uint32]memory.GuestAddr{}, txAddr: map[uint32]memory.GuestAddr{},
		txSize: HeaderLen + MaxPacket, listen: map[uint32]bool{}, socks: map[gkey]*gsock{}, port: 50000, bufDef: 256 << 10,
		zeros: make([]byte, MaxPacket)}
	t.Cleanup(func() {
		dev.Close()
		ln.Close()
		mem.Close()
	})
	for _, q := range []struct {
		d    **queuetest.Driver
		base memory.GuestAddr
	}{{&g.rx, rxBase}, {&g.tx, txBase}, {&g.ev, evBase}} {
		if *q.d, err = queuetest.New(mem, q.base, o.queueSize); err != nil {
			t.Fatal(err)
		}
		(*q.d).EventIdx, (*q.d).Indirect = o.eventIdx, true
	}
	feat := dev.Features()
	if !o.eventIdx {
		feat &^= virtio.FeatureRingEventIdx
	}
	dev.Ack(feat)
	for range o.rxBufs {
		a, err := g.rx.Alloc(uint64(HeaderLen + o.rxSize))
		if err != nil {
			t.Fatal(err)
		}
		g.postRx(a)
	}
	for range 32 {
		a, err := g.tx.Alloc(uint64(g.txSize))
		if err != nil {
			t.Fatal(err)
		}
		g.txFree = append(g.txFree, a)
	}
	g.activate()
	return g
}

func (g *mockGuest) activate() {
	var qs []*queue.Queue
	for _, d := range []*queuetest.Driver{g.rx, g.tx, g.ev} {
		q, err := queue.New(g.mem, d.Size, d.Config())
		if err != nil {
			g.t.Fatal(err)
		}
		qs = append(qs, q)
	}
	if err := g.dev.Activate(g.mem, g.irq, qs); err != nil {
		g.t.Fatal(err)
	}
}

func (g *mockGuest) postRx(a memory.GuestAddr) {
	head, err := g.rx.Add(queuetest.Buf{Addr: a, Len: HeaderLen + g.rxSize, Write: true})
	if err != nil {
		g.t.Fatal(err)
	}
	g.rxAddr[uint32(head)] = a
}

func (g *mockGuest) kick(d *queuetest.Driver, q uint16) {
	if need, err := d.NeedsKick(); err != nil {
		g.t.Fatal(err)
	} else if need {
		g.dev.Notify(q)
	}
}

// poll handles every used entry: received packets, completed sends. It
// reports whether anything happened.
func (g *mockGuest) poll() bool {
	any := false
	for {
		id, _, ok, err := g.tx.Used()
		if err != nil {
			g.t.Fatal(err)
		}
		if !ok {
			break
		}
		any = true
		g.txFree = append(g.txFree, g.txAddr[id])
		delete(g.txAddr, id)
	}
	reposted := false
	for {
		id, n, ok, err := g.rx.Used()
		if err != nil {
			g.t.Fatal(err)
		}
		if !ok {
			break
		}
		any = true
		a, known := g.rxAddr[id]
		if !known {
			g.t.Fatalf("device used unknown receive head %d", id)
		}
		delete(g.rxAddr, id)
		if n < HeaderLen || n > HeaderLen+g.rxSize {
			g.t.Fatalf("receive used length %d out of range", n)
		}
		b, err := g.mem.Slice(a, uint64(n))
		if err != nil {
			g.t.Fatal(err)
		}
		var h Header
		h.Decode(b)
		if int(h.Len) != len(b)-HeaderLen {
			g.t.Fatalf("header len %d, used length %d", h.Len, n)
		}
		g.receive(&h, b[HeaderLen:])
		g.postRx(a)
		reposted = true
	}
	if reposted {
		g.kick(g.rx, RxQueue)
	}
	return any
}

// receive handles one packet from the device.
func (g *mockGuest) receive(h *Header, data []byte) {
	t := g.t
	if h.SrcCID != HostCID || h.DstCID != testCID || h.Type != TypeStream {
		t.Fatalf("device sent a bad header %+v", h)
	}
	k := gkey{local: h.DstPort, peer: h.SrcPort}
	s := g.socks[k]
	if s == nil {
		if h.Op == OpRequest && g.listen[h.DstPort] && !g.ignore {
			s = g.newSock(k)
			s.connected = true
			s.note(h)
			g.send(s, OpResponse, 0, nil)
			g.backlog = append(g.backlog, s)
			return
		}
		g.unknown = append(g.unknown, *h)
		if h.Op == OpRequest && !g.ignore {
			g.sendRaw(Header{SrcPort: h.DstPort, DstPort: h.SrcPort, Op: OpRst}, nil)
		}
		return
	}
	s.note(h)
	switch h.Op {
	case OpResponse:
		s.connected = true
	case OpRst:
		s.rst, s.connected = true, false
		delete(g.socks, k)
	case OpShutdown:
		s.peerShut |= h.Flags
		if s.peerShut == ShutdownRcv|ShutdownSend && !s.noAutoRst {
			g.send(s, OpRst, 0, nil)
			s.connected = false
			delete(g.socks, k)
		}
	case OpRW:
		if uint64(s.rxCnt-s.fwdCnt)+uint64(len(data)) > uint64(s.bufAlloc) {
			s.overCredit += int(uint64(s.rxCnt-s.fwdCnt) + uint64(len(data)) - uint64(s.bufAlloc))
		}
		s.rxCnt += uint32(len(data))
		if s.discard {
			s.fwdCnt += uint32(len(data))
			s.maybeUpdate()
		} else {
			s.data = append(s.data, data...)
		}
	case OpCreditRequest:
		g.send(s, OpCreditUpdate, 0, nil)
	}
}

func (s *gsock) note(h *Header) {
	if s.ops == nil {
		s.ops = map[Op]int{}
	}
	s.ops[h.Op]++
	s.peerAlloc, s.peerFwd = h.BufAlloc, h.FwdCnt
}

func (g *mockGuest) newSock(k gkey) *gsock {
	s := &gsock{g: g, key: k, bufAlloc: g.bufDef}
	g.socks[k] = s
	return s
}

// sendRaw puts a packet on the transmit queue exactly as given (CIDs and
// type filled in when zero) and kicks.
func (g *mockGuest) sendRaw(h Header, data []byte) {
	if h.SrcCID == 0 {
		h.SrcCID = testCID
	}
	if h.DstCID == 0 {
		h.DstCID = HostCID
	}
	if h.Type == 0 {
		h.Type = TypeStream
	}
	if h.Len == 0 {
		h.Len = uint32(len(data))
	}
	var hb [HeaderLen]byte
	h.Encode(hb[:])
	g.sendBytes(hb[:], data)
}

// sendBytes sends a header's bytes and data as one packet.
func (g *mockGuest) sendBytes(hdr, data []byte) {
	for len(g.txFree) == 0 {
		g.wait("a free transmit buffer", func() bool { return len(g.txFree) > 0 })
	}
	a := g.txFree[len(g.txFree)-1]
	g.txFree = g.txFree[:len(g.txFree)-1]
	if err := g.mem.Write(a, hdr); err != nil {
		g.t.Fatal(err)
	}
	if !g.inPlace {
		if err := g.mem.Write(a+memory.GuestAddr(len(hdr)), data); err != nil {
			g.t.Fatal(err)
		}
	}
	var head uint16
	var err error
	if g.twoDesc && len(data) > 0 {
		head, err = g.tx.Add(queuetest.Buf{Addr: a, Len: uint32(len(hdr))},
			queuetest.Buf{Addr: a + memory.GuestAddr(len(hdr)), Len: uint32(len(data))})
	} else {
		head, err = g.tx.Add(queuetest.Buf{Addr: a, Len: uint32(len(hdr) + len(data))})
	}
	if err != nil {
		g.t.Fatal(err)
	}
	g.txAddr[uint32(head)] = a
	g.kick(g.tx, TxQueue)
}

// send sends op on s with the socket's credit fields.
func (g *mockGuest) send(s *gsock, op Op, flags uint32, data []byte) {
	s.lastFwd = s.fwdCnt
	g.sendRaw(Header{SrcPort: s.key.local, DstPort: s.key.peer, Op: op, Flags: flags,
		BufAlloc: s.bufAlloc, FwdCnt: s.fwdCnt, Len: uint32(len(data))}, data)
}

// wait polls until cond holds, sleeping on interrupts. The deadline only
// catches a lost event; it measures nothing.
func (g *mockGuest) wait(what string, cond func() bool) {
	g.t.Helper()
	g.poll()
	if cond() {
		return
	}
	deadline := time.Now().Add(20 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond) // a lost interrupt would be a device bug; the tick keeps a failing test short
	defer tick.Stop()
	for {
		select {
		case <-g.irq.c:
		case <-tick.C:
			if time.Now().After(deadline) {
				g.t.Fatalf("mock guest: no %s within 20s (metrics %+v)", what, g.dev.Metrics().Snapshot())
			}
		}
		g.poll()
		if cond() {
			return
		}
	}
}

// sub makes t (a subtest) the one the guest reports to until it ends.
func (g *mockGuest) sub(t testing.TB) {
	old := g.t
	g.t = t
	t.Cleanup(func() { g.t = old })
}

// accept waits for a host-initiated connection on a listening port.
func (g *mockGuest) accept() *gsock {
	g.t.Helper()
	g.wait("incoming connection", func() bool { return len(g.backlog) > 0 })
	s := g.backlog[0]
	g.backlog = g.backlog[1:]
	return s
}

// connect opens a guest-initiated connection to host port; it returns
// the socket and whether the device accepted it (false: RST).
func (g *mockGuest) connect(port uint32) (*gsock, bool) {
	g.t.Helper()
	g.port++
	s := g.newSock(gkey{local: g.port, peer: port})
	g.send(s, OpRequest, 0, nil)
	g.wait("RESPONSE or RST", func() bool { return s.connected || s.rst })
	return s, s.connected
}

// write sends data within the device's credit, in packets of at most
// chunk bytes, waiting for the device to announce credit as needed (as
// Linux does, it never asks).
func (s *gsock) write(data []byte, chunk int) {
	g := s.g
	g.t.Helper()
	for len(data) > 0 {
		if s.credit() == 0 {
			g.wait("credit", func() bool { return s.credit() > 0 || s.rst })
			if s.rst {
				g.t.Fatalf("connection reset while writing")
			}
		}
		n := min(len(data), int(s.credit()), chunk)
		s.txCnt += uint32(n)
		g.send(s, OpRW, 0, data[:n])
		data = data[n:]
		g.poll()
	}
}

// writeInPlace sends n bytes of whatever the transmit buffers hold, as an
// application that produced its data in guest memory would: the
// benchmarks' guest copies nothing, so they measure the device path.
func (s *gsock) writeInPlace(n, chunk int) {
	g := s.g
	g.inPlace = true
	defer func() { g.inPlace = false }()
	for n > 0 {
		if s.credit() == 0 {
			g.wait("credit", func() bool { return s.credit() > 0 || s.rst })
		}
		k := min(n, int(s.credit()), chunk)
		s.txCnt += uint32(k)
		g.send(s, OpRW, 0, g.zeros[:k])
		n -= k
		g.poll()
	}
}

// read waits for n bytes (fewer at EOF or reset) and consumes them,
// sending a credit update once half the buffer was consumed unannounced.
func (s *gsock) read(n int) []byte {
	g := s.g
	g.t.Helper()
	g.wait(fmt.Sprintf("%d bytes", n), func() bool {
		return len(s.data) >= n || s.rst || s.peerShut&ShutdownSend != 0 || g.socks[s.key] != s
	})
	n = min(n, len(s.data))
	out := bytes.Clone(s.data[:n])
	s.data = s.data[n:]
	s.fwdCnt += uint32(n)
	s.maybeUpdate()
	return out
}

func (s *gsock) maybeUpdate() {
	if s.fwdCnt-s.lastFwd >= s.bufAlloc/2 {
		s.g.send(s, OpCreditUpdate, 0, nil)
	}
}

// dialHost connects to the device's socket and sends the connect line.
func (g *mockGuest) dialHost(line string) *net.UnixConn {
	g.t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: g.path, Net: "unix"})
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { c.Close() })
	if line != "" {
		if _, err := c.Write([]byte(line)); err != nil {
			g.t.Fatal(err)
		}
	}
	return c
}

// hostConnect does a whole host-initiated connect to a listening guest
// port and returns both ends, the host's after the OK line.
func (g *mockGuest) hostConnect(port uint32) (*net.UnixConn, *gsock, string) {
	g.t.Helper()
	g.listen[port] = true
	c := g.dialHost(fmt.Sprintf("CONNECT %d\n", port))
	s := g.accept()
	ok := readLine(g.t, c)
	return c, s, ok
}

// readLine reads one line from c a byte at a time (so nothing after it is
// consumed).
func readLine(t testing.TB, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	var b []byte
	one := make([]byte, 1)
	for {
		n, err := c.Read(one)
		if err != nil {
			t.Fatalf("read line: %v (got %q)", err, b)
		}
		if n == 1 {
			if one[0] == '\n' {
				return string(b)
			}
			b = append(b, one[0])
		}
	}
}

// hostEOF waits for the host end to read EOF (after any data it gets) and
// returns the data.
func hostEOF(t testing.TB, g *mockGuest, c net.Conn) []byte {
	t.Helper()
	type res struct {
		b   []byte
		err error
	}
	done := make(chan res, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		var all []byte
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			all = append(all, buf[:n]...)
			if err != nil {
				done <- res{all, err}
				return
			}
		}
	}()
	r := waitChan(g, "host EOF", done)
	if !errors.Is(r.err, errEOF) && !isReset(r.err) {
		t.Fatalf("host read ended with %v, want EOF", r.err)
	}
	return r.b
}

// waitChan runs the guest until a value arrives on c (from a host-side
// goroutine) and returns it.
func waitChan[T any](g *mockGuest, what string, c <-chan T) T {
	g.t.Helper()
	var v T
	g.wait(what, func() bool {
		select {
		case v = <-c:
			return true
		default:
			return false
		}
	})
	return v
}
