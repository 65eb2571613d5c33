package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
)

// Backend is what an export serves; storage.Disk implements it. It must be
// safe for concurrent use: a connection runs many requests at once. The
// server answers every request it read, also when the client leaves, so
// the contexts it passes never end.
type Backend interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	WriteAt(ctx context.Context, p []byte, off int64) (int, error)
	Flush(ctx context.Context) error
	Size() int64
}

// Discarder is a Backend that can deallocate a range (NBD_CMD_TRIM).
type Discarder interface {
	Discard(ctx context.Context, off, n int64) error
}

// ZeroWriter is a Backend that can zero a range without a buffer
// (NBD_CMD_WRITE_ZEROES); unmap may deallocate it.
type ZeroWriter interface {
	WriteZeroes(ctx context.Context, off, n int64, unmap bool) error
}

// Export is one named block device a server offers.
type Export struct {
	Name        string
	Description string // sent as NBD_INFO_DESCRIPTION when asked for
	Backend     Backend
	ReadOnly    bool
}

// Exports is the set of exports a server offers; it may change while the
// server runs.
type Exports interface {
	// Open returns the export called name and a function the server
	// calls when the connection that opened it ends.
	Open(name string) (exp *Export, release func(), ok bool)
	// List lists the exports (NBD_OPT_LIST).
	List() []Listing
}

// Listing is an export's entry in NBD_OPT_LIST.
type Listing struct{ Name, Description string }

// StaticExports is a fixed set of exports by name.
type StaticExports map[string]*Export

// Open implements Exports.
func (s StaticExports) Open(name string) (*Export, func(), bool) {
	e, ok := s[name]
	return e, func() {}, ok
}

// List implements Exports.
func (s StaticExports) List() []Listing {
	var l []Listing
	for k, e := range s {
		l = append(l, Listing{k, e.Description})
	}
	sort.Slice(l, func(i, j int) bool { return l[i].Name < l[j].Name })
	return l
}

// Server serves exports over NBD.
type Server struct {
	Exports Exports
	// Log receives one line per connection that ends with an error. nil
	// discards.
	Log *slog.Logger
	// MaxInFlight bounds the requests one connection runs at once
	// (default 64); the connection's reader waits when it is reached.
	MaxInFlight int

	// Counters, for tests and metrics.
	Conns          atomic.Int64 // connections accepted
	ProtocolErrors atomic.Int64 // connections closed for breaking the protocol
	Requests       atomic.Int64 // transmission requests served

	mu        sync.Mutex
	listeners map[net.Listener]bool
	conns     map[net.Conn]bool
	closed    bool
	wg        sync.WaitGroup
}

func (s *Server) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// Serve accepts connections on l until l is closed or Close is called.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if s.listeners == nil {
		s.listeners = map[net.Listener]bool{}
	}
	s.listeners[l] = true
	s.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			delete(s.listeners, l)
			s.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("nbd server: accept: %w", err)
		}
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.ServeConn(c)
		}()
	}
}

// Close stops accepting, closes every connection and waits for their
// requests to finish.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) track(c net.Conn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.closed {
			return false
		}
		if s.conns == nil {
			s.conns = map[net.Conn]bool{}
		}
		s.conns[c] = true
	} else {
		delete(s.conns, c)
	}
	return true
}

// ServeConn runs one client connection to its end and closes it.
func (s *Server) ServeConn(c net.Conn) {
	defer c.Close()
	if !s.track(c, true) {
		return
	}
	defer s.track(c, false)
	s.Conns.Add(1)
	sc := &serverConn{s: s, c: c, r: bufio.NewReaderSize(c, 64<<10), w: bufio.NewWriterSize(c, 64<<10)}
	err := sc.run()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		if errors.Is(err, ErrProtocol) {
			s.ProtocolErrors.Add(1)
		}
		s.log().Warn("nbd connection closed", "remote", c.RemoteAddr().String(), "err", err)
	}
}

type serverConn struct {
	s *Server
	c net.Conn
	r *bufio.Reader

	wmu     sync.Mutex // w and the connection's write side
	w       *bufio.Writer
	waiting atomic.Int32 // replies waiting for wmu: the last one flushes

	noZeroes   bool
	structured bool
	exp        *Export
	release    func()
}

