package vmm

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage"
)

// Backends are everything a VM needs from the host, opened by the control
// plane (and, in rayvmm-vm, handed over as file descriptors): vmm opens
// nothing by path and knows no state directory.
type Backends struct {
	// KVM is the open KVM device.
	KVM *os.File
	// Kernel and Initrd are the images' bytes.
	Kernel, Initrd []byte
	// Disks back s.Disks, in the same order.
	Disks []DiskBackend
	// NICs back s.Nets, in the same order.
	NICs []NICBackend
	// Vsock is the listening Unix socket of s.Vsock (at s.Vsock.UDS).
	Vsock *os.File
}

// DiskBackend is one opened disk image.
type DiskBackend struct {
	Disk   storage.Disk
	Source string // a path or "volume:NAME", for messages and metrics
}

// Options are a built VM's surroundings.
type Options struct {
	Console io.Writer // guest serial output
	Log     *slog.Logger
	// Started and CPUBefore: see Config.
	Started   time.Time
	CPUBefore time.Duration
	BootTimer bool
	// VCPUThread: see Config.
	VCPUThread func(id, vcpuFD, vmFD int) error
}

// Build makes a VM from an effective spec (defaulted, validated, every
// NIC's MAC resolved) and its opened backends, and loads the guest, so
// that bad input is reported before any vCPU runs. It takes ownership of
// every backend, also when it fails.
func Build(s *spec.VM, b Backends, o Options) (_ *VM, err error) {
	var owned []io.Closer
	for _, d := range b.Disks {
		owned = append(owned, d.Disk)
	}
	for _, n := range b.NICs {
		owned = append(owned, n.Port)
	}
	if b.Vsock != nil {
		// The device keeps a duplicate of the listener.
		owned = append(owned, b.Vsock)
	}
	defer func() {
		for _, c := range owned {
			c.Close()
		}
	}()
	if len(b.Disks) != len(s.Disks) || len(b.NICs) != len(s.Nets) || (b.Vsock != nil) != (s.Vsock != nil) {
		if b.KVM != nil {
			b.KVM.Close()
		}
		return nil, fmt.Errorf("%w: %d disk, %d NIC and %d vsock backends for %d disks, %d NICs and %d vsock devices", ErrConfig,
			len(b.Disks), len(b.NICs), btoi(b.Vsock != nil), len(s.Disks), len(s.Nets), btoi(s.Vsock != nil))
	}
	v, err := New(Config{
		KVM: b.KVM, MemoryBytes: uint64(s.Memory), CPUs: s.CPUs, CPUTemplate: s.CPUTemplate,
		Kernel: b.Kernel, Initrd: b.Initrd, Cmdline: s.Cmdline,
		Console: o.Console, Log: o.Log, Started: o.Started, CPUBefore: o.CPUBefore, BootTimer: o.BootTimer,
		VCPUThread: o.VCPUThread,
	})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	for i := range s.Disks {
		owned[i] = nopCloser{}
		if _, err := v.AttachDisk(s.Disks[i], b.Disks[i].Disk, b.Disks[i].Source); err != nil {
			return nil, err
		}
	}
	for i := range s.Nets {
		owned[len(s.Disks)+i] = nopCloser{}
		if _, err := v.AttachNIC(s.Nets[i], b.NICs[i]); err != nil {
			return nil, err
		}
	}
	if s.Vsock != nil {
		if _, err := v.AttachVsock(VsockConfig{CID: s.Vsock.CID, Listener: b.Vsock, Path: s.Vsock.UDS}); err != nil {
			return nil, err
		}
	}
	if err := v.Prepare(); err != nil {
		return nil, err
	}
	return v, nil
}

type nopCloser struct{}

func (nopCloser) Close() error { return nil }

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
