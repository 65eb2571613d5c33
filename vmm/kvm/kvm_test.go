package kvm

import (
	"errors"
	"os"
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
