// Package spec is the VM spec: one Go type, VM, that says what a microVM
// is — kernel, command line, vCPUs, memory, disks, NICs, vsock, its API
// socket, its sandbox — and its strict JSON form. `rayvmm boot` builds one from a file
// (--config, YAML or JSON) and its flags, the pods daemon embeds one in
// each pod VM, and the VM process (rayvmm-vm) is handed the effective one.
//
// Decoding is strict: an unknown or repeated field, a wrong type or a bad
// value is an error that names its JSON path, such as
// "disks[1].rateLimit.iops: must not be negative" or
// "nets[0].colour: unknown field". YAML is read by the control plane,
// which converts it to JSON and calls the same decoder, so both forms give
// the same errors. The JSON names are camelCase, as in Kubernetes.
//
// Memory is a Size: a string such as "128M" (powers of 1024, as qemu-img
// reads them) or a whole number of bytes; it is always written back in the
// canonical string form ("128M").
//
// The package depends on the standard library only, because the VM
// process links it.
package spec

import (
	"fmt"
	"net"
	"slices"
	"strings"
)

// VM is a microVM's spec. The zero value plus Defaults is a valid VM that
// boots the built-in rayguest with 1 vCPU and 128 MiB.
type VM struct {
	// Name names the VM; generated MACs derive from it. The control plane
	// picks one when it is empty.
	Name string `json:"name,omitempty"`
	// Kernel is an ELF (vmlinux, rayguest) or a bzImage; empty means the
	// built-in rayguest.
	Kernel string `json:"kernel,omitempty"`
	// Initrd is an initial ramdisk for the kernel.
	Initrd string `json:"initrd,omitempty"`
	// Cmdline is the kernel command line; rayvmm appends its device
	// announcements.
	Cmdline string `json:"cmdline,omitempty"`
	// CPUs is the number of vCPUs (default 1).
	CPUs int `json:"cpus,omitempty"`
	// Memory is the guest's RAM (default 128M).
	Memory Size `json:"memory,omitempty"`
	// CPUTemplate is the CPUID template: auto (default), host or emulated.
	CPUTemplate string `json:"cpuTemplate,omitempty"`
	// Disks are virtio-blk devices, in guest order (vda, vdb, ...).
	Disks []Disk `json:"disks,omitempty"`
	// Nets are virtio-net devices, in guest order.
	Nets []NIC `json:"nets,omitempty"`
	// Vsock is a virtio-vsock device with Firecracker's hybrid (Unix
	// socket) host side.
	Vsock *Vsock `json:"vsock,omitempty"`
	// APISocket is where the VM's control API listens (HTTP/1.1 over a
	// Unix socket).
	APISocket string `json:"apiSocket,omitempty"`
	// MetricsFile receives the VM's device metrics (JSON) when it exits.
	MetricsFile string `json:"metricsFile,omitempty"`
	// Sandbox confines the VM process (seccomp, capabilities, landlock,
	// and optionally a jail).
	Sandbox Sandbox `json:"sandbox,omitzero"`
}

// Sandbox is how the VM process is confined (package seccap).
type Sandbox struct {
	// Mode is strict (refused calls kill the VM process), log (they are
	// only logged by the kernel) or off; empty means strict where the
	// kernel has seccomp filters, else off (the control plane decides).
	Mode string `json:"mode,omitempty"`
	// Jail also confines the VM process as Firecracker's jailer does: a
	// root of its own (Dir/NAME/root), new mount, pid, ipc and uts
	// namespaces, resource limits, and an unprivileged uid and gid. It
	// needs mode strict or log, and root.
	Jail *Jail `json:"jail,omitempty"`
}

// Jail is where and as whom a jailed VM process runs.
type Jail struct {
	// Dir holds the jails: the VM's root is Dir/NAME/root.
	Dir string `json:"dir"`
	// UID and GID the VM process runs as (not 0).
	UID int `json:"uid"`
	GID int `json:"gid"`
}

// SandboxModes are the values Sandbox.Mode takes ("" is the default).
var SandboxModes = []string{"strict", "log", "off"}

