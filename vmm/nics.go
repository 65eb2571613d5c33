package vmm

import (
	"fmt"
	"net"

	vnet "github.com/rayvmm/rayvmm/devices/virtio/net"
	"github.com/rayvmm/rayvmm/network/port"
	"github.com/rayvmm/rayvmm/ratelimit"
	"github.com/rayvmm/rayvmm/spec"
)

// NIC is a virtio-net device attached to the VM and its host side.
type NIC struct {
	Spec   spec.NIC
	MAC    net.HardwareAddr
	TAPs   []string // host interfaces, one per VLAN of a trunk
	Port   port.Port
	Device *vnet.Device
	Slot   *VirtioSlot
	rx, tx *ratelimit.Limiter // always set, so the API can change them
}

// NICBackend is the host side of one NIC, opened by the control plane.
type NICBackend struct {
	Port port.Port
	MTU  int      // 0 means 1500
	TAPs []string // for metrics and messages
}

// AttachNIC builds a virtio-net device for entry n (its MAC resolved) on
// an opened port and places it on the MMIO bus. The VM owns the port from
// here on, also when AttachNIC fails: it is closed (its TAPs released)
// with the VM, after the device has stopped.
func (v *VM) AttachNIC(n spec.NIC, b NICBackend) (_ *NIC, err error) {
	defer func() {
		if err != nil {
			b.Port.Close()
		}
	}()
	mac, err := spec.ParseMAC(n.MAC)
	if err != nil {
		return nil, fmt.Errorf("nic %s: %w", n.ID, err)
	}
	rxc, txc := NICLimits(n.RateLimit)
	rx, err := ratelimit.NewUpdatable(rxc)
	if err != nil {
		return nil, fmt.Errorf("nic %s: rx rate limit: %w", n.ID, err)
	}
	tx, err := ratelimit.NewUpdatable(txc)
	if err != nil {
		return nil, fmt.Errorf("nic %s: tx rate limit: %w", n.ID, err)
	}
	dev, err := vnet.New(vnet.Config{MAC: mac, MTU: b.MTU, Port: b.Port, RX: rx, TX: tx, Log: v.log})
	if err != nil {
		return nil, fmt.Errorf("nic %s: %w", n.ID, err)
	}
	// Closers run in reverse: the device first, then the port (which also
	// ends the device's receive goroutine blocked on it).
	v.OnClose(func() error {
		if err := b.Port.Close(); err != nil {
			return fmt.Errorf("nic %s: %w", n.ID, err)
		}
		return nil
	})
	v.OnClose(func() error { dev.Close(); return nil })
	slot, err := v.AddVirtio(dev)
	if err != nil {
		return nil, fmt.Errorf("nic %s: %w", n.ID, err)
	}
	nic := &NIC{Spec: n, MAC: mac, TAPs: b.TAPs, Port: b.Port, Device: dev, Slot: slot, rx: rx, tx: tx}
	v.nics = append(v.nics, nic)
	return nic, nil
}

// NICs are the attached NICs in guest order.
func (v *VM) NICs() []*NIC { return v.nics }

// NICLimits is a NIC's rate limit as token buckets per direction,
// refilled every second: Bps bytes and Pps packets, plus one-time bursts.
func NICLimits(r spec.NICRateLimit) (rx, tx ratelimit.Config) {
	dir := func(bps, pps, burstBytes, burstPkts int64) ratelimit.Config {
		var c ratelimit.Config
		if bps > 0 {
			c.Bandwidth = ratelimit.BucketConfig{Size: uint64(bps), OneTimeBurst: uint64(burstBytes), RefillTimeMs: 1000}
		}
		if pps > 0 {
			c.Ops = ratelimit.BucketConfig{Size: uint64(pps), OneTimeBurst: uint64(burstPkts), RefillTimeMs: 1000}
		}
		return c
	}
	return dir(r.RxBps, r.RxPps, r.RxBurst, r.RxPpsBurst), dir(r.TxBps, r.TxPps, r.TxBurst, r.TxPpsBurst)
}

// SetRateLimit changes the NIC's token buckets while the VM runs.
func (n *NIC) SetRateLimit(r spec.NICRateLimit) error {
	if err := r.Validate("rateLimit"); err != nil {
		return err
	}
	rx, tx := NICLimits(r)
	if err := n.rx.Update(rx); err != nil {
		return fmt.Errorf("nic %s: rx rate limit: %w", n.Spec.ID, err)
	}
	if err := n.tx.Update(tx); err != nil {
		return fmt.Errorf("nic %s: tx rate limit: %w", n.Spec.ID, err)
	}
	return nil
}
