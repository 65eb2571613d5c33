package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// fakeServer accepts one connection, negotiates like a real server (GO,
// structured replies when asked), reads one request and answers it with
// whatever reply returns.
func fakeServer(t *testing.T, greeting []byte, reply func(req request) []byte) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if greeting != nil {
			c.Write(greeting)
			io.Copy(io.Discard, c)
			return
		}
		c.Write(serverHello())
		var cf [4]byte
		io.ReadFull(c, cf[:])
		for {
			var h [16]byte
			if _, err := io.ReadFull(c, h[:]); err != nil {
				return
			}
			opt := binary.BigEndian.Uint32(h[8:])
			io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(h[12:])))
			if opt == optStructuredReply {
				c.Write(optReplyBytes(opt, repAck, nil))
				continue
			}
			info := make([]byte, 12)
			binary.BigEndian.PutUint64(info[2:], 1<<20)
			binary.BigEndian.PutUint16(info[10:], FlagHasFlags|FlagSendFlush)
			c.Write(append(optReplyBytes(opt, repInfo, info), optReplyBytes(opt, repAck, nil)...))
			break
		}
		var rh [requestSize]byte
		if _, err := io.ReadFull(c, rh[:]); err != nil {
			return
		}
		req, _ := decodeRequest(rh[:])
		c.Write(reply(req))
		io.Copy(io.Discard, c) // keep the connection open until the client gives up
	}()
	return l.Addr().String()
}

func serverHello() []byte {
	b := make([]byte, 18)
	binary.BigEndian.PutUint64(b, nbdMagic)
	binary.BigEndian.PutUint64(b[8:], optMagic)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	return b
}

func optReplyBytes(opt, typ uint32, data []byte) []byte {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b, optReplyMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	return append(b, data...)
}

func simpleReply(handle uint64, errno uint32, data []byte) []byte {
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint32(b, simpleMagic)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], handle)
	return append(b, data...)
}

func chunkReply(handle uint64, flags, typ uint16, length uint32, payload []byte) []byte {
	b := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint32(b, structuredMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint32(b[16:], length)
	return append(b, payload...)
}

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// TestHostileServer: a server that sends garbage, short or oversized
// replies, replies for requests nobody made, or nothing at all makes the
// client's request fail in bounded time; nothing panics or hangs.
func TestHostileServer(t *testing.T) {
	cases := []struct {
		name  string
		reply func(request) []byte
	}{
		{"garbage", func(request) []byte { return bytes.Repeat([]byte{0xde, 0xad}, 64) }},
		{"short header", func(r request) []byte { return simpleReply(r.handle, 0, nil)[:10] }},
		{"short data", func(r request) []byte { return simpleReply(r.handle, 0, make([]byte, 100)) }},
		{"wrong handle", func(r request) []byte { return simpleReply(r.handle+7, 0, make([]byte, r.length)) }},
		{"huge chunk", func(r request) []byte {
			return chunkReply(r.handle, replyFlagDone, replyOffsetData, 0xffffffff, be64(r.offset))
		}},
		{"chunk outside the read", func(r request) []byte {
			return chunkReply(r.handle, replyFlagDone, replyOffsetData, 8+16, append(be64(r.offset+uint64(r.length)-8), make([]byte, 16)...))
		}},
		{"overlapping chunks", func(r request) []byte {
			half := r.length / 2
			a := chunkReply(r.handle, 0, replyOffsetData, 8+half, append(be64(r.offset), make([]byte, half)...))
			b := chunkReply(r.handle, replyFlagDone, replyOffsetData, 8+half, append(be64(r.offset), make([]byte, half)...))
			return append(a, b...)
		}},
		{"done without data", func(r request) []byte { return chunkReply(r.handle, replyFlagDone, replyNone, 0, nil) }},
		{"huge hole", func(r request) []byte {
			return chunkReply(r.handle, replyFlagDone, replyOffsetHole, 12, append(be64(r.offset), 0xff, 0xff, 0xff, 0xff))
		}},
		{"error chunk with long message length", func(r request) []byte {
			return chunkReply(r.handle, replyFlagDone, replyError, 6, []byte{0, 0, 0, 5, 0xff, 0xff})
		}},
		{"silent", func(request) []byte { return nil }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr := fakeServer(t, nil, tc.reply)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := Dial(ctx, addr, "x")
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			rctx, rcancel := context.WithTimeout(ctx, time.Second)
			defer rcancel()
			err = c.ReadAt(rctx, make([]byte, 4096), 0)
			if err == nil {
				t.Fatal("read succeeded")
			}
			// A reply cut short on an open connection is a wait that
			// the request's deadline ends.
			timeoutOK := tc.name == "silent" || strings.HasPrefix(tc.name, "short")
			if !errors.Is(err, ErrProtocol) && !(timeoutOK && errors.Is(err, context.DeadlineExceeded)) {
				t.Fatalf("read error is not a protocol error: %v", err)
			}
			// The connection is dead: later requests fail at once.
			if err := c.Flush(ctx); err == nil {
				t.Fatal("flush on a failed connection succeeded")
			}
		})
	}
}

