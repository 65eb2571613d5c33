package network

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// The state of networks lives in <state-dir>/networks: one JSON file per
// network (NAME.json), written atomically (temp file, fsync, rename, fsync
// of the directory). Every command takes a flock on networks/.lock: shared
// to list, exclusive to create, remove, attach (which may recreate the
// network's pieces) or inspect (whose attach tests would otherwise see each
// other as VMs), so concurrent rayvmm processes never see or write half a
// record. A VM attached to network NAME holds a shared flock on
// networks/NAME.attach for as long as it runs; the kernel drops it when the
// process dies, also on SIGKILL, so "attached" is derived from live
// processes, never from a record a crashed VMM left.

const (
	storeDirName = "networks"
	lockName     = ".lock"
)

// store is the networks directory with its directory lock held.
type store struct {
	dir  string
	lock *os.File
}

// openStore locks <stateDir>/networks, exclusively when write is set. With
// create unset, a missing directory is not created and yields a store with
// no networks (and no lock: there is nothing to protect).
func openStore(stateDir string, write, create bool) (*store, error) {
	dir := filepath.Join(stateDir, storeDirName)
	if create {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create network state directory: %w", err)
		}
	} else if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return &store{dir: dir}, nil
	}
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open network state lock: %w", err)
	}
	how := unix.LOCK_SH
	if write {
		how = unix.LOCK_EX
	}
	if err := flock(f, how); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock network state: %w", err)
	}
	return &store{dir: dir, lock: f}, nil
}

func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			return err
		}
	}
}

// close releases the directory lock.
func (s *store) close() {
	if s.lock != nil {
		s.lock.Close()
	}
}

func (s *store) path(name string) string { return filepath.Join(s.dir, name+".json") }

// load reads one record; a missing one is ErrNotFound.
func (s *store) load(name string) (*Network, error) {
	b, err := os.ReadFile(s.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("network %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read network %q: %w", name, err)
	}
	var n Network
	if err := json.Unmarshal(b, &n); err != nil {
		return nil, fmt.Errorf("read network %q: %s: %w", name, s.path(name), err)
	}
	if n.Name != name {
		return nil, fmt.Errorf("read network %q: %s names network %q", name, s.path(name), n.Name)
	}
	if err := n.check(); err != nil {
		return nil, fmt.Errorf("read network %q: %s: %w", name, s.path(name), err)
	}
	return &n, nil
}

// check reports whether a record read from disk is one Create could have
// written: the network is rebuilt from its options and the names,
// addresses and MTU derived from them must match. A damaged or edited
// record could otherwise name someone else's bridge or VXLAN device for
// "net rm" to delete and "boot" to put TAPs on.
func (n *Network) check() error {
	o := CreateOptions{Name: n.Name, Subnet: n.Subnet.String(), Isolated: n.Isolated, NAT: n.NAT, MTU: n.MTU}
	if n.Overlay != nil {
		o.Overlay = n.Overlay.String()
	}
	want, err := newNetwork(o)
	if err != nil {
		return err
	}
	switch {
	case n.Bridge != want.Bridge:
		return fmt.Errorf("%w: bridge %q, want %q", ErrInvalid, n.Bridge, want.Bridge)
	case n.HostAddr != want.HostAddr:
		return fmt.Errorf("%w: host address %s, want %s", ErrInvalid, n.HostAddr, want.HostAddr)
	case n.Overlay != nil && n.Overlay.Device != want.Overlay.Device:
		return fmt.Errorf("%w: VXLAN device %q, want %q", ErrInvalid, n.Overlay.Device, want.Overlay.Device)
	}
	return nil
}

// all reads every record, sorted by name.
func (s *store) all() ([]*Network, error) {
	ents, err := os.ReadDir(s.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	var out []*Network
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || e.IsDir() || strings.HasPrefix(name, ".") {
			continue
		}
		n, err := s.load(name)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// tempPattern matches the temporary files save writes for network name.
func (s *store) tempPattern(name string) string { return "." + name + ".json.*" }

// removeTemps deletes the temporary files of network name that a process
// killed inside save left. Only with the lock held exclusively: then no
// save is running.
func (s *store) removeTemps(name string) {
	m, _ := filepath.Glob(filepath.Join(s.dir, s.tempPattern(name)))
	for _, p := range m {
		os.Remove(p)
	}
}

// save writes a record atomically. The lock must be held exclusively.
func (s *store) save(n *Network) error {
	b, err := json.MarshalIndent(n, "", "  ")
	if err != nil {
		return fmt.Errorf("save network %q: %w", n.Name, err)
	}
	s.removeTemps(n.Name)
	tmp, err := os.CreateTemp(s.dir, s.tempPattern(n.Name))
	if err != nil {
		return fmt.Errorf("save network %q: %w", n.Name, err)
	}
	defer os.Remove(tmp.Name()) // after the rename this is a no-op
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), s.path(n.Name))
	}
	if err == nil {
		err = syncDir(s.dir)
	}
	if err != nil {
		return fmt.Errorf("save network %q: %w", n.Name, err)
	}
	return nil
}

// remove deletes a record, its attach lock file and any temporary file a
// killed save left. The lock must be held exclusively.
func (s *store) remove(name string) error {
	if err := os.Remove(s.path(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove network %q record: %w", name, err)
	}
	os.Remove(s.attachPath(name))
	s.removeTemps(name)
	return syncDir(s.dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (s *store) attachPath(name string) string { return filepath.Join(s.dir, name+".attach") }

// holdAttach takes the shared attach lock of network name, held until the
// returned file is closed (or the process dies).
func (s *store) holdAttach(name string) (*os.File, error) {
	f, err := os.OpenFile(s.attachPath(name), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("network %q: open attach lock: %w", name, err)
	}
	if err := flock(f, unix.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("network %q: take attach lock: %w", name, err)
	}
	return f, nil
}

// attached reports whether any live process holds network name's attach
// lock.
func (s *store) attached(name string) (bool, error) {
	f, err := os.OpenFile(s.attachPath(name), os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("network %q: open attach lock: %w", name, err)
	}
	defer f.Close()
	switch err := flock(f, unix.LOCK_EX|unix.LOCK_NB); {
	case err == unix.EWOULDBLOCK:
		return true, nil
	case err != nil:
		return false, fmt.Errorf("network %q: test attach lock: %w", name, err)
	}
	return false, nil
}
