package vsock

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/internal/seedcorpus"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the fuzz seed corpus in testdata/fuzz")

// --- FuzzPackets: guest packets through the device's state machine ---

// A FuzzPackets input is a sequence of packets, each fzPktLen bytes: a
// raw 44-byte header exactly as the guest writes it, then one byte giving
// the data sent behind it (that many bytes times 61, whatever the
// header's len says). Before the packets, the host has connected to guest
// port 52 (host port FirstHostPort) and written "hello"; after them, the
// device must still connect the host to guest port 53 and carry data both
// ways, and must never have sent past a guest socket's buffer.
const (
	fzPktLen  = HeaderLen + 1
	fzMaxPkts = 32
)

func runPackets(t *testing.T, data []byte) {
	g := newGuest(t, guestOpts{rxBufs: 16, queueSize: 64})
	c, s, _ := g.hostConnect(52)
	c.Write([]byte("hello"))
	for i := 0; i+fzPktLen <= len(data) && i < fzMaxPkts*fzPktLen; i += fzPktLen {
		p := data[i : i+fzPktLen]
		g.sendBytes(p[:HeaderLen], make([]byte, int(p[HeaderLen])*61))
		g.poll()
	}
	c2, s2, ok := g.hostConnect(53)
	if !strings.HasPrefix(ok, "OK ") {
		t.Fatalf("after the packets the device answered %q", ok)
	}
	c2.Write([]byte("ping"))
	if got := s2.read(4); string(got) != "ping" {
		t.Fatalf("guest got %q", got)
	}
	s2.write([]byte("pong"), 100)
	b := make([]byte, 4)
	if _, err := io.ReadFull(c2, b); err != nil || string(b) != "pong" {
		t.Fatalf("host got %q, %v", b, err)
	}
	for _, x := range []*gsock{s, s2} {
		if x.overCredit != 0 {
			t.Fatalf("device sent %d bytes past the guest's buffer", x.overCredit)
		}
	}
}

func FuzzPackets(f *testing.F) {
	for _, s := range packetSeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) { runPackets(t, data) })
}

// pkt encodes one FuzzPackets packet on the established connection
// (guest port 52, host port FirstHostPort) unless the header says
// otherwise.
func pkt(h Header, dataUnits byte) []byte {
	if h.SrcCID == 0 {
		h.SrcCID = testCID
	}
	if h.DstCID == 0 {
		h.DstCID = HostCID
	}
	if h.Type == 0 {
		h.Type = TypeStream
	}
	if h.SrcPort == 0 && h.DstPort == 0 {
		h.SrcPort, h.DstPort = 52, FirstHostPort
	}
	b := make([]byte, fzPktLen)
	h.Encode(b)
	b[HeaderLen] = dataUnits
	return b
}