// TestHostileHandshake: a greeting that is not NBD, an old-style server,
// and an option reply claiming a huge length fail the handshake.
func TestHostileHandshake(t *testing.T) {
	oldstyle := append(be64(nbdMagic), be64(0x00420281861253)...)
	huge := append(serverHello(), optReplyBytes(optStructuredReply, repAck, nil)[:16]...)
	huge = append(huge, 0xff, 0xff, 0xff, 0xff)
	for name, g := range map[string][]byte{"http": []byte("HTTP/1.1 400 Bad Request\r\n\r\n"), "oldstyle": oldstyle, "huge option reply": huge} {
		t.Run(name, func(t *testing.T) {
			addr := fakeServer(t, g, nil)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := Dial(ctx, addr, "x"); err == nil {
				t.Fatal("handshake succeeded")
			}
		})
	}
}

// TestGarbageClient: a client that sends garbage loses its connection; a
// well-behaved client on the same server keeps working.
func TestGarbageClient(t *testing.T) {
	m := &memBackend{b: make([]byte, 1<<20)}
	s, addr := startServer(t, StaticExports{"m": {Name: "m", Backend: m}})
	good := dial(t, addr, "m")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	attacks := map[string]func(net.Conn){
		"garbage greeting": func(c net.Conn) { c.Write(bytes.Repeat([]byte("GET / HTTP/1.1\r\n"), 10)) },
		"huge option": func(c net.Conn) {
			c.Write([]byte{0, 0, 0, 1})
			c.Write(append(be64(optMagic), 0, 0, 0, optGo, 0x7f, 0xff, 0xff, 0xff))
		},
		"bad request magic": func(c net.Conn) {
			info, err := handshake(c, "m", true)
			if err != nil || info.Size != 1<<20 {
				t.Errorf("handshake: %v", err)
			}
			c.Write(bytes.Repeat([]byte{0x41}, requestSize))
		},
		"huge write": func(c net.Conn) {
			if _, err := handshake(c, "m", false); err != nil {
				t.Errorf("handshake: %v", err)
			}
			var h [requestSize]byte
			(&request{typ: CmdWrite, length: 0xffffffff}).encode(h[:])
			c.Write(h[:])
		},
	}
	for name, attack := range attacks {
		t.Run(name, func(t *testing.T) {
			before := s.ProtocolErrors.Load()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			attack(c)
			// The server closes: reading drains its replies, then EOF.
			if _, err := io.Copy(io.Discard, c); err != nil {
				t.Fatalf("the server did not close the connection: %v", err)
			}
			if s.ProtocolErrors.Load() == before && !strings.Contains(name, "greeting") {
				t.Errorf("no protocol error counted")
			}
			p := []byte("still here")
			if err := good.WriteAt(ctx, p, 512, false); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(p))
			if err := good.ReadAt(ctx, got, 512); err != nil || !bytes.Equal(got, p) {
				t.Fatalf("the good client broke: %v %q", err, got)
			}
		})
	}
}

// TestServerRequestErrors: requests the server refuses get an error
// reply and leave the connection usable.
func TestServerRequestErrors(t *testing.T) {
	m := &memBackend{b: make([]byte, 1<<20)}
	_, addr := startServer(t, StaticExports{"ro": {Name: "ro", Backend: m, ReadOnly: true}})
	c := dial(t, addr, "ro")
	ctx := context.Background()
	if c.Info().Flags&FlagReadOnly == 0 {
		t.Fatal("read-only export not flagged")
	}
	err := c.WriteAt(ctx, []byte{1}, 0, false)
	var ne *Error
	if !errors.As(err, &ne) || ne.Code != EPERM {
		t.Fatalf("write to a read-only export: %v", err)
	}
	if err := c.ReadAt(ctx, make([]byte, 8), 0); err != nil {
		t.Fatalf("read after a refused write: %v", err)
	}
}
