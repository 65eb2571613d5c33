package blk

import (
	"encoding/binary"
	"fmt"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Request types (virtio 1.x §5.2.6).
const (
	TypeIn          uint32 = 0
	TypeOut         uint32 = 1
	TypeFlush       uint32 = 4
	TypeGetID       uint32 = 8
	TypeDiscard     uint32 = 11
	TypeWriteZeroes uint32 = 13
)

// Request status values, the last byte of every chain.
const (
	StatusOK     byte = 0
	StatusIOErr  byte = 1
	StatusUnsupp byte = 2
)

// SectorSize is the unit of the request header's sector field.
const SectorSize = 512

const (
	headerLen = 16 // type u32, reserved u32, sector u64
	rangeLen  = 16 // virtio_blk_discard_write_zeroes: sector u64, num_sectors u32, flags u32
	idLen     = 20 // VIRTIO_BLK_ID_BYTES

	rangeFlagUnmap = 1
)

// limits is what request parsing checks against.
type limits struct {
	capacity          uint64 // sectors
	segMax            uint32 // data segments per request
	maxDiscardSectors uint32 // per range, DISCARD and WRITE_ZEROES
	maxRanges         uint32 // ranges per DISCARD / WRITE_ZEROES request
	readOnly          bool
	discard, zeroes   bool // VIRTIO_BLK_F_DISCARD / WRITE_ZEROES negotiated
}

// seg is one piece of a request's data in guest memory.
type seg struct {
	addr memory.GuestAddr
	buf  []byte // aliases guest memory
}

// extent is one range of a DISCARD or WRITE_ZEROES request.
type extent struct {
	sector, sectors uint64
	unmap           bool
}

// request is a parsed virtio-blk request. Its slices are reused from one
// request to the next.
type request struct {
	typ     uint32
	sector  uint64
	data    []seg // contiguous guest pieces merged
	dataLen uint64
	status  []byte // the status byte in guest memory; nil if none is writable
	ranges  []extent
}

// reqError is a refused request: its kind is counted, its status (if the
// request has a status byte) is written back.
type reqError struct {
	kind   ErrorKind
	status byte
	msg    string
}

func (e *reqError) Error() string { return e.kind.String() + ": " + e.msg }

func refuse(kind ErrorKind, format string, args ...any) *reqError {
	st := StatusIOErr
	if kind == ErrUnsupported {
		st = StatusUnsupp
	}
	return &reqError{kind: kind, status: st, msg: fmt.Sprintf(format, args...)}
}

// parse checks a walked chain and fills r. The chain's layout is taken as
// a byte stream (virtio 1.x does not fix descriptor boundaries): device-
// readable bytes first, holding the 16-byte header and, for writes, the
// data; then device-writable bytes ending in the status byte. Every
// buffer is resolved through guest memory's bounds checks here, so
// execution touches only validated slices. On error, r.status says
// whether a status can be written.
func parse(mem *memory.Memory, ds []queue.Descriptor, lim *limits, r *request) *reqError {
	r.typ, r.sector, r.data, r.dataLen, r.status, r.ranges = 0, 0, r.data[:0], 0, nil, r.ranges[:0]
	if len(ds) == 0 {
		return refuse(ErrMalformed, "empty chain")
	}
	last := ds[len(ds)-1]
	if !last.Writable() || last.Len == 0 {
		return refuse(ErrMalformed, "last descriptor is not a device-writable status byte")
	}
	// The walk guarantees Addr+Len does not wrap.
	st, err := mem.Slice(last.Addr+memory.GuestAddr(last.Len-1), 1)
	if err != nil {
		return refuse(ErrGuestMemory, "status byte: %v", err)
	}
	r.status = st

	nr := 0 // device-readable descriptors come first
	for nr < len(ds) && !ds[nr].Writable() {
		nr++
	}
	var writable uint64
	for _, d := range ds[nr:] {
		if !d.Writable() {
			return refuse(ErrMalformed, "device-readable descriptor after a device-writable one")
		}
		writable += uint64(d.Len)
	}

	var hdr [headerLen]byte
	got, i, off := uint32(0), 0, uint32(0) // header bytes read; position (descriptor, offset)
	for got < headerLen && i < nr {
		d := ds[i]
		n := min(d.Len-off, headerLen-got)
		if err := mem.Read(d.Addr+memory.GuestAddr(off), hdr[got:got+n]); err != nil {
			return refuse(ErrGuestMemory, "header: %v", err)
		}
		got, off = got+n, off+n
		if off == d.Len {
			i, off = i+1, 0
		}
	}
	if got < headerLen {
		return refuse(ErrMalformed, "header is %d bytes, want %d device-readable", got, headerLen)
	}
	r.typ = binary.LittleEndian.Uint32(hdr[0:4])
	r.sector = binary.LittleEndian.Uint64(hdr[8:16])
	var readable uint64 // readable bytes after the header
	for j := i; j < nr; j++ {
		readable += uint64(ds[j].Len)
	}
	readable -= uint64(off)

	switch r.typ {
	case TypeIn, TypeGetID:
		if readable != 0 {
			return refuse(ErrMalformed, "type %d: %d device-readable data bytes", r.typ, readable)
		}
		if err := r.addData(mem, ds[nr:], 0, writable-1, lim.segMax); err != nil {
			return err
		}
	case TypeOut, TypeDiscard, TypeWriteZeroes, TypeFlush:
		if writable != 1 {
			return refuse(ErrMalformed, "type %d: %d device-writable bytes, want the status byte only", r.typ, writable)
		}
		if r.typ == TypeFlush && readable != 0 {
			return refuse(ErrMalformed, "flush with %d data bytes", readable)
		}
		if err := r.addData(mem, ds[i:nr], off, readable, lim.segMax); err != nil {
			return err
		}
	default:
		return refuse(ErrUnsupported, "request type %d", r.typ)
	}

	switch r.typ {
	case TypeIn, TypeOut:
		if r.typ == TypeOut && lim.readOnly {
			return refuse(ErrReadOnly, "write to a read-only disk")
		}
		if r.dataLen%SectorSize != 0 {
			return refuse(ErrMalformed, "data length %d is not a multiple of %d", r.dataLen, SectorSize)
		}
		if err := checkRange(r.sector, r.dataLen/SectorSize, lim.capacity); err != nil {
			return err
		}
	case TypeDiscard, TypeWriteZeroes:
		if (r.typ == TypeDiscard && !lim.discard) || (r.typ == TypeWriteZeroes && !lim.zeroes) {
			return refuse(ErrUnsupported, "request type %d without its feature", r.typ)
		}
		if lim.readOnly {
			return refuse(ErrReadOnly, "type %d on a read-only disk", r.typ)
		}
		return r.parseRanges(lim)
	}
	return nil
}

// addData appends n bytes of ds, starting at offset off in ds[0], as data
// segments, resolving each through guest memory.
func (r *request) addData(mem *memory.Memory, ds []queue.Descriptor, off uint32, n uint64, segMax uint32) *reqError {
	pieces := uint32(0)
	for _, d := range ds {
		if n == 0 {
			break
		}
		l := min(uint64(d.Len-off), n)
		a := d.Addr + memory.GuestAddr(off)
		off = 0
		if l == 0 {
			continue
		}
		n -= l
		if pieces++; pieces > segMax {
			return refuse(ErrMalformed, "more than %d data segments", segMax)
		}
		r.dataLen += l
		// Merge with the previous piece when contiguous in one region.
		if k := len(r.data) - 1; k >= 0 && r.data[k].addr+memory.GuestAddr(len(r.data[k].buf)) == a {
			if b, err := mem.Slice(r.data[k].addr, uint64(len(r.data[k].buf))+l); err == nil {
				r.data[k].buf = b
				continue
			}
		}
		b, err := mem.Slice(a, l)
		if err != nil {
			return refuse(ErrGuestMemory, "data segment: %v", err)
		}
		r.data = append(r.data, seg{a, b})
	}
	return nil
}

// checkRange checks sectors starting at sector fit in capacity, without
// overflowing.
func checkRange(sector, sectors, capacity uint64) *reqError {
	if sector > capacity || sectors > capacity-sector {
		return refuse(ErrOutOfRange, "sectors [%d, +%d) past the end (%d)", sector, sectors, capacity)
	}
	return nil
}

// parseRanges decodes the virtio_blk_discard_write_zeroes ranges of a
// DISCARD or WRITE_ZEROES request.
func (r *request) parseRanges(lim *limits) *reqError {
	if r.dataLen == 0 || r.dataLen%rangeLen != 0 {
		return refuse(ErrMalformed, "range data of %d bytes", r.dataLen)
	}
	if r.dataLen/rangeLen > uint64(lim.maxRanges) {
		return refuse(ErrMalformed, "%d ranges, at most %d", r.dataLen/rangeLen, lim.maxRanges)
	}
	var b [rangeLen]byte
	si, so := 0, 0 // position in r.data
	for range r.dataLen / rangeLen {
		for got := 0; got < rangeLen; {
			n := copy(b[got:], r.data[si].buf[so:])
			got, so = got+n, so+n
			if so == len(r.data[si].buf) {
				si, so = si+1, 0
			}
		}
		e := extent{
			sector:  binary.LittleEndian.Uint64(b[0:8]),
			sectors: uint64(binary.LittleEndian.Uint32(b[8:12])),
		}
		flags := binary.LittleEndian.Uint32(b[12:16])
		e.unmap = flags&rangeFlagUnmap != 0
		switch {
		case flags&^rangeFlagUnmap != 0:
			return refuse(ErrUnsupported, "range flags %#x", flags)
		case r.typ == TypeDiscard && e.unmap:
			return refuse(ErrUnsupported, "discard with the unmap flag")
		case e.sectors > uint64(lim.maxDiscardSectors):
			return refuse(ErrMalformed, "range of %d sectors, at most %d", e.sectors, lim.maxDiscardSectors)
		}
		if err := checkRange(e.sector, e.sectors, lim.capacity); err != nil {
			return err
		}
		r.ranges = append(r.ranges, e)
	}
	return nil
}
