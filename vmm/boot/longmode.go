package boot

import (
	"encoding/binary"

	"github.com/rayvmm/rayvmm/vmm/kvm"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// gdtEntry encodes a segment descriptor from flags (the access byte in bits
// 0-7 and the granularity nibble in bits 12-15), base and limit.
func gdtEntry(flags uint16, base, limit uint32) uint64 {
	return uint64(base&0xff000000)<<(56-24) |
		uint64(flags&0xf0ff)<<40 |
		uint64(limit&0x000f0000)<<(48-16) |
		uint64(base&0x00ffffff)<<16 |
		uint64(limit&0x0000ffff)
}

// GDT is the boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
var GDT = []uint64{
	0,
	0,
	gdtEntry(0xa09b, 0, 0xfffff),
	gdtEntry(0xc093, 0, 0xfffff),
	gdtEntry(0x808b, 0, 0xfffff),
}

// WriteGDT writes GDT at GDTAddr; the limit for LGDT is 8*len(GDT)-1.
func WriteGDT(m *memory.Memory) error {
	b := make([]byte, 8*len(GDT))
	for i, e := range GDT {
		binary.LittleEndian.PutUint64(b[8*i:], e)
	}
	return m.Write(GDTAddr, b)
}

// WritePageTables identity-maps the first 4 GiB with 2 MiB pages, so the
// kernel, zero page, command line, initrd and the MMIO hole (LAPIC, IOAPIC,
// virtio-mmio) are all reachable on entry.
func WritePageTables(m *memory.Memory) error {
	const present, rw, ps = 1, 2, 0x80
	if err := m.Zero(PML4Addr, 6*4096); err != nil {
		return err
	}
	if err := m.PutUint64(PML4Addr, PDPTAddr|present|rw); err != nil {
		return err
	}
	pd := make([]byte, 4*4096)
	for i := uint64(0); i < 4*512; i++ {
		binary.LittleEndian.PutUint64(pd[8*i:], i<<21|present|rw|ps)
	}
	for i := uint64(0); i < 4; i++ {
		if err := m.PutUint64(memory.GuestAddr(PDPTAddr+8*i), (PDAddr+i*4096)|present|rw); err != nil {
			return err
		}
	}
	return m.Write(PDAddr, pd)
}

// Control register bits for long mode.
const (
	CR0PE   = 1 << 0
	CR0ET   = 1 << 4
	CR0PG   = 1 << 31
	CR4PAE  = 1 << 5
	EFERLME = 1 << 8
	EFERLMA = 1 << 10
)

// LongModeSregs changes a vCPU's special registers to the state the Linux
// 64-bit boot protocol enters a kernel in: flat 64-bit code and data
// segments from GDT, the identity page tables, paging and long mode on,
// no IDT.
func LongModeSregs(s *kvm.Sregs) {
	code := kvm.Segment{Limit: 0xfffff, Selector: SelectorCode, Typ: 0xb, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xfffff, Selector: SelectorData, Typ: 0x3, Present: 1, S: 1, DB: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = kvm.Segment{Limit: 0xfffff, Selector: SelectorTSS, Typ: 0xb, Present: 1, G: 1}
	s.GDT.Base, s.GDT.Limit = GDTAddr, uint16(8*len(GDT)-1)
	s.IDT.Base, s.IDT.Limit = 0, 0
	s.CR3 = PML4Addr
	s.CR4 |= CR4PAE
	s.CR0 |= CR0PE | CR0PG | CR0ET
	s.EFER |= EFERLME | EFERLMA
}

// EntryRegs are the general registers at kernel entry: RIP at the entry
// point, RSI at the zero page, a stack below the page tables.
func EntryRegs(entry uint64) *kvm.Regs {
	return &kvm.Regs{RIP: entry, RSI: ZeroPageAddr, RSP: BootStack, RBP: BootStack, RFLAGS: 2}
}
