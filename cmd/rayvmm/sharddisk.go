package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/rayvmm/rayvmm/shards"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/vmm"
)

// attachDisk attaches one --disk. volume=NAME naming a sharded volume
// (no local volume of that name, and sharded volumes configured here) is
// opened through shards.OpenDisk, the control plane's seam; everything
// else through vmm.AttachDisk.
func attachDisk(ctx context.Context, v *vmm.VM, d storage.DiskSpec, log *slog.Logger) error {
	if d.Volume == "" || !shardedOnly(d.Volume) {
		_, err := v.AttachDisk(d, stateDir)
		return err
	}
	if d.Format != "" {
		return fmt.Errorf("volume %q is sharded: format= does not apply", d.Volume)
	}
	disk, release, err := shards.OpenDisk(ctx, connectOptions(true), d.Volume, "rayvmm boot", log)
	if err != nil {
		return err
	}
	_, err = v.AttachBackend(d, "sharded:"+d.Volume, disk, release)
	return err
}
