package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"github.com/vishvananda/netlink"
)

// ensureNetwork makes the host side of n exist in the current namespace:
// the bridge (up, MTU), the host address, the NAT rule and the overlay
// device. Pieces that already exist are kept; each piece it creates gets an
// undo step.
func ensureNetwork(ctx context.Context, n *Network, undo *undoList) error {
	br, err := ensureBridge(n.Bridge, n.MTU, undo)
	if err != nil {
		return err
	}
	if n.HostAddr.IsValid() {
		if err := ensureAddr(br, n.HostAddr, undo); err != nil {
			return err
		}
	}
	if n.Overlay != nil {
		if err := ensureVXLAN(n, br, undo); err != nil {
			return err
		}
	}
	if n.NAT {
		if err := ensureNAT(ctx, n, undo); err != nil {
			return err
		}
	}
	return nil
}

// ensureBridge returns the bridge named name, creating it (up, with mtu)
// when it does not exist.
func ensureBridge(name string, mtu int, undo *undoList) (netlink.Link, error) {
	l, err := netlink.LinkByName(name)
	if err == nil {
		if _, ok := l.(*netlink.Bridge); !ok {
			return nil, fmt.Errorf("interface %s exists and is a %s, not a bridge", name, l.Type())
		}
		return l, nil
	}
	if !isNotFound(err) {
		return nil, fmt.Errorf("look up bridge %s: %w", name, err)
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = name, mtu
	br := &netlink.Bridge{LinkAttrs: attrs}
	if err := netlink.LinkAdd(br); err != nil {
		if errors.Is(err, os.ErrExist) { // another rayvmm made it just now
			return ensureBridge(name, mtu, undo)
		}
		return nil, fmt.Errorf("create bridge %s: %w", name, err)
	}
	undo.add(func() { netlink.LinkDel(br) })
	if err := netlink.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("set bridge %s up: %w", name, err)
	}
	return netlink.LinkByName(name)
}

func ensureAddr(l netlink.Link, p netip.Prefix, undo *undoList) error {
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}
	if err := netlink.AddrAdd(l, addr); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil
		}
		return fmt.Errorf("add address %s to %s: %w", p, l.Attrs().Name, err)
	}
	undo.add(func() { netlink.AddrDel(l, addr) })
	return nil
}

