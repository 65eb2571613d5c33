// Package network is rayvmm's host side of guest networking: networks
// (Linux bridges made with netlink, an optional host address, nftables
// masquerade and a VXLAN overlay) recorded in the state directory, VLANs
// without kernel 802.1Q (one bridge per access VLAN, and a trunk Port that
// tags and untags 802.1Q frames between a guest and one TAP per VLAN), and
// guest NICs: Attach creates the TAP(s) with songgao/water, puts them on the
// right bridge and returns a Port that reads and writes whole Ethernet
// frames. TAPs are not persistent, so they vanish with the process that
// opened them, also after SIGKILL.
//
// The package never imports devices: the virtio-net device sees a Port only
// as an io.ReadWriter of frames.
package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/rayvmm/rayvmm/state"
)

// Error categories; every error from this package wraps one of these or
// names the failed operation.
var (
	ErrNotFound = errors.New("no such network")
	ErrExists   = errors.New("network already exists")
	ErrInUse    = errors.New("network in use")
	ErrOverlap  = errors.New("subnet overlaps")
	ErrInvalid  = errors.New("invalid network options")
)

// DefaultMTU is the MTU of a network without overlay; an overlay network
// defaults to DefaultMTU minus the VXLAN encapsulation (50 bytes).
const (
	DefaultMTU    = 1500
	vxlanOverhead = 50
	vxlanPort     = 4789
)

// Network is the record of one network in the state store.
type Network struct {
	Name   string       `json:"name"`
	Subnet netip.Prefix `json:"subnet"`
	Bridge string       `json:"bridge"`
	// HostAddr is the address the host holds on the bridge (the subnet's
	// first address, with the subnet's prefix length); invalid when the
	// network is isolated.
	HostAddr netip.Prefix `json:"host_addr,omitzero"`
	Isolated bool         `json:"isolated,omitempty"`
	NAT      bool         `json:"nat,omitempty"`
	MTU      int          `json:"mtu"`
	Overlay  *Overlay     `json:"overlay,omitempty"`
	Created  time.Time    `json:"created"`
}

// Overlay is a VXLAN tunnel that extends the network's untagged segment to
// another host.
type Overlay struct {
	VNI    uint32     `json:"vni"`
	Remote netip.Addr `json:"remote"`
	Local  netip.Addr `json:"local"`
	Port   uint16     `json:"port"`
	Device string     `json:"device"`
}

// String renders the overlay in the form ParseOverlay reads.
func (o *Overlay) String() string {
	s := fmt.Sprintf("vxlan:%d,remote=%s,local=%s", o.VNI, o.Remote, o.Local)
	if o.Port != vxlanPort {
		s += fmt.Sprintf(",port=%d", o.Port)
	}
	return s
}

// CreateOptions are the arguments of "rayvmm net create".
type CreateOptions struct {
	Name     string
	Subnet   string // CIDR, e.g. 192.0.2.0/24
	Isolated bool   // the host takes no address on the bridge
	NAT      bool   // masquerade the subnet's traffic leaving the host
	Overlay  string // vxlan:ID,remote=IP,local=IP[,port=N]
	MTU      int    // 0: DefaultMTU, less the VXLAN overhead with an overlay
}

