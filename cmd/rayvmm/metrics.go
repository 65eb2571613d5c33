package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rayvmm/rayvmm/devices/virtio/blk"
	"github.com/rayvmm/rayvmm/devices/virtio/mmio"
	vnet "github.com/rayvmm/rayvmm/devices/virtio/net"
	"github.com/rayvmm/rayvmm/devices/virtio/vsock"
	"github.com/rayvmm/rayvmm/vmm"
)

type diskMetrics struct {
	Name      string       `json:"name"` // vda, vdb, ...
	Source    string       `json:"source"`
	ReadOnly  bool         `json:"read_only"`
	Metrics   blk.Snapshot `json:"metrics"`
	Transport mmio.Stats   `json:"transport"`
}

type nicMetrics struct {
	MAC       string        `json:"mac"`
	TAPs      []string      `json:"taps"`
	Metrics   vnet.Snapshot `json:"metrics"`
	Transport mmio.Stats    `json:"transport"`
}

type vsockMetrics struct {
	CID       uint32         `json:"cid"`
	UDS       string         `json:"uds"`
	Metrics   vsock.Snapshot `json:"metrics"`
	Transport mmio.Stats     `json:"transport"`
}

type vmMetrics struct {
	Exit      string        `json:"exit"`
	BootTimes vmm.BootTimes `json:"boot_times"`
	Disks     []diskMetrics `json:"disks"`
	NICs      []nicMetrics  `json:"nics"`
	Vsock     *vsockMetrics `json:"vsock,omitempty"`
}

// writeMetrics writes the VM's device metrics as JSON, atomically.
func writeMetrics(path string, v *vmm.VM) error {
	m := vmMetrics{BootTimes: v.BootTimes(), Disks: []diskMetrics{}, NICs: []nicMetrics{}}
	for _, n := range v.NICs() {
		m.NICs = append(m.NICs, nicMetrics{
			MAC:       n.Host.MAC.String(),
			TAPs:      n.Host.TAPs,
			Metrics:   n.Device.Metrics().Snapshot(),
			Transport: n.Slot.Transport.Stats(),
		})
	}
	if vs := v.Vsock(); vs != nil {
		m.Vsock = &vsockMetrics{CID: vs.Device.CID(), UDS: vs.Device.Path(),
			Metrics: vs.Device.Metrics().Snapshot(), Transport: vs.Slot.Transport.Stats()}
	}
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