// Disk is one virtio-blk device.
type Disk struct {
	// ID names the disk in the API (PATCH /drives/{id}); default vda,
	// vdb, ... by position.
	ID string `json:"id,omitempty"`
	// Path is an image file (raw or qcow2) or block device; exactly one
	// of Path and Volume is set.
	Path string `json:"path,omitempty"`
	// Volume is a volume in the state directory.
	Volume string `json:"volume,omitempty"`
	// ReadOnly offers VIRTIO_BLK_F_RO; guest writes fail.
	ReadOnly bool `json:"readOnly,omitempty"`
	// Format is raw or qcow2; empty means detected from the file.
	Format string `json:"format,omitempty"`
	// Serial is the GET_ID string (at most 20 bytes); default derived
	// from the path or volume name.
	Serial string `json:"serial,omitempty"`
	// RateLimit throttles the disk; zero fields are unlimited.
	RateLimit DiskRateLimit `json:"rateLimit,omitzero"`
}

// DiskRateLimit is a disk's token buckets, refilled every second,
// Firecracker-style: the bucket holds one second's worth.
type DiskRateLimit struct {
	// IOPS is requests per second.
	IOPS int64 `json:"iops,omitempty"`
	// Bps is bytes per second.
	Bps int64 `json:"bps,omitempty"`
	// Burst is a one-time extra allowance: requests with IOPS, else bytes.
	Burst int64 `json:"burst,omitempty"`
}

// NIC is one virtio-net device.
type NIC struct {
	// ID names the NIC in the API (PATCH /network-interfaces/{id});
	// default net0, net1, ... by position.
	ID string `json:"id,omitempty"`
	// Network is a rayvmm network to join; exactly one of Network and Tap
	// is set.
	Network string `json:"network,omitempty"`
	// Tap is a TAP interface to use as is, created if it does not exist.
	Tap string `json:"tap,omitempty"`
	// MAC is the guest's address; empty means generated from the VM name.
	MAC string `json:"mac,omitempty"`
	// VLAN is an access VLAN (1..4094) on Network.
	VLAN int `json:"vlan,omitempty"`
	// Trunk lists the VLANs of a trunk port: the guest sees 802.1Q tags.
	Trunk []int `json:"trunk,omitempty"`
	// RateLimit throttles the NIC; zero fields are unlimited.
	RateLimit NICRateLimit `json:"rateLimit,omitzero"`
}

// NICRateLimit is a NIC's token buckets per direction (rx: toward the
// guest, tx: from it), refilled every second, Firecracker-style.
type NICRateLimit struct {
	RxBps int64 `json:"rxBps,omitempty"` // bytes per second
	TxBps int64 `json:"txBps,omitempty"`
	RxPps int64 `json:"rxPps,omitempty"` // packets per second
	TxPps int64 `json:"txPps,omitempty"`
	// One-time bursts on top of the rates, spent first, never refilled.
	RxBurst    int64 `json:"rxBurst,omitempty"` // bytes
	TxBurst    int64 `json:"txBurst,omitempty"`
	RxPpsBurst int64 `json:"rxPpsBurst,omitempty"` // packets
	TxPpsBurst int64 `json:"txPpsBurst,omitempty"`
}

// Vsock is a virtio-vsock device whose host side is a Unix socket, as
// Firecracker's hybrid vsock.
type Vsock struct {
	// CID is the guest's context ID (at least 3).
	CID uint32 `json:"cid"`
	// UDS is the Unix socket host programs connect to ("CONNECT
	// <port>\n"); a guest connection to host port P is connected to the
	// Unix socket UDS_P. The control plane makes it (mode 0600) and
	// removes it when the VM is gone; a relative path is taken from the
	// control plane's working directory.
	UDS string `json:"uds"`
}

// VsockPortSuffixMax is the longest suffix a guest connection adds to
// Vsock.UDS: a connection to host port P goes to the socket UDS_P.
const VsockPortSuffixMax = "_4294967295"

// Defaults.
const (
	DefaultCPUs        = 1
	DefaultMemory      = Size(128 << 20)
	DefaultCPUTemplate = "auto"
)

// CPUTemplates are the values CPUTemplate takes.
var CPUTemplates = []string{"auto", "host", "emulated"}

