// Package kvm holds rayvmm's handles on the Linux KVM API: one type per kind
// of file descriptor (System for /dev/kvm, VM, VCPU), as rust-vmm's
// kvm-ioctls does.
//
// The ioctls themselves come from gokvm's kvm package where it has them.
// What it lacks or gets wrong for a VMM that must be kickable lives here:
// KVM_RUN without an EINTR retry, the mmapped kvm_run area with
// immediate_exit, irqfd and ioeventfd, and KVM_CHECK_EXTENSION on the VM fd.
package kvm

import (
	"errors"
	"fmt"
	"os"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// ErrUnsupported is returned when the host KVM lacks something rayvmm needs.
var ErrUnsupported = errors.New("not supported by this KVM")

// Capability numbers rayvmm checks (KVM_CAP_*), reusing gokvm's names.
const (
	CapIRQChip     = gokvm.CapIRQChip
	CapUserMemory  = gokvm.CapUserMemory
	CapSetTSSAddr  = gokvm.CapSetTSSAddr
	CapExtCPUID    = gokvm.CapEXTCPUID
	CapNrVCPUs     = gokvm.CapNRVCPUS
	CapNrMemSlots  = gokvm.CapNRMemSlots
	CapPIT2        = gokvm.CapPIT2
	CapMPState     = gokvm.CapMPState
	CapIRQFD       = gokvm.CapIRQFD
	CapIOEventFD   = gokvm.CapIOEventFD
	CapInternalErr = gokvm.CapInternalErrorData
	CapImmExit     = gokvm.Capability(136) // KVM_CAP_IMMEDIATE_EXIT
	CapMaxVCPUs    = gokvm.Capability(66)  // KVM_CAP_MAX_VCPUS
)

// System is an open /dev/kvm.
type System struct {
	f    *os.File
	Path string
}

// Open opens the KVM device and checks the API version.
func Open(path string) (*System, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open KVM device: %w", err)
	}
	s, err := FromFile(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return s, nil
}

// FromFile takes over an open KVM device (opened by a control plane and
// handed to the VM process) and checks the API version. On error the
// caller keeps f.
func FromFile(f *os.File) (*System, error) {
	s := &System{f: f, Path: f.Name()}
	v, err := s.APIVersion()
	if err != nil {
		return nil, fmt.Errorf("%s: KVM_GET_API_VERSION: %w (is it a KVM device?)", s.Path, err)
	}
	if v != 12 {
		return nil, fmt.Errorf("%s: KVM API version %d, want 12: %w", s.Path, v, ErrUnsupported)
	}
	return s, nil
}

func (s *System) fd() uintptr { return s.f.Fd() }

// Close closes /dev/kvm; VMs created from it stay valid.
func (s *System) Close() error { return s.f.Close() }

// APIVersion is KVM_GET_API_VERSION (always 12 on a sane kernel).
func (s *System) APIVersion() (int, error) {
	v, err := gokvm.GetAPIVersion(s.fd())
	return int(v), err
}

// CheckExtension is KVM_CHECK_EXTENSION; 0 means unsupported.
func (s *System) CheckExtension(c gokvm.Capability) int {
	v, err := gokvm.CheckExtension(s.fd(), c)
	if err != nil {
		return 0
	}
	return int(v)
}

// VCPUMmapSize is the size of the kvm_run area of each vCPU.
func (s *System) VCPUMmapSize() (int, error) {
	v, err := gokvm.GetVCPUMMmapSize(s.fd())
	return int(v), err
}

// CPUIDEntry is one struct kvm_cpuid_entry2.
type CPUIDEntry = gokvm.CPUIDEntry2

// SupportedCPUID is KVM_GET_SUPPORTED_CPUID.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	const max = 256
	c := &gokvm.CPUID{Nent: max, Entries: make([]CPUIDEntry, max)}
	if err := gokvm.GetSupportedCPUID(s.fd(), c); err != nil {
		return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %w", err)
	}
	if int(c.Nent) > len(c.Entries) {
		return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %d entries, buffer holds %d", c.Nent, len(c.Entries))
	}
	return c.Entries[:c.Nent], nil
}

// VM is a KVM virtual machine file descriptor.
type VM struct {
	fd       int
	sys      *System
	runSize  int
	nextSlot uint32
}

