package vsock

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

var errEOF = io.EOF

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7+i>>9) ^ seed
	}
	return b
}

func TestNewChecksConfig(t *testing.T) {
	dir := t.TempDir()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "v.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conn, err := net.DialUnix("unix", nil, ln.Addr().(*net.UnixAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	f, err := os.Create(filepath.Join(dir, "file"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lf, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // "" = ok
	}{
		{"ok", Config{CID: 3, Listener: ln, Path: "p"}, ""},
		{"os.File of the listener", Config{CID: 42, Listener: lf, Path: "p"}, ""},
		{"cid 2", Config{CID: 2, Listener: ln, Path: "p"}, "guest CID 2"},
		{"cid any", Config{CID: ^uint32(0), Listener: ln, Path: "p"}, "guest CID"},
		{"no path", Config{CID: 3, Listener: ln}, "no socket path"},
		{"no listener", Config{CID: 3, Path: "p"}, "no listening socket"},
		{"connected socket", Config{CID: 3, Listener: conn, Path: "p"}, "not listening"},
		{"regular file", Config{CID: 3, Listener: f, Path: "p"}, "not a Unix socket"},
		{"queue size", Config{CID: 3, Listener: ln, Path: "p", QueueSize: 100}, "queue size 100"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := New(tc.cfg)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestConfigSpaceAndFeatures(t *testing.T) {
	g := newGuest(t, guestOpts{})
	d := g.dev
	if d.Type() != virtio.TypeVsock || d.Type().String() != "vsock" {
		t.Fatalf("type %v", d.Type())
	}
	if f := d.Features(); f&virtio.FeatureVersion1 == 0 {
		t.Fatalf("features %#x lack VERSION_1", f)
	}
	if n := len(d.QueueSizes()); n != 3 {
		t.Fatalf("%d queues, want rx, tx, event", n)
	}
	b := make([]byte, 8)
	d.ReadConfig(0, b)
	if cid := binary.LittleEndian.Uint64(b); cid != testCID {
		t.Fatalf("guest_cid %d", cid)
	}
	d.ReadConfig(4, b[:4])
	if !bytes.Equal(b[:4], []byte{0, 0, 0, 0}) {
		t.Fatalf("upper half of guest_cid %x", b[:4])
	}
	d.ReadConfig(8, b)
	if !bytes.Equal(b, make([]byte, 8)) {
		t.Fatalf("past the config space: %x", b)
	}
	d.WriteConfig(0, []byte{9})
	d.ReadConfig(0, b[:1])
	if b[0] != testCID || d.Metrics().Snapshot().ConfigWrites != 1 {
		t.Fatalf("guest_cid writable or write not counted")
	}
}

// TestHostInitiated: CONNECT, OK with a host port from 2^30, echo both
// ways, host close reaches the guest as SHUTDOWN, and the guest's RST
// removes the connection.
func TestHostInitiated(t *testing.T) {
	g := newGuest(t, guestOpts{})
	for i, line := range []string{"CONNECT 52\n", "connect 52\n", "Connect  52 \n", "CONNECT +52\r\n"} {
		g.listen[52] = true
		c := g.dialHost(line)
		s := g.accept()
		if ok, want := readLine(t, c), fmt.Sprintf("OK %d", FirstHostPort+i); ok != want {
			t.Fatalf("%q: got %q, want %q", line, ok, want)
		}
		if s.key.local != 52 || s.key.peer != uint32(FirstHostPort+i) {
			t.Fatalf("guest socket %+v", s.key)
		}
		msg := pattern(10000, byte(i))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if got := s.read(len(msg)); !bytes.Equal(got, msg) {
			t.Fatalf("guest got %d bytes, not what the host sent", len(got))
		}
		s.write(msg, 3000)
		back := make([]byte, len(msg))
		if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, msg) {
			t.Fatalf("host read back: %v", err)
		}
		c.Close()
		g.wait("SHUTDOWN from the host's close", func() bool { return s.peerShut == ShutdownRcv|ShutdownSend })
		g.wait("connection removed", func() bool { return g.dev.Metrics().Snapshot().ConnsRemoved == uint64(i+1) })
	}
	m := g.dev.Metrics().Snapshot()
	if m.HostConnects != 4 || m.HostConnectsOK != 4 || m.BadOp+m.BadChain+m.BadHeader != 0 {
		t.Fatalf("metrics %+v", m)
	}
}

// TestHostInitiatedDataBeforeOK: data the host sends right behind its
// CONNECT line reaches the guest after the handshake.
func TestHostInitiatedDataBeforeOK(t *testing.T) {
	g := newGuest(t, guestOpts{})
	g.listen[7] = true
	c := g.dialHost("CONNECT 7\nhello")
	s := g.accept()
	if ok := readLine(t, c); !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("got %q", ok)
	}
	if got := s.read(5); string(got) != "hello" {
		t.Fatalf("guest got %q", got)
	}
}

