// Package cgroup puts each pod VM's process in a cgroup of its own,
// <parent>/<pod>/<vm> (parent "rayvmm" by default), holding the VM's
// limits: a CPU quantity becomes a CFS quota, a memory limit the memory
// limit, a pids limit the pids limit. It reads the group's CPU time,
// memory use and OOM kills back for the daemon's metrics.
//
// Both cgroup versions are handled through containerd/cgroups/v3, the
// library containerd itself uses: v1 with one directory per controller
// (cpu, cpuacct, memory, pids: what the limits and metrics need, nothing
// else), v2 in the unified hierarchy. Detect picks the host's: v2 when
// /sys/fs/cgroup is a cgroup2 mount, else v1 (a hybrid host, with an
// empty cgroup2 mount beside the v1 controllers, is v1). New takes a root
// directory, so tests run both against a fake cgroupfs.
package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	cgroups "github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Version is a cgroup version.
type Version int

// The two versions.
const (
	V1 Version = 1
	V2 Version = 2
)

// DefaultRoot is where the host mounts cgroups.
const DefaultRoot = "/sys/fs/cgroup"

// DefaultParent is the directory every pod's groups go under.
const DefaultParent = "rayvmm"

// CFSPeriod is the CFS period a CPU quota is a share of (100 ms, the
// kernel's default and what Kubernetes uses).
const CFSPeriod = 100000

// ErrUnwritable is the category of a group that could not be made or
// configured (no cgroup mount, no permission, a read-only hierarchy).
var ErrUnwritable = errors.New("cannot set up the VM's cgroup")

// Limits are a VM's limits; a zero field is no limit.
type Limits struct {
	// MilliCPU is the CPU quota in thousandths of a CPU.
	MilliCPU int64
	// Memory is the memory limit in bytes.
	Memory int64
	// Pids is the most processes and threads.
	Pids int64
}

// Stats is what a group used.
type Stats struct {
	// CPUSeconds is the CPU time of every process in the group.
	CPUSeconds float64
	// MemoryBytes is the memory charged to the group now.
	MemoryBytes uint64
	// OOMKills counts processes the OOM killer ended in the group.
	OOMKills uint64
}

// Manager makes and finds the groups of one parent directory.
type Manager struct {
	version Version
	root    string
	parent  string
}

// New returns a manager of the groups under parent, in the hierarchy of
// version v mounted at root (v1: root holds one directory per
// controller).
func New(v Version, root, parent string) (*Manager, error) {
	if v != V1 && v != V2 {
		return nil, fmt.Errorf("cgroup version %d: want 1 or 2", v)
	}
	if err := checkRel(parent); err != nil {
		return nil, fmt.Errorf("cgroup parent %q: %w", parent, err)
	}
	return &Manager{version: v, root: root, parent: parent}, nil
}

// Detect returns a manager for this host's cgroups (see the package
// comment for the choice).
func Detect(parent string) (*Manager, error) {
	v := V1
	if cgroups.Mode() == cgroups.Unified {
		v = V2
	}
	return New(v, DefaultRoot, parent)
}

// Version is the hierarchy's version.
func (m *Manager) Version() Version { return m.version }

func checkRel(p string) error {
	if p == "" || strings.HasPrefix(p, "/") || filepath.Clean(p) != p || strings.Contains(p, "..") {
		return errors.New("want a relative path without '..'")
	}
	return nil
}

// Path is the group of a pod's VM relative to the hierarchy's root:
// <parent>/<pod>/<vm>.
func (m *Manager) Path(pod, vm string) string { return filepath.Join(m.parent, pod, vm) }

// Dirs are the directories of a group's path (rel, as Path gives it): one
// per controller in v1, one in v2.
func (m *Manager) Dirs(rel string) map[string]string {
	if m.version == V2 {
		return map[string]string{"unified": filepath.Join(m.root, rel)}
	}
	out := map[string]string{}
	for _, c := range v1Controllers {
		out[c] = filepath.Join(m.root, c, rel)
	}
	return out
}

var v1Controllers = []string{string(cgroup1.Cpu), string(cgroup1.Cpuacct), string(cgroup1.Memory), string(cgroup1.Pids)}

// v1Hierarchy is the controllers rayvmm uses, under m.root.
func (m *Manager) v1Hierarchy() ([]cgroup1.Subsystem, error) {
	return []cgroup1.Subsystem{
		cgroup1.NewCpu(m.root),
		cgroup1.NewCpuacct(m.root),
		cgroup1.NewMemory(m.root, cgroup1.OptionalSwap()),
		cgroup1.NewPids(m.root),
	}, nil
}

