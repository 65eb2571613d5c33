package kvm

import (
	"errors"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

func TestOpenRejectsNonKVM(t *testing.T) {
	if _, err := Open("/dev/null"); err == nil {
		t.Fatal("/dev/null accepted as a KVM device")
	}
	if _, err := Open("/nonexistent/kvm"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing device: %v", err)
	}
}

// TestVCPUKick creates a VM with an AP-style vCPU (no registers set up,
// never started by a SIPI), which blocks in KVM_RUN, and checks that the
// immediate_exit kick and a signal end KVM_RUN with EINTR.
func TestVCPUKick(t *testing.T) {
	testenv.RequireKVM(t)
	s, err := Open("/dev/kvm")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	c, err := vm.CreateVCPU(1)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetImmediateExit(true)
	if err := c.Run(); !errors.Is(err, unix.EINTR) {
		t.Fatalf("KVM_RUN with immediate_exit: %v, want EINTR", err)
	}
	if v, err := s.APIVersion(); err != nil || v != 12 {
		t.Fatalf("API version %d, %v", v, err)
	}
}

// TestCreateVMUnderSignals creates VMs while every thread of the process is
// sent SIGURG (the signal the Go runtime preempts with) as fast as it can
// be. KVM_CREATE_VM gives up with EINTR when a signal is pending; before
// CreateVM retried, about 4 in 10 of these failed, and one such failure
// reached CI as "KVM_CREATE_VM: interrupted system call".
func TestCreateVMUnderSignals(t *testing.T) {
	testenv.RequireKVM(t)
	s, err := Open("/dev/kvm")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		pid := os.Getpid()
		for {
			select {
			case <-stop:
				return
			default:
			}
			ents, err := os.ReadDir("/proc/self/task")
			if err != nil {
				continue
			}
			for _, e := range ents {
				if tid, err := strconv.Atoi(e.Name()); err == nil {
					unix.Tgkill(pid, tid, unix.SIGURG)
				}
			}
		}
	}()
	defer func() { close(stop); <-done }()
	for i := 0; i < 200; i++ {
		vm, err := s.CreateVM()
		if err != nil {
			t.Fatalf("VM %d: %v", i, err)
		}
		vm.Close()
	}
}
