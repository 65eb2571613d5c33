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
	defer func() {
		for _, c := range owned {
			c.Close()
		}
	}()
	if len(b.Disks) != len(s.Disks) || len(b.NICs) != len(s.Nets) {
		if b.KVM != nil {
			b.KVM.Close()
		}
		return nil, fmt.Errorf("%w: %d disk and %d NIC backends for %d disks and %d NICs", ErrConfig, len(b.Disks), len(b.NICs), len(s.Disks), len(s.Nets))
	}
	if s.Vsock != nil {
		if b.KVM != nil {
			b.KVM.Close()
		}
		return nil, fmt.Errorf("%w: vsock: this rayvmm has no virtio-vsock device yet", ErrConfig)
	}
	v, err := New(Config{
		KVM: b.KVM, MemoryBytes: uint64(s.Memory), CPUs: s.CPUs, CPUTemplate: s.CPUTemplate,
		Kernel: b.Kernel, Initrd: b.Initrd, Cmdline: s.Cmdline,
		Console: o.Console, Log: o.Log, Started: o.Started, CPUBefore: o.CPUBefore, BootTimer: o.BootTimer,
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
	if err := v.Prepare(); err != nil {
		return nil, err
	}
	return v, nil
}

type nopCloser struct{}

func (nopCloser) Close() error { return nil }
