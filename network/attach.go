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

	"github.com/rayvmm/rayvmm/network/port"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/state"
)

// NIC is a guest NIC's host side, made by Attach: one TAP, or one TAP per
// VLAN of a trunk, created in the control plane and handed (as
// descriptors) to the VM process, or used in this process through Port.
type NIC struct {
	// MAC is the guest's address (from the spec or generated).
	MAC net.HardwareAddr
	// MTU is the guest's MTU: the network's, or the TAP's for tap=.
	MTU int
	// TAPs are the host interfaces: one, or one per VLAN of a trunk.
	TAPs []*TAP
	// VLANs is set for a trunk: VLANs[i] is the VLAN of TAPs[i], and the
	// guest sees 802.1Q-tagged frames.
	VLANs []uint16

	attachLock *state.Lock
	portOnce   sync.Once
	port       port.Port
	once       sync.Once
	closeErr   error
}

// TAPNames names the host interfaces, in the order of TAPs.
func (n *NIC) TAPNames() []string {
	names := make([]string, len(n.TAPs))
	for i, t := range n.TAPs {
		names[i] = t.Name()
	}
	return names
}

// Port is the NIC's data path in this process: its TAP, or for a trunk a
// multiplexer (port.Trunk) over its TAPs, made on first use. A NIC handed
// to a VM process is not used through Port here.
func (n *NIC) Port() port.Port {
	n.portOnce.Do(func() {
		if n.VLANs == nil {
			n.port = n.TAPs[0]
			return
		}
		taps := map[uint16]*port.TAP{}
		for i, t := range n.TAPs {
			taps[n.VLANs[i]] = t.TAP
		}
		n.port = port.NewTrunk(taps)
	})
	return n.port
}

// CloseTAPs closes this process's descriptors of the NIC's TAPs but keeps
// the hold on the network: for a NIC whose TAPs were handed to a VM
// process, which now keeps them (and so the TAPs themselves) alive. Close
// lets go of the network later.
func (n *NIC) CloseTAPs() error {
	var errs []error
	for _, t := range n.TAPs {
		errs = append(errs, t.Close())
	}
	return errors.Join(errs...)
}

// HoldFile is the descriptor holding the NIC's network (its shared
// attach lock), nil for tap=. A control plane hands it to the VM process
// with the TAPs, so that the network stays held for as long as the VM
// process runs, whichever process dies first.
func (n *NIC) HoldFile() *os.File {
	if n.attachLock == nil {
		return nil
	}
	return n.attachLock.File()
}

// Detach closes this process's descriptors of the NIC's TAPs and of its
// hold on the network without letting go of either: for a NIC whose TAPs
// and hold went to a detached VM process, which keeps them for as long as
// it runs. Unhold removes the hold's file once that process is gone.
func (n *NIC) Detach() error {
	err := n.CloseTAPs()
	n.once.Do(func() {}) // Close must not release what the VM process holds
	return errors.Join(err, n.attachLock.Close())
}

// Unhold removes network name's attach lock file once no VM holds it
// (what a detached VM process leaves, see Detach). It takes the network
// lock, so it never races an attach.
func Unhold(stateDir, name string) error {
	if err := spec.CheckNetworkName(name); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	s, err := openStore(stateDir, true, false)
	if err != nil {
		return err
	}
	defer s.close()
	return state.Sweep(s.attachPath(name))
}