func packetSeeds() []seedcorpus.Seed {
	cat := func(p ...[]byte) []byte { return bytes.Join(p, nil) }
	const alloc = 256 << 10
	return []seedcorpus.Seed{
		{Name: "rw", Data: pkt(Header{Op: OpRW, Len: 61, BufAlloc: alloc}, 1)},
		{Name: "rw-len-past-data", Data: pkt(Header{Op: OpRW, Len: 1000, BufAlloc: alloc}, 1)},
		{Name: "rw-len-short", Data: pkt(Header{Op: OpRW, Len: 10, BufAlloc: alloc}, 2)},
		{Name: "rw-past-credit", Data: cat(
			pkt(Header{Op: OpRW, Len: 61 * 255, BufAlloc: alloc}, 255), pkt(Header{Op: OpRW, Len: 61 * 255, BufAlloc: alloc}, 255),
			pkt(Header{Op: OpRW, Len: 61 * 255, BufAlloc: alloc}, 255), pkt(Header{Op: OpRW, Len: 61 * 255, BufAlloc: alloc}, 255),
			pkt(Header{Op: OpRW, Len: 61 * 255, BufAlloc: alloc}, 255))},
		{Name: "rw-zero", Data: pkt(Header{Op: OpRW, BufAlloc: alloc}, 0)},
		{Name: "shutdown-send-then-rw", Data: cat(pkt(Header{Op: OpShutdown, Flags: ShutdownSend, BufAlloc: alloc}, 0),
			pkt(Header{Op: OpRW, Len: 61, BufAlloc: alloc}, 1))},
		{Name: "shutdown-both", Data: pkt(Header{Op: OpShutdown, Flags: 3, BufAlloc: alloc}, 0)},
		{Name: "shutdown-all-flags", Data: pkt(Header{Op: OpShutdown, Flags: ^uint32(0), BufAlloc: alloc}, 0)},
		{Name: "rst", Data: pkt(Header{Op: OpRst}, 0)},
		{Name: "rst-then-rw", Data: cat(pkt(Header{Op: OpRst}, 0), pkt(Header{Op: OpRW, Len: 61}, 1))},
		{Name: "credit-request", Data: pkt(Header{Op: OpCreditRequest, BufAlloc: alloc}, 0)},
		{Name: "credit-update-lying", Data: pkt(Header{Op: OpCreditUpdate, BufAlloc: ^uint32(0), FwdCnt: 1 << 31}, 0)},
		{Name: "credit-zero", Data: pkt(Header{Op: OpCreditUpdate}, 0)},
		{Name: "request-duplicate", Data: pkt(Header{Op: OpRequest, BufAlloc: alloc}, 0)},
		{Name: "request-nothing-listens", Data: pkt(Header{Op: OpRequest, SrcPort: 60000, DstPort: 9, BufAlloc: alloc}, 0)},
		{Name: "response-unexpected", Data: pkt(Header{Op: OpResponse}, 0)},
		{Name: "unknown-op", Data: pkt(Header{Op: 200}, 0)},
		{Name: "op-invalid", Data: pkt(Header{Op: OpInvalid}, 0)},
		{Name: "seqpacket", Data: pkt(Header{Op: OpRequest, Type: 2, SrcPort: 1, DstPort: 2}, 0)},
		{Name: "wrong-dst-cid", Data: pkt(Header{Op: OpRW, DstCID: 1 << 40, Len: 61}, 1)},
		{Name: "wrong-src-cid", Data: pkt(Header{Op: OpRW, SrcCID: 4, Len: 61}, 1)},
		{Name: "len-over-max", Data: pkt(Header{Op: OpRW, Len: ^uint32(0)}, 255)},
		{Name: "unroutable", Data: pkt(Header{Op: OpRW, SrcPort: 7, DstPort: 8, Len: 61}, 1)},
	}
}

// --- FuzzChains: the ring-level parsing of transmit and receive chains ---

// A FuzzChains input is a queuetest.FuzzQueue image; every chain is parsed
// both as a transmit packet and as a receive buffer.
func runChains(t *testing.T, data []byte) {
	mem, q, ok, err := queuetest.FuzzQueue(data)
	if err != nil {
		t.Fatalf("valid layout rejected: %v", err)
	}
	if !ok {
		return
	}
	var descs []queue.Descriptor
	var tx txPacket
	var rx rxBuffer
	for range 2*int(q.Size()) + 2 {
		c, ok, err := q.Pop()
		if err != nil || !ok {
			return
		}
		descs, err = c.Collect(descs[:0])
		if err != nil {
			if !errors.Is(err, queue.ErrInvalidChain) {
				t.Fatalf("walk: %v", err)
			}
			continue
		}
		switch err := parseTx(mem, descs, &tx); {
		case err == nil:
			n := 0
			for _, b := range tx.data {
				n += len(b)
			}
			if n != int(tx.hdr.Len) || n > MaxPacket {
				t.Fatalf("packet of %d data bytes for len %d", n, tx.hdr.Len)
			}
		case errors.Is(err, errWritable), errors.Is(err, errShortChain), errors.Is(err, errLenPast),
			errors.Is(err, errTooBig), errors.Is(err, memory.ErrOutOfRange):
		default:
			t.Fatalf("parseTx: unexpected error %v", err)
		}
		switch err := parseRx(mem, descs, &rx); {
		case err == nil:
			n, space := 0, 0
			for _, b := range rx.hdr {
				n += len(b)
			}
			for _, b := range rx.data {
				space += len(b)
			}
			if n != HeaderLen || uint64(space) != rx.space || space > MaxPacket {
				t.Fatalf("receive buffer: header %d bytes, space %d (%d)", n, space, rx.space)
			}
			rx.writeHeader(&Header{Op: OpRW, Len: 1})
			lim := rx.limit(rx.space / 2)
			got := 0
			for _, b := range lim {
				got += len(b)
			}
			if uint64(got) != rx.space/2 {
				t.Fatalf("limit(%d) gave %d bytes", rx.space/2, got)
			}
		case errors.Is(err, errReadable), errors.Is(err, errShortChain), errors.Is(err, memory.ErrOutOfRange):
		default:
			t.Fatalf("parseRx: unexpected error %v", err)
		}
		_ = q.AddUsed(c.Head(), 0)
	}
}

