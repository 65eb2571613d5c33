package network

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"

	"github.com/rayvmm/rayvmm/ratelimit"
)

// ErrInvalidSpec is the category of every error ParseNICSpec returns.
var ErrInvalidSpec = errors.New("invalid NIC spec")

// Limits are the token-bucket limits of one direction of a NIC, with
// Firecracker's semantics: a bucket of Bps bytes (Pps packets) refilled
// linearly over one second, plus a one-time burst that is spent first and
// never refills. Zero means unlimited.
type Limits struct {
	Bps        uint64 // bytes per second
	Pps        uint64 // packets per second
	BurstBytes uint64 // one-time burst, bytes
	BurstPkts  uint64 // one-time burst, packets
}

// Unlimited reports whether no limit is set.
func (l Limits) Unlimited() bool { return l.Bps == 0 && l.Pps == 0 }

// RateLimit is l as token buckets refilled over one second: Bps bytes and
// Pps packets, plus the one-time bursts.
func (l Limits) RateLimit() ratelimit.Config {
	var c ratelimit.Config
	if l.Bps != 0 {
		c.Bandwidth = ratelimit.BucketConfig{Size: l.Bps, OneTimeBurst: l.BurstBytes, RefillTimeMs: 1000}
	}
	if l.Pps != 0 {
		c.Ops = ratelimit.BucketConfig{Size: l.Pps, OneTimeBurst: l.BurstPkts, RefillTimeMs: 1000}
	}
	return c
}

// Limiter builds the limiter for l; nil when l is unlimited.
func (l Limits) Limiter() (*ratelimit.Limiter, error) {
	lim, err := ratelimit.New(l.RateLimit())
	if err != nil {
		return nil, fmt.Errorf("rate limit: %w", err)
	}
	return lim, nil
}

// NICSpec is one guest NIC as given to "rayvmm boot --net".
type NICSpec struct {
	// Network is the rayvmm network to join (network=NAME); exactly one
	// of Network and Tap is set.
	Network string
	// Tap is a TAP interface to use as is (tap=IFNAME), created if it does
	// not exist; rayvmm attaches it to nothing.
	Tap string
	// MAC is the guest's MAC address; nil means generated from the VM name
	// and Index.
	MAC net.HardwareAddr
	// VLAN is the access VLAN (1..4094), 0 for the untagged segment.
	VLAN uint16
	// Trunk lists the VLANs of a trunk port, sorted; the guest sees
	// 802.1Q-tagged frames.
	Trunk []uint16
	// RX limits frames toward the guest, TX frames from the guest.
	RX, TX Limits
	// Index is the NIC's position among the VM's NICs. The caller sets it;
	// it selects the generated MAC.
	Index int
}

// String renders the spec in the form ParseNICSpec reads.
func (s NICSpec) String() string {
	var parts []string
	if s.Network != "" {
		parts = append(parts, "network="+s.Network)
	} else {
		parts = append(parts, "tap="+s.Tap)
	}
	if s.MAC != nil {
		parts = append(parts, "mac="+s.MAC.String())
	}
	if s.VLAN != 0 {
		parts = append(parts, fmt.Sprintf("vlan=%d", s.VLAN))
	}
	if len(s.Trunk) > 0 {
		v := make([]string, len(s.Trunk))
		for i, id := range s.Trunk {
			v[i] = strconv.Itoa(int(id))
		}
		parts = append(parts, "trunk="+strings.Join(v, ":"))
	}
	for _, l := range []struct {
		key string
		v   uint64
	}{
		{"rx-bps", s.RX.Bps}, {"rx-pps", s.RX.Pps}, {"rx-burst", s.RX.BurstBytes}, {"rx-pps-burst", s.RX.BurstPkts},
		{"tx-bps", s.TX.Bps}, {"tx-pps", s.TX.Pps}, {"tx-burst", s.TX.BurstBytes}, {"tx-pps-burst", s.TX.BurstPkts},
	} {
		if l.v != 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", l.key, l.v))
		}
	}
	return strings.Join(parts, ",")
}

// ParseNICSpec parses a --net value: network=NAME or tap=IFNAME, then any
// of mac=MAC, vlan=N, trunk=N1:N2:..., rx-bps=, tx-bps=, rx-pps=, tx-pps=,
// rx-burst=, tx-burst=, rx-pps-burst=, tx-pps-burst=. Byte rates and bursts
// take K, M, G (powers of 1000) or Ki, Mi, Gi suffixes.
func ParseNICSpec(s string) (NICSpec, error) {
	var spec NICSpec
	if strings.TrimSpace(s) == "" {
		return spec, fmt.Errorf("%w: empty (want network=NAME or tap=IFNAME)", ErrInvalidSpec)
	}
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || v == "" {
			return spec, fmt.Errorf("%w: %q is not key=value", ErrInvalidSpec, kv)
		}
		if seen[k] {
			return spec, fmt.Errorf("%w: %s given twice", ErrInvalidSpec, k)
		}
		seen[k] = true
		var err error
		switch k {
		case "network":
			err = ValidateName(v)
			spec.Network = v
		case "tap":
			err = checkIfName(v, "tap")
			spec.Tap = v
		case "mac":
			spec.MAC, err = parseMAC(v)
		case "vlan":
			spec.VLAN, err = parseVLAN(v)
		case "trunk":
			spec.Trunk, err = parseTrunk(v)
		case "rx-bps":
			spec.RX.Bps, err = parseSize(v)
		case "tx-bps":
			spec.TX.Bps, err = parseSize(v)
		case "rx-burst":
			spec.RX.BurstBytes, err = parseSize(v)
		case "tx-burst":
			spec.TX.BurstBytes, err = parseSize(v)
		case "rx-pps":
			spec.RX.Pps, err = parseCount(v)
		case "tx-pps":
			spec.TX.Pps, err = parseCount(v)
		case "rx-pps-burst":
			spec.RX.BurstPkts, err = parseCount(v)
		case "tx-pps-burst":
			spec.TX.BurstPkts, err = parseCount(v)
		default:
			return spec, fmt.Errorf("%w: unknown key %q", ErrInvalidSpec, k)
		}
		if err != nil {
			return spec, fmt.Errorf("%w: %s: %w", ErrInvalidSpec, k, err)
		}
	}
	return spec, spec.validate()
}

