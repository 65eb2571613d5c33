package spec

import (
	"fmt"
	"strconv"
	"strings"
)

// The flag forms of disks, NICs and the vsock device (rayvmm boot --disk,
// --net and --vsock): a comma-separated list of key=value options. They
// parse into the same Disk, NIC and Vsock entries as a spec file; the
// parsers check only the syntax, and VM.Validate checks the values for
// both forms.

// DiskFlagHelp lists the --disk options.
const DiskFlagHelp = "path=FILE or volume=NAME, then optional id=ID, readonly, format=raw|qcow2, iops=N, bps=N, burst=N, serial=ID"

// ParseDisk parses a --disk value:
// path=FILE|volume=NAME[,id=ID][,readonly][,format=F][,iops=N][,bps=N][,burst=N][,serial=S].
// iops and bps are per-second rates (a bucket holds one second's worth);
// burst=N is a one-time extra allowance: N requests when iops is set,
// otherwise N bytes of bps.
func ParseDisk(s string) (Disk, error) {
	var d Disk
	bad := func(format string, args ...any) (Disk, error) {
		return Disk{}, fieldErr("", "--disk %q: %s", s, fmt.Sprintf(format, args...))
	}
	if strings.TrimSpace(s) == "" {
		return bad("empty; want %s", DiskFlagHelp)
	}
	seen := map[string]bool{}
	for _, part := range strings.Split(s, ",") {
		key, val, hasVal := strings.Cut(part, "=")
		if key == "ro" {
			key = "readonly"
		}
		if seen[key] {
			return bad("option %q given twice", key)
		}
		seen[key] = true
		if key != "readonly" && val == "" {
			if _, known := diskKeys[key]; known {
				return bad("%s= needs a value", key)
			}
		}
		var err error
		switch key {
		case "id":
			d.ID = val
		case "path":
			d.Path = val
		case "volume":
			d.Volume = val
		case "format":
			d.Format = val
		case "readonly":
			if hasVal {
				return bad("readonly takes no value")
			}
			d.ReadOnly = true
		case "serial":
			d.Serial = val
		case "iops":
			d.RateLimit.IOPS, err = parseCount(val)
		case "bps":
			d.RateLimit.Bps, err = parseCount(val)
		case "burst":
			d.RateLimit.Burst, err = parseCount(val)
		default:
			return bad("unknown option %q; want %s", key, DiskFlagHelp)
		}
		if err != nil {
			return bad("%s: %v", key, err)
		}
	}
	return d, nil
}

var diskKeys = map[string]bool{"id": true, "path": true, "volume": true, "format": true, "serial": true, "iops": true, "bps": true, "burst": true}

// String renders d in the form ParseDisk reads.
func (d Disk) String() string {
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+v)
		}
	}
	add("path", d.Path)
	add("volume", d.Volume)
	add("id", d.ID)
	if d.ReadOnly {
		parts = append(parts, "readonly")
	}
	add("format", d.Format)
	add("serial", d.Serial)
	for _, n := range []struct {
		k string
		v int64
	}{{"iops", d.RateLimit.IOPS}, {"bps", d.RateLimit.Bps}, {"burst", d.RateLimit.Burst}} {
		if n.v != 0 {
			add(n.k, strconv.FormatInt(n.v, 10))
		}
	}
	return strings.Join(parts, ",")
}

// NICFlagHelp lists the --net options.
const NICFlagHelp = "network=NAME or tap=IFNAME, then optional id=ID, mac=MAC, vlan=N, trunk=N1:N2, rx-bps=N, tx-bps=N, rx-pps=N, tx-pps=N, rx-burst=N, tx-burst=N, rx-pps-burst=N, tx-pps-burst=N"

