// Package pods is rayvmm's pods of microVMs, shaped like Kubernetes pods:
// the pod spec (strict YAML or JSON, every error naming its field's path),
// its Kubernetes defaults and checks, and the status, event and API types
// the daemon (package pods/daemon, `rayvmm daemon`) serves and the CLI
// (`rayvmm pod ...`, package pods/client) reads.
//
// A pod's vms[] entries are VM specs (package spec) with Kubernetes'
// resources and probes added. The daemon runs each VM as a detached VM
// process (rayvmm-vm) in a cgroup of its own, restarts it by the pod's
// restart policy with Kubernetes' back-off, probes it over vsock or UDP,
// and re-adopts it when the daemon restarts. See README.md.
//
// The package is light on purpose (standard library, spec and the YAML
// reader): the CLI links it, and the CLI links no Prometheus client,
// cgroup library or etcd.
package pods

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rayvmm/rayvmm/spec"
)

// APIVersion and Kind are what a pod document says it is.
const (
	APIVersion = "rayvmm/v1"
	Kind       = "Pod"
)

// Pod is a pod document.
type Pod struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Metadata   Metadata `json:"metadata"`
	Spec       PodSpec  `json:"spec"`
}

// Metadata names a pod and labels it.
type Metadata struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Restart policies, as in Kubernetes.
const (
	RestartAlways    = "Always"
	RestartOnFailure = "OnFailure"
	RestartNever     = "Never"
)

// RestartPolicies are the values RestartPolicy takes.
var RestartPolicies = []string{RestartAlways, RestartOnFailure, RestartNever}

// PodSpec is what the pod runs.
type PodSpec struct {
	// RestartPolicy is Always (the default), OnFailure or Never; it
	// applies to every VM of the pod.
	RestartPolicy string `json:"restartPolicy,omitempty"`
	// TerminationGracePeriodSeconds is how long a VM has to stop cleanly
	// (SIGTERM: the VM process flushes its disks and exits) before it is
	// killed (SIGKILL), on stop, rm and a failed liveness probe. Default
	// 30, as in Kubernetes.
	TerminationGracePeriodSeconds *int64 `json:"terminationGracePeriodSeconds,omitempty"`
	// VMs are the pod's microVMs, each a VM process of its own.
	VMs []VM `json:"vms"`
	// Volumes are the pod's own volumes, cloned from a snapshot when the
	// pod is applied and removed with it (unless retained). A disk names
	// one by its name here.
	Volumes []Volume `json:"volumes,omitempty"`
}

// DefaultGracePeriod is Kubernetes' terminationGracePeriodSeconds.
const DefaultGracePeriod = 30

// GracePeriod is the pod's termination grace period.
func (s *PodSpec) GracePeriod() time.Duration {
	if s.TerminationGracePeriodSeconds == nil {
		return DefaultGracePeriod * time.Second
	}
	return time.Duration(*s.TerminationGracePeriodSeconds) * time.Second
}

// VM is one vms[] entry: a VM spec (inline) with resource limits and
// probes.
type VM struct {
	spec.VM
	// Resources are the limits of the VM process's cgroup.
	Resources Resources `json:"resources,omitzero"`
	// StartupProbe gates the other two: they start once it succeeded.
	StartupProbe *Probe `json:"startupProbe,omitempty"`
	// LivenessProbe failing failureThreshold times in a row restarts the
	// VM (by the restart policy).
	LivenessProbe *Probe `json:"livenessProbe,omitempty"`
	// ReadinessProbe decides whether the VM is Ready; failing clears Ready
	// and restarts nothing.
	ReadinessProbe *Probe `json:"readinessProbe,omitempty"`
}

// Resources are a VM's cgroup limits.
type Resources struct {
	Limits Limits `json:"limits,omitzero"`
}

