// Package cpuid shapes the CPUID table each vCPU sees: topology (APIC IDs,
// core counts) and a CPU template that hides features, as Firecracker's CPU
// templates do.
//
// The "emulated" template exists for hosts where KVM runs the guest in its
// x86 instruction emulator (PVM-backed /dev/kvm): there, cmpxchg16b, the XSAVE
// family, and SSE/AVX arithmetic fail with "emulation failure", so those
// features are hidden and a guest that checks CPUID never uses them.
package cpuid

import (
	"fmt"
	"os"

	"github.com/rayvmm/rayvmm/vmm/kvm"
)

// Template names.
const (
	Auto     = "auto"
	Host     = "host"
	Emulated = "emulated"
)

// PVMBacked reports whether /dev/kvm is PVM-backed, the case where guest
// code runs in KVM's instruction emulator.
func PVMBacked() bool {
	_, err := os.Stat("/sys/module/kvm_pvm")
	return err == nil
}

// Resolve turns a template name from the command line into host or emulated.
func Resolve(name string) (string, error) {
	switch name {
	case "", Auto:
		if PVMBacked() {
			return Emulated, nil
		}
		return Host, nil
	case Host, Emulated:
		return name, nil
	}
	return "", fmt.Errorf("unknown CPU template %q: want auto, host or emulated", name)
}

// mask lists the bits the emulated template clears, per leaf, subleaf and
// register.
type mask struct {
	fn, index          uint32
	eax, ebx, ecx, edx uint32
}

func bits(b ...uint) uint32 {
	var v uint32
	for _, x := range b {
		v |= 1 << x
	}
	return v
}

var emulatedMasks = []mask{
	// Leaf 1 ECX: SSE3, PCLMULQDQ, SSSE3, FMA, CX16, SSE4.1, SSE4.2, POPCNT,
	// AES, XSAVE, OSXSAVE, AVX, F16C, RDRAND.
	{fn: 1, ecx: bits(0, 1, 9, 12, 13, 19, 20, 23, 25, 26, 27, 28, 29, 30)},
	// Leaf 7.0 EBX: FSGSBASE, BMI1, AVX2, BMI2, INVPCID, AVX512F/DQ,
	// RDSEED, ADX, SMAP, AVX512IFMA, CLFLUSHOPT, CLWB, AVX512PF/ER/CD, SHA,
	// AVX512BW/VL.
	{fn: 7, index: 0, ebx: bits(0, 3, 5, 8, 10, 16, 17, 18, 19, 20, 21, 23, 24, 26, 27, 28, 29, 30, 31),
		// ECX: AVX512VBMI, PKU, OSPKE, WAITPKG, AVX512VBMI2, GFNI, VAES,
		// VPCLMULQDQ, AVX512VNNI, AVX512BITALG, AVX512VPOPCNTDQ, RDPID.
		ecx: bits(1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 22),
		// EDX: AVX512_4VNNIW/4FMAPS, AVX512_VP2INTERSECT, AMX, AVX512_FP16.
		edx: bits(2, 3, 8, 22, 23, 24, 25)},
	// Leaf 7.1 EAX: AVX-VNNI, AVX512_BF16.
	{fn: 7, index: 1, eax: bits(4, 5)},
	// Leaf 0x80000001 ECX: ABM/LZCNT, SSE4A, MisAlignSSE, XOP, FMA4, TBM.
	{fn: 0x80000001, ecx: bits(5, 6, 7, 11, 16, 21)},
}

// Topology is what one vCPU's CPUID must say about the machine.
type Topology struct {
	CPU, CPUs int
	// TSCKHz, when non-zero, is published in the hypervisor timing leaf
	// 0x40000010 (EAX TSC kHz, EBX LAPIC timer kHz), so a guest need not
	// calibrate its clocks against the PIT.
	TSCKHz uint32
}

const (
	leafHypervisor = 0x40000000
	leafTiming     = 0x40000010
	// lapicBusKHz is KVM's LAPIC timer frequency (1 GHz).
	lapicBusKHz = 1000000
)

// Apply returns a copy of the host-supported entries shaped for one vCPU
// with the given template.
func Apply(supported []kvm.CPUIDEntry, template string, t Topology) []kvm.CPUIDEntry {
	out := make([]kvm.CPUIDEntry, 0, len(supported))
	for _, e := range supported {
		if template == Emulated {
			if e.Function == 0xd {
				continue // XSAVE state enumeration: no XSAVE at all
			}
			for _, m := range emulatedMasks {
				if e.Function == m.fn && e.Index == m.index {
					e.Eax &^= m.eax
					e.Ebx &^= m.ebx
					e.Ecx &^= m.ecx
					e.Edx &^= m.edx
				}
			}
		}
		switch e.Function {
		case 1:
			// Initial APIC ID, logical processor count, HTT, hypervisor.
			e.Ebx = e.Ebx&0x0000ffff | uint32(t.CPU)<<24 | uint32(t.CPUs&0xff)<<16
			if t.CPUs > 1 {
				e.Edx |= 1 << 28
			}
			e.Ecx |= 1 << 31
		case 4:
			// Deterministic cache parameters: cores per package - 1.
			if e.Eax&0x1f != 0 {
				e.Eax = e.Eax&0x03ffffff | uint32(t.CPUs-1)<<26
			}
		case 0xb, 0x1f:
			// Extended topology: one thread per core, CPUs cores.
			e.Edx = uint32(t.CPU)
			switch e.Index {
			case 0:
				e.Eax, e.Ebx, e.Ecx = 0, 1, 1<<8|e.Index
			case 1:
				e.Eax, e.Ebx, e.Ecx = uint32(shiftFor(t.CPUs)), uint32(t.CPUs), 2<<8|e.Index
			default:
				e.Eax, e.Ebx, e.Ecx = 0, 0, e.Index
			}
		case 0x80000008:
			// AMD: number of cores - 1 in ECX[7:0].
			e.Ecx = e.Ecx&^0xff | uint32(t.CPUs-1)&0xff
		}
		if e.Function == leafHypervisor && t.TSCKHz != 0 && e.Eax < leafTiming {
			e.Eax = leafTiming
		}
		out = append(out, e)
	}
	if t.TSCKHz != 0 {
		out = append(out, kvm.CPUIDEntry{Function: leafTiming, Eax: t.TSCKHz, Ebx: lapicBusKHz})
	}
	return out
}

func shiftFor(n int) int {
	s := 0
	for 1<<s < n {
		s++
	}
	return s
}

// Has reports whether a leaf's register has a bit set; reg is 'a'..'d'.
func Has(entries []kvm.CPUIDEntry, fn, index uint32, reg byte, bit uint) bool {
	for _, e := range entries {
		if e.Function == fn && e.Index == index {
			v := map[byte]uint32{'a': e.Eax, 'b': e.Ebx, 'c': e.Ecx, 'd': e.Edx}[reg]
			return v&(1<<bit) != 0
		}
	}
	return false
}
