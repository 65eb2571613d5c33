package seccap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Jail confines a VM process as Firecracker's jailer does: a root of its
// own under a jail directory, entered with pivot_root in new mount, pid,
// ipc and uts namespaces, resource limits, then an unprivileged uid and
// gid.
//
// It works in two steps, split by the handoff. The control plane, as
// root, calls PrepareJail (the directory DIR/ID/root and the mount points
// of Binds) and starts the VM process with Cloneflags, so that it begins
// life in the new namespaces (a new pid namespace takes a fork, and
// os.StartProcess's clone is that fork). The VM process, still root,
// builds the VM from the descriptors it was handed and then enters the
// jail in Apply, before every other part of the sandbox: it makes its
// mounts private, bind-mounts its root and the Binds, pivots into the
// root, remounts it read-only, sets its hostname and resource limits and
// becomes UID:GID. The control plane calls Remove once the VM process
// has exited.
//
// Nothing of the VM's needs a path inside: the images, TAPs, /dev/kvm and
// the API socket arrive as open descriptors. What must be reachable by
// path are only the Unix sockets the VM process dials: the vsock
// device's <uds>_<PORT> listeners, whose directory is a Bind at the same
// path (those sockets must be writable by UID for a connect to succeed).
type Jail struct {
	// Root is the VM's root directory, DIR/ID/root.
	Root string `json:"root"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
	// Hostname is set in the new uts namespace (the VM's ID).
	Hostname string `json:"hostname"`
	// Binds are host directories made visible inside at the same path.
	Binds []Bind `json:"binds,omitempty"`
	// NoFile is RLIMIT_NOFILE (default DefaultNoFile); FSize is
	// RLIMIT_FSIZE in bytes, 0 for none (disk images grow).
	NoFile uint64 `json:"nofile,omitempty"`
	FSize  uint64 `json:"fsize,omitempty"`
	// Outside are the control plane's namespaces (/proc/self/ns/NAME
	// links), which the VM process checks it is not in before it touches
	// mounts or the hostname.
	Outside map[string]string `json:"outside"`
}

// jailNamespaces are the namespaces of Cloneflags, as /proc/PID/ns names them.
var jailNamespaces = []string{"mnt", "pid", "ipc", "uts"}

// Bind is a host directory bind-mounted into the jail at the same path.
type Bind struct {
	Path     string `json:"path"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// DefaultNoFile is the jail's RLIMIT_NOFILE, Firecracker's jailer default.
const DefaultNoFile = 2048

// Cloneflags are the namespaces a jailed VM process must start in
// (syscall.SysProcAttr.Cloneflags).
const Cloneflags = unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS

// ErrJail is the category of bad jail requests.
var ErrJail = errors.New("invalid jail")

// validID: 1 to 64 letters, digits, '_', '.' or '-', starting with a
// letter or digit (no regexp: the VM process links this package, and
// compiling one costs every process at start).
func validID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for i, c := range id {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || (c != '_' && c != '.' && c != '-')) {
			return false
		}
	}
	return true
}

// PrepareJail makes the jail root DIR/ID/root, owned by root and
// readable by all, and the mount points of binds inside. It refuses an ID
// that is already jailed there, uid or gid 0, and relative paths, and
// leaves nothing behind when it fails.
func PrepareJail(dir, id string, uid, gid int, binds []Bind) (*Jail, error) {
	switch {
	case !filepath.IsAbs(dir):
		return nil, fmt.Errorf("%w: jail directory %q is not an absolute path", ErrJail, dir)
	case !validID(id):
		return nil, fmt.Errorf("%w: VM id %q: want 1 to 64 letters, digits, '_', '.' or '-', not starting with a punctuation mark", ErrJail, id)
	case uid <= 0 || gid <= 0:
		return nil, fmt.Errorf("%w: --uid %d --gid %d: a jail runs the VM as an unprivileged user and group, not root", ErrJail, uid, gid)
	}
	for _, b := range binds {
		if !filepath.IsAbs(b.Path) || filepath.Clean(b.Path) != b.Path || b.Path == "/" {
			return nil, fmt.Errorf("%w: bind %q: want a clean absolute path other than /", ErrJail, b.Path)
		}
		if st, err := os.Stat(b.Path); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("%w: bind %q: not a directory", ErrJail, b.Path)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("jail directory: %w", err)
	}
	vmDir := filepath.Join(dir, id)
	if err := os.Mkdir(vmDir, 0o755); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("%w: %s exists: is VM %q jailed already (or left behind by a crash)?", ErrJail, vmDir, id)
		}
		return nil, fmt.Errorf("jail: %w", err)
	}
	j := &Jail{Root: filepath.Join(vmDir, "root"), UID: uid, GID: gid, Hostname: id, Binds: binds, NoFile: DefaultNoFile,
		Outside: map[string]string{}}
	for _, ns := range jailNamespaces {
		l, err := os.Readlink("/proc/self/ns/" + ns)
		if err != nil {
			j.Remove()
			return nil, fmt.Errorf("jail: %w", err)
		}
		j.Outside[ns] = l
	}
	if err := j.makeMountPoints(); err != nil {
		j.Remove()
		return nil, err
	}
	return j, nil
}