// Close closes this process's descriptors of the NIC's TAPs (a TAP Attach
// created disappears once no process holds it) and lets go of the network.
// It is safe to call more than once.
func (n *NIC) Close() error {
	n.once.Do(func() {
		var errs []error
		n.portOnce.Do(func() {}) // no trunk may start after this
		if tr, ok := n.port.(*port.Trunk); ok {
			errs = append(errs, tr.Close())
		} else {
			for _, t := range n.TAPs {
				errs = append(errs, t.Close())
			}
		}
		errs = append(errs, n.attachLock.Release())
		n.closeErr = errors.Join(errs...)
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

// Attach makes the host side of NIC index of VM vmName in the calling
// thread's network namespace. For network=NAME it makes sure the network's
// bridge exists (recreating it after a reboot), creates one non-persistent
// TAP (one per VLAN for a trunk), puts it on the network's bridge (or the
// access VLAN's bridge, created on first use) and holds the network so
// "net rm" refuses to remove it. For tap=IFNAME it opens that TAP and
// attaches it to nothing. An empty MAC is generated from vmName and index.
// The entry is validated before anything is made; on error nothing is
// left behind. Rate limits are the VM process's business, not Attach's.
func Attach(ctx context.Context, stateDir, vmName string, index int, nic spec.NIC) (*NIC, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := nic.Validate(fmt.Sprintf("nets[%d]", index)); err != nil {
		return nil, fmt.Errorf("attach NIC %d: %w", index, err)
	}
	mac := GenerateMAC(vmName, index)
	if nic.MAC != "" {
		var err error
		if mac, err = spec.ParseMAC(nic.MAC); err != nil {
			return nil, fmt.Errorf("attach NIC %d: %w", index, err)
		}
	}
	if nic.Tap != "" {
		return attachTap(vmName, index, nic, mac)
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
	nw, err := s.load(nic.Network)
	if err != nil {
		return nil, fmt.Errorf("attach NIC %d: %w", index, err)
	}
	var vlans []uint16
	for _, v := range nic.Trunk {
		vlans = append(vlans, uint16(v))
	}
	if nic.VLAN != 0 {
		vlans = []uint16{uint16(nic.VLAN)}
	}
	for _, v := range vlans {
		if nw.Overlay != nil {
			return nil, fmt.Errorf("attach NIC %d: network %q has an overlay, which carries only its untagged segment; VLAN ports are not supported on it", index, nw.Name)
		}
		if err := checkIfName(VLANBridgeName(nw.Name, v), fmt.Sprintf("network %s VLAN %d: bridge", nw.Name, v)); err != nil {
			return nil, fmt.Errorf("attach NIC %d: %w; use a shorter network name", index, err)
		}
	}
	lock, err := s.holdAttach(nw.Name)
	if err != nil {
		return nil, err
	}
	n := &NIC{MAC: mac, MTU: nw.MTU, attachLock: lock}
	var undo undoList
	fail := func(err error) (*NIC, error) {
		n.Close()
		undo.run()
		return nil, fmt.Errorf("attach NIC %d to network %q: %w", index, nw.Name, err)
	}
	if err := ensureNetwork(ctx, nw, &undo); err != nil {
		return fail(err)
	}
	alias := fmt.Sprintf("rayvmm vm=%s nic=%d network=%s", vmName, index, nw.Name)
	if len(vlans) == 0 {
		tap, err := plugTAP(nextTAPName(), nw.Bridge, nw.MTU, alias)
		if err != nil {
			return fail(err)
		}
		n.TAPs = []*TAP{tap}
		return n, nil
	}
	for _, v := range vlans {
		if _, err := ensureBridge(VLANBridgeName(nw.Name, v), nw.MTU, &undo); err != nil {
			return fail(err)
		}
		tap, err := plugTAP(nextTAPName(), VLANBridgeName(nw.Name, v), nw.MTU, fmt.Sprintf("%s vlan=%d", alias, v))
		if err != nil {
			return fail(err)
		}
		n.TAPs = append(n.TAPs, tap)
	}
	if len(nic.Trunk) > 0 {
		n.VLANs = vlans
	}
	return n, nil
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
func attachTap(vmName string, index int, nic spec.NIC, mac net.HardwareAddr) (*NIC, error) {
	tap, err := OpenTAP(nic.Tap)
	if err != nil {
		return nil, fmt.Errorf("attach NIC %d: %w", index, err)
	}
	l, err := netlink.LinkByName(tap.Name())
	if err == nil {
		alias := "" // leave a TAP someone else made as it was, but up
		if tap.created {
			alias = fmt.Sprintf("rayvmm vm=%s nic=%d", vmName, index)
		}
		err = setupTAP(tap.Name(), 0, alias, nil)
	}
	if err != nil {
		tap.Close()
		return nil, fmt.Errorf("attach NIC %d: %w", index, err)
	}
	return &NIC{MAC: mac, MTU: l.Attrs().MTU, TAPs: []*TAP{tap}}, nil
}

// AttachAll attaches a VM's NICs in order. If one fails, the NICs already
// made are closed again, so a bad entry leaves nothing behind.
func AttachAll(ctx context.Context, stateDir, vmName string, nics []spec.NIC) ([]*NIC, error) {
	var out []*NIC
	for i, nic := range nics {
		n, err := Attach(ctx, stateDir, vmName, i, nic)
		if err != nil {
			CloseAll(out)
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

// CloseAll closes every NIC and returns the errors joined.
func CloseAll(nics []*NIC) error {
	var errs []error
	for _, n := range nics {
		errs = append(errs, n.Close())
	}
	return errors.Join(errs...)
}