// Limits are what the VM process may use.
type Limits struct {
	// CPU is a Kubernetes CPU quantity ("500m", "1", "1.5"): the CFS
	// quota, in CPUs.
	CPU CPU `json:"cpu,omitempty"`
	// Memory limits the whole VM process: guest memory plus the VMM's own
	// (at least Overhead more than the guest's memory).
	Memory spec.Size `json:"memory,omitempty"`
	// Pids limits the VM process's threads.
	Pids int64 `json:"pids,omitempty"`
}

// Overhead is the memory a VM process needs beyond its guest's: the Go
// runtime, vCPU threads' stacks, KVM's page tables and device buffers.
// rayvmm-vm measures about 4.5 MiB (tests/bench); the margin covers
// page cache of its disk images and kernel memory the cgroup is charged.
const Overhead = 16 << 20

// MinPids is the fewest threads a VM process can run with: the Go
// runtime's (about 5), the API server and device workers, plus one per
// vCPU (PidsFloor adds the vCPUs).
const MinPids = 12

// PidsFloor is the smallest pids limit a VM with cpus vCPUs runs under.
func PidsFloor(cpus int) int64 { return MinPids + int64(cpus) }

// CPU is a CPU quantity in millicores; it reads Kubernetes' forms ("500m",
// "2", "0.5", or a number) and writes "500m" or "2".
type CPU int64

// String is the canonical form.
func (c CPU) String() string {
	if c%1000 == 0 {
		return strconv.FormatInt(int64(c/1000), 10)
	}
	return strconv.FormatInt(int64(c), 10) + "m"
}

// MarshalJSON writes the canonical form.
func (c CPU) MarshalJSON() ([]byte, error) { return []byte(strconv.Quote(c.String())), nil }

// UnmarshalJSON reads a quantity string or a number of CPUs.
func (c *CPU) UnmarshalJSON(b []byte) error {
	s := string(b)
	if len(b) > 0 && b[0] == '"' {
		var err error
		if s, err = strconv.Unquote(s); err != nil {
			return fmt.Errorf("bad string: %w", err)
		}
	}
	v, err := ParseCPU(s)
	if err != nil {
		return err
	}
	*c = v
	return nil
}

// ParseCPU reads a Kubernetes CPU quantity into millicores: "250m",
// "1", "1.5" (at most three decimals: Kubernetes' precision).
func ParseCPU(s string) (CPU, error) {
	bad := func(why string) (CPU, error) {
		return 0, fmt.Errorf("%q is not a CPU quantity (%s; want e.g. 500m, 1 or 1.5)", s, why)
	}
	if m, ok := strings.CutSuffix(s, "m"); ok {
		n, err := strconv.ParseInt(m, 10, 64)
		if err != nil || m == "" || m[0] == '+' {
			return bad("millicores are a whole number")
		}
		if n <= 0 {
			return bad("must be greater than zero")
		}
		if n > maxCPU {
			return bad("too large")
		}
		return CPU(n), nil
	}
	whole, frac, _ := strings.Cut(s, ".")
	if whole == "" && frac == "" || len(frac) > 3 || strings.ContainsAny(s, "+-eE") {
		if strings.HasPrefix(s, "-") {
			return bad("must be greater than zero")
		}
		return bad("at most three decimals")
	}
	var n int64
	for _, part := range []string{whole, frac + strings.Repeat("0", 3-len(frac))} {
		for _, r := range part {
			if r < '0' || r > '9' {
				return bad("not a number")
			}
			n = n*10 + int64(r-'0')
			if n > maxCPU {
				return bad("too large")
			}
		}
	}
	if n == 0 {
		return bad("must be greater than zero")
	}
	return CPU(n), nil
}

// maxCPU bounds a CPU quantity (1024 CPUs).
const maxCPU = 1024 * 1000

// Probe kinds.
const (
	ProbeStartup   = "startup"
	ProbeLiveness  = "liveness"
	ProbeReadiness = "readiness"
)