// Group is one VM's cgroup.
type Group struct {
	m    *Manager
	rel  string
	v1   cgroup1.Cgroup
	v2   *cgroup2.Manager
	path string // for messages
}

// Create makes the group of a pod's VM with limits l (a group left from
// before is reused, its limits rewritten). On error nothing is left.
func (m *Manager) Create(pod, vm string, l Limits) (*Group, error) {
	rel := m.Path(pod, vm)
	g := &Group{m: m, rel: rel, path: rel}
	fail := func(err error) (*Group, error) {
		m.removeDirs(rel)
		return nil, fmt.Errorf("%w %s: %w", ErrUnwritable, rel, err)
	}
	if m.version == V1 {
		c, err := cgroup1.New(cgroup1.StaticPath("/"+rel), v1Resources(l), cgroup1.WithHierarchy(m.v1Hierarchy))
		if err != nil {
			return fail(err)
		}
		g.v1 = c
		return g, nil
	}
	c, err := cgroup2.NewManager(m.root, "/"+rel, v2Resources(l))
	if err != nil {
		return fail(err)
	}
	g.v2 = c
	return g, nil
}

// Load finds the group of a pod's VM (a daemon re-adopting its VM).
func (m *Manager) Load(pod, vm string) (*Group, error) {
	rel := m.Path(pod, vm)
	g := &Group{m: m, rel: rel, path: rel}
	if m.version == V1 {
		c, err := cgroup1.Load(cgroup1.StaticPath("/"+rel), cgroup1.WithHierarchy(m.v1Hierarchy))
		if err != nil {
			return nil, fmt.Errorf("cgroup %s: %w", rel, err)
		}
		g.v1 = c
		return g, nil
	}
	if _, err := os.Stat(filepath.Join(m.root, rel)); err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", rel, err)
	}
	c, err := cgroup2.Load("/"+rel, cgroup2.WithMountpoint(m.root))
	if err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", rel, err)
	}
	g.v2 = c
	return g, nil
}

func v1Resources(l Limits) *specs.LinuxResources {
	r := &specs.LinuxResources{}
	if l.MilliCPU > 0 {
		q, p := l.MilliCPU*CFSPeriod/1000, uint64(CFSPeriod)
		r.CPU = &specs.LinuxCPU{Quota: &q, Period: &p}
	}
	if l.Memory > 0 {
		r.Memory = &specs.LinuxMemory{Limit: &l.Memory}
	}
	if l.Pids > 0 {
		r.Pids = &specs.LinuxPids{Limit: &l.Pids}
	}
	return r
}

func v2Resources(l Limits) *cgroup2.Resources {
	r := &cgroup2.Resources{}
	if l.MilliCPU > 0 {
		q, p := l.MilliCPU*CFSPeriod/1000, uint64(CFSPeriod)
		r.CPU = &cgroup2.CPU{Max: cgroup2.NewCPUMax(&q, &p)}
	}
	if l.Memory > 0 {
		r.Memory = &cgroup2.Memory{Max: &l.Memory}
	}
	if l.Pids > 0 {
		r.Pids = &cgroup2.Pids{Max: l.Pids}
	}
	return r
}

// OpenDir opens a v2 group's directory, for starting a process in it
// (vmproc.Options.CgroupDir); nil for a v1 group, whose processes must be
// moved in (Add).
func (g *Group) OpenDir() (*os.File, error) {
	if g.v2 == nil {
		return nil, nil
	}
	f, err := os.OpenFile(filepath.Join(g.m.root, g.rel), os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrUnwritable, g.path, err)
	}
	return f, nil
}

// Path is the group relative to the hierarchy's root.
func (g *Group) Path() string { return g.rel }

// Add moves process pid into the group.
func (g *Group) Add(pid int) error {
	var err error
	if g.v1 != nil {
		err = g.v1.AddProc(uint64(pid))
	} else {
		err = g.v2.AddProc(uint64(pid))
	}
	if err != nil {
		return fmt.Errorf("%w %s: add pid %d: %w", ErrUnwritable, g.path, pid, err)
	}
	return nil
}

