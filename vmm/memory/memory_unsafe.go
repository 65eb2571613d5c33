package memory

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// This file is the one documented place where rayvmm shares guest memory
// with a concurrently running guest through atomics: virtqueue ring indices
// and event fields are read and written here and nowhere else, so the
// compiler can neither cache nor tear them. Go has no 16-bit atomics, so a
// 16-bit field is accessed through the aligned 32-bit word that contains it;
// a store is a compare-and-swap loop that leaves the other half, which the
// guest may be writing at the same moment, as the guest left it.

// HostAddr is the host virtual address of the region's first byte, for
// KVM_SET_USER_MEMORY_REGION.
func (r *Region) HostAddr() uintptr {
	if len(r.mem) == 0 {
		return 0
	}
	return uintptr(unsafe.Pointer(&r.mem[0]))
}

// word32 returns the aligned 32-bit word holding the n-byte field at a and
// the field's bit shift within it. n is 2 or 4; a must be n-aligned.
func (m *Memory) word32(a GuestAddr, n uint64) (*uint32, uint, error) {
	if uint64(a)%n != 0 {
		return nil, 0, fmt.Errorf("%w: unaligned %d-byte atomic access at %#x", ErrOutOfRange, n, uint64(a))
	}
	wa := a &^ 3
	s, err := m.Slice(wa, 4)
	if err != nil {
		return nil, 0, &AddrError{Addr: a, Len: n}
	}
	p := unsafe.Pointer(&s[0])
	if uintptr(p)%4 != 0 {
		return nil, 0, fmt.Errorf("%w: host memory for %#x is not 4-byte aligned", ErrOutOfRange, uint64(a))
	}
	return (*uint32)(p), uint(a-wa) * 8, nil
}

// LoadUint16 atomically reads the little-endian uint16 at a (2-aligned).
func (m *Memory) LoadUint16(a GuestAddr) (uint16, error) {
	w, sh, err := m.word32(a, 2)
	if err != nil {
		return 0, err
	}
	return uint16(atomic.LoadUint32(w) >> sh), nil
}

// StoreUint16 atomically writes the little-endian uint16 at a (2-aligned)
// without disturbing the neighbouring 16 bits.
func (m *Memory) StoreUint16(a GuestAddr, v uint16) error {
	w, sh, err := m.word32(a, 2)
	if err != nil {
		return err
	}
	mask := uint32(0xffff) << sh
	for {
		old := atomic.LoadUint32(w)
		nw := old&^mask | uint32(v)<<sh
		if atomic.CompareAndSwapUint32(w, old, nw) {
			return nil
		}
	}
}

// LoadUint32 atomically reads the little-endian uint32 at a (4-aligned).
func (m *Memory) LoadUint32(a GuestAddr) (uint32, error) {
	w, _, err := m.word32(a, 4)
	if err != nil {
		return 0, err
	}
	return atomic.LoadUint32(w), nil
}

// StoreUint32 atomically writes the little-endian uint32 at a (4-aligned).
func (m *Memory) StoreUint32(a GuestAddr, v uint32) error {
	w, _, err := m.word32(a, 4)
	if err != nil {
		return err
	}
	atomic.StoreUint32(w, v)
	return nil
}

// Fence orders every earlier guest memory access before every later one, as
// the virtio spec asks between writing a used element and publishing its
// index, and between publishing it and reading the driver's event index.
func Fence() {
	var x uint32
	atomic.AddUint32(&x, 1)
}
