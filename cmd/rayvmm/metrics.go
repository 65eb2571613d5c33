package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rayvmm/rayvmm/devices/virtio/blk"
	"github.com/rayvmm/rayvmm/devices/virtio/mmio"
	"github.com/rayvmm/rayvmm/vmm"
)

type diskMetrics struct {
	Name      string       `json:"name"` // vda, vdb, ...
	Source    string       `json:"source"`
	ReadOnly  bool         `json:"read_only"`
	Metrics   blk.Snapshot `json:"metrics"`
	Transport mmio.Stats   `json:"transport"`
}

type vmMetrics struct {
	Exit      string        `json:"exit"`
	BootTimes vmm.BootTimes `json:"boot_times"`
	Disks     []diskMetrics `json:"disks"`
}

// writeMetrics writes the VM's device metrics as JSON, atomically.
func writeMetrics(path string, v *vmm.VM) error {
	m := vmMetrics{BootTimes: v.BootTimes(), Disks: []diskMetrics{}}
	if e := v.Exit(); e != nil {
		m.Exit = e.String()
	}
	for i, d := range v.Disks() {
		m.Disks = append(m.Disks, diskMetrics{
			Name:      "vd" + string(rune('a'+i)),
			Source:    d.Source,
			ReadOnly:  d.Spec.ReadOnly,
			Metrics:   d.Device.Metrics().Snapshot(),
			Transport: d.Slot.Transport.Stats(),
		})
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".metrics-*")
	if err != nil {
		return fmt.Errorf("--metrics-file: %w", err)
	}
	_, werr := tmp.Write(append(b, '\n'))
	cerr := tmp.Close()
	if werr != nil || cerr != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("--metrics-file: write %s: %w", path, errors.Join(werr, cerr))
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("--metrics-file: %w", err)
	}
	return nil
}
