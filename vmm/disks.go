package vmm

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/rayvmm/rayvmm/devices/virtio/blk"
	"github.com/rayvmm/rayvmm/ratelimit"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage"
)

// Disk is a virtio-blk device attached to the VM and what backs it.
type Disk struct {
	Spec   spec.Disk
	Source string // what backs it, for messages: a path or "volume:NAME"
	Device *blk.Device
	Slot   *VirtioSlot
	limit  *ratelimit.Limiter // always set, so the API can change it
}

// AttachDisk builds a virtio-blk device for entry d on an opened backend
// and places it on the MMIO bus. Disks appear to the guest in the order
// they are attached. The VM owns backend from here on, also when
// AttachDisk fails: it is flushed and closed with the VM (a failed final
// flush is an error of Close, naming the disk), or at once on failure.
func (v *VM) AttachDisk(d spec.Disk, backend storage.Disk, source string) (_ *Disk, err error) {
	name := fmt.Sprintf("disk %s (%s)", d.ID, source)
	release := func() error {
		if err := errors.Join(backend.Flush(context.Background()), backend.Close()); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	}
	defer func() {
		if err != nil {
			release()
		}
	}()
	lim, err := ratelimit.NewUpdatable(DiskLimits(d.RateLimit))
	if err != nil {
		return nil, fmt.Errorf("%s: rate limit: %w", name, err)
	}
	serial := d.Serial
	if serial == "" {
		serial = d.Volume
		if serial == "" {
			serial = filepath.Base(d.Path)
		}
		if len(serial) > 20 {
			serial = serial[:20]
		}
	}
	dev, err := blk.New(blk.Config{Disk: backend, ReadOnly: d.ReadOnly, Serial: serial, Log: v.log, RateLimit: lim})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	slot, err := v.AddVirtio(dev)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	// Closers run in reverse order after the devices were reset, so the
	// device is quiet before its backend is flushed and closed.
	v.OnClose(release)
	disk := &Disk{Spec: d, Source: source, Device: dev, Slot: slot, limit: lim}
	v.disks = append(v.disks, disk)
	return disk, nil
}

// Disks are the attached disks in guest order (vda, vdb, ...).
func (v *VM) Disks() []*Disk { return v.disks }

// DiskLimits is a disk's rate limit as token buckets refilled every
// second: IOPS requests and Bps bytes, Burst a one-time extra allowance
// (requests with IOPS, else bytes).
func DiskLimits(r spec.DiskRateLimit) ratelimit.Config {
	var c ratelimit.Config
	burst := uint64(r.Burst)
	if r.IOPS > 0 {
		c.Ops = ratelimit.BucketConfig{Size: uint64(r.IOPS), RefillTimeMs: 1000, OneTimeBurst: burst}
		burst = 0
	}
	if r.Bps > 0 {
		c.Bandwidth = ratelimit.BucketConfig{Size: uint64(r.Bps), RefillTimeMs: 1000, OneTimeBurst: burst}
	}
	return c
}

// SetRateLimit changes the disk's token buckets while the VM runs.
func (d *Disk) SetRateLimit(r spec.DiskRateLimit) error {
	if err := r.Validate("rateLimit"); err != nil {
		return err
	}
	if err := d.limit.Update(DiskLimits(r)); err != nil {
		return fmt.Errorf("disk %s: rate limit: %w", d.Spec.ID, err)
	}
	return nil
}
