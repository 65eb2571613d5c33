// Package nbd speaks the Network Block Device protocol (the NBD project's
// doc/proto.md) as qemu-nbd and nbdkit do: fixed newstyle negotiation with
// NBD_OPT_GO, INFO, LIST, EXPORT_NAME and STRUCTURED_REPLY; simple and
// structured replies; READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES and
// DISC.
//
// Server serves any number of exports over TCP (or any net.Listener) with
// many requests in flight per connection; Client is one connection with
// many requests in flight, each with its own context. Both sides treat the
// peer's bytes as hostile: lengths, offsets, handles and magic numbers are
// checked before anything is allocated or written, and a peer that breaks
// the protocol loses its connection, never the process.
//
// The package links no etcd and no gRPC: it is the wire part of shards, and
// the VM process uses it.
package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Negotiation magic numbers and flags (proto.md, "Handshake").
const (
	nbdMagic      = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic      = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic = 0x3e889045565a9

	flagFixedNewstyle = 1 << 0 // server handshake flag
	flagNoZeroes      = 1 << 1
	cFlagFixed        = 1 << 0 // client flags
	cFlagNoZeroes     = 1 << 1
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option replies.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repFlagError   = 1 << 31
	repErrUnsup    = repFlagError | 1
	repErrPolicy   = repFlagError | 2
	repErrInvalid  = repFlagError | 3
	repErrPlatform = repFlagError | 4
	repErrUnknown  = repFlagError | 6
)

// NBD_INFO types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags, as the server advertises them.
const (
	FlagHasFlags        = 1 << 0
	FlagReadOnly        = 1 << 1
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagSendDF          = 1 << 7
	FlagCanMultiConn    = 1 << 8
)

// Command flags.
const (
	CmdFlagFUA    = 1 << 0
	CmdFlagNoHole = 1 << 1
	CmdFlagDF     = 1 << 2
	CmdFlagReqOne = 1 << 3
)

// Commands.
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6
)

// Transmission magic numbers and sizes.
const (
	requestMagic    = 0x25609513
	simpleMagic     = 0x67446698
	structuredMagic = 0x668e33ef

	requestSize    = 28
	simpleSize     = 16
	structuredSize = 20

	replyFlagDone = 1 << 0

	replyNone        = 0
	replyOffsetData  = 1
	replyOffsetHole  = 2
	replyError       = 1<<15 + 1
	replyErrorOffset = 1<<15 + 2
)

// MaxPayload is the largest READ or WRITE either side accepts (qemu's
// NBD_MAX_BUFFER_SIZE); larger requests are refused, not allocated.
const MaxPayload = 32 << 20

// maxOptionLen bounds an option's data (a name is at most 4096 bytes, plus
// info requests); anything longer is refused without reading it all.
const maxOptionLen = 64 << 10

// Error numbers on the wire (proto.md, "Error values").
const (
	EPERM     = 1
	EIO       = 5
	ENOMEM    = 12
	EINVAL    = 22
	ENOSPC    = 28
	EOVERFLOW = 75
	ENOTSUP   = 95
	ESHUTDOWN = 108
)

// ErrProtocol is wrapped by every error that means the peer broke the
// protocol; the connection is closed.
var ErrProtocol = errors.New("nbd protocol violation")

// ErrClosed is returned for requests on a closed or failed client.
var ErrClosed = errors.New("nbd connection closed")

// Error is an error the server returned for one request.
type Error struct {
	Code    uint32
	Message string // from a structured error chunk, if any
}

func (e *Error) Error() string {
	name := map[uint32]string{EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
		ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN"}[e.Code]
	if name == "" {
		name = fmt.Sprintf("error %d", e.Code)
	}
	if e.Message != "" {
		return fmt.Sprintf("nbd server: %s: %s", name, e.Message)
	}
	return "nbd server: " + name
}

// request is a transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

func (r *request) encode(b []byte) {
	binary.BigEndian.PutUint32(b[0:], requestMagic)
	binary.BigEndian.PutUint16(b[4:], r.flags)
	binary.BigEndian.PutUint16(b[6:], r.typ)
	binary.BigEndian.PutUint64(b[8:], r.handle)
	binary.BigEndian.PutUint64(b[16:], r.offset)
	binary.BigEndian.PutUint32(b[24:], r.length)
}

func decodeRequest(b []byte) (request, error) {
	if m := binary.BigEndian.Uint32(b[0:]); m != requestMagic {
		return request{}, fmt.Errorf("request magic %#x: %w", m, ErrProtocol)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		handle: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

func cmdName(t uint16) string {
	switch t {
	case CmdRead:
		return "read"
	case CmdWrite:
		return "write"
	case CmdDisc:
		return "disc"
	case CmdFlush:
		return "flush"
	case CmdTrim:
		return "trim"
	case CmdCache:
		return "cache"
	case CmdWriteZeroes:
		return "write-zeroes"
	}
	return fmt.Sprintf("command %d", t)
}
