package storage

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/rayvmm/rayvmm/ratelimit"
)

// DiskSpec is one --disk argument of rayvmm boot.
type DiskSpec struct {
	Path     string // path=FILE
	Volume   string // volume=NAME
	Format   string // format=raw|qcow2, "" = detect
	ReadOnly bool   // readonly
	Serial   string // serial=ID (GET_ID), default derived from the source
	// Limits holds iops=, bps= and burst= as Firecracker-style token
	// buckets refilled every second.
	Limits ratelimit.Config
}

const diskSpecHelp = "path=FILE or volume=NAME, then optional readonly, format=raw|qcow2, iops=N, bps=N, burst=N, serial=ID"

// ParseDiskSpec parses "path=FILE[,readonly][,format=F][,iops=N][,bps=N][,burst=N]"
// (or volume=NAME instead of path=). iops and bps are per-second rates; a
// bucket holds one second's worth. burst=N is a one-time extra allowance: N
// operations when iops is set, otherwise N bytes of bps.
func ParseDiskSpec(s string) (DiskSpec, error) {
	var d DiskSpec
	var iops, bps, burst uint64
	bad := func(format string, args ...any) (DiskSpec, error) {
		return DiskSpec{}, fmt.Errorf("disk %q: %s", s, fmt.Sprintf(format, args...))
	}
	if strings.TrimSpace(s) == "" {
		return bad("empty spec; want %s", diskSpecHelp)
	}
	seen := map[string]bool{}
	for _, part := range strings.Split(s, ",") {
		key, val, hasVal := strings.Cut(part, "=")
		if seen[key] {
			return bad("option %q given twice", key)
		}
		seen[key] = true
		num := func() (uint64, error) {
			n, err := strconv.ParseUint(val, 10, 64)
			if err != nil || n == 0 {
				return 0, fmt.Errorf("disk %q: %s=%q is not a positive whole number", s, key, val)
			}
			return n, nil
		}
		var err error
		switch key {
		case "path":
			d.Path = val
		case "volume":
			d.Volume = val
		case "format":
			if val != "raw" && val != "qcow2" {
				return bad("format=%q: want raw or qcow2", val)
			}
			d.Format = val
		case "readonly", "ro":
			if hasVal {
				return bad("readonly takes no value")
			}
			d.ReadOnly = true
		case "serial":
			if len(val) > 20 {
				return bad("serial=%q is longer than 20 bytes", val)
			}
			d.Serial = val
		case "iops":
			iops, err = num()
		case "bps":
			bps, err = num()
		case "burst":
			burst, err = num()
		default:
			return bad("unknown option %q; want %s", key, diskSpecHelp)
		}
		if err != nil {
			return DiskSpec{}, err
		}
		if (key == "path" || key == "volume" || key == "serial") && val == "" {
			return bad("%s= needs a value", key)
		}
	}
	switch {
	case d.Path == "" && d.Volume == "":
		return bad("no path= or volume=; want %s", diskSpecHelp)
	case d.Path != "" && d.Volume != "":
		return bad("give path= or volume=, not both")
	case burst > 0 && iops == 0 && bps == 0:
		return bad("burst= needs iops= or bps=")
	}
	if iops > 0 {
		d.Limits.Ops = ratelimit.BucketConfig{Size: iops, RefillTimeMs: 1000, OneTimeBurst: burst}
		burst = 0
	}
	if bps > 0 {
		d.Limits.Bandwidth = ratelimit.BucketConfig{Size: bps, RefillTimeMs: 1000, OneTimeBurst: burst}
	}
	return d, nil
}
