package runner

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/rayvmm/rayvmm/devices/virtio/blk"
	"github.com/rayvmm/rayvmm/devices/virtio/mmio"
	vnet "github.com/rayvmm/rayvmm/devices/virtio/net"
	"github.com/rayvmm/rayvmm/devices/virtio/vsock"
	"github.com/rayvmm/rayvmm/vmm"
)

// The metrics file (Spec.MetricsFile) gets these counters, as JSON, when
// the VM exits; the control plane created the file and moves it into
// place.

type diskMetrics struct {
	Name      string       `json:"name"` // the disk's id: vda, vdb, ...
	Source    string       `json:"source"`
	ReadOnly  bool         `json:"read_only"`
	Metrics   blk.Snapshot `json:"metrics"`
	Transport mmio.Stats   `json:"transport"`
}

type nicMetrics struct {
	ID        string        `json:"id"`
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

// writeMetrics writes the VM's device metrics as JSON to f.
func writeMetrics(f *os.File, v *vmm.VM) error {
	m := vmMetrics{BootTimes: v.BootTimes(), Disks: []diskMetrics{}, NICs: []nicMetrics{}}
	for _, n := range v.NICs() {
		m.NICs = append(m.NICs, nicMetrics{
			ID:        n.Spec.ID,
			MAC:       n.MAC.String(),
			TAPs:      n.TAPs,
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
	for _, d := range v.Disks() {
		m.Disks = append(m.Disks, diskMetrics{
			Name:      d.Spec.ID,
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
	if _, err := f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write %s: %w", f.Name(), err)
	}
	return f.Sync()
}