// TestHostInitiatedRefused: nothing listens in the guest, so the guest
// answers RST and the host socket is closed without an OK.
func TestHostInitiatedRefused(t *testing.T) {
	g := newGuest(t, guestOpts{})
	c := g.dialHost("CONNECT 9999\n")
	if b := hostEOF(t, g, c); len(b) != 0 {
		t.Fatalf("host got %q before the close", b)
	}
	g.wait("connection removed", func() bool { return g.dev.Metrics().Snapshot().ConnsRemoved == 1 })
	if m := g.dev.Metrics().Snapshot(); m.HostConnectsOK != 0 || m.RequestTimeouts != 0 {
		t.Fatalf("metrics %+v", m)
	}
}

// TestRequestTimeout: a guest that never answers a REQUEST gets RST, and
// the host socket is closed.
func TestRequestTimeout(t *testing.T) {
	g := newGuest(t, guestOpts{cfg: Config{RequestTimeout: 200 * time.Millisecond}})
	g.ignore = true
	c := g.dialHost("CONNECT 52\n")
	start := time.Now()
	hostEOF(t, g, c)
	if e := time.Since(start); e < 200*time.Millisecond {
		t.Fatalf("host closed after %v, before the timeout", e)
	}
	g.wait("RST", func() bool {
		for _, h := range g.unknown {
			if h.Op == OpRst && h.DstPort == 52 {
				return true
			}
		}
		return false
	})
	if m := g.dev.Metrics().Snapshot(); m.RequestTimeouts != 1 || m.ConnsRemoved != 1 {
		t.Fatalf("metrics %+v", m)
	}
}

// TestGuestInitiated: a guest connection to port P reaches the host
// listener at <uds>_P; with no listener the guest gets RST.
func TestGuestInitiated(t *testing.T) {
	g := newGuest(t, guestOpts{})
	ln, err := net.Listen("unix", PortPath(g.path, 1234))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	s, ok := g.connect(1234)
	if !ok {
		t.Fatal("guest connect to a listening host port was reset")
	}
	hc := waitChan(g, "host accept", accepted)
	defer hc.Close()
	msg := pattern(200000, 1)
	go func() { io.Copy(hc, hc) }() // echo
	g.twoDesc = true
	s.write(msg, 65536)
	if got := s.read(len(msg)); !bytes.Equal(got, msg) {
		t.Fatalf("echo: %d bytes back, different", len(got))
	}
	// The guest closes: SHUTDOWN both ways, the device answers RST and
	// the host reads EOF.
	g.send(s, OpShutdown, ShutdownRcv|ShutdownSend, nil)
	g.wait("RST after the guest's shutdown", func() bool { return s.rst })

	if _, ok := g.connect(4321); ok {
		t.Fatal("guest connect to a port nothing listens on succeeded")
	}
	if m := g.dev.Metrics().Snapshot(); m.GuestConnects != 2 || m.GuestRefused != 1 {
		t.Fatalf("metrics %+v", m)
	}
}

