package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"

	"github.com/rayvmm/rayvmm/ratelimit"
	"github.com/rayvmm/rayvmm/state"
)

// NIC is a guest NIC's host side, made by Attach.
type NIC struct {
	// Port moves the guest's frames; hand it to the virtio-net device.
	Port Port
	// MAC is the guest's address (from mac= or generated).
	MAC net.HardwareAddr
	// MTU is the guest's MTU: the network's, or the TAP's for tap=.
	MTU int
	// TAPs names the host interfaces, one per VLAN for a trunk.
	TAPs []string
	// Trunk is set for a trunk port (for its drop counters).
	Trunk *Trunk
	// RX and TX are the NIC's rate limiters from the spec (nil when
	// unlimited): RX for frames toward the guest, TX for frames from it.
	RX, TX *ratelimit.Limiter

	attachLock *state.Lock
	once       sync.Once
	closeErr   error
}

// Close closes the NIC's TAPs, which removes the ones Attach created, and
// lets go of the network. It is safe to call more than once.
func (n *NIC) Close() error {
	n.once.Do(func() {
		if n.Port != nil {
			n.closeErr = n.Port.Close()
		}
		n.attachLock.Release()
	})
	return n.closeErr
}

var tapSeq atomic.Uint32

// nextTAPName is "rvt<pid>-<n>": unique on the host while this process
// lives, and recognisably rayvmm's. It fits IFNAMSIZ for pids up to
// 4194304 (the kernel's maximum) and n < 10000.
func nextTAPName() string {
	return tapPrefix + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(int(tapSeq.Add(1)-1))
}

// Attach makes the host side of one NIC of VM vmName in the calling
// thread's network namespace. For network=NAME it makes sure the
// network's bridge exists (recreating it after a reboot), creates one
// non-persistent TAP (one per VLAN for a trunk), puts it on the network's
// bridge (or the access VLAN's bridge, created on first use) and holds
// the network so "net rm" refuses to remove it. For tap=IFNAME it opens
// that TAP and attaches it to nothing. Everything is checked before
// anything is made; on error nothing is left behind.
func Attach(ctx context.Context, stateDir, vmName string, spec NICSpec) (*NIC, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := spec.validate(); err != nil {
		return nil, fmt.Errorf("attach NIC %d: %w", spec.Index, err)
	}
	mac := spec.MAC
	if mac == nil {
		mac = GenerateMAC(vmName, spec.Index)
	}
	rx, err := spec.RX.Limiter()
	if err != nil {
		return nil, fmt.Errorf("attach NIC %d: rx: %w", spec.Index, err)
	}
	tx, err := spec.TX.Limiter()
	if err != nil {
		return nil, fmt.Errorf("attach NIC %d: tx: %w", spec.Index, err)
	}
	nic, err := attach(ctx, stateDir, vmName, spec, mac)
	if err != nil {
		return nil, err
	}
	nic.RX, nic.TX = rx, tx
	return nic, nil
}

func attach(ctx context.Context, stateDir, vmName string, spec NICSpec, mac net.HardwareAddr) (*NIC, error) {
	if spec.Tap != "" {
		return attachTap(vmName, spec, mac)
	}
	// Exclusively: Attach may (re)create the network's bridges, address
	// and NAT rule, and undoes what it made if a later step fails. Two
	// attaches at once would both install the NAT rule, and one's undo could
	// delete a bridge the other had just put its TAP on.
	s, err := openStore(stateDir, true, false)
	if err != nil {
		return nil, err
	}
	defer s.close()
	nw, err := s.load(spec.Network)
	if err != nil {
		return nil, fmt.Errorf("attach NIC %d: %w", spec.Index, err)
	}
	vlans := spec.Trunk
	if spec.VLAN != 0 {
		vlans = []uint16{spec.VLAN}
	}
	for _, v := range vlans {
		if nw.Overlay != nil {
			return nil, fmt.Errorf("attach NIC %d: network %q has an overlay, which carries only its untagged segment; VLAN ports are not supported on it", spec.Index, nw.Name)
		}
		if err := checkIfName(VLANBridgeName(nw.Name, v), fmt.Sprintf("network %s VLAN %d: bridge", nw.Name, v)); err != nil {
			return nil, fmt.Errorf("attach NIC %d: %w; use a shorter network name", spec.Index, err)
		}
	}
	lock, err := s.holdAttach(nw.Name)
	if err != nil {
		return nil, err
	}
	nic := &NIC{MAC: mac, MTU: nw.MTU, attachLock: lock}
	var undo undoList
	fail := func(err error) (*NIC, error) {
		nic.Close()
		undo.run()
		return nil, fmt.Errorf("attach NIC %d to network %q: %w", spec.Index, nw.Name, err)
	}
	if err := ensureNetwork(ctx, nw, &undo); err != nil {
		return fail(err)
	}
	alias := fmt.Sprintf("rayvmm vm=%s nic=%d network=%s", vmName, spec.Index, nw.Name)
	if len(vlans) == 0 {
		tap, err := plugTAP(nextTAPName(), nw.Bridge, nw.MTU, alias)
		if err != nil {
			return fail(err)
		}
		nic.Port, nic.TAPs = tap, []string{tap.Name()}
		return nic, nil
	}
	taps := map[uint16]*TAP{}
	closeTaps := func() {
		for _, t := range taps {
			t.Close()
		}
	}
	for _, v := range vlans {
		if _, err := ensureBridge(VLANBridgeName(nw.Name, v), nw.MTU, &undo); err != nil {
			closeTaps()
			return fail(err)
		}
		tap, err := plugTAP(nextTAPName(), VLANBridgeName(nw.Name, v), nw.MTU, fmt.Sprintf("%s vlan=%d", alias, v))
		if err != nil {
			closeTaps()
			return fail(err)
		}
		taps[v] = tap
		nic.TAPs = append(nic.TAPs, tap.Name())
	}
	if spec.VLAN != 0 {
		nic.Port = taps[spec.VLAN]
	} else {
		nic.Trunk = NewTrunk(taps)
		nic.Port = nic.Trunk
	}
	return nic, nil
}

