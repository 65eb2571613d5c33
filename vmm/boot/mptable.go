package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/rayvmm/rayvmm/vmm/memory"
)

// The Intel MultiProcessor Specification 1.4 table that tells the guest how
// many CPUs there are, their LAPIC IDs, and where the IOAPIC is.
const (
	mpFloatSize   = 16
	mpHeaderSize  = 44
	mpProcSize    = 20
	mpEntrySize   = 8
	mpIOAPICPins  = 24
	mpLAPICVer    = 0x14
	mpIOAPICVer   = 0x11
	mpCPUSig      = 0x600 // family 6
	mpCPUFeatures = 0x201 // FPU, APIC
)

// MaxCPUs is the most vCPUs the xAPIC-ID space and the MP table describe.
const MaxCPUs = 254

func mpChecksum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return -s
}

// BuildMPTable returns the MP config table (without the floating pointer)
// for n CPUs with LAPIC IDs 0..n-1 and one IOAPIC with ID n.
func BuildMPTable(n int) ([]byte, error) {
	if n < 1 || n > MaxCPUs {
		return nil, fmt.Errorf("MP table: %d CPUs, want 1..%d", n, MaxCPUs)
	}
	le := binary.LittleEndian
	ioapicID := byte(n)
	var e []byte
	for i := 0; i < n; i++ {
		p := make([]byte, mpProcSize)
		p[0] = 0 // processor
		p[1] = byte(i)
		p[2] = mpLAPICVer
		p[3] = 1 // enabled
		if i == 0 {
			p[3] |= 2 // bootstrap processor
		}
		le.PutUint32(p[4:], mpCPUSig)
		le.PutUint32(p[8:], mpCPUFeatures)
		e = append(e, p...)
	}
	e = append(e, 1, 0, 'I', 'S', 'A', ' ', ' ', ' ') // bus 0: ISA
	e = append(e, 2, ioapicID, mpIOAPICVer, 1, 0, 0, 0, 0)
	le.PutUint32(e[len(e)-4:], IOAPICAddr)
	for pin := 0; pin < mpIOAPICPins; pin++ {
		typ := byte(0) // INT
		if pin == 0 {
			typ = 3 // ExtINT
		}
		e = append(e, 3, typ, 0, 0, 0, byte(pin), ioapicID, byte(pin))
	}
	e = append(e, 4, 3, 0, 0, 0, 0, 0xff, 0) // ExtINT -> LINT0 of all LAPICs
	e = append(e, 4, 1, 0, 0, 0, 0, 0xff, 1) // NMI -> LINT1
	count := n + 1 + 1 + mpIOAPICPins + 2

	h := make([]byte, mpHeaderSize)
	copy(h, "PCMP")
	le.PutUint16(h[4:], uint16(mpHeaderSize+len(e)))
	h[6] = 4 // spec 1.4
	copy(h[8:], "RAYVMM  ")
	copy(h[16:], "RAYGUEST    ")
	le.PutUint16(h[34:], uint16(count))
	le.PutUint32(h[36:], LAPICAddr)
	t := append(h, e...)
	t[7] = mpChecksum(t)
	return t, nil
}

// WriteMPTable writes the floating pointer at EBDAStart and the config table
// right after it, or in the BIOS area when it is too big for the EBDA.
func WriteMPTable(m *memory.Memory, n int) error {
	t, err := BuildMPTable(n)
	if err != nil {
		return err
	}
	at := uint64(EBDAStart + mpFloatSize)
	if at+uint64(len(t)) > 0xa0000 {
		at = BIOSStart
	}
	fp := make([]byte, mpFloatSize)
	copy(fp, "_MP_")
	binary.LittleEndian.PutUint32(fp[4:], uint32(at))
	fp[8] = 1 // length in 16-byte units
	fp[9] = 4 // spec 1.4
	fp[10] = mpChecksum(fp)
	if err := m.Write(EBDAStart, fp); err != nil {
		return fmt.Errorf("write MP floating pointer: %w", err)
	}
	if err := m.Write(memory.GuestAddr(at), t); err != nil {
		return fmt.Errorf("write MP table: %w", err)
	}
	return nil
}