// TestHandshakeGarbage: every bad connect line closes that host
// connection and nothing else.
func TestHandshakeGarbage(t *testing.T) {
	g := newGuest(t, guestOpts{cfg: Config{HandshakeTimeout: 300 * time.Millisecond}})
	ok, s, _ := g.hostConnect(52)
	for _, tc := range []struct {
		name, send string
		metric     func(Snapshot) uint64
	}{
		{"not a number", "CONNECT abc\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"past 2^32-1", "CONNECT 99999999999\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"2^32", "CONNECT 4294967296\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"negative", "CONNECT -1\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"hex", "CONNECT 0x34\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"no port", "CONNECT\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"other word", "LISTEN 52\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"empty line", "\n", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"32 bytes, no newline", strings.Repeat("CONNECT 52", 4), func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"1 MiB, no newline", strings.Repeat("x", 1<<20), func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"immediate close", "", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"half a line, then close", "CONNE", func(m Snapshot) uint64 { return m.HandshakeErrors }},
		{"silence", "silence", func(m Snapshot) uint64 { return m.HandshakeTimeouts }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g.sub(t)
			before := tc.metric(g.dev.Metrics().Snapshot())
			c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: g.path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			switch tc.send {
			case "":
				c.Close()
			case "silence":
			case "CONNE":
				c.Write([]byte(tc.send))
				c.CloseWrite()
			default:
				go c.Write([]byte(tc.send)) // 1 MiB does not fit the socket buffer
			}
			if tc.send != "" {
				if b := hostEOF(t, g, c); len(b) != 0 {
					t.Fatalf("host got %q", b)
				}
			}
			g.wait("the bad connection counted", func() bool { return tc.metric(g.dev.Metrics().Snapshot()) == before+1 })
			// The established connection still works.
			ok.Write([]byte("still here"))
			if got := s.read(10); string(got) != "still here" {
				t.Fatalf("established connection got %q", got)
			}
		})
	}
	if m := g.dev.Metrics().Snapshot(); m.HostConnectsOK != 1 || m.ConnsAdded != 1 {
		t.Fatalf("metrics %+v", m)
	}
}

// TestCreditHostToGuest: the device never sends past the guest's
// buf_alloc; it asks for credit and resumes when the guest consumes.
func TestCreditHostToGuest(t *testing.T) {
	g := newGuest(t, guestOpts{})
	g.bufDef = 8192
	c, s, _ := g.hostConnect(52)
	msg := pattern(100000, 3)
	go c.Write(msg)
	g.wait("the guest's buffer full", func() bool { return len(s.data) == 8192 })
	// The device asks for credit only once it has none: everything it
	// sent came before the request.
	g.wait("CREDIT_REQUEST", func() bool { return s.ops[OpCreditRequest] > 0 })
	if len(s.data) != 8192 || s.overCredit != 0 {
		t.Fatalf("device sent %d bytes to an 8192-byte buffer (over by %d)", len(s.data), s.overCredit)
	}
	var got []byte
	for len(got) < len(msg) {
		got = append(got, s.read(min(4096, len(msg)-len(got)))...)
	}
	if !bytes.Equal(got, msg) || s.overCredit != 0 {
		t.Fatalf("stream differs or credit overrun %d", s.overCredit)
	}
}

// TestCreditGuestToHost: with a host that does not read, the device holds
// at most BufSize of the guest's data, and the guest's credit runs out;
// when the host reads, credit comes back.
func TestCreditGuestToHost(t *testing.T) {
	g := newGuest(t, guestOpts{})
	c, s, _ := g.hostConnect(52)
	// Fill the host socket's buffers first so the device must buffer.
	msg := pattern(4<<20, 5)
	sent := 0
	for {
		if s.credit() == 0 {
			// Ask: the answer comes after the device handled all we
			// sent, so no credit then means its buffer is full.
			n := s.ops[OpCreditUpdate]
			g.send(s, OpCreditRequest, 0, nil)
			g.wait("CREDIT_UPDATE", func() bool { return s.ops[OpCreditUpdate] > n })
			if s.credit() == 0 {
				break
			}
		}
		n := min(int(s.credit()), 65536, len(msg)-sent)
		s.txCnt += uint32(n)
		g.send(s, OpRW, 0, msg[sent:sent+n])
		sent += n
		g.poll()
		if sent > 3<<20 {
			t.Fatal("the host socket takes everything; cannot fill the device's buffer")
		}
	}
	if s.txCnt-s.peerFwd != BufSize {
		t.Fatalf("device holds %d bytes with no credit left, want %d", s.txCnt-s.peerFwd, BufSize)
	}
	if m := g.dev.Metrics().Snapshot(); m.CreditOverflow != 0 {
		t.Fatalf("metrics %+v", m)
	}
	// Now the host reads everything; the guest gets credit back and
	// finishes.
	done := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(msg))
		io.ReadFull(c, b)
		done <- b
	}()
	s.write(msg[sent:], 65536)
	if got := waitChan(g, "host read", done); !bytes.Equal(got, msg) {
		t.Fatal("host got a different stream")
	}
}