// Formats are the disk image formats.
var Formats = []string{"raw", "qcow2"}

// DiskID is the default id of the disk at index i: vda, vdb, ..., vdz,
// vdaa, ... as Linux names them.
func DiskID(i int) string {
	var b []byte
	for n := i + 1; n > 0; n = (n - 1) / 26 {
		b = append([]byte{byte('a' + (n-1)%26)}, b...)
	}
	return "vd" + string(b)
}

// NICID is the default id of the NIC at index i: net0, net1, ...
func NICID(i int) string { return fmt.Sprintf("net%d", i) }

// Defaults fills in every default: vCPUs, memory, CPU template, device
// ids, and writes MACs in their canonical form. It is the
// one place defaults are decided; a spec file and the equivalent flags
// give the same result.
func (v *VM) Defaults() {
	if v.CPUs == 0 {
		v.CPUs = DefaultCPUs
	}
	if v.Memory == 0 {
		v.Memory = DefaultMemory
	}
	if v.CPUTemplate == "" {
		v.CPUTemplate = DefaultCPUTemplate
	}
	for i := range v.Disks {
		if v.Disks[i].ID == "" {
			v.Disks[i].ID = DiskID(i)
		}
	}
	for i := range v.Nets {
		n := &v.Nets[i]
		if n.ID == "" {
			n.ID = NICID(i)
		}
		if mac, err := net.ParseMAC(n.MAC); err == nil && n.MAC != "" {
			n.MAC = mac.String()
		}
	}
}

// Validate reports the first problem in v, naming its path. It checks
// what can be checked without the host (the files, networks and volumes
// named are checked when they are opened). Call Defaults first.
func (v *VM) Validate() error {
	if v.Name != "" {
		if err := CheckVMName(v.Name); err != nil {
			return fieldErr("name", "%v", err)
		}
	}
	if v.CPUs < 1 {
		return fieldErr("cpus", "%d: need at least 1", v.CPUs)
	}
	if v.Memory <= 0 {
		return fieldErr("memory", "must be greater than zero")
	}
	if !slices.Contains(CPUTemplates, v.CPUTemplate) {
		return fieldErr("cpuTemplate", "unknown CPU template %q (want %s)", v.CPUTemplate, strings.Join(CPUTemplates, ", "))
	}
	for _, p := range []struct{ path, val string }{
		{"kernel", v.Kernel}, {"initrd", v.Initrd}, {"metricsFile", v.MetricsFile},
	} {
		if strings.ContainsRune(p.val, 0) {
			return fieldErr(p.path, "contains a NUL byte")
		}
	}
	if err := checkSocketPath("apiSocket", v.APISocket); err != nil {
		return err
	}
	ids := map[string]string{}
	for i := range v.Disks {
		p := fmt.Sprintf("disks[%d]", i)
		if err := v.Disks[i].Validate(p); err != nil {
			return err
		}
		if err := uniqueID(ids, v.Disks[i].ID, p); err != nil {
			return err
		}
	}
	for i := range v.Nets {
		p := fmt.Sprintf("nets[%d]", i)
		if err := v.Nets[i].Validate(p); err != nil {
			return err
		}
		if err := uniqueID(ids, v.Nets[i].ID, p); err != nil {
			return err
		}
	}
	if err := v.Sandbox.Validate("sandbox"); err != nil {
		return err
	}
	if v.Vsock != nil {
		if v.Vsock.CID < 3 || v.Vsock.CID == ^uint32(0) {
			return fieldErr("vsock.cid", "%d: want 3 to %d (0-2 are reserved)", v.Vsock.CID, ^uint32(0)-1)
		}
		if v.Vsock.UDS == "" {
			return fieldErr("vsock.uds", "a Unix socket path is required")
		}
		if err := checkSocketPath("vsock.uds", v.Vsock.UDS); err != nil {
			return err
		}
		// Guest connections to host port P go to UDS_P: the longest of
		// those must fit in a socket address too.
		if n := len(v.Vsock.UDS) + len(VsockPortSuffixMax); n > maxSocketPath {
			return fieldErr("vsock.uds", "%q is too long: with %s behind it (the sockets guest connections go to) it is %d bytes, and a Unix socket path holds %d",
				abbreviate(v.Vsock.UDS), VsockPortSuffixMax, n, maxSocketPath)
		}
	}
	return nil
}