// plugTAP creates TAP name and puts it, up, on bridge.
func plugTAP(name, bridge string, mtu int, alias string) (*TAP, error) {
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return nil, fmt.Errorf("look up bridge %s: %w", bridge, err)
	}
	tap, err := OpenTAP(name)
	if err != nil {
		return nil, err
	}
	if err := setupTAP(tap.Name(), mtu, alias, br); err != nil {
		tap.Close()
		return nil, err
	}
	return tap, nil
}

// setupTAP sets a TAP's MTU and alias (each when not zero), puts it on
// master (when not nil) and brings it up.
func setupTAP(name string, mtu int, alias string, master netlink.Link) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("look up TAP %s: %w", name, err)
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"set MTU", func() error {
			if mtu == 0 {
				return nil
			}
			return netlink.LinkSetMTU(l, mtu)
		}},
		{"set alias", func() error {
			if alias == "" {
				return nil
			}
			return netlink.LinkSetAlias(l, alias)
		}},
		{"attach to bridge", func() error {
			if master == nil {
				return nil
			}
			return netlink.LinkSetMaster(l, master)
		}},
		{"set up", func() error { return netlink.LinkSetUp(l) }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("TAP %s: %s: %w", name, s.what, err)
		}
	}
	return nil
}

// attachTap opens a named TAP for tap=IFNAME.
func attachTap(vmName string, spec NICSpec, mac net.HardwareAddr) (*NIC, error) {
	tap, err := OpenTAP(spec.Tap)
	if err != nil {
		return nil, fmt.Errorf("attach NIC %d: %w", spec.Index, err)
	}
	l, err := netlink.LinkByName(tap.Name())
	if err == nil {
		alias := "" // leave a TAP someone else made as it was, but up
		if tap.created {
			alias = fmt.Sprintf("rayvmm vm=%s nic=%d", vmName, spec.Index)
		}
		err = setupTAP(tap.Name(), 0, alias, nil)
	}
	if err != nil {
		tap.Close()
		return nil, fmt.Errorf("attach NIC %d: %w", spec.Index, err)
	}
	return &NIC{Port: tap, MAC: mac, MTU: l.Attrs().MTU, TAPs: []string{tap.Name()}}, nil
}

// AttachAll attaches a VM's NICs in order, setting each spec's Index to its
// position. If one fails, the NICs already made are closed again, so a bad
// --net leaves nothing behind.
func AttachAll(ctx context.Context, stateDir, vmName string, specs []NICSpec) ([]*NIC, error) {
	var nics []*NIC
	for i, spec := range specs {
		spec.Index = i
		nic, err := Attach(ctx, stateDir, vmName, spec)
		if err != nil {
			CloseAll(nics)
			return nil, err
		}
		nics = append(nics, nic)
	}
	return nics, nil
}

// CloseAll closes every NIC and returns the errors joined.
func CloseAll(nics []*NIC) error {
	var errs []error
	for _, n := range nics {
		errs = append(errs, n.Close())
	}
	return errors.Join(errs...)
}