// TestLyingGuest: a guest that sends past its credit is reset (the device
// buffers no more than BufSize), and a guest that claims a forwarded count
// ahead of what it got, or a buffer it takes back, gets no more data than
// its honest buffer allows.
func TestLyingGuest(t *testing.T) {
	t.Run("sends past credit", func(t *testing.T) {
		g := newGuest(t, guestOpts{})
		c, s, _ := g.hostConnect(52)
		_ = c
		big := pattern(65536, 1)
		// The host does not read; keep sending whatever the credit says.
		for i := 0; i < 200 && !s.rst; i++ {
			s.txCnt += uint32(len(big))
			g.send(s, OpRW, 0, big)
			g.poll()
		}
		g.wait("RST", func() bool { return s.rst })
		if m := g.dev.Metrics().Snapshot(); m.CreditOverflow != 1 {
			t.Fatalf("metrics %+v", m)
		}
		hostEOF(t, g, c)
	})
	t.Run("fwd_cnt ahead", func(t *testing.T) {
		g := newGuest(t, guestOpts{})
		g.bufDef = 4096
		c, s, _ := g.hostConnect(52)
		go c.Write(pattern(1<<20, 2))
		g.wait("first data", func() bool { return len(s.data) > 0 })
		// Claim to have consumed 1 GiB, and a 4 KiB buffer. The device
		// has no credit for that, so it asks again (after the lie).
		asked := s.ops[OpCreditRequest]
		g.sendRaw(Header{SrcPort: s.key.local, DstPort: s.key.peer, Op: OpCreditUpdate, BufAlloc: 4096, FwdCnt: s.fwdCnt + 1<<30}, nil)
		g.wait("CREDIT_REQUEST after the lie", func() bool { return s.ops[OpCreditRequest] > asked })
		if len(s.data) > 4096 || s.overCredit != 0 {
			t.Fatalf("device sent %d bytes (over by %d) to a 4 KiB buffer", len(s.data), s.overCredit)
		}
	})
	t.Run("buf_alloc taken back", func(t *testing.T) {
		g := newGuest(t, guestOpts{})
		c, s, _ := g.hostConnect(52)
		s.bufAlloc = 0
		g.send(s, OpCreditUpdate, 0, nil)
		// The reply to a request comes after the device took the update.
		n := s.ops[OpCreditUpdate]
		g.send(s, OpCreditRequest, 0, nil)
		g.wait("CREDIT_UPDATE", func() bool { return s.ops[OpCreditUpdate] > n })
		if _, err := c.Write(pattern(50000, 4)); err != nil {
			t.Fatal(err)
		}
		g.wait("CREDIT_REQUEST", func() bool { return s.ops[OpCreditRequest] > 0 })
		if len(s.data) != 0 {
			t.Fatalf("device sent %d bytes to a guest with no buffer", len(s.data))
		}
		s.bufAlloc = 65536
		g.send(s, OpCreditUpdate, 0, nil)
		if got := s.read(50000); !bytes.Equal(got, pattern(50000, 4)) {
			t.Fatal("stream differs after the credit came back")
		}
	})
}