func (sc *serverConn) run() error {
	defer func() {
		if sc.release != nil {
			sc.release()
		}
	}()
	if err := sc.negotiate(); err != nil {
		return err
	}
	if sc.exp == nil {
		return nil // the client aborted
	}
	return sc.transmit()
}

// negotiate runs the fixed newstyle handshake until the client picks an
// export (EXPORT_NAME or GO) or aborts.
func (sc *serverConn) negotiate() error {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := sc.c.Write(hello[:]); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(sc.r, cf[:]); err != nil {
		return err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&cFlagFixed == 0 || flags&^(cFlagFixed|cFlagNoZeroes) != 0 {
		return fmt.Errorf("client flags %#x: %w", flags, ErrProtocol)
	}
	sc.noZeroes = flags&cFlagNoZeroes != 0
	for {
		var h [16]byte
		if _, err := io.ReadFull(sc.r, h[:]); err != nil {
			return err
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != optMagic {
			return fmt.Errorf("option magic %#x: %w", m, ErrProtocol)
		}
		opt, n := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		if n > maxOptionLen {
			return fmt.Errorf("option %d of %d bytes: %w", opt, n, ErrProtocol)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(sc.r, data); err != nil {
			return err
		}
		done, err := sc.option(opt, data)
		if err != nil || done {
			return err
		}
	}
}

func (sc *serverConn) optReply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	sc.w.Write(h[:])
	sc.w.Write(data)
	return sc.w.Flush()
}

func (sc *serverConn) optError(opt, typ uint32, msg string) error {
	return sc.optReply(opt, typ, []byte(msg))
}

// option handles one option; done means the transmission phase starts (or
// the client aborted).
func (sc *serverConn) option(opt uint32, data []byte) (done bool, err error) {
	switch opt {
	case optExportName:
		exp, release, ok := sc.s.Exports.Open(string(data))
		if !ok {
			return true, fmt.Errorf("client asked for unknown export %q", data) // proto.md: the server closes
		}
		sc.exp, sc.release = exp, release
		b := make([]byte, 10, 134)
		binary.BigEndian.PutUint64(b[0:], uint64(exp.Backend.Size()))
		binary.BigEndian.PutUint16(b[8:], sc.transmissionFlags())
		if !sc.noZeroes {
			b = b[:134]
		}
		sc.w.Write(b)
		return true, sc.w.Flush()
	case optAbort:
		sc.optReply(opt, repAck, nil)
		return true, nil
	case optList:
		if len(data) != 0 {
			return false, sc.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, e := range sc.s.Exports.List() {
			// u32 name length, name, then the description (proto.md:
			// the rest is free text for the user).
			b := make([]byte, 4+len(e.Name))
			binary.BigEndian.PutUint32(b, uint32(len(e.Name)))
			copy(b[4:], e.Name)
			b = append(b, e.Description...)
			if err := sc.optReply(opt, repServer, b); err != nil {
				return false, err
			}
		}
		return false, sc.optReply(opt, repAck, nil)
	case optInfo, optGo:
		return sc.infoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, sc.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		sc.structured = true
		return false, sc.optReply(opt, repAck, nil)
	case optStartTLS:
		return false, sc.optError(opt, repErrPolicy, "TLS is not offered")
	case optListMetaContext, optSetMetaContext:
		if !sc.structured {
			return false, sc.optError(opt, repErrInvalid, "meta contexts need structured replies")
		}
		// No meta contexts are offered: the answer is an empty list.
		return false, sc.optReply(opt, repAck, nil)
	}
	return false, sc.optError(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO: data is the export name
// (u32 length + bytes) and the info types asked for (u16 count + u16s).
func (sc *serverConn) infoGo(opt uint32, data []byte) (bool, error) {
	bad := func(msg string) (bool, error) { return false, sc.optError(opt, repErrInvalid, msg) }
	if len(data) < 6 {
		return bad("short NBD_OPT_INFO/GO")
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) {
		return bad("export name longer than the option")
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return bad("info request count does not match the option's length")
	}
	var wantName, wantDesc bool
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	exp, release, ok := sc.s.Exports.Open(name)
	if !ok {
		return false, sc.optError(opt, repErrUnknown, fmt.Sprintf("no export %q", name))
	}
	info := func(b []byte) error { return sc.optReply(opt, repInfo, b) }
	b := make([]byte, 12)
	binary.BigEndian.PutUint16(b[0:], infoExport)
	binary.BigEndian.PutUint64(b[2:], uint64(exp.Backend.Size()))
	binary.BigEndian.PutUint16(b[10:], sc.transmissionFlagsFor(exp))
	err := info(b)
	if err == nil {
		bs := make([]byte, 14)
		binary.BigEndian.PutUint16(bs[0:], infoBlockSize)
		binary.BigEndian.PutUint32(bs[2:], 1)
		binary.BigEndian.PutUint32(bs[6:], 4096)
		binary.BigEndian.PutUint32(bs[10:], MaxPayload)
		err = info(bs)
	}
	if err == nil && wantName {
		err = info(append([]byte{0, infoName}, exp.Name...))
	}
	if err == nil && wantDesc && exp.Description != "" {
		err = info(append([]byte{0, infoDescription}, exp.Description...))
	}
	if err == nil {
		err = sc.optReply(opt, repAck, nil)
	}
	if err != nil || opt == optInfo {
		release()
		return false, err
	}
	sc.exp, sc.release = exp, release
	return true, nil
}

func (sc *serverConn) transmissionFlags() uint16 { return sc.transmissionFlagsFor(sc.exp) }

func (sc *serverConn) transmissionFlagsFor(e *Export) uint16 {
	f := uint16(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendDF | FlagCanMultiConn)
	if e.ReadOnly {
		f |= FlagReadOnly
	} else {
		f |= FlagSendTrim | FlagSendWriteZeroes
	}
	return f
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 128<<10); return &b }}

func getBuf(n int) *[]byte {
	bp := bufPool.Get().(*[]byte)
	if cap(*bp) < n {
		*bp = make([]byte, n)
	}
	*bp = (*bp)[:n]
	return bp
}

func putBuf(bp *[]byte) {
	if cap(*bp) <= 4<<20 { // keep the pool from holding 32 MiB buffers
		bufPool.Put(bp)
	}
}

// transmit reads requests and runs each on its own goroutine, at most
// MaxInFlight at once; replies go out as requests finish.
func (sc *serverConn) transmit() error {
	max := sc.s.MaxInFlight
	if max <= 0 {
		max = 64
	}
	sem := make(chan struct{}, max)
	var wg sync.WaitGroup
	defer wg.Wait()
	size := uint64(sc.exp.Backend.Size())
	var h [requestSize]byte
	for {
		if _, err := io.ReadFull(sc.r, h[:]); err != nil {
			return err
		}
		req, err := decodeRequest(h[:])
		if err != nil {
			return err
		}
		var payload *[]byte
		if req.typ == CmdWrite {
			// The payload follows whatever we think of the request:
			// one we cannot read past is the end of the connection.
			if req.length > MaxPayload {
				return fmt.Errorf("write of %d bytes: %w", req.length, ErrProtocol)
			}
			payload = getBuf(int(req.length))
			if _, err := io.ReadFull(sc.r, *payload); err != nil {
				putBuf(payload)
				return err
			}
		}
		if req.typ == CmdDisc {
			return nil // wg.Wait: in-flight requests are answered first
		}
		sc.s.Requests.Add(1)
		if errno := sc.check(req, size); errno != 0 {
			if payload != nil {
				putBuf(payload)
			}
			if err := sc.reply(req, errno, nil); err != nil {
				return err
			}
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			sc.serve(req, payload)
		}()
	}
}

// check validates a request against the export; it returns an NBD error
// number, or 0.
func (sc *serverConn) check(r request, size uint64) uint32 {
	switch r.typ {
	case CmdRead, CmdWrite, CmdTrim, CmdWriteZeroes, CmdCache:
		if r.offset > size || uint64(r.length) > size-r.offset {
			if r.typ == CmdWrite || r.typ == CmdWriteZeroes {
				return ENOSPC
			}
			return EINVAL
		}
		if r.typ == CmdRead && r.length > MaxPayload {
			return EINVAL
		}
	case CmdFlush:
	default:
		return EINVAL
	}
	if r.flags&^(CmdFlagFUA|CmdFlagNoHole|CmdFlagDF|CmdFlagReqOne) != 0 {
		return EINVAL
	}
	if sc.exp.ReadOnly && (r.typ == CmdWrite || r.typ == CmdTrim || r.typ == CmdWriteZeroes) {
		return EPERM
	}
	return 0
}

func errno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errNotSupported):
		return ENOTSUP
	}
	return EIO
}

