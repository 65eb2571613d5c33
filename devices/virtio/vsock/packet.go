package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// HeaderLen is the size of struct virtio_vsock_hdr (virtio 1.x §5.10.6).
const HeaderLen = 44

// Header field offsets, all little endian.
const (
	offSrcCID   = 0  // le64
	offDstCID   = 8  // le64
	offSrcPort  = 16 // le32
	offDstPort  = 20 // le32
	offLen      = 24 // le32
	offType     = 28 // le16
	offOp       = 30 // le16
	offFlags    = 32 // le32
	offBufAlloc = 36 // le32
	offFwdCnt   = 40 // le32
)

// Op is a packet's operation (VIRTIO_VSOCK_OP_*).
type Op uint16

// Operations.
const (
	OpInvalid       Op = 0
	OpRequest       Op = 1
	OpResponse      Op = 2
	OpRst           Op = 3
	OpShutdown      Op = 4
	OpRW            Op = 5
	OpCreditUpdate  Op = 6
	OpCreditRequest Op = 7
)

func (o Op) String() string {
	switch o {
	case OpRequest:
		return "REQUEST"
	case OpResponse:
		return "RESPONSE"
	case OpRst:
		return "RST"
	case OpShutdown:
		return "SHUTDOWN"
	case OpRW:
		return "RW"
	case OpCreditUpdate:
		return "CREDIT_UPDATE"
	case OpCreditRequest:
		return "CREDIT_REQUEST"
	}
	return fmt.Sprintf("op(%d)", uint16(o))
}

// TypeStream is VIRTIO_VSOCK_TYPE_STREAM, the only socket type offered.
const TypeStream uint16 = 1

// SHUTDOWN flags.
const (
	ShutdownRcv  uint32 = 1 // VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: the sender will receive no more
	ShutdownSend uint32 = 2 // VIRTIO_VSOCK_SHUTDOWN_F_SEND: the sender will send no more
)

// HostCID is the host's context ID (VMADDR_CID_HOST): guest packets for
// anything else are dropped.
const HostCID = 2

// MaxPacket is the most data one packet carries, either way (Linux's
// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
const MaxPacket = 64 << 10

// Header is a decoded virtio_vsock_hdr.
type Header struct {
	SrcCID, DstCID   uint64
	SrcPort, DstPort uint32
	Len              uint32
	Type             uint16
	Op               Op
	Flags            uint32
	BufAlloc, FwdCnt uint32
}

// Decode reads b[:HeaderLen].
func (h *Header) Decode(b []byte) {
	le := binary.LittleEndian
	*h = Header{
		SrcCID: le.Uint64(b[offSrcCID:]), DstCID: le.Uint64(b[offDstCID:]),
		SrcPort: le.Uint32(b[offSrcPort:]), DstPort: le.Uint32(b[offDstPort:]),
		Len: le.Uint32(b[offLen:]), Type: le.Uint16(b[offType:]), Op: Op(le.Uint16(b[offOp:])),
		Flags: le.Uint32(b[offFlags:]), BufAlloc: le.Uint32(b[offBufAlloc:]), FwdCnt: le.Uint32(b[offFwdCnt:]),
	}
}

// Encode writes h into b[:HeaderLen].
func (h *Header) Encode(b []byte) {
	le := binary.LittleEndian
	le.PutUint64(b[offSrcCID:], h.SrcCID)
	le.PutUint64(b[offDstCID:], h.DstCID)
	le.PutUint32(b[offSrcPort:], h.SrcPort)
	le.PutUint32(b[offDstPort:], h.DstPort)
	le.PutUint32(b[offLen:], h.Len)
	le.PutUint16(b[offType:], h.Type)
	le.PutUint16(b[offOp:], uint16(h.Op))
	le.PutUint32(b[offFlags:], h.Flags)
	le.PutUint32(b[offBufAlloc:], h.BufAlloc)
	le.PutUint32(b[offFwdCnt:], h.FwdCnt)
}