func ensureVXLAN(n *Network, br netlink.Link, undo *undoList) error {
	o := n.Overlay
	if l, err := netlink.LinkByName(o.Device); err == nil {
		if _, ok := l.(*netlink.Vxlan); !ok {
			return fmt.Errorf("interface %s exists and is a %s, not a VXLAN device", o.Device, l.Type())
		}
		// A bridge deleted and recreated lost its ports: put the device
		// back on it.
		if l.Attrs().MasterIndex != br.Attrs().Index {
			if err := netlink.LinkSetMaster(l, br); err != nil {
				return fmt.Errorf("attach %s to %s: %w", o.Device, br.Attrs().Name, err)
			}
		}
		if l.Attrs().Flags&net.FlagUp == 0 {
			if err := netlink.LinkSetUp(l); err != nil {
				return fmt.Errorf("set %s up: %w", o.Device, err)
			}
		}
		return nil
	} else if !isNotFound(err) {
		return fmt.Errorf("look up %s: %w", o.Device, err)
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = o.Device, n.MTU
	vx := &netlink.Vxlan{
		LinkAttrs: attrs,
		VxlanId:   int(o.VNI),
		SrcAddr:   o.Local.AsSlice(),
		Group:     o.Remote.AsSlice(),
		Port:      int(o.Port),
		Learning:  true,
	}
	if err := netlink.LinkAdd(vx); err != nil {
		return fmt.Errorf("create VXLAN device %s (VNI %d): %w", o.Device, o.VNI, err)
	}
	undo.add(func() { netlink.LinkDel(vx) })
	if err := netlink.LinkSetMaster(vx, br); err != nil {
		return fmt.Errorf("attach %s to %s: %w", o.Device, br.Attrs().Name, err)
	}
	if err := netlink.LinkSetUp(vx); err != nil {
		return fmt.Errorf("set %s up: %w", o.Device, err)
	}
	return nil
}

// hostState is what the namespace holds of one network.
type hostState struct {
	bridges []BridgeStatus
	vxlan   bool
}

// taps lists the TAPs on the network's bridges.
func (h *hostState) taps() []string {
	var out []string
	for _, b := range h.bridges {
		for _, p := range b.Ports {
			if p.Kind == "tuntap" {
				out = append(out, p.Name)
			}
		}
	}
	return out
}

// inspectHost finds n's bridges (untagged and per VLAN), their ports and
// its overlay device in the current namespace.
func inspectHost(n *Network) (*hostState, error) {
	links, err := linkList()
	if err != nil {
		return nil, err
	}
	h := &hostState{}
	byIndex := map[int]int{} // link index -> position in h.bridges
	for _, l := range links {
		a := l.Attrs()
		if a.Name == VXLANName(n.Name) {
			h.vxlan = true
		}
		if _, ok := l.(*netlink.Bridge); !ok {
			continue
		}
		vlan, isVLAN := vlanOfBridge(n.Name, a.Name)
		if a.Name != n.Bridge && !isVLAN {
			continue
		}
		byIndex[a.Index] = len(h.bridges)
		h.bridges = append(h.bridges, BridgeStatus{Name: a.Name, VLAN: vlan, Up: a.Flags&net.FlagUp != 0, Ports: []PortStatus{}})
	}
	for _, l := range links {
		a := l.Attrs()
		if i, ok := byIndex[a.MasterIndex]; ok && a.MasterIndex != 0 {
			h.bridges[i].Ports = append(h.bridges[i].Ports, PortStatus{Name: a.Name, Kind: l.Type(), Alias: a.Alias})
		}
	}
	sort.Slice(h.bridges, func(i, j int) bool { return h.bridges[i].VLAN < h.bridges[j].VLAN })
	return h, nil
}

// teardown removes what ensureNetwork and Attach made for n.
func teardown(ctx context.Context, n *Network, h *hostState) error {
	var errs []error
	if n.Overlay != nil && h.vxlan {
		errs = append(errs, delLink(n.Overlay.Device))
	}
	for _, b := range h.bridges {
		errs = append(errs, delLink(b.Name))
	}
	if n.NAT {
		errs = append(errs, removeNAT(ctx, n))
	}
	return errors.Join(errs...)
}

func delLink(name string) error {
	l, err := netlink.LinkByName(name)
	if isNotFound(err) {
		return nil
	}
	if err == nil {
		err = netlink.LinkDel(l)
	}
	if err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// checkHostFree refuses a network whose bridge or VXLAN device name is
// taken or whose subnet overlaps a route the namespace already has.
func checkHostFree(n *Network) error {
	names := []string{n.Bridge}
	if n.Overlay != nil {
		names = append(names, n.Overlay.Device)
	}
	for _, name := range names {
		if l, err := netlink.LinkByName(name); err == nil {
			return fmt.Errorf("%w: interface %s already exists (a %s)", ErrExists, name, l.Type())
		} else if !isNotFound(err) {
			return fmt.Errorf("look up %s: %w", name, err)
		}
	}
	if n.Isolated {
		return nil
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		a, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		if !ok || ones == 0 {
			continue
		}
		if p := netip.PrefixFrom(a, ones); p.Overlaps(n.Subnet) {
			dev := ""
			if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
				dev = " on " + l.Attrs().Name
			}
			return fmt.Errorf("%w: %s overlaps the host route %s%s", ErrOverlap, n.Subnet, p, dev)
		}
	}
	return nil
}

// linkList lists the namespace's links, retrying a dump the kernel
// interrupted because links changed meanwhile.
func linkList() ([]netlink.Link, error) {
	var err error
	for range 5 {
		var links []netlink.Link
		if links, err = netlink.LinkList(); err == nil {
			return links, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, fmt.Errorf("list links: %w", err)
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// VLANFilteringSupported reports whether the kernel offers bridge VLAN
// filtering (CONFIG_BRIDGE_VLAN_FILTERING), seen as the vlan_filtering
// attribute of any bridge in sysfs. rayvmm works the same either way: it
// uses one bridge per access VLAN, which needs no 802.1Q in the kernel.
func VLANFilteringSupported() bool {
	m, _ := filepath.Glob("/sys/class/net/*/bridge/vlan_filtering")
	return len(m) > 0
}
