package vmm

import (
	"fmt"

	vnet "github.com/rayvmm/rayvmm/devices/virtio/net"
	"github.com/rayvmm/rayvmm/network"
)

// NIC is a virtio-net device attached to the VM and its host side.
type NIC struct {
	Host   *network.NIC
	Device *vnet.Device
	Slot   *VirtioSlot
}

// AttachNIC builds a virtio-net device on a NIC's port and places it on the
// MMIO bus. The VM takes ownership of host: it is closed (its TAPs removed)
// with the VM, after the device has stopped.
func (v *VM) AttachNIC(host *network.NIC) (*NIC, error) {
	dev, err := vnet.New(vnet.Config{MAC: host.MAC, MTU: host.MTU, Port: host.Port, RX: host.RX, TX: host.TX, Log: v.log})
	if err != nil {
		host.Close()
		return nil, fmt.Errorf("nic %s: %w", host.MAC, err)
	}
	// Closers run in reverse: the device first, then the TAPs (which also
	// ends the device's receive goroutine blocked on the port).
	v.OnClose(host.Close)
	v.OnClose(func() error { dev.Close(); return nil })
	slot, err := v.AddVirtio(dev)
	if err != nil {
		return nil, fmt.Errorf("nic %s: %w", host.MAC, err)
	}
	n := &NIC{Host: host, Device: dev, Slot: slot}
	v.nics = append(v.nics, n)
	return n, nil
}

// NICs are the attached NICs in guest order.
func (v *VM) NICs() []*NIC { return v.nics }
