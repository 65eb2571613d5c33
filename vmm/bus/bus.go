// Package bus dispatches the guest's port I/O and MMIO accesses to the
// device that owns the address, as Firecracker's and Cloud Hypervisor's
// buses do. A bus is built before the vCPUs start and never changes after,
// so lookups take no lock; devices do their own locking.
package bus

import (
	"fmt"
	"sort"
	"sync/atomic"
)

// Device handles accesses at an offset from the base it was registered at.
// Called on vCPU threads: it must not block on device I/O.
type Device interface {
	Read(offset uint64, data []byte)
	Write(offset uint64, data []byte)
}

type entry struct {
	base, size uint64
	dev        Device
	name       string
}

// Bus is an address space (port I/O or MMIO) of non-overlapping devices.
type Bus struct {
	entries []entry
	// Unhandled counts accesses no device claimed.
	Unhandled atomic.Uint64
}

// Register adds a device at [base, base+size).
func (b *Bus) Register(name string, base, size uint64, d Device) error {
	if size == 0 || base+size < base {
		return fmt.Errorf("bus: %s: bad range %#x+%#x", name, base, size)
	}
	for _, e := range b.entries {
		if base < e.base+e.size && e.base < base+size {
			return fmt.Errorf("bus: %s at %#x+%#x overlaps %s at %#x+%#x", name, base, size, e.name, e.base, e.size)
		}
	}
	b.entries = append(b.entries, entry{base, size, d, name})
	sort.Slice(b.entries, func(i, j int) bool { return b.entries[i].base < b.entries[j].base })
	return nil
}

func (b *Bus) find(addr uint64, n int) (*entry, bool) {
	i := sort.Search(len(b.entries), func(i int) bool { return b.entries[i].base+b.entries[i].size > addr })
	if i == len(b.entries) {
		return nil, false
	}
	e := &b.entries[i]
	if addr < e.base || addr+uint64(n) > e.base+e.size {
		return nil, false
	}
	return e, true
}

// Read dispatches a read; unclaimed reads return all ones, like an
// unpopulated ISA bus, and report false.
func (b *Bus) Read(addr uint64, data []byte) bool {
	if e, ok := b.find(addr, len(data)); ok {
		e.dev.Read(addr-e.base, data)
		return true
	}
	for i := range data {
		data[i] = 0xff
	}
	b.Unhandled.Add(1)
	return false
}

// Write dispatches a write; unclaimed writes are dropped and report false.
func (b *Bus) Write(addr uint64, data []byte) bool {
	if e, ok := b.find(addr, len(data)); ok {
		e.dev.Write(addr-e.base, data)
		return true
	}
	b.Unhandled.Add(1)
	return false
}
