package vmm

import (
	"github.com/rayvmm/rayvmm/vmm/cpuid"
	"github.com/rayvmm/rayvmm/vmm/kvm"
)

// CapReport is one KVM capability and its value.
type CapReport struct {
	Name     string
	Value    int
	Required bool
}

// ProbeReport is what rayvmm probe prints.
type ProbeReport struct {
	Device           string
	APIVersion       int
	PVM              bool
	AutoTemplate     string
	MaxVCPUs         int
	RecommendedVCPUs int
	MemSlots         int
	Caps             []CapReport
}

// Probe opens the KVM device and reports what it offers.
func Probe(device string) (*ProbeReport, error) {
	s, err := kvm.Open(device)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	v, err := s.APIVersion()
	if err != nil {
		return nil, err
	}
	auto, _ := cpuid.Resolve(cpuid.Auto)
	r := &ProbeReport{
		Device:           device,
		APIVersion:       v,
		PVM:              cpuid.PVMBacked(),
		AutoTemplate:     auto,
		MaxVCPUs:         s.CheckExtension(kvm.CapMaxVCPUs),
		RecommendedVCPUs: s.CheckExtension(kvm.CapNrVCPUs),
		MemSlots:         s.CheckExtension(kvm.CapNrMemSlots),
	}
	for _, c := range []struct {
		name string
		cap  kvm.Capability
		req  bool
	}{
		{"KVM_CAP_IRQCHIP (in-kernel PIC, IOAPIC, LAPIC)", kvm.CapIRQChip, true},
		{"KVM_CAP_PIT2 (in-kernel i8254)", kvm.CapPIT2, true},
		{"KVM_CAP_USER_MEMORY", kvm.CapUserMemory, true},
		{"KVM_CAP_IMMEDIATE_EXIT (kickable vCPUs)", kvm.CapImmExit, true},
		{"KVM_CAP_EXT_CPUID (CPUID templates)", kvm.CapExtCPUID, false},
		{"KVM_CAP_MP_STATE (SMP bring-up)", kvm.CapMPState, false},
		{"KVM_CAP_IRQFD (virtio interrupts without exits)", kvm.CapIRQFD, false},
		{"KVM_CAP_IOEVENTFD (virtio notifications without exits)", kvm.CapIOEventFD, false},
		{"KVM_CAP_SET_TSS_ADDR", kvm.CapSetTSSAddr, false},
		{"KVM_CAP_INTERNAL_ERROR_DATA", kvm.CapInternalErr, false},
	} {
		r.Caps = append(r.Caps, CapReport{Name: c.name, Value: s.CheckExtension(c.cap), Required: c.req})
	}
	return r, nil
}
