package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Info describes the export a client negotiated.
type Info struct {
	Export      string `json:"export"`
	Size        int64  `json:"size"`
	Flags       uint16 `json:"flags"`      // transmission flags
	Structured  bool   `json:"structured"` // structured replies negotiated
	Description string `json:"description,omitempty"`
	// Block size constraints (NBD_INFO_BLOCK_SIZE); 0 when not sent.
	MinBlock, PrefBlock, MaxBlock uint32 `json:",omitempty"`
}

// ErrUnknownExport is returned by Handshake when the server has no export
// of that name.
var ErrUnknownExport = errors.New("nbd server has no such export")

// maxExportName is the longest export name the protocol allows.
const maxExportName = 4096

// deadline applies ctx's deadline to conn for the handshake; the returned
// function clears it and stops watching ctx.
func deadline(ctx context.Context, conn net.Conn) func() {
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		stop()
		conn.SetDeadline(time.Time{})
	}
}

// Handshake negotiates export on conn (fixed newstyle): structured replies
// when structured is set and the server agrees, then NBD_OPT_GO, or
// NBD_OPT_EXPORT_NAME from a server that does not know GO. On success conn
// is in the transmission phase: pass it to NewClient.
func Handshake(ctx context.Context, conn net.Conn, export string, structured bool) (Info, error) {
	defer deadline(ctx, conn)()
	info, err := handshake(conn, export, structured)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, context.Cause(ctx))
		}
		return Info{}, fmt.Errorf("nbd handshake for export %q: %w", export, err)
	}
	return info, nil
}

func handshake(rw io.ReadWriter, export string, structured bool) (Info, error) {
	if len(export) > maxExportName {
		return Info{}, fmt.Errorf("export name of %d bytes is too long", len(export))
	}
	noZeroes, err := hello(rw)
	if err != nil {
		return Info{}, err
	}
	info := Info{Export: export}
	if structured {
		typ, _, err := option(rw, optStructuredReply, nil)
		if err != nil {
			return Info{}, err
		}
		info.Structured = typ == repAck
	}
	req := make([]byte, 4+len(export)+2+4)
	binary.BigEndian.PutUint32(req, uint32(len(export)))
	copy(req[4:], export)
	binary.BigEndian.PutUint16(req[4+len(export):], 2)
	binary.BigEndian.PutUint16(req[6+len(export):], infoDescription)
	binary.BigEndian.PutUint16(req[8+len(export):], infoBlockSize)
	if err := sendOption(rw, optGo, req); err != nil {
		return Info{}, err
	}
	gotExport := false
	for {
		typ, data, err := optionReply(rw, optGo)
		if err != nil {
			return Info{}, err
		}
		switch typ {
		case repAck:
			if !gotExport {
				return Info{}, fmt.Errorf("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT: %w", ErrProtocol)
			}
			return info, nil
		case repInfo:
			if err := parseInfo(&info, data); err != nil {
				return Info{}, err
			}
			if len(data) >= 2 && binary.BigEndian.Uint16(data) == infoExport {
				gotExport = true
			}
		case repErrUnsup:
			return exportName(rw, info, noZeroes)
		case repErrUnknown:
			return Info{}, ErrUnknownExport
		default:
			if typ&repFlagError != 0 {
				return Info{}, fmt.Errorf("NBD_OPT_GO refused (reply %#x): %s", typ, printable(data))
			}
			// proto.md: a client ignores reply types it does not know.
		}
	}
}

// hello reads the server's greeting and sends the client flags; it
// reports whether the 124 zero bytes after NBD_OPT_EXPORT_NAME are left
// out.
func hello(rw io.ReadWriter) (bool, error) {
	var h [18]byte
	if _, err := io.ReadFull(rw, h[:]); err != nil {
		return false, fmt.Errorf("greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != nbdMagic {
		return false, fmt.Errorf("greeting magic %#x: %w", m, ErrProtocol)
	}
	if m := binary.BigEndian.Uint64(h[8:]); m != optMagic {
		return false, fmt.Errorf("not a newstyle server (magic %#x): %w", m, ErrProtocol)
	}
	sf := binary.BigEndian.Uint16(h[16:])
	if sf&flagFixedNewstyle == 0 {
		return false, fmt.Errorf("server does not speak fixed newstyle: %w", ErrProtocol)
	}
	cf := uint32(cFlagFixed)
	noZeroes := sf&flagNoZeroes != 0
	if noZeroes {
		cf |= cFlagNoZeroes
	}
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], cf)
	_, err := rw.Write(b[:])
	return noZeroes, err
}