// Validate reports the first problem in a sandbox, naming it under path p.
func (sb *Sandbox) Validate(p string) error {
	if sb.Mode != "" && !slices.Contains(SandboxModes, sb.Mode) {
		return fieldErr(p+".mode", "%q: want strict, log or off", sb.Mode)
	}
	j := sb.Jail
	if j == nil {
		return nil
	}
	switch {
	case sb.Mode == "off":
		return fieldErr(p+".jail", "needs mode strict or log (the sandbox enters the jail)")
	case j.Dir == "":
		return fieldErr(p+".jail.dir", "a directory is required")
	case strings.ContainsRune(j.Dir, 0):
		return fieldErr(p+".jail.dir", "contains a NUL byte")
	case !strings.HasPrefix(j.Dir, "/"):
		return fieldErr(p+".jail.dir", "%q is not an absolute path", j.Dir)
	case j.UID < 1 || int64(j.UID) > maxID:
		return fieldErr(p+".jail.uid", "%d: want an unprivileged uid, 1 to %d", j.UID, maxID)
	case j.GID < 1 || int64(j.GID) > maxID:
		return fieldErr(p+".jail.gid", "%d: want an unprivileged gid, 1 to %d", j.GID, maxID)
	}
	return nil
}

// maxID is the largest uid or gid (2^32-2; -1 means "unchanged").
const maxID = 1<<32 - 2

// maxSocketPath is sun_path's size less its NUL.
const maxSocketPath = 107

func checkSocketPath(path, val string) error {
	switch {
	case len(val) > maxSocketPath:
		return fieldErr(path, "%q is %d bytes, longer than a Unix socket path may be (%d)", abbreviate(val), len(val), maxSocketPath)
	case strings.ContainsRune(val, 0):
		return fieldErr(path, "contains a NUL byte")
	}
	return nil
}

func uniqueID(ids map[string]string, id, path string) error {
	if id == "" {
		return fieldErr(path+".id", "empty (Defaults names every device)")
	}
	if other, ok := ids[id]; ok {
		return fieldErr(path+".id", "%q is also the id of %s", id, other)
	}
	ids[id] = path
	return nil
}

// Validate reports the first problem in one disk entry; path names the
// entry in messages (disks[1]). An empty ID is allowed here (Defaults
// fills it); VM.Validate requires one.
func (d *Disk) Validate(path string) error {
	p := path
	if d.ID != "" {
		if err := checkID(d.ID); err != nil {
			return fieldErr(p+".id", "%v", err)
		}
	}
	switch {
	case d.Path == "" && d.Volume == "":
		return fieldErr(p, "needs path or volume")
	case d.Path != "" && d.Volume != "":
		return fieldErr(p, "give path or volume, not both")
	case strings.ContainsRune(d.Path, 0):
		return fieldErr(p+".path", "contains a NUL byte")
	}
	if d.Format != "" && !slices.Contains(Formats, d.Format) {
		return fieldErr(p+".format", "%q: want raw or qcow2", d.Format)
	}
	if len(d.Serial) > 20 {
		return fieldErr(p+".serial", "%q is longer than 20 bytes", d.Serial)
	}
	return d.RateLimit.Validate(p + ".rateLimit")
}

// Validate reports the first bad value, naming it under path p.
func (r DiskRateLimit) Validate(p string) error {
	for _, f := range []struct {
		name string
		v    int64
	}{{"iops", r.IOPS}, {"bps", r.Bps}, {"burst", r.Burst}} {
		if err := nonNegative(p+"."+f.name, f.v); err != nil {
			return err
		}
	}
	if r.Burst > 0 && r.IOPS == 0 && r.Bps == 0 {
		return fieldErr(p+".burst", "needs iops or bps")
	}
	return nil
}

