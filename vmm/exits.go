package vmm

import "github.com/rayvmm/rayvmm/vmm/kvm"

// exitKind classifies a vCPU's KVM_RUN returns for the metrics.
type exitKind int

const (
	exitIO exitKind = iota
	exitMMIO
	exitHLT
	exitKick // KVM_RUN interrupted by a signal: a kick or Go's preemption
	exitIRQWindow
	exitShutdown
	exitInternalError
	exitFailEntry
	exitSystemEvent
	exitOther
	numExitKinds
)

var exitKindNames = [numExitKinds]string{
	"io", "mmio", "hlt", "signal", "irq_window", "shutdown", "internal_error", "fail_entry", "system_event", "other",
}

func (k exitKind) String() string { return exitKindNames[k] }

func exitKindOf(r uint32) exitKind {
	switch r {
	case kvm.ExitIO:
		return exitIO
	case kvm.ExitMMIO:
		return exitMMIO
	case kvm.ExitHLT:
		return exitHLT
	case kvm.ExitIntr:
		return exitKick
	case kvm.ExitIRQWindowOpen:
		return exitIRQWindow
	case kvm.ExitShutdown:
		return exitShutdown
	case kvm.ExitInternalError:
		return exitInternalError
	case kvm.ExitFailEntry:
		return exitFailEntry
	case kvm.ExitSystemEvent:
		return exitSystemEvent
	}
	return exitOther
}

func (c *vcpu) count(k exitKind) { c.exits[k].Add(1) }

// VCPUExits are one vCPU's KVM_RUN returns by reason.
type VCPUExits struct {
	VCPU   int
	ByKind map[string]uint64
}

// Exits returns every vCPU's exit counts (empty before Run).
func (v *VM) Exits() []VCPUExits {
	var out []VCPUExits
	for _, c := range v.vcpuList() {
		e := VCPUExits{VCPU: c.id, ByKind: make(map[string]uint64, numExitKinds)}
		for k := range numExitKinds {
			e.ByKind[k.String()] = c.exits[k].Load()
		}
		out = append(out, e)
	}
	return out
}