func FuzzChains(f *testing.F) {
	for _, s := range chainSeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) { runChains(t, data) })
}

// chainImage is a FuzzQueue image of 8 descriptors, heads published in
// order; mem is written at 0x400.
func chainImage(flags byte, descs [][3]uint64, mem []byte, heads ...uint16) []byte {
	b := make([]byte, 2+queuetest.FuzzMem)
	b[0], b[1] = 3, flags
	m := b[2:]
	for i, d := range descs {
		binary.LittleEndian.PutUint64(m[16*i:], d[0])
		binary.LittleEndian.PutUint32(m[16*i+8:], uint32(d[1]))
		binary.LittleEndian.PutUint16(m[16*i+12:], uint16(d[2]))
		binary.LittleEndian.PutUint16(m[16*i+14:], uint16(i+1))
	}
	for i, h := range heads {
		binary.LittleEndian.PutUint16(m[queuetest.FuzzAvail+4+2*i:], h)
	}
	binary.LittleEndian.PutUint16(m[queuetest.FuzzAvail+2:], uint16(len(heads)))
	copy(m[0x400:], mem)
	return b
}

func chainSeeds() []seedcorpus.Seed {
	const next, write, ind = uint64(queue.DescFNext), uint64(queue.DescFWrite), uint64(queue.DescFIndirect)
	hdr := func(len uint32) []byte {
		b := make([]byte, HeaderLen)
		(&Header{SrcCID: testCID, DstCID: HostCID, Type: TypeStream, Op: OpRW, Len: len}).Encode(b)
		return b
	}
	return []seedcorpus.Seed{
		{Name: "one-descriptor", Data: chainImage(0, [][3]uint64{{0x400, HeaderLen + 16, 0}}, hdr(16), 0)},
		{Name: "header-and-data", Data: chainImage(0, [][3]uint64{{0x400, HeaderLen, next}, {0x800, 100, 0}}, hdr(100), 0)},
		{Name: "split-header", Data: chainImage(0, [][3]uint64{{0x400, 20, next}, {0x414, 24, next}, {0x800, 8, 0}}, hdr(8), 0)},
		{Name: "len-past-chain", Data: chainImage(0, [][3]uint64{{0x400, HeaderLen + 4, 0}}, hdr(100), 0)},
		{Name: "len-huge", Data: chainImage(0, [][3]uint64{{0x400, HeaderLen, 0}}, hdr(^uint32(0)), 0)},
		{Name: "receive-buffer", Data: chainImage(0, [][3]uint64{{0x400, HeaderLen + 4096, write}}, nil, 0)},
		{Name: "receive-split", Data: chainImage(0, [][3]uint64{{0x400, 30, write | next}, {0x800, 30, write | next}, {0x900, 100, write}}, nil, 0)},
		{Name: "short", Data: chainImage(0, [][3]uint64{{0x400, 10, 0}}, nil, 0)},
		{Name: "outside-memory", Data: chainImage(0, [][3]uint64{{0xfff0, HeaderLen, 0}}, nil, 0)},
		{Name: "indirect", Data: chainImage(2, [][3]uint64{{0x600, 32, ind}}, nil, 0)},
		{Name: "loop", Data: chainImage(0, [][3]uint64{{0x400, 8, next}, {0x400, 8, next}, {0x400, 8, next}, {0x400, 8, next},
			{0x400, 8, next}, {0x400, 8, next}, {0x400, 8, next}, {0x400, 8, next}}, nil, 0)},
		{Name: "two-chains", Data: chainImage(0, [][3]uint64{{0x400, HeaderLen + 1, 0}, {0x800, HeaderLen, write}}, hdr(1), 0, 1)},
	}
}