// ParseNIC parses a --net value: network=NAME or tap=IFNAME, then any of
// id=ID, mac=MAC, vlan=N, trunk=N1:N2:..., rx-bps=, tx-bps=, rx-pps=,
// tx-pps=, rx-burst=, tx-burst=, rx-pps-burst=, tx-pps-burst=. Byte rates
// and bursts take K, M, G (powers of 1000) or Ki, Mi, Gi suffixes.
func ParseNIC(s string) (NIC, error) {
	var n NIC
	bad := func(format string, args ...any) (NIC, error) {
		return NIC{}, fieldErr("", "--net %q: %s", s, fmt.Sprintf(format, args...))
	}
	if strings.TrimSpace(s) == "" {
		return bad("empty; want %s", NICFlagHelp)
	}
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || v == "" {
			return bad("%q is not key=value", kv)
		}
		if seen[k] {
			return bad("%s given twice", k)
		}
		seen[k] = true
		var err error
		rl := &n.RateLimit
		switch k {
		case "id":
			n.ID = v
		case "network":
			n.Network = v
		case "tap":
			n.Tap = v
		case "mac":
			n.MAC = v
		case "vlan":
			// 0 is no VLAN in a spec; given here it is a mistake.
			if n.VLAN, err = strconv.Atoi(v); err == nil && n.VLAN == 0 {
				err = fmt.Errorf("VLAN 0 out of range 1..4094")
			}
		case "trunk":
			for _, f := range strings.Split(v, ":") {
				id, perr := strconv.Atoi(f)
				if perr != nil {
					err = fmt.Errorf("VLAN %q is not a number", f)
					break
				}
				n.Trunk = append(n.Trunk, id)
			}
		case "rx-bps":
			rl.RxBps, err = parseBytes(v)
		case "tx-bps":
			rl.TxBps, err = parseBytes(v)
		case "rx-burst":
			rl.RxBurst, err = parseBytes(v)
		case "tx-burst":
			rl.TxBurst, err = parseBytes(v)
		case "rx-pps":
			rl.RxPps, err = parseCount(v)
		case "tx-pps":
			rl.TxPps, err = parseCount(v)
		case "rx-pps-burst":
			rl.RxPpsBurst, err = parseCount(v)
		case "tx-pps-burst":
			rl.TxPpsBurst, err = parseCount(v)
		default:
			return bad("unknown key %q; want %s", k, NICFlagHelp)
		}
		if err != nil {
			return bad("%s: %v", k, err)
		}
	}
	return n, nil
}

// String renders n in the form ParseNIC reads.
func (n NIC) String() string {
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+v)
		}
	}
	add("network", n.Network)
	add("tap", n.Tap)
	add("id", n.ID)
	add("mac", n.MAC)
	if n.VLAN != 0 {
		add("vlan", strconv.Itoa(n.VLAN))
	}
	if len(n.Trunk) > 0 {
		v := make([]string, len(n.Trunk))
		for i, id := range n.Trunk {
			v[i] = strconv.Itoa(id)
		}
		add("trunk", strings.Join(v, ":"))
	}
	r := n.RateLimit
	for _, l := range []struct {
		k string
		v int64
	}{
		{"rx-bps", r.RxBps}, {"rx-pps", r.RxPps}, {"rx-burst", r.RxBurst}, {"rx-pps-burst", r.RxPpsBurst},
		{"tx-bps", r.TxBps}, {"tx-pps", r.TxPps}, {"tx-burst", r.TxBurst}, {"tx-pps-burst", r.TxPpsBurst},
	} {
		if l.v != 0 {
			add(l.k, strconv.FormatInt(l.v, 10))
		}
	}
	return strings.Join(parts, ",")
}

// VsockFlagHelp is the --vsock form.
const VsockFlagHelp = "cid=N,uds=PATH"

// ParseVsock parses a --vsock value: cid=N,uds=PATH.
func ParseVsock(s string) (Vsock, error) {
	var v Vsock
	bad := func(format string, args ...any) (Vsock, error) {
		return Vsock{}, fieldErr("", "--vsock %q: %s", s, fmt.Sprintf(format, args...))
	}
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		k, val, ok := strings.Cut(kv, "=")
		if !ok || val == "" {
			return bad("%q is not key=value; want %s", kv, VsockFlagHelp)
		}
		if seen[k] {
			return bad("%s given twice", k)
		}
		seen[k] = true
		switch k {
		case "cid":
			n, err := strconv.ParseUint(val, 10, 32)
			if err != nil {
				return bad("cid: %q is not a guest CID (a number from 3 to %d)", val, ^uint32(0)-1)
			}
			v.CID = uint32(n)
		case "uds":
			v.UDS = val
		default:
			return bad("unknown key %q; want %s", k, VsockFlagHelp)
		}
	}
	if !seen["cid"] {
		return bad("cid=N is missing")
	}
	if !seen["uds"] {
		return bad("uds=PATH is missing")
	}
	return v, nil
}

// String renders v in the form ParseVsock reads.
func (v Vsock) String() string {
	return "cid=" + strconv.FormatUint(uint64(v.CID), 10) + ",uds=" + v.UDS
}

// parseCount reads a whole number (a negative one is left to Validate,
// which names the field).
func parseCount(v string) (int64, error) {
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a whole number", v)
	}
	return n, nil
}

var byteSuffixes = []struct {
	s string
	m int64
}{
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30},
	{"K", 1e3}, {"M", 1e6}, {"G", 1e9},
}

// parseBytes reads a byte count with an optional SI or IEC suffix (rates:
// 1M is a million bytes, 1Mi 2^20).
func parseBytes(v string) (int64, error) {
	num, mult := v, int64(1)
	for _, s := range byteSuffixes {
		if strings.HasSuffix(v, s.s) {
			num, mult = strings.TrimSuffix(v, s.s), s.m
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a byte count (like 1000000, 1M or 1Mi)", v)
	}
	if n > 0 && n > (1<<63-1)/mult || n < 0 && n < -(1<<63-1)/mult {
		return 0, fmt.Errorf("%q overflows", v)
	}
	return n * mult, nil
}