// ParseOverlay parses vxlan:ID,remote=IP,local=IP[,port=N].
func ParseOverlay(s string) (*Overlay, error) {
	rest, ok := strings.CutPrefix(s, "vxlan:")
	if !ok {
		return nil, fmt.Errorf("%w: overlay %q: want vxlan:ID,remote=IP,local=IP", ErrInvalid, s)
	}
	fields := strings.Split(rest, ",")
	id, err := strconv.ParseUint(fields[0], 10, 32)
	if err != nil || id == 0 || id >= 1<<24 {
		return nil, fmt.Errorf("%w: overlay %q: VXLAN ID %q out of range 1..16777215", ErrInvalid, s, fields[0])
	}
	o := &Overlay{VNI: uint32(id), Port: vxlanPort}
	seen := map[string]bool{}
	for _, f := range fields[1:] {
		k, v, _ := strings.Cut(f, "=")
		if seen[k] {
			return nil, fmt.Errorf("%w: overlay %q: %s given twice", ErrInvalid, s, k)
		}
		seen[k] = true
		switch k {
		case "remote", "local":
			a, err := netip.ParseAddr(v)
			if err != nil || !a.Is4() || a.IsUnspecified() || a.IsMulticast() {
				return nil, fmt.Errorf("%w: overlay %q: %s=%q is not a unicast IPv4 address", ErrInvalid, s, k, v)
			}
			if k == "remote" {
				o.Remote = a
			} else {
				o.Local = a
			}
		case "port":
			p, err := strconv.ParseUint(v, 10, 16)
			if err != nil || p == 0 {
				return nil, fmt.Errorf("%w: overlay %q: port %q out of range 1..65535", ErrInvalid, s, v)
			}
			o.Port = uint16(p)
		default:
			return nil, fmt.Errorf("%w: overlay %q: unknown key %q (want remote=, local=, port=)", ErrInvalid, s, k)
		}
	}
	if !o.Remote.IsValid() || !o.Local.IsValid() {
		return nil, fmt.Errorf("%w: overlay %q: remote= and local= are required", ErrInvalid, s)
	}
	if o.Remote == o.Local {
		return nil, fmt.Errorf("%w: overlay %q: remote and local are the same address", ErrInvalid, s)
	}
	return o, nil
}

// newNetwork validates options and builds the record, touching nothing.
func newNetwork(o CreateOptions) (*Network, error) {
	if err := ValidateName(o.Name); err != nil {
		return nil, err
	}
	p, err := netip.ParsePrefix(o.Subnet)
	if err != nil || !p.Addr().Is4() {
		return nil, fmt.Errorf("%w: subnet %q is not an IPv4 CIDR like 192.0.2.0/24", ErrInvalid, o.Subnet)
	}
	if p != p.Masked() {
		return nil, fmt.Errorf("%w: subnet %s has host bits set; did you mean %s?", ErrInvalid, p, p.Masked())
	}
	if p.Bits() < 8 || p.Bits() > 30 {
		return nil, fmt.Errorf("%w: subnet %s: prefix length must be 8..30", ErrInvalid, p)
	}
	n := &Network{Name: o.Name, Subnet: p, Bridge: BridgeName(o.Name), Isolated: o.Isolated, NAT: o.NAT, MTU: o.MTU, Created: time.Now().UTC().Truncate(time.Second)}
	if o.NAT && o.Isolated {
		return nil, fmt.Errorf("%w: --nat needs the host on the network; drop --isolated", ErrInvalid)
	}
	if !o.Isolated {
		n.HostAddr = netip.PrefixFrom(p.Addr().Next(), p.Bits())
	}
	if o.Overlay != "" {
		if n.Overlay, err = ParseOverlay(o.Overlay); err != nil {
			return nil, err
		}
		n.Overlay.Device = VXLANName(o.Name)
		if err := checkIfName(n.Overlay.Device, "network "+o.Name+": VXLAN device"); err != nil {
			return nil, err
		}
	}
	if n.MTU == 0 {
		n.MTU = DefaultMTU
		if n.Overlay != nil {
			n.MTU -= vxlanOverhead
		}
	}
	if n.MTU < 576 || n.MTU > 9000 {
		return nil, fmt.Errorf("%w: MTU %d out of range 576..9000", ErrInvalid, n.MTU)
	}
	return n, nil
}

// Create validates the options, creates the network's bridge, host
// address, NAT rule and overlay in the current network namespace, and
// records it. On any error everything it made is removed again.
func Create(ctx context.Context, stateDir string, o CreateOptions) (*Network, error) {
	n, err := newNetwork(o)
	if err != nil {
		return nil, err
	}
	s, err := openStore(stateDir, true, true)
	if err != nil {
		return nil, err
	}
	defer s.close()
	if _, err := s.load(n.Name); err == nil {
		return nil, fmt.Errorf("create network %q: %w", n.Name, ErrExists)
	} else if !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	others, err := s.all()
	if err != nil {
		return nil, err
	}
	for _, m := range others {
		if m.Subnet.Overlaps(n.Subnet) {
			return nil, fmt.Errorf("create network %q: %w: %s overlaps %s of network %q", n.Name, ErrOverlap, n.Subnet, m.Subnet, m.Name)
		}
	}
	if err := checkHostFree(n); err != nil {
		return nil, fmt.Errorf("create network %q: %w", n.Name, err)
	}
	// The record goes first: a process killed from here on leaves a
	// network that "net rm" removes (or "boot" completes), never a bridge
	// or NAT table that no record names.
	if err := s.save(n); err != nil {
		return nil, err
	}
	var undo undoList
	fail := func(err error) (*Network, error) {
		undo.run()
		s.remove(n.Name)
		return nil, fmt.Errorf("create network %q: %w", n.Name, err)
	}
	if err := ensureNetwork(ctx, n, &undo); err != nil {
		return fail(err)
	}
	return n, nil
}