// TestShutdown: the guest's half-close reaches the host as EOF while the
// host can still send; the host's half-close reaches the guest as
// SHUTDOWN(SEND) while the guest can still send; a full close ends with
// RST both ways.
func TestShutdown(t *testing.T) {
	g := newGuest(t, guestOpts{})
	t.Run("guest half-close", func(t *testing.T) {
		g.sub(t)
		c, s, _ := g.hostConnect(52)
		s.write([]byte("bye"), 100)
		g.send(s, OpShutdown, ShutdownSend, nil)
		if b := hostEOF(t, g, c); string(b) != "bye" {
			t.Fatalf("host got %q", b)
		}
		c.Write([]byte("still open"))
		if got := s.read(10); string(got) != "still open" {
			t.Fatalf("guest got %q", got)
		}
		g.send(s, OpShutdown, ShutdownRcv|ShutdownSend, nil)
		g.wait("RST", func() bool { return s.rst })
	})
	t.Run("host half-close", func(t *testing.T) {
		g.sub(t)
		c, s, _ := g.hostConnect(53)
		c.Write([]byte("last words"))
		c.CloseWrite()
		g.wait("SHUTDOWN(SEND)", func() bool { return s.peerShut&ShutdownSend != 0 })
		if s.peerShut != ShutdownSend {
			t.Fatalf("half-close sent flags %d", s.peerShut)
		}
		if got := s.read(10); string(got) != "last words" {
			t.Fatalf("guest got %q", got)
		}
		s.write([]byte("reply"), 100)
		g.send(s, OpShutdown, ShutdownRcv|ShutdownSend, nil)
		if b := hostEOF(t, g, c); string(b) != "reply" {
			t.Fatalf("host got %q", b)
		}
		g.wait("RST", func() bool { return s.rst })
	})
	t.Run("host close, guest silent", func(t *testing.T) {
		g := newGuest(t, guestOpts{cfg: Config{ShutdownTimeout: 200 * time.Millisecond}})
		c, s, _ := g.hostConnect(54)
		s.noAutoRst = true
		c.Close()
		g.wait("SHUTDOWN", func() bool { return s.peerShut == ShutdownRcv|ShutdownSend })
		g.wait("RST after the shutdown timeout", func() bool { return s.rst })
		if m := g.dev.Metrics().Snapshot(); m.ShutdownTimeouts != 1 {
			t.Fatalf("metrics %+v", m)
		}
	})
	t.Run("guest RST", func(t *testing.T) {
		g.sub(t)
		c, s, _ := g.hostConnect(55)
		g.send(s, OpRst, 0, nil)
		delete(g.socks, s.key)
		hostEOF(t, g, c)
	})
}