// Stats reads what the group used.
func (g *Group) Stats() (Stats, error) {
	var s Stats
	if g.v1 != nil {
		st, err := g.v1.Stat(cgroup1.IgnoreNotExist)
		if err != nil {
			return s, fmt.Errorf("cgroup %s: stats: %w", g.path, err)
		}
		if st.CPU != nil && st.CPU.Usage != nil {
			s.CPUSeconds = float64(st.CPU.Usage.Total) / 1e9
		}
		if st.Memory != nil && st.Memory.Usage != nil {
			s.MemoryBytes = st.Memory.Usage.Usage
		}
		if st.MemoryOomControl != nil {
			s.OOMKills = st.MemoryOomControl.OomKill
		}
		return s, nil
	}
	st, err := g.v2.Stat()
	if err != nil {
		return s, fmt.Errorf("cgroup %s: stats: %w", g.path, err)
	}
	if st.CPU != nil {
		s.CPUSeconds = float64(st.CPU.UsageUsec) / 1e6
	}
	if st.Memory != nil {
		s.MemoryBytes = st.Memory.Usage
	}
	if st.MemoryEvents != nil {
		s.OOMKills = st.MemoryEvents.OomKill
	}
	return s, nil
}

// OOMKills reads only the group's OOM kill count (memory.oom_control in
// v1, memory.events in v2): cheaper than Stats.
func (g *Group) OOMKills() (uint64, error) {
	file, key := "memory.oom_control", "oom_kill"
	dir := filepath.Join(g.m.root, "memory", g.rel)
	if g.v2 != nil {
		file, dir = "memory.events", filepath.Join(g.m.root, g.rel)
	}
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", g.path, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == key {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, nil // a kernel before 4.13 counts none
}

// Procs lists the processes in the group.
func (g *Group) Procs() ([]int, error) {
	var out []int
	if g.v1 != nil {
		ps, err := g.v1.Processes(cgroup1.Memory, false)
		if err != nil {
			return nil, fmt.Errorf("cgroup %s: %w", g.path, err)
		}
		for _, p := range ps {
			out = append(out, p.Pid)
		}
		return out, nil
	}
	ps, err := g.v2.Procs(false)
	if err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", g.path, err)
	}
	for _, p := range ps {
		out = append(out, int(p))
	}
	return out, nil
}

// Delete removes the group; it fails while a process is in it.
func (g *Group) Delete() error {
	var err error
	if g.v1 != nil {
		err = g.v1.Delete()
	} else {
		err = g.v2.Delete()
	}
	if err != nil {
		return fmt.Errorf("remove cgroup %s: %w", g.path, err)
	}
	return nil
}

// RemovePod removes what is left of a pod's groups: each VM's (which
// must hold no process) and the pod's own directory.
func (m *Manager) RemovePod(pod string) error {
	rel := filepath.Join(m.parent, pod)
	var errs []error
	for _, dir := range m.Dirs(rel) {
		ents, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range ents {
			if e.IsDir() {
				errs = append(errs, rmdir(filepath.Join(dir, e.Name())))
			}
		}
		errs = append(errs, rmdir(dir))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove cgroups of pod %s: %w", pod, err)
	}
	return nil
}

// Exists reports whether any directory of a pod's groups (or, with vm,
// of that VM's group) is left.
func (m *Manager) Exists(pod, vm string) bool {
	rel := filepath.Join(m.parent, pod, vm)
	for _, dir := range m.Dirs(rel) {
		if _, err := os.Stat(dir); err == nil {
			return true
		}
	}
	return false
}

// removeDirs undoes a Create that failed half-way.
func (m *Manager) removeDirs(rel string) {
	for _, dir := range m.Dirs(rel) {
		rmdir(dir)
	}
}

// rmdir removes a group directory: on a cgroup file system rmdir
// removes it with its control files; a fake one (tests) holds plain
// files, removed first.
func rmdir(dir string) error {
	err := os.Remove(dir)
	// A group its last process just left can be busy a moment longer
	// (the kernel lets go of it after the exit): try again, as
	// containerd's remove does, for up to about 300 ms.
	for delay := 10 * time.Millisecond; errors.Is(err, unix.EBUSY) && delay <= 160*time.Millisecond; delay *= 2 {
		time.Sleep(delay)
		err = os.Remove(dir)
	}
	if err == nil || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if !isCgroupFS(dir) {
		return os.RemoveAll(dir)
	}
	return err
}

func isCgroupFS(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return false
	}
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && (st.Type == unix.CGROUP_SUPER_MAGIC || st.Type == unix.CGROUP2_SUPER_MAGIC)
}
