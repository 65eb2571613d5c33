package cpuid

import (
	"testing"

	"github.com/rayvmm/rayvmm/vmm/kvm"
)

func host() []kvm.CPUIDEntry {
	return []kvm.CPUIDEntry{
		{Function: 0x0, Eax: 0x10},
		{Function: 0x1, Ebx: 0x00010800, Ecx: 0xffffffff, Edx: 0x078bfbff},
		{Function: 0x7, Index: 0, Ebx: 0xffffffff, Ecx: 0xffffffff, Edx: 0xffffffff},
		{Function: 0xb, Index: 0}, {Function: 0xb, Index: 1},
		{Function: 0xd, Index: 0, Eax: 7}, {Function: 0xd, Index: 1, Eax: 1},
		{Function: leafHypervisor, Eax: 0x40000001},
		{Function: 0x80000008, Ecx: 0x3007},
	}
}

func find(es []kvm.CPUIDEntry, fn, idx uint32) *kvm.CPUIDEntry {
	for i := range es {
		if es[i].Function == fn && es[i].Index == idx {
			return &es[i]
		}
	}
	return nil
}

func TestEmulatedTemplate(t *testing.T) {
	out := Apply(host(), Emulated, Topology{CPU: 1, CPUs: 4, TSCKHz: 2600000})
	for _, c := range []struct {
		name    string
		fn, idx uint32
		reg     byte
		bit     uint
		want    bool
	}{
		{"CX16 hidden", 1, 0, 'c', 13, false},
		{"XSAVE hidden", 1, 0, 'c', 26, false},
		{"AVX hidden", 1, 0, 'c', 28, false},
		{"AVX2 hidden", 7, 0, 'b', 5, false},
		{"AVX512F hidden", 7, 0, 'b', 16, false},
		{"hypervisor bit", 1, 0, 'c', 31, true},
		{"HTT with 4 cpus", 1, 0, 'd', 28, true},
		{"SSE2 kept", 1, 0, 'd', 26, true},
		{"ERMS kept", 7, 0, 'b', 9, true},
	} {
		if got := Has(out, c.fn, c.idx, c.reg, c.bit); got != c.want {
			t.Errorf("%s: bit %d of leaf %#x %c = %v", c.name, c.bit, c.fn, c.reg, got)
		}
	}
	if find(out, 0xd, 0) != nil || find(out, 0xd, 1) != nil {
		t.Error("XSAVE enumeration leaf 0xd kept")
	}
	if e := find(out, 1, 0); e.Ebx>>24 != 1 || (e.Ebx>>16)&0xff != 4 {
		t.Errorf("leaf 1 EBX %#x: want APIC ID 1, 4 logical CPUs", e.Ebx)
	}
	if e := find(out, 0xb, 1); e.Ebx != 4 || e.Edx != 1 || e.Eax != 2 {
		t.Errorf("leaf 0xb.1 = %+v", *e)
	}
	if e := find(out, 0x80000008, 0); e.Ecx&0xff != 3 {
		t.Errorf("leaf 0x80000008 ECX %#x", e.Ecx)
	}
	if e := find(out, leafTiming, 0); e == nil || e.Eax != 2600000 || e.Ebx != lapicBusKHz {
		t.Errorf("timing leaf %+v", e)
	}
	if e := find(out, leafHypervisor, 0); e.Eax != leafTiming {
		t.Errorf("hypervisor max leaf %#x", e.Eax)
	}
}

func TestHostTemplateKeepsFeatures(t *testing.T) {
	out := Apply(host(), Host, Topology{CPU: 0, CPUs: 1})
	if !Has(out, 1, 0, 'c', 13) || !Has(out, 7, 0, 'b', 5) || find(out, 0xd, 0) == nil {
		t.Fatal("host template hid features")
	}
	if Has(out, 1, 0, 'd', 28) {
		t.Fatal("HTT set for one CPU")
	}
	if find(out, leafTiming, 0) != nil {
		t.Fatal("timing leaf without a TSC frequency")
	}
}

func TestResolve(t *testing.T) {
	for _, n := range []string{Host, Emulated} {
		if got, err := Resolve(n); err != nil || got != n {
			t.Errorf("Resolve(%q) = %q, %v", n, got, err)
		}
	}
	auto, _ := Resolve(Auto)
	if want := map[bool]string{true: Emulated, false: Host}[PVMBacked()]; auto != want {
		t.Errorf("auto = %q, want %q", auto, want)
	}
	if _, err := Resolve("turbo"); err == nil {
		t.Error("unknown template accepted")
	}
}