// Why a chain is refused; every one is counted (see Metrics).
var (
	errWritable   = errors.New("transmit chain has a device-writable buffer")
	errReadable   = errors.New("receive chain has a device-readable buffer")
	errShortChain = errors.New("chain shorter than the 44-byte header")
	errLenPast    = errors.New("header len runs past the chain")
	errTooBig     = errors.New("header len over 64 KiB")
)

// txPacket is a guest packet, parsed and resolved: the header and its
// data as slices of guest memory (bounds-checked, len(data) bytes total ==
// hdr.Len).
type txPacket struct {
	hdr  Header
	data [][]byte
	raw  [HeaderLen]byte
}

// parseTx reads a transmit chain: the header from the first 44 bytes of
// the chain (it may span descriptors), then hdr.Len bytes of data right
// after it. Every buffer must be device-readable and inside guest memory;
// hdr.Len must fit in the chain and in MaxPacket. Bytes past hdr.Len are
// ignored. p.data reuses its backing array.
func parseTx(mem *memory.Memory, descs []queue.Descriptor, p *txPacket) error {
	p.data = p.data[:0]
	got := 0 // header bytes copied
	var need uint64
	for _, d := range descs {
		if d.Writable() {
			return errWritable
		}
		b, err := mem.Slice(d.Addr, uint64(d.Len))
		if err != nil {
			return err
		}
		if got < HeaderLen {
			n := copy(p.raw[got:], b)
			got += n
			b = b[n:]
			if got < HeaderLen {
				continue
			}
			p.hdr.Decode(p.raw[:])
			if p.hdr.Len > MaxPacket {
				return errTooBig
			}
			need = uint64(p.hdr.Len)
		}
		if need == 0 {
			continue // the rest of the chain is ignored, but still checked
		}
		if uint64(len(b)) > need {
			b = b[:need]
		}
		if len(b) > 0 {
			p.data = append(p.data, b)
			need -= uint64(len(b))
		}
	}
	if got < HeaderLen {
		return errShortChain
	}
	if need > 0 {
		return errLenPast
	}
	return nil
}

// rxBuffer is a receive chain, resolved: where the header goes (it may
// span descriptors) and the data space after it.
type rxBuffer struct {
	hdr   [][]byte // exactly HeaderLen bytes in total
	data  [][]byte
	space uint64 // total of data, capped at MaxPacket
	raw   [HeaderLen]byte
}

// parseRx resolves a receive chain: device-writable buffers only, all
// inside guest memory, at least HeaderLen bytes. r reuses its arrays.
func parseRx(mem *memory.Memory, descs []queue.Descriptor, r *rxBuffer) error {
	r.hdr, r.data, r.space = r.hdr[:0], r.data[:0], 0
	need := HeaderLen
	for _, d := range descs {
		if !d.Writable() {
			return errReadable
		}
		b, err := mem.Slice(d.Addr, uint64(d.Len))
		if err != nil {
			return err
		}
		if need > 0 {
			n := min(need, len(b))
			r.hdr = append(r.hdr, b[:n])
			need -= n
			b = b[n:]
		}
		if len(b) == 0 || r.space >= MaxPacket {
			continue
		}
		if left := MaxPacket - r.space; uint64(len(b)) > left {
			b = b[:left]
		}
		r.data = append(r.data, b)
		r.space += uint64(len(b))
	}
	if need > 0 {
		return errShortChain
	}
	return nil
}

// writeHeader encodes h into the chain's header bytes.
func (r *rxBuffer) writeHeader(h *Header) {
	h.Encode(r.raw[:])
	off := 0
	for _, b := range r.hdr {
		off += copy(b, r.raw[off:])
	}
}

// limit trims the data slices to n bytes (for a read of at most n).
func (r *rxBuffer) limit(n uint64) [][]byte {
	out := r.data
	for i, b := range out {
		if uint64(len(b)) >= n {
			out[i] = b[:n]
			return out[:i+1]
		}
		n -= uint64(len(b))
	}
	return out
}
