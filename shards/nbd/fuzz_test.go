package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"io"
	"net"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/seedcorpus"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the fuzz seed corpus in testdata/fuzz")

// rwBytes is a peer that sends data and swallows whatever it is sent.
type rwBytes struct{ r *bytes.Reader }

func (p rwBytes) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p rwBytes) Write(b []byte) (int, error) { return len(b), nil }

func goReplies(size uint64, flags uint16) []byte {
	info := make([]byte, 12)
	binary.BigEndian.PutUint64(info[2:], size)
	binary.BigEndian.PutUint16(info[10:], flags)
	var b []byte
	b = append(b, optReplyBytes(optStructuredReply, repAck, nil)...)
	b = append(b, optReplyBytes(optGo, repInfo, info)...)
	b = append(b, optReplyBytes(optGo, repInfo, append([]byte{0, infoDescription}, "desc"...))...)
	return append(b, optReplyBytes(optGo, repAck, nil)...)
}

func handshakeSeeds() []seedcorpus.Seed {
	list := make([]byte, 4, 8)
	binary.BigEndian.PutUint32(list, 3)
	list = append(list, "abc"...)
	return []seedcorpus.Seed{
		{Name: "go", Data: append(serverHello(), goReplies(1<<20, FlagHasFlags|FlagSendFlush)...)},
		{Name: "go-unsupported", Data: append(append(serverHello(), optReplyBytes(optStructuredReply, repErrUnsup, nil)...),
			append(optReplyBytes(optGo, repErrUnsup, nil), append(be64(1<<20), 0, 1)...)...)},
		{Name: "unknown-export", Data: append(serverHello(), optReplyBytes(optStructuredReply, repAck, nil)...)},
		{Name: "list", Data: append(append(serverHello(), optReplyBytes(optList, repServer, list)...), optReplyBytes(optList, repAck, nil)...)},
		{Name: "huge-reply", Data: append(serverHello(), 0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff)},
	}
}

// FuzzHandshake feeds a server's negotiation bytes to the client's
// handshake and export listing.
func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if info, err := handshake(rwBytes{bytes.NewReader(data)}, "e", true); err == nil && (info.Size < 0 || info.Export != "e") {
			t.Fatalf("handshake accepted %+v", info)
		}
		listExports(rwBytes{bytes.NewReader(data)})
	})
}

func replySeeds() []seedcorpus.Seed {
	data := append(be64(0), bytes.Repeat([]byte{7}, 4096)...)
	return []seedcorpus.Seed{
		{Name: "simple", Data: bytes.Join([][]byte{simpleReply(1, 0, make([]byte, 4096)), simpleReply(2, 0, nil),
			simpleReply(3, 0, nil), simpleReply(4, EIO, nil)}, nil)},
		{Name: "structured", Data: bytes.Join([][]byte{
			chunkReply(1, 0, replyOffsetData, 8+2048, data[:8+2048]),
			chunkReply(1, replyFlagDone, replyOffsetHole, 12, append(be64(2048), 0, 0, 8, 0)),
			chunkReply(2, replyFlagDone, replyNone, 0, nil),
			chunkReply(3, replyFlagDone, replyError, 10, []byte{0, 0, 0, 5, 0, 4, 'o', 'o', 'p', 's'}),
			chunkReply(4, replyFlagDone, replyOffsetData, 8+100, append(be64(1000), make([]byte, 100)...))}, nil)},
		{Name: "wrong-handle", Data: simpleReply(9, 0, nil)},
		{Name: "huge", Data: chunkReply(1, replyFlagDone, replyOffsetData, 0xffffffff, be64(0))},
	}
}

