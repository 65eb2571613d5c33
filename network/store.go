package network

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rayvmm/rayvmm/state"
)

// Networks are recorded in the state store's "networks" bucket (package
// state), one JSON record per network, checked on every read. Commands
// that change a network or the host for it (create, remove, attach, which
// may recreate the network's pieces) hold a flock on
// <state-dir>/networks/.lock exclusively, inspect holds it shared, so
// concurrent rayvmm processes cannot both create overlapping networks or
// recreate one bridge twice; list reads the store alone.
//
// A VM attached to network NAME holds a shared lock on
// <state-dir>/networks/NAME.lock (state.TryLock) for as long as it runs;
// the kernel drops it when the process dies, also on SIGKILL, so
// "attached" is derived from live processes, never from a record a
// crashed VMM left. Remove takes it exclusively, so it is refused while a
// VM holds it; inspect tests it without taking it.

const (
	kind     = "networks"
	lockName = ".lock"
)

// records is the state store's bucket of network records.
var records = state.NewBucket(kind, checkRecord)

// checkRecord refuses a record that Create could not have written (see
// Network.check), or that is stored under another network's name.
func checkRecord(name string, n *Network) error {
	if n.Name != name {
		return fmt.Errorf("%w: record names network %q", ErrInvalid, n.Name)
	}
	return n.check()
}

// store is the networks of a state directory, with the network lock held
// (unless none was asked for).
type store struct {
	st   *state.Store
	dir  string // <state-dir>/networks: the lock files
	lock *state.Serial
}

// openStore takes the network lock, exclusively when write is set. With
// create unset, a missing networks directory is not created and nothing
// is locked: there is no network to protect.
func openStore(stateDir string, write, create bool) (*store, error) {
	st, err := state.Open(stateDir)
	if err != nil {
		return nil, err
	}
	s := &store{st: st, dir: st.KindDir(kind)}
	if create {
		if err := os.MkdirAll(s.dir, 0o700); err != nil {
			return nil, fmt.Errorf("create network state directory: %w", err)
		}
	} else if _, err := os.Stat(s.dir); errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if s.lock, err = state.Serialize(filepath.Join(s.dir, lockName), write, st.Timeout); err != nil {
		return nil, fmt.Errorf("lock network state: %w", err)
	}
	return s, nil
}

// close releases the network lock.
func (s *store) close() { s.lock.Unlock() }

// load reads one record; a missing one is ErrNotFound.
func (s *store) load(name string) (*Network, error) {
	var n *Network
	var ok bool
	err := s.st.View(func(tx *state.Tx) (err error) {
		n, ok, err = records.Get(tx, name)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read network %q: %w", name, err)
	}
	if !ok {
		return nil, fmt.Errorf("network %q: %w", name, ErrNotFound)
	}
	return n, nil
}

// all reads every record, sorted by name.
func (s *store) all() ([]*Network, error) {
	var out []*Network
	err := s.st.View(func(tx *state.Tx) (err error) {
		out, err = records.All(tx)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	return out, nil
}

// save writes a record. The lock must be held exclusively.
func (s *store) save(n *Network) error {
	if err := s.st.Update(func(tx *state.Tx) error { return records.Put(tx, n.Name, n) }); err != nil {
		return fmt.Errorf("save network %q: %w", n.Name, err)
	}
	return nil
}

// remove deletes a record. The lock must be held exclusively.
func (s *store) remove(name string) error {
	if err := s.st.Update(func(tx *state.Tx) error { return records.Delete(tx, name) }); err != nil {
		return fmt.Errorf("remove network %q record: %w", name, err)
	}
	return nil
}

func (s *store) attachPath(name string) string { return s.st.LockPath(kind, name) }

// holdAttach takes the shared attach lock of network name, held until it
// is released (or the process dies).
func (s *store) holdAttach(name string) (*state.Lock, error) {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("network %q: attach lock: %w", name, err)
	}
	l, err := state.TryLock(s.attachPath(name), false)
	if err != nil {
		return nil, fmt.Errorf("network %q: take attach lock: %w", name, err)
	}
	return l, nil
}

// attached reports whether any live process holds network name's attach
// lock. It takes nothing, so it never disturbs another test or an attach.
func (s *store) attached(name string) bool {
	held, _ := state.Holder(s.attachPath(name))
	return held
}

// claim takes network name's attach lock exclusively for a removal: it
// fails with ErrInUse while a VM holds it.
func (s *store) claim(name string) (*state.Lock, error) {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("network %q: attach lock: %w", name, err)
	}
	l, err := state.TryLock(s.attachPath(name), true)
	if errors.Is(err, state.ErrLocked) {
		return nil, fmt.Errorf("remove network %q: %w: a running VM is attached", name, ErrInUse)
	}
	if err != nil {
		return nil, fmt.Errorf("network %q: attach lock: %w", name, err)
	}
	return l, nil
}

// check reports whether a record read from the store is one Create could
// have written: the network is rebuilt from its options and the names,
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