// Validate reports the first problem in one NIC entry; path names the
// entry in messages (nets[0]). An empty ID is allowed here (Defaults fills
// it); VM.Validate requires one.
func (n *NIC) Validate(path string) error {
	p := path
	if n.ID != "" {
		if err := checkID(n.ID); err != nil {
			return fieldErr(p+".id", "%v", err)
		}
	}
	switch {
	case n.Network == "" && n.Tap == "":
		return fieldErr(p, "needs network or tap")
	case n.Network != "" && n.Tap != "":
		return fieldErr(p, "give network or tap, not both")
	case n.VLAN != 0 && len(n.Trunk) != 0:
		return fieldErr(p, "vlan and trunk are exclusive")
	case n.Tap != "" && (n.VLAN != 0 || len(n.Trunk) != 0):
		return fieldErr(p, "vlan and trunk need network")
	}
	if n.Network != "" {
		if err := CheckNetworkName(n.Network); err != nil {
			return fieldErr(p+".network", "%v", err)
		}
	} else if err := CheckIfName(n.Tap, "tap"); err != nil {
		return fieldErr(p+".tap", "%v", err)
	}
	if n.MAC != "" {
		if _, err := ParseMAC(n.MAC); err != nil {
			return fieldErr(p+".mac", "%v", err)
		}
	}
	if n.VLAN != 0 {
		if err := checkVLAN(n.VLAN); err != nil {
			return fieldErr(p+".vlan", "%v", err)
		}
	}
	seen := map[int]bool{}
	for i, id := range n.Trunk {
		q := fmt.Sprintf("%s.trunk[%d]", p, i)
		if err := checkVLAN(id); err != nil {
			return fieldErr(q, "%v", err)
		}
		if seen[id] {
			return fieldErr(q, "VLAN %d listed twice", id)
		}
		seen[id] = true
	}
	return n.RateLimit.Validate(p + ".rateLimit")
}

// Validate reports the first bad value, naming it under path p.
func (r NICRateLimit) Validate(p string) error {
	for _, f := range []struct {
		name string
		v    int64
		rate string // the rate a burst needs
		rv   int64
	}{
		{"rxBps", r.RxBps, "", 0}, {"txBps", r.TxBps, "", 0},
		{"rxPps", r.RxPps, "", 0}, {"txPps", r.TxPps, "", 0},
		{"rxBurst", r.RxBurst, "rxBps", r.RxBps}, {"txBurst", r.TxBurst, "txBps", r.TxBps},
		{"rxPpsBurst", r.RxPpsBurst, "rxPps", r.RxPps}, {"txPpsBurst", r.TxPpsBurst, "txPps", r.TxPps},
	} {
		if err := nonNegative(p+"."+f.name, f.v); err != nil {
			return err
		}
		if f.rate != "" && f.v > 0 && f.rv == 0 {
			return fieldErr(p+"."+f.name, "needs %s", f.rate)
		}
	}
	return nil
}

func checkVLAN(v int) error {
	if v < 1 || v > 4094 {
		return fmt.Errorf("VLAN %d out of range 1..4094", v)
	}
	return nil
}

// ParseMAC parses a unicast, non-zero 6-byte MAC address.
func ParseMAC(v string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(v)
	if err != nil || len(mac) != 6 {
		return nil, fmt.Errorf("%q is not a MAC address like 02:00:00:00:00:01", v)
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("%s is a multicast address; a NIC needs a unicast one", mac)
	}
	if string(mac) == "\x00\x00\x00\x00\x00\x00" {
		return nil, fmt.Errorf("%s is the zero address", mac)
	}
	return mac, nil
}

// Clone returns a deep copy of v.
func (v *VM) Clone() *VM {
	c := *v
	c.Disks = slices.Clone(v.Disks)
	c.Nets = slices.Clone(v.Nets)
	for i := range c.Nets {
		c.Nets[i].Trunk = slices.Clone(v.Nets[i].Trunk)
	}
	if v.Vsock != nil {
		vs := *v.Vsock
		c.Vsock = &vs
	}
	if v.Sandbox.Jail != nil {
		j := *v.Sandbox.Jail
		c.Sandbox.Jail = &j
	}
	return &c
}

// Parse decodes a JSON VM spec strictly (see Decode). It neither applies
// defaults nor validates.
func Parse(data []byte) (*VM, error) {
	var v VM
	if err := Decode(data, &v); err != nil {
		return nil, err
	}
	return &v, nil
}