// FuzzClientReplies feeds transmission-phase bytes to a client with four
// requests in flight (handles 1-4: read 4096 at 0, write 512 at 0, flush,
// read 100 at 1000). Every request must complete; nothing may panic.
func FuzzClientReplies(f *testing.F) {
	for _, s := range replySeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cside, sside := net.Pipe()
		c := NewClient(cside, Info{Export: "e", Size: 1 << 20, Flags: FlagHasFlags | FlagSendFlush, Structured: true})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done := make(chan error, 4)
		reqs := []func() error{
			func() error { return c.ReadAt(ctx, make([]byte, 4096), 0) },
			func() error { return c.WriteAt(ctx, make([]byte, 512), 0, false) },
			func() error { return c.Flush(ctx) },
			func() error { return c.ReadAt(ctx, make([]byte, 100), 1000) },
		}
		var hdr [requestSize]byte
		for i, r := range reqs {
			go func() { done <- r() }()
			// net.Pipe is synchronous: once the header is read, the
			// request has its handle (i+1) and the next one can go.
			if _, err := io.ReadFull(sside, hdr[:]); err != nil {
				t.Fatal(err)
			}
			if i == 1 {
				io.CopyN(io.Discard, sside, 512)
			}
		}
		go func() {
			sside.Write(data)
			sside.Close()
		}()
		for range reqs {
			<-done
		}
		c.Close()
		if ctx.Err() != nil {
			t.Fatal("requests hung until the deadline")
		}
	})
}

func serverSeeds() []seedcorpus.Seed {
	opt := func(o uint32, d []byte) []byte {
		return append(append(be64(optMagic), binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, o), uint32(len(d)))...), d...)
	}
	goData := append(binary.BigEndian.AppendUint32(nil, 1), 'm', 0, 1, 0, infoDescription)
	req := func(typ, flags uint16, h, off uint64, n uint32) []byte {
		var b [requestSize]byte
		(&request{typ: typ, flags: flags, handle: h, offset: off, length: n}).encode(b[:])
		return b[:]
	}
	flagsAll := []byte{0, 0, 0, cFlagFixed | cFlagNoZeroes}
	return []seedcorpus.Seed{
		{Name: "go-and-io", Data: bytes.Join([][]byte{flagsAll, opt(optStructuredReply, nil), opt(optGo, goData),
			req(CmdWrite, CmdFlagFUA, 1, 0, 8), []byte("12345678"), req(CmdRead, 0, 2, 0, 8), req(CmdFlush, 0, 3, 0, 0),
			req(CmdTrim, 0, 4, 0, 4096), req(CmdWriteZeroes, 0, 5, 4096, 4096), req(CmdRead, 0, 6, 1<<20, 1), req(CmdDisc, 0, 7, 0, 0)}, nil)},
		{Name: "list-info-abort", Data: bytes.Join([][]byte{flagsAll, opt(optList, nil), opt(optInfo, goData), opt(99, nil), opt(optAbort, nil)}, nil)},
		{Name: "export-name", Data: bytes.Join([][]byte{{0, 0, 0, 1}, opt(optExportName, []byte("m")), req(CmdRead, 0, 1, 0, 4096)}, nil)},
		{Name: "bad-info", Data: bytes.Join([][]byte{flagsAll, opt(optGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0}), opt(optGo, []byte{0, 0, 0, 0, 0, 9})}, nil)},
	}
}

// FuzzServer feeds a client's bytes to a server connection with one 1 MiB
// export "m"; it must end the connection or answer, never panic.
func FuzzServer(f *testing.F) {
	for _, s := range serverSeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := &Server{Exports: StaticExports{"m": {Name: "m", Backend: &memBackend{b: make([]byte, 1<<20)}}}}
		cside, sside := net.Pipe()
		served := make(chan struct{})
		go func() {
			s.ServeConn(sside)
			close(served)
		}()
		go io.Copy(io.Discard, cside)
		cside.Write(data)
		cside.Close()
		<-served
	})
}

func TestSeedCorpus(t *testing.T) {
	seedcorpus.Check(t, "FuzzHandshake", handshakeSeeds(), *updateSeeds)
	seedcorpus.Check(t, "FuzzClientReplies", replySeeds(), *updateSeeds)
	seedcorpus.Check(t, "FuzzServer", serverSeeds(), *updateSeeds)
}
