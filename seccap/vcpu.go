package seccap

import "fmt"

// VCPUFilter stacks the vCPU filter on the calling OS thread only: KVM_RUN
// and the exit path's KVM calls on this vCPU's descriptor (vcpuFD; the VM
// descriptor vmFD for the serial port's interrupt), and what the Go
// runtime does on any thread. Call it from the vCPU's goroutine, locked to
// its thread (runtime.LockOSThread) for the rest of its life, after the
// vCPU's set-up and before its first KVM_RUN, and after Apply. A negative
// descriptor is not checked. It does nothing in ModeOff.
//
// A locked thread never becomes the parent of another Go thread (the
// runtime's template thread clones those), so the filter stays on this
// thread; the process filter stays on as well, and a call passes only if
// both allow it.
func (a *Applied) VCPUFilter(vcpuFD, vmFD int) error {
	if a == nil || a.Mode == ModeOff {
		return nil
	}
	p, err := assemble(vcpuGroups(vcpuFD, vmFD, a.pid), defaultAction(a.Mode, a.Trap))
	if err != nil {
		return fmt.Errorf("vcpu filter: %w", err)
	}
	if err := load(p, false, a.Trap); err != nil {
		return fmt.Errorf("vcpu filter: %w", err)
	}
	return nil
}