// TestBadPackets: each bad packet is dropped or answered with RST and
// counted, and the device keeps working.
func TestBadPackets(t *testing.T) {
	g := newGuest(t, guestOpts{})
	c, s, _ := g.hostConnect(52)
	sk := s.key
	hdr := func(op Op) Header { return Header{SrcPort: sk.local, DstPort: sk.peer, Op: op, BufAlloc: s.bufAlloc} }
	rstFor := func(port uint32) func() bool {
		return func() bool {
			for _, h := range g.unknown {
				if h.Op == OpRst && h.DstPort == port {
					return true
				}
			}
			return false
		}
	}
	for _, tc := range []struct {
		name   string
		send   func()
		metric func(Snapshot) uint64
		rst    func() bool // an RST the guest must get, or nil
	}{
		{"wrong dst cid", func() { h := hdr(OpRW); h.DstCID = 7; g.sendRaw(h, []byte("x")) }, func(m Snapshot) uint64 { return m.BadCID }, nil},
		{"wrong src cid", func() { h := hdr(OpRW); h.SrcCID = 9; g.sendRaw(h, []byte("x")) }, func(m Snapshot) uint64 { return m.BadCID }, nil},
		{"seqpacket type", func() {
			g.sendRaw(Header{SrcPort: 700, DstPort: 701, Op: OpRequest, Type: 2}, nil)
		}, func(m Snapshot) uint64 { return m.BadType }, rstFor(700)},
		{"unknown op", func() { g.sendRaw(hdr(Op(99)), nil) }, func(m Snapshot) uint64 { return m.BadOp }, nil},
		{"op invalid", func() { g.sendRaw(hdr(OpInvalid), nil) }, func(m Snapshot) uint64 { return m.BadOp }, nil},
		{"second REQUEST", func() { g.sendRaw(hdr(OpRequest), nil) }, func(m Snapshot) uint64 { return m.BadOp }, nil},
		{"RESPONSE when established", func() { g.sendRaw(hdr(OpResponse), nil) }, func(m Snapshot) uint64 { return m.BadOp }, nil},
		{"RW for no connection", func() {
			g.sendRaw(Header{SrcPort: 800, DstPort: 801, Op: OpRW}, []byte("x"))
		}, func(m Snapshot) uint64 { return m.Unroutable }, rstFor(800)},
		{"len past the chain", func() {
			h := Header{SrcPort: 900, DstPort: 901, Op: OpRW, Len: 100}
			var hb [HeaderLen]byte
			h.SrcCID, h.DstCID, h.Type = testCID, HostCID, TypeStream
			h.Encode(hb[:])
			g.sendBytes(hb[:], []byte("short"))
		}, func(m Snapshot) uint64 { return m.BadHeader }, rstFor(900)},
		{"len over 64 KiB", func() {
			h := Header{SrcCID: testCID, DstCID: HostCID, Type: TypeStream, SrcPort: 901, DstPort: 902, Op: OpRW, Len: MaxPacket + 1}
			var hb [HeaderLen]byte
			h.Encode(hb[:])
			g.sendBytes(hb[:], make([]byte, MaxPacket+1-HeaderLen))
		}, func(m Snapshot) uint64 { return m.BadHeader }, rstFor(901)},
		{"short header", func() { g.sendBytes(make([]byte, 20), nil) }, func(m Snapshot) uint64 { return m.BadHeader }, nil},
		{"device-writable transmit buffer", func() {
			a, _ := g.tx.Alloc(64)
			head, _ := g.tx.Add(queuetest.Buf{Addr: a, Len: 64, Write: true})
			g.txAddr[uint32(head)] = a
			g.kick(g.tx, TxQueue)
		}, func(m Snapshot) uint64 { return m.BadChain }, nil},
		{"buffer outside guest memory", func() {
			head, _ := g.tx.Add(queuetest.Buf{Addr: 0x7000000, Len: 64})
			g.txAddr[uint32(head)] = 0
			g.kick(g.tx, TxQueue)
		}, func(m Snapshot) uint64 { return m.BadChain }, nil},
		{"RST for no connection is not answered", func() {
			g.sendRaw(Header{SrcPort: 1000, DstPort: 1001, Op: OpRst}, nil)
		}, func(m Snapshot) uint64 { return m.TxPackets }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g.sub(t)
			before := tc.metric(g.dev.Metrics().Snapshot())
			tc.send()
			g.wait("the packet counted", func() bool { return tc.metric(g.dev.Metrics().Snapshot()) > before })
			if tc.rst != nil {
				g.wait("RST", tc.rst)
			}
			// The connection still works both ways.
			c.Write([]byte("ping"))
			if got := s.read(4); string(got) != "ping" {
				t.Fatalf("guest got %q", got)
			}
			s.write([]byte("pong"), 100)
			b := make([]byte, 4)
			if _, err := io.ReadFull(c, b); err != nil || string(b) != "pong" {
				t.Fatalf("host got %q, %v", b, err)
			}
		})
	}
	for _, h := range g.unknown {
		if h.DstPort == 1000 {
			t.Fatalf("device answered an RST with %v", h.Op)
		}
	}
	if s.rst {
		t.Fatal("the good connection was reset")
	}
}

// TestConnectionLimit: the device holds at most MaxConnections host
// connections (handshakes included); one more is closed and counted.
func TestConnectionLimit(t *testing.T) {
	g := newGuest(t, guestOpts{cfg: Config{HandshakeTimeout: time.Minute}})
	var conns []*net.UnixConn
	for range MaxConnections {
		conns = append(conns, g.dialHost(""))
	}
	g.wait("every connection accepted", func() bool { return g.dev.Metrics().Snapshot().HostConnects == MaxConnections })
	extra := g.dialHost("")
	extra.Write([]byte("CONNECT 52\n")) // may fail: the device may have closed it already
	hostEOF(t, g, extra)
	if m := g.dev.Metrics().Snapshot(); m.ConnLimit != 1 {
		t.Fatalf("metrics %+v", m)
	}
	// Freeing one makes room again.
	conns[0].Close()
	g.wait("a handshake dropped", func() bool { return g.dev.Metrics().Snapshot().HandshakeErrors == 1 })
	c, _, ok := g.hostConnect(52)
	if !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("got %q", ok)
	}
	c.Close()
}

