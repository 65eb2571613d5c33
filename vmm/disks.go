package vmm

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/rayvmm/rayvmm/devices/virtio/blk"
	"github.com/rayvmm/rayvmm/ratelimit"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/storage/volume"
)

// Disk is a virtio-blk device attached to the VM and what backs it.
type Disk struct {
	Spec   storage.DiskSpec
	Source string // path or "volume:NAME"
	Device *blk.Device
	Slot   *VirtioSlot
}

// AttachDisk opens the backend a --disk spec names (a file, or a volume
// from the store under stateDir, locked for this VM), builds a virtio-blk
// device on it and places it on the MMIO bus. Disks appear to the guest in
// the order they are attached. Everything it opened is closed with the VM,
// or at once if it fails.
func (v *VM) AttachDisk(spec storage.DiskSpec, stateDir string) (_ *Disk, err error) {
	d := &Disk{Spec: spec}
	var backend storage.Disk
	var release func() error
	defer func() {
		if err != nil && release != nil {
			release()
		}
	}()
	switch {
	case spec.Volume != "":
		st, err := volume.Open(stateDir)
		if err != nil {
			return nil, fmt.Errorf("volume %q: %w", spec.Volume, err)
		}
		a, err := st.Attach(spec.Volume, spec.ReadOnly)
		if err != nil {
			return nil, err
		}
		if spec.Format != "" && spec.Format != a.Volume.Format {
			a.Close()
			return nil, fmt.Errorf("volume %q is %s, not %s", spec.Volume, a.Volume.Format, spec.Format)
		}
		backend, release = a.Disk, a.Close
		d.Source = "volume:" + spec.Volume
	default:
		disk, err := storage.OpenDisk(spec.Path, spec.Format, spec.ReadOnly)
		if err != nil {
			return nil, fmt.Errorf("disk %s: %w", spec.Path, err)
		}
		backend = disk
		release = func() error { return errors.Join(disk.Flush(), disk.Close()) }
		d.Source = spec.Path
	}
	rel := release
	release = nil // attachBackend releases it on failure
	return v.attachBackend(d, backend, rel)
}

// AttachBackend attaches a disk whose backend the caller has opened (a
// sharded volume, say); source names it in errors and metrics, and
// release is called when the VM closes, after the device was reset. If
// it fails, release is called at once.
func (v *VM) AttachBackend(spec storage.DiskSpec, source string, backend storage.Disk, release func() error) (*Disk, error) {
	return v.attachBackend(&Disk{Spec: spec, Source: source}, backend, release)
}

func (v *VM) attachBackend(d *Disk, backend storage.Disk, release func() error) (_ *Disk, err error) {
	spec := d.Spec
	defer func() {
		if err != nil && release != nil {
			release()
		}
	}()
	lim, err := ratelimit.New(spec.Limits)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", d.Source, err)
	}
	serial := spec.Serial
	if serial == "" {
		serial = spec.Volume
		if serial == "" {
			serial = filepath.Base(spec.Path)
		}
		if len(serial) > 20 {
			serial = serial[:20]
		}
	}
	cfg := blk.Config{Disk: backend, ReadOnly: spec.ReadOnly, Serial: serial, Log: v.log}
	if lim != nil {
		cfg.RateLimit = lim
	}
	if d.Device, err = blk.New(cfg); err != nil {
		return nil, fmt.Errorf("disk %s: %w", d.Source, err)
	}
	if d.Slot, err = v.AddVirtio(d.Device); err != nil {
		return nil, fmt.Errorf("disk %s: %w", d.Source, err)
	}
	// Closers run in reverse order after the devices were reset, so the
	// device is quiet before its backend is flushed and closed.
	v.OnClose(release)
	v.disks = append(v.disks, d)
	return d, nil
}

// Disks are the attached disks in guest order (vda, vdb, ...).
func (v *VM) Disks() []*Disk { return v.disks }