// Probe is a Kubernetes probe with rayvmm's two handlers: vsock (send
// "ping", expect "pong" over the VM's hybrid vsock socket) and udp (send a
// payload to the guest, expect it echoed). Zero fields take Kubernetes'
// defaults (Defaults).
type Probe struct {
	Vsock *VsockProbe `json:"vsock,omitempty"`
	UDP   *UDPProbe   `json:"udp,omitempty"`
	// Exec, HTTPGet, TCPSocket and GRPC are Kubernetes' handlers, known
	// here only to be refused with a clear reason.
	Exec      json.RawMessage `json:"exec,omitempty"`
	HTTPGet   json.RawMessage `json:"httpGet,omitempty"`
	TCPSocket json.RawMessage `json:"tcpSocket,omitempty"`
	GRPC      json.RawMessage `json:"grpc,omitempty"`

	InitialDelaySeconds int32 `json:"initialDelaySeconds,omitempty"`
	PeriodSeconds       int32 `json:"periodSeconds,omitempty"`
	TimeoutSeconds      int32 `json:"timeoutSeconds,omitempty"`
	SuccessThreshold    int32 `json:"successThreshold,omitempty"`
	FailureThreshold    int32 `json:"failureThreshold,omitempty"`
}

// Kubernetes' probe defaults.
const (
	DefaultPeriodSeconds    = 10
	DefaultTimeoutSeconds   = 1
	DefaultSuccessThreshold = 1
	DefaultFailureThreshold = 3
)

// VsockProbe connects to a guest port over the VM's vsock device.
type VsockProbe struct {
	Port uint32 `json:"port"`
}

// UDPProbe sends Payload to the guest's Host:Port and expects it back.
type UDPProbe struct {
	Port int `json:"port"`
	// Payload is the datagram (default "ping").
	Payload string `json:"payload,omitempty"`
	// Host is the guest's IPv4 address; default: the first address of
	// rayguest.ip= on the VM's command line.
	Host string `json:"host,omitempty"`
}

// Volume is a pod's own volume, cloned from a snapshot at apply.
type Volume struct {
	Name string `json:"name"`
	// From is the snapshot (a read-only volume) to clone.
	From string `json:"from"`
	// Retain keeps the volume when the pod is removed.
	Retain bool `json:"retain,omitempty"`
}

// VolumeName is the store name of pod volume vol: "<pod>-<vol>".
func VolumeName(pod, vol string) string { return pod + "-" + vol }

// VMName is the name a pod VM's process runs under ("<pod>.<vm>"): MACs
// are generated from it, and it is what GET / on the VM's API says.
func VMName(pod, vm string) string { return pod + "." + vm }

// ErrInvalid is the category of every spec error (a *spec.FieldError
// naming the path).
var ErrInvalid = spec.ErrInvalid

func fieldErr(path, format string, args ...any) error {
	return &spec.FieldError{Path: path, Msg: fmt.Sprintf(format, args...)}
}

// under re-roots a spec.FieldError (or any error) at path.
func under(path string, err error) error {
	var fe *spec.FieldError
	if errors.As(err, &fe) {
		p := path
		if fe.Path != "" {
			p += "." + fe.Path
		}
		return &spec.FieldError{Path: p, Msg: fe.Msg}
	}
	return fieldErr(path, "%v", err)
}

// maxName is a DNS-1123 label's length, Kubernetes' limit for container
// names.
const maxName = 63

// CheckName reports why s cannot name a pod or a pod's VM: a DNS-1123
// label (lower-case letters, digits and '-', starting and ending with a
// letter or digit, at most 63 characters), as Kubernetes names containers.
func CheckName(s string) error {
	ok := len(s) > 0 && len(s) <= maxName && s[0] != '-' && s[len(s)-1] != '-'
	for i := 0; ok && i < len(s); i++ {
		c := s[i]
		ok = c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-'
	}
	if !ok {
		return fmt.Errorf("%q: use 1 to %d lower-case letters, digits and '-', starting and ending with a letter or digit", s, maxName)
	}
	return nil
}