// TestResetClosesConnections: a driver reset closes every host socket, and
// the device works again after re-activation.
func TestResetClosesConnections(t *testing.T) {
	g := newGuest(t, guestOpts{})
	c, _, _ := g.hostConnect(52)
	g.dev.Reset()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("host read after reset: %v", err)
	}
	// Fresh queues, as a driver re-initialising would make.
	for _, d := range []**queuetest.Driver{&g.rx, &g.tx, &g.ev} {
		nd, err := queuetest.New(g.mem, (*d).DescAddr, (*d).Size)
		if err != nil {
			t.Fatal(err)
		}
		*d = nd
	}
	g.rxAddr, g.txAddr, g.socks = map[uint32]memory.GuestAddr{}, map[uint32]memory.GuestAddr{}, map[gkey]*gsock{}
	g.txFree = nil
	for range 8 {
		a, _ := g.rx.Alloc(uint64(HeaderLen + g.rxSize))
		g.postRx(a)
		b, _ := g.tx.Alloc(uint64(g.txSize))
		g.txFree = append(g.txFree, b)
	}
	g.activate()
	c2, s2, ok := g.hostConnect(52)
	if !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("after reset got %q", ok)
	}
	c2.Write([]byte("again"))
	if got := s2.read(5); string(got) != "again" {
		t.Fatalf("guest got %q", got)
	}
}

// TestBrokenRing: an avail index far ahead makes the device ask for a
// reset instead of running on garbage, and closes its connections.
func TestBrokenRing(t *testing.T) {
	g := newGuest(t, guestOpts{})
	c, _, _ := g.hostConnect(52)
	g.tx.SetAvailIdx(g.tx.LastUsed() + 1000)
	g.dev.Notify(TxQueue)
	g.wait("NEEDS_RESET", func() bool { return g.irq.resets.Load() == 1 })
	hostEOF(t, g, c)
	if m := g.dev.Metrics().Snapshot(); m.QueueErrors != 1 {
		t.Fatalf("metrics %+v", m)
	}
}

// TestMetricsSnapshotFields: every counter reaches the snapshot.
func TestMetricsSnapshotFields(t *testing.T) {
	var m Metrics
	mv := reflect.ValueOf(&m).Elem()
	st := reflect.TypeOf(Snapshot{})
	if mv.NumField() != st.NumField() {
		t.Fatalf("Metrics has %d fields, Snapshot %d", mv.NumField(), st.NumField())
	}
	for i := range mv.NumField() {
		name := mv.Type().Field(i).Name
		if _, ok := st.FieldByName(name); !ok {
			t.Fatalf("Snapshot lacks %s", name)
		}
		mv.Field(i).Addr().Interface().(interface{ Add(uint64) uint64 }).Add(uint64(i + 1))
	}
	sv := reflect.ValueOf(m.Snapshot())
	for i := range mv.NumField() {
		if got := sv.FieldByName(mv.Type().Field(i).Name).Uint(); got != uint64(i+1) {
			t.Fatalf("%s: snapshot %d, want %d", mv.Type().Field(i).Name, got, i+1)
		}
	}
}

func TestParseConnect(t *testing.T) {
	for _, tc := range []struct {
		line string
		port uint32
		ok   bool
	}{
		{"CONNECT 52", 52, true},
		{"connect 52", 52, true},
		{"cOnNeCt 0", 0, true},
		{"CONNECT 4294967295", 4294967295, true},
		{"CONNECT +7", 7, true},
		{"  CONNECT\t52  extra words", 52, true},
		{"CONNECT 52\r", 52, true},
		{"CONNECT 4294967296", 0, false},
		{"CONNECT 99999999999", 0, false},
		{"CONNECT abc", 0, false},
		{"CONNECT -1", 0, false},
		{"CONNECT +", 0, false},
		{"CONNECT 5x", 0, false},
		{"CONNECT", 0, false},
		{"CONNECTS 5", 0, false},
		{"", 0, false},
	} {
		p, err := ParseConnect([]byte(tc.line))
		if tc.ok != (err == nil) || p != tc.port {
			t.Errorf("ParseConnect(%q) = %d, %v", tc.line, p, err)
		}
		if err != nil && !errors.Is(err, ErrHandshake) {
			t.Errorf("ParseConnect(%q): %v does not wrap ErrHandshake", tc.line, err)
		}
	}
}
