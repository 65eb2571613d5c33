// Package memory is the only way rayvmm touches guest physical memory.
//
// Guest memory is a table of host mmap regions, each covering a range of
// guest physical addresses. Every access takes a guest address and a length
// and is bounds-checked against that table, so an address or length that
// came from a hostile guest yields an *AddrError, never a host panic. No Go
// struct is ever overlaid on guest memory: multi-byte values are read and
// written little-endian through the accessors below, and the few values that
// the guest and the VMM race on (virtqueue ring indices) go through the
// atomic accessors in memory_unsafe.go.
package memory

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"golang.org/x/sys/unix"
)

// GuestAddr is a guest physical address.
type GuestAddr uint64

// ErrOutOfRange is the category of every failed guest memory access.
var ErrOutOfRange = errors.New("guest address out of range")

// AddrError reports an access that is not wholly inside one region.
type AddrError struct {
	Addr GuestAddr
	Len  uint64
}

func (e *AddrError) Error() string {
	return fmt.Sprintf("guest memory access [%#x, +%#x) is outside guest RAM", uint64(e.Addr), e.Len)
}

// Unwrap makes errors.Is(err, ErrOutOfRange) true.
func (e *AddrError) Unwrap() error { return ErrOutOfRange }

// Range is a range of guest physical addresses.
type Range struct {
	Base GuestAddr
	Size uint64
}

// End is the first address past the range.
func (r Range) End() GuestAddr { return r.Base + GuestAddr(r.Size) }

// Region is one contiguous piece of guest RAM backed by host memory.
type Region struct {
	Range
	mem []byte
}

// Memory is guest physical memory: a sorted, non-overlapping region table.
type Memory struct {
	regions []*Region
	mapped  bool
}

const pageSize = 4096

// New maps anonymous host memory for each range. Ranges must be page
// aligned, non-empty and must not overlap.
func New(ranges ...Range) (*Memory, error) {
	if len(ranges) == 0 {
		return nil, errors.New("guest memory: no ranges")
	}
	rs := append([]Range(nil), ranges...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].Base < rs[j].Base })
	for i, r := range rs {
		if r.Size == 0 || r.Base%pageSize != 0 || r.Size%pageSize != 0 {
			return nil, fmt.Errorf("guest memory: range %#x+%#x is empty or not page aligned", uint64(r.Base), r.Size)
		}
		if r.End() < r.Base {
			return nil, fmt.Errorf("guest memory: range %#x+%#x wraps", uint64(r.Base), r.Size)
		}
		if i > 0 && rs[i-1].End() > r.Base {
			return nil, fmt.Errorf("guest memory: ranges %#x and %#x overlap", uint64(rs[i-1].Base), uint64(r.Base))
		}
	}
	m := &Memory{mapped: true}
	for _, r := range rs {
		b, err := unix.Mmap(-1, 0, int(r.Size), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("guest memory: mmap %d bytes: %w", r.Size, err)
		}
		m.regions = append(m.regions, &Region{Range: r, mem: b})
	}
	return m, nil
}

// FromBytes builds guest memory over caller-owned byte slices; tests and
// fuzzers use it to run device code with no mmap and no KVM.
func FromBytes(base GuestAddr, b []byte) *Memory {
	return &Memory{regions: []*Region{{Range: Range{Base: base, Size: uint64(len(b))}, mem: b}}}
}

// Close unmaps the regions. The Memory must not be used afterwards.
func (m *Memory) Close() error {
	var first error
	if m.mapped {
		for _, r := range m.regions {
			if err := unix.Munmap(r.mem); err != nil && first == nil {
				first = err
			}
		}
	}
	m.regions = nil
	return first
}

// Regions returns the region table, lowest address first.
func (m *Memory) Regions() []*Region { return m.regions }

// Size is the total number of bytes of guest RAM.
func (m *Memory) Size() uint64 {
	var n uint64
	for _, r := range m.regions {
		n += r.Size
	}
	return n
}

func (m *Memory) region(a GuestAddr) *Region {
	for _, r := range m.regions {
		if a >= r.Base && a < r.End() {
			return r
		}
	}
	return nil
}

// Slice returns the n bytes at a as a slice aliasing guest memory. The
// slice's capacity is n, so appending to it never writes past the range.
func (m *Memory) Slice(a GuestAddr, n uint64) ([]byte, error) {
	r := m.region(a)
	end := uint64(a) + n
	if r == nil || end < uint64(a) || end > uint64(r.End()) {
		return nil, &AddrError{Addr: a, Len: n}
	}
	off := uint64(a - r.Base)
	return r.mem[off : off+n : off+n], nil
}

// Read copies len(p) bytes at a into p.
func (m *Memory) Read(a GuestAddr, p []byte) error {
	s, err := m.Slice(a, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(p, s)
	return nil
}

// Write copies p into guest memory at a.
func (m *Memory) Write(a GuestAddr, p []byte) error {
	s, err := m.Slice(a, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(s, p)
	return nil
}

// Zero clears n bytes at a.
func (m *Memory) Zero(a GuestAddr, n uint64) error {
	s, err := m.Slice(a, n)
	if err != nil {
		return err
	}
	clear(s)
	return nil
}

// Uint16 reads a little-endian uint16 at a.
func (m *Memory) Uint16(a GuestAddr) (uint16, error) {
	s, err := m.Slice(a, 2)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(s), nil
}

// Uint32 reads a little-endian uint32 at a.
func (m *Memory) Uint32(a GuestAddr) (uint32, error) {
	s, err := m.Slice(a, 4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(s), nil
}

// Uint64 reads a little-endian uint64 at a.
func (m *Memory) Uint64(a GuestAddr) (uint64, error) {
	s, err := m.Slice(a, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(s), nil
}

// PutUint16 writes a little-endian uint16 at a.
func (m *Memory) PutUint16(a GuestAddr, v uint16) error {
	s, err := m.Slice(a, 2)
	if err != nil {
		return err
	}
	binary.LittleEndian.PutUint16(s, v)
	return nil
}

// PutUint32 writes a little-endian uint32 at a.
func (m *Memory) PutUint32(a GuestAddr, v uint32) error {
	s, err := m.Slice(a, 4)
	if err != nil {
		return err
	}
	binary.LittleEndian.PutUint32(s, v)
	return nil
}

// PutUint64 writes a little-endian uint64 at a.
func (m *Memory) PutUint64(a GuestAddr, v uint64) error {
	s, err := m.Slice(a, 8)
	if err != nil {
		return err
	}
	binary.LittleEndian.PutUint64(s, v)
	return nil
}