func sendOption(w io.Writer, opt uint32, data []byte) error {
	b := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(b[0:], optMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	copy(b[16:], data)
	_, err := w.Write(b)
	return err
}

// option sends an option that is answered by exactly one reply.
func option(rw io.ReadWriter, opt uint32, data []byte) (uint32, []byte, error) {
	if err := sendOption(rw, opt, data); err != nil {
		return 0, nil, err
	}
	return optionReply(rw, opt)
}

// optionReply reads one option reply to opt, refusing lengths that could
// not be a real reply before reading them.
func optionReply(r io.Reader, opt uint32) (uint32, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != optReplyMagic {
		return 0, nil, fmt.Errorf("option reply magic %#x: %w", m, ErrProtocol)
	}
	if o := binary.BigEndian.Uint32(h[8:]); o != opt {
		return 0, nil, fmt.Errorf("reply to option %d while waiting for %d: %w", o, opt, ErrProtocol)
	}
	typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
	if n > maxOptionLen {
		return 0, nil, fmt.Errorf("option reply of %d bytes: %w", n, ErrProtocol)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, nil, fmt.Errorf("option reply: %w", err)
	}
	return typ, data, nil
}

func parseInfo(info *Info, d []byte) error {
	if len(d) < 2 {
		return fmt.Errorf("NBD_REP_INFO of %d bytes: %w", len(d), ErrProtocol)
	}
	switch binary.BigEndian.Uint16(d) {
	case infoExport:
		if len(d) != 12 {
			return fmt.Errorf("NBD_INFO_EXPORT of %d bytes: %w", len(d), ErrProtocol)
		}
		size := binary.BigEndian.Uint64(d[2:])
		if size > 1<<62 {
			return fmt.Errorf("export size %d: %w", size, ErrProtocol)
		}
		info.Size, info.Flags = int64(size), binary.BigEndian.Uint16(d[10:])
	case infoDescription:
		info.Description = string(d[2:])
	case infoBlockSize:
		if len(d) != 14 {
			return fmt.Errorf("NBD_INFO_BLOCK_SIZE of %d bytes: %w", len(d), ErrProtocol)
		}
		info.MinBlock = binary.BigEndian.Uint32(d[2:])
		info.PrefBlock = binary.BigEndian.Uint32(d[6:])
		info.MaxBlock = binary.BigEndian.Uint32(d[10:])
	}
	return nil
}

// exportName selects the export the old way (NBD_OPT_EXPORT_NAME), after
// a server refused NBD_OPT_GO as unsupported.
func exportName(rw io.ReadWriter, info Info, noZeroes bool) (Info, error) {
	if err := sendOption(rw, optExportName, []byte(info.Export)); err != nil {
		return Info{}, err
	}
	n := 134
	if noZeroes {
		n = 10
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(rw, b); err != nil {
		return Info{}, fmt.Errorf("NBD_OPT_EXPORT_NAME (the server closes on an unknown export): %w", err)
	}
	size := binary.BigEndian.Uint64(b)
	if size > 1<<62 {
		return Info{}, fmt.Errorf("export size %d: %w", size, ErrProtocol)
	}
	info.Size, info.Flags = int64(size), binary.BigEndian.Uint16(b[8:])
	return info, nil
}

// ListExports asks a server for its export names (NBD_OPT_LIST) and
// aborts the negotiation.
func ListExports(ctx context.Context, conn net.Conn) ([]string, error) {
	defer deadline(ctx, conn)()
	names, err := listExports(conn)
	if err != nil {
		return nil, fmt.Errorf("nbd list exports: %w", err)
	}
	return names, nil
}

func listExports(rw io.ReadWriter) ([]string, error) {
	if _, err := hello(rw); err != nil {
		return nil, err
	}
	if err := sendOption(rw, optList, nil); err != nil {
		return nil, err
	}
	var names []string
	for {
		typ, data, err := optionReply(rw, optList)
		if err != nil {
			return nil, err
		}
		switch {
		case typ == repAck:
			sendOption(rw, optAbort, nil)
			return names, nil
		case typ == repServer:
			if len(data) < 4 || uint64(binary.BigEndian.Uint32(data)) > uint64(len(data)-4) {
				return nil, fmt.Errorf("NBD_REP_SERVER of %d bytes: %w", len(data), ErrProtocol)
			}
			names = append(names, string(data[4:4+binary.BigEndian.Uint32(data)]))
			if len(names) > 1<<16 {
				return nil, fmt.Errorf("more than %d exports: %w", 1<<16, ErrProtocol)
			}
		case typ&repFlagError != 0:
			return nil, fmt.Errorf("NBD_OPT_LIST refused (reply %#x): %s", typ, printable(data))
		}
	}
}

// printable quotes at most 200 bytes of a peer's message.
func printable(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	return fmt.Sprintf("%q", b)
}