// Remove deletes a network: its bridges (also the per-VLAN ones), overlay
// device, NAT rule and record. It is refused while a running VM is attached
// or any TAP is still a port of one of its bridges.
func Remove(ctx context.Context, stateDir, name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	s, err := openStore(stateDir, true, false)
	if err != nil {
		return err
	}
	defer s.close()
	n, err := s.load(name)
	if err != nil {
		return fmt.Errorf("remove network: %w", err)
	}
	// Held to the end: no VM can attach while the network goes, and the
	// release removes the lock file with the network.
	claim, err := s.claim(name)
	if err != nil {
		return err
	}
	defer claim.Release()
	h, err := inspectHost(n)
	if err != nil {
		return fmt.Errorf("remove network %q: %w", name, err)
	}
	if taps := h.taps(); len(taps) > 0 {
		return fmt.Errorf("remove network %q: %w: TAP %s is still on its bridge", name, ErrInUse, strings.Join(taps, ", "))
	}
	if err := teardown(ctx, n, h); err != nil {
		return fmt.Errorf("remove network %q: %w", name, err)
	}
	return s.remove(name)
}

// List returns every recorded network, sorted by name.
func List(stateDir string) ([]*Network, error) {
	st, err := state.Open(stateDir)
	if err != nil {
		return nil, err
	}
	// One read of the store: no network lock is needed.
	return (&store{st: st}).all()
}

// Status is a network's record beside what the host really has.
type Status struct {
	*Network
	// Attached is true while a running VM holds the network.
	Attached bool `json:"attached"`
	// Bridges are the network's bridges present in this namespace (the
	// untagged one first, then one per access VLAN in use).
	Bridges []BridgeStatus `json:"bridges"`
	// NATRule is true when the masquerade rule is installed.
	NATRule bool `json:"nat_rule"`
	// VLANMode says how VLANs are done on this host.
	VLANMode string `json:"vlan_mode"`
}

// BridgeStatus is one bridge of a network.
type BridgeStatus struct {
	Name  string       `json:"name"`
	VLAN  uint16       `json:"vlan,omitempty"`
	Up    bool         `json:"up"`
	Ports []PortStatus `json:"ports"`
}

// PortStatus is one interface on a bridge.
type PortStatus struct {
	Name  string `json:"name"`
	Kind  string `json:"kind"`
	Alias string `json:"alias,omitempty"`
}

// Inspect returns a network's record and its live state.
func Inspect(stateDir, name string) (*Status, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	// Shared: the attach test takes nothing, so inspections run together,
	// but not while a create, remove or attach changes the host.
	s, err := openStore(stateDir, false, false)
	if err != nil {
		return nil, err
	}
	defer s.close()
	n, err := s.load(name)
	if err != nil {
		return nil, fmt.Errorf("inspect network: %w", err)
	}
	st := &Status{Network: n, VLANMode: "bridge per VLAN (kernel has no bridge VLAN filtering)"}
	if VLANFilteringSupported() {
		st.VLANMode = "bridge per VLAN (kernel has bridge VLAN filtering; not used)"
	}
	st.Attached = s.attached(name)
	h, err := inspectHost(n)
	if err != nil {
		return nil, fmt.Errorf("inspect network %q: %w", name, err)
	}
	st.Bridges = h.bridges
	if n.NAT {
		if st.NATRule, err = natPresent(n); err != nil {
			return nil, fmt.Errorf("inspect network %q: %w", name, err)
		}
	}
	return st, nil
}

// undoList collects the steps that reverse what an operation made so far.
type undoList []func()

func (u *undoList) add(f func()) { *u = append(*u, f) }

// run undoes in reverse order.
func (u *undoList) run() {
	for i := len(*u) - 1; i >= 0; i-- {
		(*u)[i]()
	}
	*u = nil
}
