package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Client is one NBD connection in the transmission phase. Its methods may
// be called from many goroutines at once; requests are multiplexed by
// handle and replies may come in any order.
//
// A request's context bounds it. NBD has no way to cancel a request the
// server is working on, so when a context ends first the whole connection
// is closed and every request on it fails: the caller learns that the
// state of this export is unknown, and no reply can later land in a
// buffer the caller has reused.
type Client struct {
	conn net.Conn
	info Info

	wmu     sync.Mutex
	w       *bufio.Writer
	waiting atomic.Int32

	mu      sync.Mutex
	pending map[uint64]*call
	next    uint64
	err     error // set once the connection failed or was closed

	readerDone chan struct{}
}

type call struct {
	req     request
	buf     []byte   // READ destination
	covered [][2]int // structured READ: byte ranges of buf received, sorted
	err     error    // the server's error chunk, if any
	result  error
	done    chan struct{}
}

// Dial connects to addr over TCP and negotiates export with structured
// replies.
func Dial(ctx context.Context, addr, export string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	info, err := Handshake(ctx, conn, export, true)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	return NewClient(conn, info), nil
}

// NewClient starts the transmission phase on conn, which Handshake has
// negotiated (here or in another process that passed the socket on).
func NewClient(conn net.Conn, info Info) *Client {
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	c := &Client{conn: conn, info: info, w: bufio.NewWriterSize(conn, 64<<10),
		pending: map[uint64]*call{}, next: 1, readerDone: make(chan struct{})}
	go c.reader()
	return c
}

// Info is what the handshake negotiated.
func (c *Client) Info() Info { return c.info }

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.info.Size }

// Err returns why the connection failed, or nil while it works.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the connection has failed or been closed.
func (c *Client) Done() <-chan struct{} { return c.readerDone }

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.do(ctx, CmdRead, 0, off, int64(len(p)), nil, p)
}

// WriteAt writes p at off; fua asks the server to make it durable before
// it replies.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	var f uint16
	if fua {
		f = CmdFlagFUA
	}
	return c.do(ctx, CmdWrite, f, off, int64(len(p)), p, nil)
}

// Flush makes every write the server has acknowledged durable.
func (c *Client) Flush(ctx context.Context) error {
	return c.do(ctx, CmdFlush, 0, 0, 0, nil, nil)
}

// Trim tells the server the range is no longer needed.
func (c *Client) Trim(ctx context.Context, off, n int64) error {
	return c.do(ctx, CmdTrim, 0, off, n, nil, nil)
}

// WriteZeroes zeroes a range; noHole asks the server to keep it allocated.
func (c *Client) WriteZeroes(ctx context.Context, off, n int64, noHole bool) error {
	var f uint16
	if noHole {
		f = CmdFlagNoHole
	}
	return c.do(ctx, CmdWriteZeroes, f, off, n, nil, nil)
}

// Close sends NBD_CMD_DISC and closes the connection; requests still in
// flight fail with ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	alive := c.err == nil
	c.mu.Unlock()
	if alive {
		var h [requestSize]byte
		(&request{typ: CmdDisc}).encode(h[:])
		c.wmu.Lock()
		c.w.Write(h[:])
		c.w.Flush()
		c.wmu.Unlock()
	}
	c.fail(ErrClosed)
	<-c.readerDone
	return nil
}