// CreateVM is KVM_CREATE_VM.
func (s *System) CreateVM() (*VM, error) {
	size, err := s.VCPUMmapSize()
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	// The kernel gives up creating a VM with EINTR when a signal is
	// pending while it sets the VM up (the call is not restarted), and the
	// Go runtime signals its threads all the time (SIGURG preemption).
	// QEMU retries too (see TestCreateVMUnderSignals).
	var fd uintptr
	for {
		fd, err = gokvm.CreateVM(s.fd())
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	unix.CloseOnExec(int(fd))
	return &VM{fd: int(fd), sys: s, runSize: size}, nil
}

// Close closes the VM fd. vCPUs must be closed first.
func (vm *VM) Close() error { return unix.Close(vm.fd) }

// FD is the VM's descriptor (for a seccomp filter that names it).
func (vm *VM) FD() int { return vm.fd }

// SetMemoryRegion maps host memory at hostAddr as guest RAM at gpa in a new
// slot (KVM_SET_USER_MEMORY_REGION).
func (vm *VM) SetMemoryRegion(gpa, size uint64, hostAddr uintptr) error {
	r := &gokvm.UserspaceMemoryRegion{
		Slot:          vm.nextSlot,
		GuestPhysAddr: gpa,
		MemorySize:    size,
		UserspaceAddr: uint64(hostAddr),
	}
	if err := gokvm.SetUserMemoryRegion(uintptr(vm.fd), r); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION slot %d at %#x (+%#x): %w", r.Slot, gpa, size, err)
	}
	vm.nextSlot++
	return nil
}

// SetTSSAddr is KVM_SET_TSS_ADDR (three pages Intel hosts need below 4 GiB).
func (vm *VM) SetTSSAddr(addr uint32) error {
	if err := gokvm.SetTSSAddr(uintptr(vm.fd), addr); err != nil {
		return fmt.Errorf("KVM_SET_TSS_ADDR: %w", err)
	}
	return nil
}

// SetIdentityMapAddr is KVM_SET_IDENTITY_MAP_ADDR.
func (vm *VM) SetIdentityMapAddr(addr uint32) error {
	if err := gokvm.SetIdentityMapAddr(uintptr(vm.fd), addr); err != nil {
		return fmt.Errorf("KVM_SET_IDENTITY_MAP_ADDR: %w", err)
	}
	return nil
}

// CreateIRQChip creates the in-kernel PIC, IOAPIC and LAPICs.
func (vm *VM) CreateIRQChip() error {
	if err := gokvm.CreateIRQChip(uintptr(vm.fd)); err != nil {
		return fmt.Errorf("KVM_CREATE_IRQCHIP: %w", err)
	}
	return nil
}

// CreatePIT2 creates the in-kernel i8254 timer.
func (vm *VM) CreatePIT2() error {
	if err := gokvm.CreatePIT2(uintptr(vm.fd)); err != nil {
		return fmt.Errorf("KVM_CREATE_PIT2: %w", err)
	}
	return nil
}

// IRQLine sets the level of a GSI (KVM_IRQ_LINE_STATUS).
func (vm *VM) IRQLine(gsi uint32, high bool) error {
	lvl := uint32(0)
	if high {
		lvl = 1
	}
	if err := gokvm.IRQLineStatus(uintptr(vm.fd), gsi, lvl); err != nil {
		return fmt.Errorf("KVM_IRQ_LINE_STATUS gsi %d: %w", gsi, err)
	}
	return nil
}

// CheckExtension is KVM_CHECK_EXTENSION on the VM fd, which reports
// per-VM values (e.g. the vCPU limit).
func (vm *VM) CheckExtension(c gokvm.Capability) int {
	v, err := gokvm.CheckExtension(uintptr(vm.fd), c)
	if err != nil {
		return 0
	}
	return int(v)
}

// VCPU is a KVM vCPU file descriptor and its mmapped kvm_run area.
type VCPU struct {
	ID  int
	fd  int
	run []byte
}

// CreateVCPU is KVM_CREATE_VCPU plus the kvm_run mmap.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := gokvm.CreateVCPU(uintptr(vm.fd), id)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU %d: %w", id, err)
	}
	unix.CloseOnExec(int(fd))
	run, err := unix.Mmap(int(fd), 0, vm.runSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("vcpu %d: mmap kvm_run: %w", id, err)
	}
	if len(run) < runMinSize {
		unix.Munmap(run)
		unix.Close(int(fd))
		return nil, fmt.Errorf("vcpu %d: kvm_run area of %d bytes is too small", id, len(run))
	}
	return &VCPU{ID: id, fd: int(fd), run: run}, nil
}

