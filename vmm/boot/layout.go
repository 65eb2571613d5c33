// Package boot lays out an x86-64 guest for the Linux 64-bit boot protocol:
// the guest physical memory map and its e820 table, the GDT and identity page
// tables that put the boot CPU in long mode, the zero page (struct
// boot_params) with the command line and initrd, the Intel MP table that
// describes the CPUs, and the kernel loaders (ELF vmlinux or rayguest, and
// bzImage).
//
// Everything here writes guest memory through vmm/memory and needs neither
// KVM nor root, so it is tested and fuzzed on any machine. Kernel images are
// untrusted input: every offset and size read from one is checked.
package boot

import (
	"fmt"

	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Guest physical addresses of what the VMM places in low memory. The guest
// kernel may use 0x10000-0x1ffff freely (rayguest puts its AP trampoline
// there).
const (
	GDTAddr      = 0x500
	ZeroPageAddr = 0x7000
	BootStack    = 0x8ff0
	PML4Addr     = 0x9000
	PDPTAddr     = 0xa000
	PDAddr       = 0xb000 // four page directories, 0xb000-0xefff
	CmdlineAddr  = 0x20000
	EBDAStart    = 0x9fc00 // MP floating pointer; reserved up to 1 MiB
	BIOSStart    = 0xf0000 // large MP config tables go here
	HighMemStart = 0x100000
	KernelLoad   = 0x100000 // where a bzImage's protected-mode kernel goes

	// MMIOHoleStart..4 GiB is not RAM: virtio-mmio devices, IOAPIC,
	// LAPIC and KVM's TSS live there.
	MMIOHoleStart  = 0xc0000000
	MMIOHoleEnd    = 1 << 32
	VirtioMMIOBase = 0xd0000000
	IOAPICAddr     = 0xfec00000
	LAPICAddr      = 0xfee00000
	TSSAddr        = 0xfffbd000
	IdentityMap    = 0xfffbc000

	// MinMemory is the smallest guest rayvmm boots: enough for low memory,
	// page tables and a small kernel.
	MinMemory = 4 << 20
)

// GDT selectors, as Linux's boot protocol expects (__BOOT_CS, __BOOT_DS).
const (
	SelectorCode = 0x10
	SelectorData = 0x18
	SelectorTSS  = 0x20
)

// RAMRanges splits size bytes of guest RAM around the MMIO hole below 4 GiB.
func RAMRanges(size uint64) []memory.Range {
	if size <= MMIOHoleStart {
		return []memory.Range{{Base: 0, Size: size}}
	}
	return []memory.Range{
		{Base: 0, Size: MMIOHoleStart},
		{Base: MMIOHoleEnd, Size: size - MMIOHoleStart},
	}
}

// CheckMemorySize validates a requested guest memory size.
func CheckMemorySize(size uint64) error {
	if size < MinMemory {
		return fmt.Errorf("guest memory of %d bytes is too small: rayvmm needs at least %d MiB", size, MinMemory>>20)
	}
	if size%4096 != 0 {
		return fmt.Errorf("guest memory of %d bytes is not a multiple of 4 KiB", size)
	}
	if size > 1<<46 {
		return fmt.Errorf("guest memory of %d bytes is beyond what x86-64 guests address", size)
	}
	return nil
}

// E820 entry types.
const (
	E820RAM      = 1
	E820Reserved = 2
)

// E820Entry is one entry of the BIOS memory map.
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// E820 is the memory map the guest gets for size bytes of RAM: conventional
// memory below the EBDA, the EBDA/BIOS area reserved, and RAM from 1 MiB
// around the MMIO hole.
func E820(size uint64) []E820Entry {
	m := []E820Entry{
		{0, EBDAStart, E820RAM},
		{EBDAStart, HighMemStart - EBDAStart, E820Reserved},
	}
	for _, r := range RAMRanges(size) {
		base, end := uint64(r.Base), uint64(r.End())
		if base < HighMemStart {
			base = HighMemStart
		}
		if end > base {
			m = append(m, E820Entry{base, end - base, E820RAM})
		}
	}
	return m
}

// UsableRAM is the sum of the RAM entries of an e820 map.
func UsableRAM(m []E820Entry) uint64 {
	var n uint64
	for _, e := range m {
		if e.Type == E820RAM {
			n += e.Size
		}
	}
	return n
}