// --- FuzzConnect: the handshake line, parsed and read off a socket ---

// runConnect checks ParseConnect on a line and readConnect on the same
// bytes arriving on a socket: both agree, and a port that parses prints
// back as itself.
func runConnect(t *testing.T, data []byte) {
	line := data
	if i := bytes.IndexByte(data, '\n'); i >= 0 {
		line = data[:i]
	}
	port, perr := ParseConnect(line)
	if perr == nil {
		if p2, err := ParseConnect(fmt.Appendf(nil, "connect %d", port)); err != nil || p2 != port {
			t.Fatalf("port %d does not round-trip: %d, %v", port, p2, err)
		}
	} else if !errors.Is(perr, ErrHandshake) {
		t.Fatalf("error %v does not wrap ErrHandshake", perr)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	in := data[:min(len(data), 4096)]
	if _, err := unix.Write(fds[1], in); err != nil {
		t.Fatal(err)
	}
	unix.Shutdown(fds[1], unix.SHUT_WR)
	got, done, rerr := readConnect(fds[0])
	if !done {
		t.Fatal("readConnect waits for more after the peer shut down")
	}
	nl := bytes.IndexByte(in, '\n')
	switch {
	case nl < 0 || nl >= MaxHandshake:
		if rerr == nil {
			t.Fatalf("readConnect accepted %q with no newline in the first %d bytes", in, MaxHandshake)
		}
	case (rerr == nil) != (perr == nil) || got != port:
		t.Fatalf("readConnect = %d, %v; ParseConnect = %d, %v", got, rerr, port, perr)
	case rerr == nil:
		rest := make([]byte, len(in))
		n, _ := unix.Read(fds[0], rest)
		if !bytes.Equal(rest[:max(n, 0)], in[nl+1:]) {
			t.Fatalf("readConnect consumed past the newline: left %q of %q", rest[:max(n, 0)], in)
		}
	}
}

func FuzzConnect(f *testing.F) {
	for _, s := range connectSeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) { runConnect(t, data) })
}

func connectSeeds() []seedcorpus.Seed {
	return []seedcorpus.Seed{
		{Name: "connect", Data: []byte("CONNECT 52\n")},
		{Name: "lower-case", Data: []byte("connect 52\n")},
		{Name: "data-behind", Data: []byte("CONNECT 1234\nhello")},
		{Name: "max-port", Data: []byte("CONNECT 4294967295\n")},
		{Name: "port-too-big", Data: []byte("CONNECT 99999999999\n")},
		{Name: "not-a-number", Data: []byte("CONNECT abc\n")},
		{Name: "plus", Data: []byte("CONNECT +5\n")},
		{Name: "crlf", Data: []byte("CONNECT 5\r\n")},
		{Name: "extra-words", Data: []byte("CONNECT 5 now please\n")},
		{Name: "no-newline", Data: []byte(strings.Repeat("CONNECT 5 ", 4))},
		{Name: "newline-at-32", Data: []byte("CONNECT 5" + strings.Repeat(" ", 22) + "\n")},
		{Name: "empty", Data: []byte("\n")},
		{Name: "utf8-space", Data: []byte("CONNECT\u00a052\n")},
		{Name: "nul", Data: []byte("CONNECT \x0052\n")},
	}
}

// TestSeedCorpus keeps testdata/fuzz in step with the seeds above (go
// test runs the files; -update-seeds rewrites them).
func TestSeedCorpus(t *testing.T) {
	seedcorpus.Check(t, "FuzzPackets", packetSeeds(), *updateSeeds)
	seedcorpus.Check(t, "FuzzChains", chainSeeds(), *updateSeeds)
	seedcorpus.Check(t, "FuzzConnect", connectSeeds(), *updateSeeds)
}