// validate checks what ParseNICSpec guarantees, for specs built in code
// too: Attach refuses an invalid spec before it makes anything (a VLAN
// outside 1..4094 would get a bridge "net rm" does not know is the
// network's).
func (s NICSpec) validate() error {
	switch {
	case s.Network == "" && s.Tap == "":
		return fmt.Errorf("%w: need network=NAME or tap=IFNAME", ErrInvalidSpec)
	case s.Network != "" && s.Tap != "":
		return fmt.Errorf("%w: network= and tap= are exclusive", ErrInvalidSpec)
	case s.VLAN != 0 && len(s.Trunk) != 0:
		return fmt.Errorf("%w: vlan= and trunk= are exclusive", ErrInvalidSpec)
	case s.Tap != "" && (s.VLAN != 0 || len(s.Trunk) != 0):
		return fmt.Errorf("%w: vlan= and trunk= need network=", ErrInvalidSpec)
	}
	var err error
	switch {
	case s.Network != "":
		err = ValidateName(s.Network)
	default:
		err = checkIfName(s.Tap, "tap")
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidSpec, err)
	}
	vlans := s.Trunk
	if s.VLAN != 0 {
		vlans = []uint16{s.VLAN}
	}
	seen := map[uint16]bool{}
	for _, v := range vlans {
		switch {
		case v < 1 || v > 4094:
			return fmt.Errorf("%w: VLAN %d out of range 1..4094", ErrInvalidSpec, v)
		case seen[v]:
			return fmt.Errorf("%w: trunk: VLAN %d listed twice", ErrInvalidSpec, v)
		}
		seen[v] = true
	}
	if s.MAC != nil {
		if _, err := parseMAC(s.MAC.String()); err != nil {
			return fmt.Errorf("%w: mac: %w", ErrInvalidSpec, err)
		}
	}
	for _, l := range []Limits{s.RX, s.TX} {
		if (l.BurstBytes != 0 && l.Bps == 0) || (l.BurstPkts != 0 && l.Pps == 0) {
			return fmt.Errorf("%w: a burst needs its rate (rx-burst needs rx-bps, rx-pps-burst needs rx-pps)", ErrInvalidSpec)
		}
		if _, err := l.Limiter(); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidSpec, err)
		}
	}
	return nil
}

func parseMAC(v string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(v)
	if err != nil || len(mac) != 6 {
		return nil, fmt.Errorf("%q is not a MAC address like 02:00:00:00:00:01", v)
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("%s is a multicast address; a NIC needs a unicast one", mac)
	}
	if isZero(mac) {
		return nil, fmt.Errorf("%s is the zero address", mac)
	}
	return mac, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func parseVLAN(v string) (uint16, error) {
	n, err := strconv.ParseUint(v, 10, 16)
	if err != nil || n < 1 || n > 4094 {
		return 0, fmt.Errorf("VLAN %q out of range 1..4094", v)
	}
	return uint16(n), nil
}

func parseTrunk(v string) ([]uint16, error) {
	var ids []uint16
	seen := map[uint16]bool{}
	for _, f := range strings.Split(v, ":") {
		id, err := parseVLAN(f)
		if err != nil {
			return nil, err
		}
		if seen[id] {
			return nil, fmt.Errorf("VLAN %d listed twice", id)
		}
		seen[id] = true
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids, nil
}

func parseCount(v string) (uint64, error) {
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a positive whole number", v)
	}
	return n, nil
}

var sizeSuffixes = []struct {
	s string
	m uint64
}{
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30},
	{"K", 1e3}, {"M", 1e6}, {"G", 1e9},
}

// parseSize reads a positive byte count with an optional SI or IEC suffix.
func parseSize(v string) (uint64, error) {
	num, mult := v, uint64(1)
	for _, s := range sizeSuffixes {
		if strings.HasSuffix(v, s.s) {
			num, mult = strings.TrimSuffix(v, s.s), s.m
			break
		}
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a positive byte count (like 1000000, 1M or 1Mi)", v)
	}
	if n > ^uint64(0)/mult {
		return 0, fmt.Errorf("%q overflows", v)
	}
	return n * mult, nil
}

// GenerateMAC derives a locally administered unicast MAC from the VM name
// and the NIC's index, so the same VM gets the same MACs on every boot.
func GenerateMAC(vmName string, index int) net.HardwareAddr {
	sum := sha256.Sum256([]byte(fmt.Sprintf("rayvmm-nic\x00%s\x00%d", vmName, index)))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^1 | 2
	return mac
}
