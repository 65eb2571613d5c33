package vmm

import (
	"fmt"
)

// ExitReason says why a VM stopped.
type ExitReason int

// Exit reasons.
const (
	// ExitPoweroff: the guest reset the machine (i8042 0xFE, or a KVM
	// system event); rayvmm treats it as a clean power off.
	ExitPoweroff ExitReason = iota
	// ExitStopped: the VMM was asked to stop (SIGINT, SIGTERM, Ctrl-A x).
	ExitStopped
	// ExitShutdown: the guest triple-faulted.
	ExitShutdown
	// ExitEmulationFailure: KVM's instruction emulator could not run an
	// instruction.
	ExitEmulationFailure
	// ExitInternalError: any other KVM internal error.
	ExitInternalError
	// ExitFailEntry: the CPU refused to enter the guest.
	ExitFailEntry
	// ExitCrash: the guest reported a crash through a KVM system event.
	ExitCrash
	// ExitHostError: an ioctl or device failed in the VMM.
	ExitHostError
)

// Exit describes how a VM ended.
type Exit struct {
	Reason ExitReason
	VCPU   int // -1 when no particular vCPU
	RIP    uint64
	Insn   []byte
	Detail string
}

// OK reports whether the VM ended the way a user asked it to.
func (e *Exit) OK() bool { return e.Reason == ExitPoweroff || e.Reason == ExitStopped }

func (e *Exit) String() string {
	where := ""
	if e.VCPU >= 0 {
		where = fmt.Sprintf(" on vcpu %d at RIP %#x", e.VCPU, e.RIP)
		if len(e.Insn) > 0 {
			where += fmt.Sprintf(" (instruction bytes % x)", e.Insn)
		}
	}
	switch e.Reason {
	case ExitPoweroff:
		return "guest powered off"
	case ExitStopped:
		return "stopped: " + e.Detail
	case ExitShutdown:
		return "guest shut down (triple fault)" + where
	case ExitEmulationFailure:
		return "KVM internal error: emulation failure" + where + e.detail()
	case ExitInternalError:
		return "KVM internal error" + where + e.detail()
	case ExitFailEntry:
		return "KVM entry failure" + where + e.detail()
	case ExitCrash:
		return "guest crashed (KVM system event)" + where
	default:
		return "VMM error" + where + e.detail()
	}
}

func (e *Exit) detail() string {
	if e.Detail == "" {
		return ""
	}
	return ": " + e.Detail
}