func (c *Client) do(ctx context.Context, typ, flags uint16, off, n int64, wbuf, rbuf []byte) error {
	op := cmdName(typ)
	if off < 0 || n < 0 || off > c.info.Size || n > c.info.Size-off {
		return fmt.Errorf("nbd %s at %d+%d: beyond the export's %d bytes", op, off, n, c.info.Size)
	}
	if n > MaxPayload && (typ == CmdRead || typ == CmdWrite) || n > 1<<32-1 {
		return fmt.Errorf("nbd %s of %d bytes: larger than %d", op, n, MaxPayload)
	}
	cl := &call{req: request{flags: flags, typ: typ, offset: uint64(off), length: uint32(n)}, buf: rbuf, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("nbd %s: %w", op, err)
	}
	cl.req.handle = c.next
	c.next++
	c.pending[cl.req.handle] = cl
	c.mu.Unlock()
	stop := context.AfterFunc(ctx, func() {
		c.fail(fmt.Errorf("request cancelled: %w", context.Cause(ctx)))
	})
	defer stop()

	var h [requestSize]byte
	cl.req.encode(h[:])
	c.waiting.Add(1)
	c.wmu.Lock()
	last := c.waiting.Add(-1) == 0
	c.w.Write(h[:])
	_, err := c.w.Write(wbuf)
	if err == nil && last {
		err = c.w.Flush() // a request still waiting for wmu flushes the rest
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("send: %w", err))
	}
	<-cl.done
	if cl.result != nil {
		return fmt.Errorf("nbd %s at %d+%d: %w", op, off, n, cl.result)
	}
	return nil
}

// fail closes the connection and fails every pending request with err
// (the first error sticks).
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err
	pending := c.pending
	c.pending = map[uint64]*call{}
	c.mu.Unlock()
	c.conn.Close()
	// The reader may be filling a pending READ's buffer: wait until it
	// has stopped before the callers get their buffers back.
	<-c.readerDone
	for _, cl := range pending {
		cl.result = err
		close(cl.done)
	}
}

func (c *Client) reader() {
	err := c.readReplies(bufio.NewReaderSize(c.conn, 64<<10))
	close(c.readerDone)
	go c.fail(err) // fail waits for readerDone, so not inline
}

// readReplies reads replies until the connection fails; every reply is
// checked against the request it names before a byte of its payload is
// stored.
func (c *Client) readReplies(r *bufio.Reader) error {
	var h [structuredSize]byte
	for {
		if _, err := io.ReadFull(r, h[:4]); err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		switch m := binary.BigEndian.Uint32(h[:]); m {
		case simpleMagic:
			if _, err := io.ReadFull(r, h[4:simpleSize]); err != nil {
				return fmt.Errorf("read reply: %w", err)
			}
			if err := c.simple(r, binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])); err != nil {
				return err
			}
		case structuredMagic:
			if !c.info.Structured {
				return fmt.Errorf("structured reply that was not negotiated: %w", ErrProtocol)
			}
			if _, err := io.ReadFull(r, h[4:structuredSize]); err != nil {
				return fmt.Errorf("read reply: %w", err)
			}
			if err := c.chunk(r, binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]),
				binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[16:])); err != nil {
				return err
			}
		default:
			return fmt.Errorf("reply magic %#x: %w", m, ErrProtocol)
		}
	}
}

func (c *Client) lookup(handle uint64) (*call, error) {
	c.mu.Lock()
	cl := c.pending[handle]
	c.mu.Unlock()
	if cl == nil {
		return nil, fmt.Errorf("reply for handle %#x, which no request is waiting for: %w", handle, ErrProtocol)
	}
	return cl, nil
}

func (c *Client) complete(cl *call, result error) {
	c.mu.Lock()
	_, ok := c.pending[cl.req.handle]
	delete(c.pending, cl.req.handle)
	c.mu.Unlock()
	if ok { // else fail took it and completes it
		cl.result = result
		close(cl.done)
	}
}

func (c *Client) simple(r *bufio.Reader, errno uint32, handle uint64) error {
	cl, err := c.lookup(handle)
	if err != nil {
		return err
	}
	if errno != 0 {
		c.complete(cl, &Error{Code: errno})
		return nil
	}
	if cl.req.typ == CmdRead {
		if len(cl.covered) != 0 {
			return fmt.Errorf("simple reply to a read that had structured chunks: %w", ErrProtocol)
		}
		if _, err := io.ReadFull(r, cl.buf); err != nil {
			return fmt.Errorf("read reply data: %w", err)
		}
	}
	c.complete(cl, nil)
	return nil
}

