package seccap

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// testVM is a real KVM guest as small as can be: 16-bit code at 0x1000
// that writes port 0x10 for ever (mov dx, 0x10; out dx, al; jmp $-2), so
// that every KVM_RUN returns with an I/O exit, as a guest's port writes
// do in rayvmm.
type testVM struct {
	kvm     *os.File
	vmFD    int
	mem     []byte
	runSize int
}

var guestCode = []byte{0xba, 0x10, 0x00, 0xee, 0xeb, 0xfd}

const exitIO = 2 // KVM_EXIT_IO

func newTestVM() (*testVM, error) {
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	vmFD, err := gokvm.CreateVM(kvm.Fd())
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	size, err := gokvm.GetVCPUMMmapSize(kvm.Fd())
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	mem, err := unix.Mmap(-1, 0, 0x10000, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, err
	}
	copy(mem[0x1000:], guestCode)
	region := &gokvm.UserspaceMemoryRegion{MemorySize: uint64(len(mem)), UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if err := gokvm.SetUserMemoryRegion(vmFD, region); err != nil {
		return nil, fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	if err := gokvm.SetTSSAddr(vmFD, 0xfffbd000); err != nil {
		return nil, fmt.Errorf("KVM_SET_TSS_ADDR: %w", err)
	}
	return &testVM{kvm: kvm, vmFD: int(vmFD), mem: mem, runSize: int(size)}, nil
}

// testVCPU is one vCPU, created and set up on the thread that runs it,
// after the sandbox, as rayvmm's are.
type testVCPU struct {
	fd  int
	run []byte
}

func (v *testVM) newVCPU(id int) (*testVCPU, error) {
	fd, err := gokvm.CreateVCPU(uintptr(v.vmFD), id)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	run, err := unix.Mmap(int(fd), 0, v.runSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap kvm_run: %w", err)
	}
	sregs, err := gokvm.GetSregs(fd)
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	sregs.CS.Base, sregs.CS.Selector = 0, 0
	if err := gokvm.SetSregs(fd, sregs); err != nil {
		return nil, fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	if err := gokvm.SetRegs(fd, &gokvm.Regs{RIP: 0x1000, RFLAGS: 2}); err != nil {
		return nil, fmt.Errorf("KVM_SET_REGS: %w", err)
	}
	return &testVCPU{fd: int(fd), run: run}, nil
}

// runIO runs until n I/O exits happened.
func (c *testVCPU) runIO(n int) error {
	for i := 0; i < n; {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), uintptr(kvmRun), 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return fmt.Errorf("KVM_RUN: %w", e)
		}
		if r := binary.LittleEndian.Uint32(c.run[8:]); r != exitIO {
			return fmt.Errorf("KVM_RUN: exit reason %d, want %d (I/O)", r, exitIO)
		}
		i++
	}
	return nil
}

// futexWake makes n FUTEX_WAKE_PRIVATE calls on a word nobody waits on:
// about the cheapest call there is that both filters must evaluate by
// its arguments, in about as many instructions as KVM_RUN takes, to
// measure what the filters cost per call without KVM's own cost (which
// under PVM swamps it).
func futexWake(n int) error {
	var word uint32
	for range n {
		if _, _, e := unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(&word)), 1|128, 1, 0, 0, 0); e != 0 {
			return fmt.Errorf("futex: %w", e)
		}
	}
	return nil
}