var errNotSupported = errors.New("not supported by the backend")

func (sc *serverConn) serve(r request, payload *[]byte) {
	b := sc.exp.Backend
	ctx := context.Background()
	off, n := int64(r.offset), int64(r.length)
	var err error
	switch r.typ {
	case CmdRead:
		buf := getBuf(int(n))
		defer putBuf(buf)
		_, err = b.ReadAt(ctx, *buf, off)
		if err == nil {
			sc.reply(r, 0, *buf)
			return
		}
	case CmdWrite:
		_, err = b.WriteAt(ctx, *payload, off)
		putBuf(payload)
	case CmdFlush:
		err = b.Flush(ctx)
	case CmdTrim:
		if d, ok := b.(Discarder); ok {
			err = d.Discard(ctx, off, n)
		} // TRIM is advisory: without a Discarder it does nothing
	case CmdWriteZeroes:
		if z, ok := b.(ZeroWriter); ok {
			err = z.WriteZeroes(ctx, off, n, r.flags&CmdFlagNoHole == 0)
		} else {
			err = writeZeroes(ctx, b, off, n)
		}
	case CmdCache:
	}
	if err == nil && r.flags&CmdFlagFUA != 0 && (r.typ == CmdWrite || r.typ == CmdWriteZeroes || r.typ == CmdTrim) {
		err = b.Flush(ctx)
	}
	if err != nil {
		sc.s.log().Warn("nbd request failed", "export", sc.exp.Name, "cmd", cmdName(r.typ), "offset", off, "length", n, "err", err)
	}
	sc.reply(r, errno(err), nil)
}

