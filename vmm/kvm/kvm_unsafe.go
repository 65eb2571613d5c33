package kvm

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// SetImmediateExit sets kvm_run.immediate_exit, which makes the next (or
// the current, once a signal interrupts it) KVM_RUN return EINTR at once.
// It is written from a goroutine other than the vCPU's, so it is stored
// atomically through the 32-bit word holding request_interrupt_window (never
// set by rayvmm, which uses the in-kernel irqchip) and immediate_exit.
func (c *VCPU) SetImmediateExit(on bool) {
	var v uint32
	if on {
		v = 1 << 8
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&c.run[0])), v)
}

// kvm_irqfd and kvm_ioeventfd from include/uapi/linux/kvm.h.
type irqfd struct {
	FD         uint32
	GSI        uint32
	Flags      uint32
	ResampleFD uint32
	_          [16]uint8
}

type ioeventfd struct {
	Datamatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	_         [36]uint8
}

const (
	ioeventfdFlagDatamatch = 1 << 0
	ioeventfdFlagPIO       = 1 << 1
	irqfdFlagDeassign      = 1 << 0
	ioeventfdFlagDeassign  = 1 << 2
)

func (vm *VM) ioctlPtr(nr, size uintptr, p unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(vm.fd), gokvm.IIOW(nr, size), uintptr(p))
	if e != 0 {
		return e
	}
	return nil
}

// IRQFD makes a write to the eventfd fd pulse GSI gsi (KVM_IRQFD).
func (vm *VM) IRQFD(fd int, gsi uint32) error {
	a := irqfd{FD: uint32(fd), GSI: gsi}
	if err := vm.ioctlPtr(0x76, unsafe.Sizeof(a), unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("KVM_IRQFD gsi %d: %w", gsi, err)
	}
	return nil
}

// IOEventFD makes a guest write of length n at MMIO address addr (with the
// value match, when match is non-nil) signal the eventfd fd instead of
// exiting to user space (KVM_IOEVENTFD).
func (vm *VM) IOEventFD(fd int, addr uint64, n uint32, match *uint64) error {
	a := ioeventfd{Addr: addr, Len: n, FD: int32(fd)}
	if match != nil {
		a.Datamatch = *match
		a.Flags |= ioeventfdFlagDatamatch
	}
	if err := vm.ioctlPtr(0x79, unsafe.Sizeof(a), unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("KVM_IOEVENTFD at %#x: %w", addr, err)
	}
	return nil
}

// MPState is KVM_GET_MP_STATE.
func (c *VCPU) MPState() (uint32, error) {
	var s gokvm.MPState
	if err := gokvm.GetMPState(uintptr(c.fd), &s); err != nil {
		return 0, fmt.Errorf("vcpu %d: KVM_GET_MP_STATE: %w", c.ID, err)
	}
	return s.State, nil
}