// Defaults fills in Kubernetes' defaults: the restart policy, each VM's
// spec defaults (vCPUs, memory, device ids) and each probe's timings.
func (p *Pod) Defaults() {
	if p.Spec.RestartPolicy == "" {
		p.Spec.RestartPolicy = RestartAlways
	}
	for i := range p.Spec.VMs {
		v := &p.Spec.VMs[i]
		v.VM.Defaults()
		for _, pr := range []*Probe{v.StartupProbe, v.LivenessProbe, v.ReadinessProbe} {
			if pr != nil {
				pr.Defaults()
			}
		}
	}
}

// Defaults fills in Kubernetes' probe defaults for zero fields.
func (p *Probe) Defaults() {
	if p.PeriodSeconds == 0 {
		p.PeriodSeconds = DefaultPeriodSeconds
	}
	if p.TimeoutSeconds == 0 {
		p.TimeoutSeconds = DefaultTimeoutSeconds
	}
	if p.SuccessThreshold == 0 {
		p.SuccessThreshold = DefaultSuccessThreshold
	}
	if p.FailureThreshold == 0 {
		p.FailureThreshold = DefaultFailureThreshold
	}
	if p.UDP != nil && p.UDP.Payload == "" {
		p.UDP.Payload = "ping"
	}
}

// Validate reports the first problem in p, naming its path
// ("spec.vms[1].resources.limits.memory: ..."). Call Defaults first.
// It checks what can be checked without the host; missing networks,
// volumes and snapshots are found when the pod starts.
func (p *Pod) Validate() error {
	switch {
	case p.APIVersion != APIVersion:
		return fieldErr("apiVersion", "%q: want %s", p.APIVersion, APIVersion)
	case p.Kind != Kind:
		return fieldErr("kind", "%q: want %s", p.Kind, Kind)
	}
	if err := CheckName(p.Metadata.Name); err != nil {
		return fieldErr("metadata.name", "%v", err)
	}
	for _, k := range slices.Sorted(maps.Keys(p.Metadata.Labels)) {
		if err := checkLabel(k, p.Metadata.Labels[k]); err != nil {
			return fieldErr("metadata.labels."+k, "%v", err)
		}
	}
	s := &p.Spec
	if !slices.Contains(RestartPolicies, s.RestartPolicy) {
		return fieldErr("spec.restartPolicy", "%q: want %s", s.RestartPolicy, strings.Join(RestartPolicies, ", "))
	}
	if g := s.TerminationGracePeriodSeconds; g != nil && (*g < 0 || *g > 3600) {
		return fieldErr("spec.terminationGracePeriodSeconds", "%d: want 0 to 3600", *g)
	}
	if len(s.VMs) == 0 {
		return fieldErr("spec.vms", "a pod needs at least one VM")
	}
	if len(s.VMs) > MaxVMs {
		return fieldErr("spec.vms", "%d VMs: a pod has at most %d", len(s.VMs), MaxVMs)
	}
	vols := map[string]bool{}
	for i, v := range s.Volumes {
		path := fmt.Sprintf("spec.volumes[%d]", i)
		if err := CheckName(v.Name); err != nil {
			return fieldErr(path+".name", "%v", err)
		}
		if vols[v.Name] {
			return fieldErr(path+".name", "%q is also the name of another volume", v.Name)
		}
		vols[v.Name] = true
		if len(VolumeName(p.Metadata.Name, v.Name)) > maxName {
			return fieldErr(path+".name", "the pod's volume %s would be longer than %d characters: shorten the pod or volume name", VolumeName(p.Metadata.Name, v.Name), maxName)
		}
		if v.From == "" {
			return fieldErr(path+".from", "the snapshot to clone is required")
		}
		if err := spec.CheckVMName(v.From); err != nil { // volume names: the same alphabet
			return fieldErr(path+".from", "%v", err)
		}
	}
	names := map[string]bool{}
	cids := map[uint32]string{}
	for i := range s.VMs {
		path := fmt.Sprintf("spec.vms[%d]", i)
		v := &s.VMs[i]
		if err := v.validate(p.Metadata.Name, path); err != nil {
			return err
		}
		if names[v.Name] {
			return fieldErr(path+".name", "%q is also the name of another VM in the pod", v.Name)
		}
		names[v.Name] = true
		if v.Vsock != nil {
			if other, ok := cids[v.Vsock.CID]; ok {
				return fieldErr(path+".vsock.cid", "%d is also the CID of %s", v.Vsock.CID, other)
			}
			cids[v.Vsock.CID] = path
		}
	}
	return nil
}