func (j *Jail) makeMountPoints() error {
	if err := os.Mkdir(j.Root, 0o755); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	for _, b := range j.Binds {
		if err := os.MkdirAll(filepath.Join(j.Root, b.Path), 0o755); err != nil {
			return fmt.Errorf("jail: mount point for %s: %w", b.Path, err)
		}
	}
	return nil
}

// createdDirs lists what PrepareJail made, deepest first.
func (j *Jail) createdDirs() []string {
	var ds []string
	for _, b := range j.Binds {
		for p := b.Path; p != "/"; p = filepath.Dir(p) {
			ds = append(ds, filepath.Join(j.Root, p))
		}
	}
	slices.SortFunc(ds, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	ds = slices.Compact(ds)
	return append(ds, j.Root, filepath.Dir(j.Root))
}

// Remove deletes what PrepareJail made, once the VM process has exited
// (its mounts died with its mount namespace). It removes only empty
// directories it made, so it never reaches into a bind mount.
func (j *Jail) Remove() error {
	var errs []error
	for _, d := range j.createdDirs() {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// enter runs in the VM process, as root, in the namespaces of Cloneflags:
// it pivots into Root and sets the hostname and resource limits. The
// uid and gid change comes later, in dropPrivileges.
func (j *Jail) enter() error {
	if err := j.checkNamespaces(); err != nil {
		return err
	}
	// Mount events must not reach the host's namespace, nor the host's
	// reach here.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	// pivot_root needs the new root to be a mount point.
	if err := unix.Mount(j.Root, j.Root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s: %w", j.Root, err)
	}
	for _, b := range j.Binds {
		target := filepath.Join(j.Root, b.Path)
		if err := unix.Mount(b.Path, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", b.Path, err)
		}
		flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
		if b.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount("", target, "", flags, ""); err != nil {
			return fmt.Errorf("remount %s: %w", b.Path, err)
		}
	}
	// pivot_root(".", ".") stacks the old root on top of the new one;
	// detaching it leaves the new root alone (runc does the same).
	if err := unix.Chdir(j.Root); err != nil {
		return fmt.Errorf("chdir %s: %w", j.Root, err)
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root %s: %w", j.Root, err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("remount / read-only: %w", err)
	}
	if j.Hostname != "" {
		if err := unix.Sethostname([]byte(j.Hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
	}
	nofile := j.NoFile
	if nofile == 0 {
		nofile = DefaultNoFile
	}
	limits := []struct {
		name     string
		resource int
		value    uint64
	}{
		{"RLIMIT_NOFILE", unix.RLIMIT_NOFILE, nofile},
		{"RLIMIT_CORE", unix.RLIMIT_CORE, 0},
	}
	if j.FSize > 0 {
		limits = append(limits, struct {
			name     string
			resource int
			value    uint64
		}{"RLIMIT_FSIZE", unix.RLIMIT_FSIZE, j.FSize})
	}
	for _, l := range limits {
		if err := unix.Setrlimit(l.resource, &unix.Rlimit{Cur: l.value, Max: l.value}); err != nil {
			return fmt.Errorf("setrlimit %s %d: %w", l.name, l.value, err)
		}
	}
	return nil
}

// becomeUser drops to the jail's uid and gid, on every thread (Go's
// syscall package does them with AllThreadsSyscall), with no
// supplementary groups.
func (j *Jail) becomeUser() error {
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(j.GID, j.GID, j.GID); err != nil {
		return fmt.Errorf("setresgid %d: %w", j.GID, err)
	}
	if err := syscall.Setresuid(j.UID, j.UID, j.UID); err != nil {
		return fmt.Errorf("setresuid %d: %w", j.UID, err)
	}
	return nil
}

// checkNamespaces refuses to touch mounts or the hostname unless the
// process is in namespaces other than the control plane's: done in the
// host's, the jail's mount changes would change the host.
func (j *Jail) checkNamespaces() error {
	for _, ns := range jailNamespaces {
		self, err := os.Readlink("/proc/self/ns/" + ns)
		if err != nil {
			return fmt.Errorf("namespaces: %w", err)
		}
		if j.Outside[ns] == "" || self == j.Outside[ns] {
			return fmt.Errorf("the VM process is in the control plane's %s namespace: it must be started with seccap.Cloneflags", ns)
		}
	}
	return nil
}