// chunk handles one structured reply chunk of length bytes.
func (c *Client) chunk(r *bufio.Reader, flags, typ uint16, handle uint64, length uint32) error {
	cl, err := c.lookup(handle)
	if err != nil {
		return err
	}
	bad := func(format string, a ...any) error {
		return fmt.Errorf("reply chunk type %d for %s: %s: %w", typ, cmdName(cl.req.typ), fmt.Sprintf(format, a...), ErrProtocol)
	}
	isRead := cl.req.typ == CmdRead
	switch typ {
	case replyNone:
		if length != 0 || flags&replyFlagDone == 0 {
			return bad("length %d, flags %#x", length, flags)
		}
	case replyOffsetData, replyOffsetHole:
		if !isRead {
			return bad("data chunk for a request that reads nothing")
		}
		var hdr [12]byte
		hl := 8
		if typ == replyOffsetHole {
			hl = 12
			if length != 12 {
				return bad("hole chunk of %d bytes", length)
			}
		} else if length <= 8 || length-8 > cl.req.length {
			return bad("data chunk of %d bytes for a %d-byte read", length, cl.req.length)
		}
		if _, err := io.ReadFull(r, hdr[:hl]); err != nil {
			return fmt.Errorf("read reply chunk: %w", err)
		}
		off := binary.BigEndian.Uint64(hdr[:])
		n := uint64(length) - 8
		if typ == replyOffsetHole {
			n = uint64(binary.BigEndian.Uint32(hdr[8:]))
		}
		start := off - cl.req.offset
		if off < cl.req.offset || n == 0 || start > uint64(cl.req.length) || n > uint64(cl.req.length)-start {
			return bad("chunk at %d+%d outside the read at %d+%d", off, n, cl.req.offset, cl.req.length)
		}
		if !cl.cover(int(start), int(start+n)) {
			return bad("chunk at %d+%d overlaps an earlier chunk", off, n)
		}
		dst := cl.buf[start : start+n]
		if typ == replyOffsetHole {
			clear(dst)
		} else if _, err := io.ReadFull(r, dst); err != nil {
			return fmt.Errorf("read reply data: %w", err)
		}
	default:
		if typ&(1<<15) == 0 {
			return bad("unknown chunk type")
		}
		// An error chunk: u32 error, u16 message length, message, and
		// for ERROR_OFFSET a u64 offset. Unknown error types are errors
		// too (proto.md).
		if length < 6 || length > maxOptionLen {
			return bad("error chunk of %d bytes", length)
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(r, b); err != nil {
			return fmt.Errorf("read reply chunk: %w", err)
		}
		code, ml := binary.BigEndian.Uint32(b), int(binary.BigEndian.Uint16(b[4:]))
		if ml > len(b)-6 || code == 0 {
			return bad("error chunk with message length %d, error %d", ml, code)
		}
		if cl.err == nil {
			cl.err = &Error{Code: code, Message: string(b[6 : 6+ml])}
		}
	}
	if flags&replyFlagDone == 0 {
		return nil
	}
	switch {
	case cl.err != nil:
		c.complete(cl, cl.err)
	case isRead && cl.coveredBytes() != int(cl.req.length):
		return fmt.Errorf("read at %d+%d finished with %d bytes received: %w", cl.req.offset, cl.req.length, cl.coveredBytes(), ErrProtocol)
	default:
		c.complete(cl, nil)
	}
	return nil
}

// cover records [s, e) as received; false if it overlaps a range already
// received. Servers send one chunk or a few in order, so this stays short.
func (cl *call) cover(s, e int) bool {
	i := 0
	for i < len(cl.covered) && cl.covered[i][1] <= s {
		i++
	}
	if i < len(cl.covered) && cl.covered[i][0] < e {
		return false
	}
	if len(cl.covered) >= 1<<16 {
		return false
	}
	cl.covered = append(cl.covered, [2]int{})
	copy(cl.covered[i+1:], cl.covered[i:])
	cl.covered[i] = [2]int{s, e}
	return true
}

func (cl *call) coveredBytes() int {
	n := 0
	for _, r := range cl.covered {
		n += r[1] - r[0]
	}
	return n
}

// IsServerError reports whether err is an error the server returned for
// a request (the connection still works), as opposed to a broken or
// closed connection.
func IsServerError(err error) bool {
	var e *Error
	return errors.As(err, &e)
}