// MaxVMs bounds a pod.
const MaxVMs = 64

// checkLabel applies Kubernetes' label rules, loosely: keys and values
// of at most 63 printable characters without spaces.
func checkLabel(k, v string) error {
	for _, s := range []string{k, v} {
		if len(s) > maxName {
			return fmt.Errorf("%q is longer than %d characters", s, maxName)
		}
		for _, c := range s {
			if c <= ' ' || c > '~' {
				return fmt.Errorf("%q: use printable characters without spaces", s)
			}
		}
	}
	if k == "" {
		return errors.New("empty label key")
	}
	return nil
}

// validate checks one VM entry at path.
func (v *VM) validate(pod, path string) error {
	if v.Name == "" {
		return fieldErr(path+".name", "every VM of a pod needs a name")
	}
	if err := CheckName(v.Name); err != nil {
		return fieldErr(path+".name", "%v", err)
	}
	if n := VMName(pod, v.Name); spec.CheckVMName(n) != nil {
		return fieldErr(path+".name", "the VM runs as %q, longer than 64 characters: shorten the pod or VM name", n)
	}
	// The daemon picks these paths.
	switch {
	case v.APISocket != "":
		return fieldErr(path+".apiSocket", "set by the daemon (see pod inspect)")
	case v.MetricsFile != "":
		return fieldErr(path+".metricsFile", "not for pod VMs: the daemon's /metrics serves each VM's counters")
	case v.Vsock != nil && v.Vsock.UDS != "":
		return fieldErr(path+".vsock.uds", "set by the daemon (see pod inspect)")
	}
	// spec.VM.Validate needs a vsock socket path; check the rest with a
	// stand-in the daemon replaces.
	check := *v.VM.Clone()
	if check.Vsock != nil {
		check.Vsock.UDS = "/daemon-picks"
	}
	check.Name = "" // checked above in its pod form
	if err := check.Validate(); err != nil {
		return under(path, err)
	}
	for i, d := range v.Disks {
		if d.Path != "" && !strings.HasPrefix(d.Path, "/") {
			return fieldErr(fmt.Sprintf("%s.disks[%d].path", path, i), "%q: the daemon needs an absolute path", d.Path)
		}
	}
	for _, f := range []struct{ name, val string }{{"kernel", v.Kernel}, {"initrd", v.Initrd}} {
		if f.val != "" && !strings.HasPrefix(f.val, "/") {
			return fieldErr(path+"."+f.name, "%q: the daemon needs an absolute path", f.val)
		}
	}
	if err := v.Resources.validate(path+".resources.limits", &v.VM); err != nil {
		return err
	}
	for _, pr := range []struct {
		kind string
		p    *Probe
	}{{ProbeStartup, v.StartupProbe}, {ProbeLiveness, v.LivenessProbe}, {ProbeReadiness, v.ReadinessProbe}} {
		if pr.p == nil {
			continue
		}
		if err := pr.p.validate(path+"."+pr.kind+"Probe", pr.kind, v); err != nil {
			return err
		}
	}
	return nil
}

func (r *Resources) validate(path string, vm *spec.VM) error {
	l := r.Limits
	if l.Memory < 0 {
		return fieldErr(path+".memory", "must not be negative")
	}
	if l.Memory > 0 {
		need := int64(vm.Memory) + Overhead
		if int64(l.Memory) < need {
			return fieldErr(path+".memory", "%s is less than the VM needs: guest memory %s plus %s for the VMM (at least %s)",
				l.Memory, vm.Memory, spec.Size(Overhead), spec.Size(need))
		}
	}
	if l.Pids < 0 {
		return fieldErr(path+".pids", "must not be negative")
	}
	if l.Pids > 0 && l.Pids < PidsFloor(vm.CPUs) {
		return fieldErr(path+".pids", "%d is fewer threads than a VM process with %d vCPUs runs (at least %d)", l.Pids, vm.CPUs, PidsFloor(vm.CPUs))
	}
	return nil
}