func writeZeroes(ctx context.Context, b Backend, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := b.WriteAt(ctx, buf[:c], off); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

// reply sends a simple reply, or for a READ with structured replies
// negotiated one NBD_REPLY_TYPE_OFFSET_DATA chunk (or an error chunk) with
// the DONE flag. A write error closes the connection, which ends the
// reader too.
func (sc *serverConn) reply(r request, errno uint32, data []byte) error {
	sc.waiting.Add(1)
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	last := sc.waiting.Add(-1) == 0
	var err error
	if sc.structured && r.typ == CmdRead {
		var h [structuredSize + 8]byte
		binary.BigEndian.PutUint32(h[0:], structuredMagic)
		binary.BigEndian.PutUint16(h[4:], replyFlagDone)
		binary.BigEndian.PutUint64(h[8:], r.handle)
		if errno == 0 {
			binary.BigEndian.PutUint16(h[6:], replyOffsetData)
			binary.BigEndian.PutUint32(h[16:], uint32(8+len(data)))
			binary.BigEndian.PutUint64(h[20:], r.offset)
			sc.w.Write(h[:])
			_, err = sc.w.Write(data)
		} else {
			binary.BigEndian.PutUint16(h[6:], replyError)
			binary.BigEndian.PutUint32(h[16:], 6)
			binary.BigEndian.PutUint32(h[20:], errno)
			binary.BigEndian.PutUint16(h[24:], 0)
			_, err = sc.w.Write(h[:26])
		}
	} else {
		var h [simpleSize]byte
		binary.BigEndian.PutUint32(h[0:], simpleMagic)
		binary.BigEndian.PutUint32(h[4:], errno)
		binary.BigEndian.PutUint64(h[8:], r.handle)
		sc.w.Write(h[:])
		if errno == 0 && r.typ == CmdRead {
			_, err = sc.w.Write(data)
		}
	}
	if err == nil && last {
		err = sc.w.Flush() // a reply still waiting for wmu flushes the rest
	}
	if err != nil {
		sc.c.Close()
	}
	return err
}