// FD is the vCPU's descriptor (for a seccomp filter that names it).
func (c *VCPU) FD() int { return c.fd }

// Close unmaps kvm_run and closes the vCPU fd.
func (c *VCPU) Close() error {
	unix.Munmap(c.run)
	return unix.Close(c.fd)
}

// Run is one KVM_RUN. It returns unix.EINTR when a signal (a kick)
// interrupted it and unix.EAGAIN when an AP received INIT; the caller decides
// what both mean. It never retries by itself.
func (c *VCPU) Run() error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), uintptr(gokvm.IIO(0x80)), 0)
	if e != 0 {
		return e
	}
	return nil
}

// Regs are the general purpose registers.
type Regs = gokvm.Regs

// Sregs are the special registers.
type Sregs = gokvm.Sregs

// Segment is one segment register in Sregs.
type Segment = gokvm.Segment

// Regs is KVM_GET_REGS.
func (c *VCPU) Regs() (*Regs, error) {
	r, err := gokvm.GetRegs(uintptr(c.fd))
	if err != nil {
		return nil, fmt.Errorf("vcpu %d: KVM_GET_REGS: %w", c.ID, err)
	}
	return r, nil
}

// SetRegs is KVM_SET_REGS.
func (c *VCPU) SetRegs(r *Regs) error {
	if err := gokvm.SetRegs(uintptr(c.fd), r); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_REGS: %w", c.ID, err)
	}
	return nil
}

// Sregs is KVM_GET_SREGS.
func (c *VCPU) Sregs() (*Sregs, error) {
	s, err := gokvm.GetSregs(uintptr(c.fd))
	if err != nil {
		return nil, fmt.Errorf("vcpu %d: KVM_GET_SREGS: %w", c.ID, err)
	}
	return s, nil
}

// SetSregs is KVM_SET_SREGS.
func (c *VCPU) SetSregs(s *Sregs) error {
	if err := gokvm.SetSregs(uintptr(c.fd), s); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_SREGS: %w", c.ID, err)
	}
	return nil
}

// SetCPUID is KVM_SET_CPUID2.
func (c *VCPU) SetCPUID(entries []CPUIDEntry) error {
	if len(entries) == 0 {
		return fmt.Errorf("vcpu %d: KVM_SET_CPUID2: no entries", c.ID)
	}
	cp := &gokvm.CPUID{Nent: uint32(len(entries)), Entries: entries}
	if err := gokvm.SetCPUID2(uintptr(c.fd), cp); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_CPUID2: %w", c.ID, err)
	}
	return nil
}

// MSR is one model-specific register value.
type MSR = gokvm.MSREntry

// SetMSRs is KVM_SET_MSRS.
func (c *VCPU) SetMSRs(msrs []MSR) error {
	m := &gokvm.MSRS{NMSRs: uint32(len(msrs)), Entries: msrs}
	if err := gokvm.SetMSRs(uintptr(c.fd), m); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_MSRS: %w", c.ID, err)
	}
	return nil
}

// Translation is the result of KVM_TRANSLATE.
type Translation = gokvm.Translation

// Translate maps a guest virtual address to a physical one with the vCPU's
// current paging mode.
func (c *VCPU) Translate(va uint64) (uint64, bool, error) {
	t := &gokvm.Translation{LinearAddress: va}
	if err := gokvm.Translate(uintptr(c.fd), t); err != nil {
		return 0, false, fmt.Errorf("vcpu %d: KVM_TRANSLATE: %w", c.ID, err)
	}
	return t.PhysicalAddress, t.Valid != 0, nil
}

// Capability is a KVM_CAP_* number.
type Capability = gokvm.Capability

// TSCKHz is KVM_GET_TSC_KHZ: the guest's TSC frequency.
func (c *VCPU) TSCKHz() (uint32, error) {
	v, err := gokvm.GetTSCKHz(uintptr(c.fd))
	if err != nil {
		return 0, fmt.Errorf("vcpu %d: KVM_GET_TSC_KHZ: %w", c.ID, err)
	}
	return uint32(v), nil
}