func (p *Probe) validate(path, kind string, vm *VM) error {
	for _, k := range []struct {
		name string
		set  bool
	}{{"exec", p.Exec != nil}, {"httpGet", p.HTTPGet != nil}, {"tcpSocket", p.TCPSocket != nil}, {"grpc", p.GRPC != nil}} {
		if k.set {
			why := "a VM has no process the host could run a command in"
			if k.name != "exec" {
				why = "rayvmm probes guests over vsock or UDP"
			}
			return fieldErr(path+"."+k.name, "%s probes are not supported (%s): use vsock or udp", k.name, why)
		}
	}
	switch {
	case p.Vsock == nil && p.UDP == nil:
		return fieldErr(path, "needs a handler: vsock or udp")
	case p.Vsock != nil && p.UDP != nil:
		return fieldErr(path, "give one handler: vsock or udp, not both")
	}
	if p.Vsock != nil {
		if vm.Vsock == nil {
			return fieldErr(path+".vsock", "the VM has no vsock device (add vsock: {cid: N})")
		}
		if p.Vsock.Port == 0 {
			return fieldErr(path+".vsock.port", "a port is required")
		}
	}
	if u := p.UDP; u != nil {
		if u.Port < 1 || u.Port > 65535 {
			return fieldErr(path+".udp.port", "%d: want 1 to 65535", u.Port)
		}
		if len(u.Payload) > 1024 {
			return fieldErr(path+".udp.payload", "%d bytes: at most 1024", len(u.Payload))
		}
		if len(vm.Nets) == 0 {
			return fieldErr(path+".udp", "the VM has no NIC")
		}
		if u.Host == "" {
			if GuestAddr(vm.Cmdline) == "" {
				return fieldErr(path+".udp.host", "required: no rayguest.ip= on the command line to take the guest's address from")
			}
		} else if !isIPv4(u.Host) {
			return fieldErr(path+".udp.host", "%q is not an IPv4 address", u.Host)
		}
	}
	for _, f := range []struct {
		name string
		v    int32
		min  int32
	}{
		{"initialDelaySeconds", p.InitialDelaySeconds, 0},
		{"periodSeconds", p.PeriodSeconds, 1},
		{"timeoutSeconds", p.TimeoutSeconds, 1},
		{"successThreshold", p.SuccessThreshold, 1},
		{"failureThreshold", p.FailureThreshold, 1},
	} {
		if f.v < f.min {
			return fieldErr(path+"."+f.name, "%d: must be at least %d", f.v, f.min)
		}
		if f.v > 86400 {
			return fieldErr(path+"."+f.name, "%d: at most 86400", f.v)
		}
	}
	if kind != ProbeReadiness && p.SuccessThreshold != 1 {
		return fieldErr(path+".successThreshold", "%d: must be 1 for a %s probe (as in Kubernetes)", p.SuccessThreshold, kind)
	}
	return nil
}

// GuestAddr is the first IPv4 address of rayguest.ip= on a command line,
// without its prefix length, or "".
func GuestAddr(cmdline string) string {
	for _, f := range strings.Fields(cmdline) {
		v, ok := strings.CutPrefix(f, "rayguest.ip=")
		if !ok {
			continue
		}
		first, _, _ := strings.Cut(v, ",")
		addr, _, _ := strings.Cut(first, "/")
		addr, _, _ = strings.Cut(addr, "@")
		if isIPv4(addr) {
			return addr
		}
	}
	return ""
}

func isIPv4(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 4 {
		return false
	}
	for _, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 255 || p == "" || len(p) > 3 {
			return false
		}
	}
	return true
}
