// Package volume keeps rayvmm's volumes: disk images under
// <state-dir>/volumes with their metadata (name, format, size, state,
// parent) in the state store's "volumes" bucket (package state).
//
// A snapshot freezes a volume's current image as a read-only parent and
// gives the volume a new qcow2 overlay on top of it, so the chain is an
// ordinary qcow2 backing chain that qemu-img can follow; a clone is a new
// overlay on a snapshot. A volume is attached while a VMM holds its lock
// (see Attach); its state is derived from that lock, so a VMM that dies,
// even by kill -9, leaves it available again. Every operation that fails
// removes what it made: no half-written image, record or lock file stays
// behind.
package volume

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/rayvmm/rayvmm/state"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/storage/qcow2"
)

// Errors by category; operations wrap them with the volume's name.
var (
	ErrNotFound    = errors.New("no such volume")
	ErrExists      = errors.New("already exists")
	ErrAttached    = errors.New("is attached")
	ErrParent      = errors.New("is the parent of")
	ErrInvalid     = errors.New("invalid volume request")
	ErrSnapshot    = errors.New("is a read-only snapshot")
	ErrNotSnapshot = errors.New("is not a snapshot")
)

// State is where a volume is in its life.
type State string

// States. Attached is never stored: it is derived from the lock.
const (
	Created   State = "created"   // record made, image being written
	Available State = "available" // ready to attach
	Attached  State = "attached"  // a VMM holds the lock
	Deleted   State = "deleted"   // being removed
)

// Volume is a volume's record, plus what is derived when it is read.
type Volume struct {
	Name     string    `json:"name"`
	Format   string    `json:"format"`
	Size     int64     `json:"virtual_size"`
	Path     string    `json:"path"`
	State    State     `json:"state"`
	Parent   string    `json:"parent,omitempty"`
	ReadOnly bool      `json:"read_only"`
	Created  time.Time `json:"created"`

	// Derived, not stored.
	Allocated  int64    `json:"allocated_bytes"`
	AttachedBy int      `json:"attached_by_pid,omitempty"`
	Chain      []string `json:"backing_chain,omitempty"`
}

// records is the state store's bucket of volume records, keyed by name.
// Image paths are stored relative to the volume directory.
var records = state.NewBucket("volumes", checkRecord)

// checkRecord refuses a stored record that rayvmm could not have written:
// one whose name is not its key, whose image is not a file directly in
// the volume directory (an edited record must not make volume rm delete
// some other file), or whose fields are out of range.
func checkRecord(key string, v *Volume) error {
	switch {
	case v.Name != key:
		return fmt.Errorf("%w: record names volume %q", ErrInvalid, v.Name)
	case v.Format != "raw" && v.Format != "qcow2":
		return fmt.Errorf("%w: format %q", ErrInvalid, v.Format)
	case v.State != Created && v.State != Available && v.State != Deleted:
		return fmt.Errorf("%w: state %q", ErrInvalid, v.State)
	case v.Path != "" && (filepath.Base(v.Path) != v.Path || v.Path == "." || v.Path == ".."):
		return fmt.Errorf("%w: image %q is not a file in the volume directory", ErrInvalid, v.Path)
	case v.Allocated != 0 || v.AttachedBy != 0 || v.Chain != nil:
		return fmt.Errorf("%w: derived fields stored", ErrInvalid)
	}
	if err := ValidName(key); err != nil {
		return err
	}
	if v.Parent != "" {
		if err := ValidName(v.Parent); err != nil {
			return fmt.Errorf("parent: %w", err)
		}
	}
	return checkSize(v.Size)
}

// ValidName reports whether name can name a volume: 1 to 63 of
// [A-Za-z0-9_.-], the first a letter or digit. (Checked by hand: a
// package-level regexp costs every rayvmm start, rayvmm boot's included,
// its compilation, about 0.15 ms of package init.)
func ValidName(name string) error {
	ok := len(name) >= 1 && len(name) <= 63
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		ok = alnum || i > 0 && (c == '_' || c == '.' || c == '-')
	}
	if !ok {
		return fmt.Errorf("%w: name %q: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, name)
	}
	return nil
}

// Store is the volumes of one state directory: their records in the
// state store and their images and lock files in <state-dir>/volumes. It
// keeps no file open between calls, so a VMM holding a Store does not
// block the CLI.
type Store struct {
	st  *state.Store
	dir string
}

// Open returns the store under stateDir. Nothing is created until a
// volume is.
func Open(stateDir string) (*Store, error) {
	if stateDir == "" {
		return nil, fmt.Errorf("%w: empty state directory", ErrInvalid)
	}
	st, err := state.Open(stateDir)
	if err != nil {
		return nil, fmt.Errorf("volume store: %w", err)
	}
	return &Store{st: st, dir: st.KindDir("volumes")}, nil
}

// Dir is the directory that holds the images and lock files.
func (s *Store) Dir() string { return s.dir }

func (s *Store) lockPath(name string) string { return s.st.LockPath("volumes", name) }

// newImagePath names a new image file for a volume.
func (s *Store) newImagePath(name, format string) string {
	var b [4]byte
	rand.Read(b[:])
	return filepath.Join(s.dir, fmt.Sprintf("%s-%s.%s", name, hex.EncodeToString(b[:]), format))
}

// update runs fn in a read-write transaction of the state store.
func (s *Store) update(fn func(tx *state.Tx) error) error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("volume store: %w", err)
	}
	return s.st.Update(fn)
}

// view runs fn in a read-only transaction.
func (s *Store) view(fn func(tx *state.Tx) error) error { return s.st.View(fn) }

func (s *Store) get(tx *state.Tx, name string) (*Volume, error) {
	v, ok, err := records.Get(tx, name)
	if err != nil {
		return nil, fmt.Errorf("volume %q: %w", name, err)
	}
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrNotFound, name)
	}
	// Images are recorded relative to the store, so the whole state
	// directory can move (backing file names are relative too).
	if v.Path != "" {
		v.Path = filepath.Join(s.dir, v.Path)
	}
	return v, nil
}

func (s *Store) put(tx *state.Tx, v *Volume) error {
	stored := *v
	stored.Allocated, stored.AttachedBy, stored.Chain = 0, 0, nil
	if stored.Path != "" {
		if filepath.Dir(stored.Path) != s.dir {
			return fmt.Errorf("volume %q: image %s is not in %s", v.Name, stored.Path, s.dir)
		}
		stored.Path = filepath.Base(stored.Path)
	}
	if stored.State == Attached {
		stored.State = Available
	}
	return records.Put(tx, v.Name, &stored)
}

// children lists the volumes whose parent is name.
func children(tx *state.Tx, name string) ([]string, error) {
	var out []string
	err := records.ForEach(tx, func(_ string, v *Volume) error {
		if v.Parent == name {
			out = append(out, v.Name)
		}
		return nil
	})
	return out, err
}

// reserve adds a record in state Created, refusing a name in use. It
// returns the new volume's lock, held until finish: while a volume is
// being made, volume rm and attach of it are refused, and a maker that
// dies (kill -9 included) leaves a created record that rm can remove.
func (s *Store) reserve(v *Volume) (*state.Lock, error) {
	l, err := s.lockVolume(v.Name, true)
	if err != nil {
		if _, gerr := s.getRecord(v.Name); gerr == nil {
			return nil, fmt.Errorf("volume %q %w", v.Name, ErrExists)
		}
		return nil, err
	}
	err = s.update(func(tx *state.Tx) error {
		if old, err := s.get(tx, v.Name); err == nil {
			if old.State == Deleted {
				return fmt.Errorf("volume %q %w and is being deleted (run volume rm %s to finish)", v.Name, ErrExists, v.Name)
			}
			return fmt.Errorf("volume %q %w", v.Name, ErrExists)
		}
		// The parent is checked in the same transaction as the one in
		// which volume rm looks for children, so one of the two sees the
		// other.
		if v.Parent != "" {
			p, err := s.get(tx, v.Parent)
			if err != nil {
				return err
			}
			if p.State != Available {
				return fmt.Errorf("%w: snapshot %q is %s", ErrInvalid, v.Parent, p.State)
			}
		}
		v.State = Created
		v.Created = time.Now().UTC().Truncate(time.Second)
		return s.put(tx, v)
	})
	if err != nil {
		return nil, errors.Join(err, l.Release())
	}
	l.SetOwner()
	return l, nil
}

// finish marks a reserved record available, or on failure removes it and
// the image; then it releases the volume's lock.
func (s *Store) finish(v *Volume, l *state.Lock, err error) (*Volume, error) {
	if err == nil {
		err = s.update(func(tx *state.Tx) error {
			v.State = Available
			return s.put(tx, v)
		})
	}
	if err != nil {
		if v.Path != "" {
			os.Remove(v.Path)
		}
		if derr := s.update(func(tx *state.Tx) error { return records.Delete(tx, v.Name) }); derr != nil {
			err = errors.Join(err, derr)
		}
	}
	if rerr := l.Release(); rerr != nil && err == nil {
		err = rerr
	}
	if err != nil {
		return nil, err
	}
	return s.Get(v.Name)
}

// Create makes a new empty volume of size bytes in format "raw" or "qcow2".
func (s *Store) Create(name string, size int64, format string) (*Volume, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	if err := checkSize(size); err != nil {
		return nil, err
	}
	if format != "raw" && format != "qcow2" {
		return nil, fmt.Errorf("%w: format %q (want raw or qcow2)", ErrInvalid, format)
	}
	v := &Volume{Name: name, Format: format, Size: size, Path: s.newImagePath(name, format)}
	l, err := s.reserve(v)
	if err != nil {
		return nil, err
	}
	d, err := storage.CreateDisk(v.Path, format, size)
	if err == nil {
		err = d.Close()
	}
	return s.finish(v, l, err)
}

func checkSize(size int64) error {
	if size <= 0 {
		return fmt.Errorf("%w: size %d must be greater than zero", ErrInvalid, size)
	}
	if size%512 != 0 {
		return fmt.Errorf("%w: size %d is not a multiple of 512 bytes", ErrInvalid, size)
	}
	return nil
}

// Get returns one volume with its derived state, allocation and chain.
func (s *Store) Get(name string) (*Volume, error) {
	var v *Volume
	var all map[string]*Volume
	err := s.view(func(tx *state.Tx) error {
		var err error
		if v, err = s.get(tx, name); err != nil {
			return err
		}
		all, err = s.loadAll(tx)
		return err
	})
	if err != nil {
		return nil, err
	}
	s.derive(v)
	for p, seen := v, map[string]bool{}; p != nil && !seen[p.Name]; p = all[p.Parent] {
		seen[p.Name] = true
		v.Chain = append(v.Chain, p.Path)
	}
	return v, nil
}

func (s *Store) loadAll(tx *state.Tx) (map[string]*Volume, error) {
	all := map[string]*Volume{}
	err := records.ForEach(tx, func(name string, _ *Volume) error {
		v, err := s.get(tx, name)
		if err == nil {
			all[v.Name] = v
		}
		return err
	})
	return all, err
}

// List returns every volume, sorted by name.
func (s *Store) List() ([]*Volume, error) {
	var all map[string]*Volume
	if err := s.view(func(tx *state.Tx) error {
		var err error
		all, err = s.loadAll(tx)
		return err
	}); err != nil {
		return nil, err
	}
	out := make([]*Volume, 0, len(all))
	for _, v := range all {
		s.derive(v)
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// derive fills in what is not stored: attached state and allocation.
func (s *Store) derive(v *Volume) {
	if v.State == Available {
		if held, pid := state.Holder(s.lockPath(v.Name)); held {
			v.State, v.AttachedBy = Attached, pid
		}
	}
	var st syscall.Stat_t
	if syscall.Stat(v.Path, &st) == nil {
		v.Allocated = st.Blocks * 512
	}
}

// lockVolume takes a volume's lock for an operation, or says who has it.
func (s *Store) lockVolume(name string, exclusive bool) (*state.Lock, error) {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("volume store: %w", err)
	}
	l, err := state.TryLock(s.lockPath(name), exclusive)
	if errors.Is(err, state.ErrLocked) {
		if _, pid := state.Holder(s.lockPath(name)); pid > 0 {
			return nil, fmt.Errorf("volume %q %w (by pid %d)", name, ErrAttached, pid)
		}
		return nil, fmt.Errorf("volume %q %w", name, ErrAttached)
	}
	if err != nil {
		return nil, fmt.Errorf("volume %q: %w", name, err)
	}
	return l, nil
}

// Snapshot freezes volume name's current image as the read-only snapshot
// snap and puts a new qcow2 overlay on it for the volume's further writes.
func (s *Store) Snapshot(name, snap string) (*Volume, error) {
	if err := ValidName(snap); err != nil {
		return nil, err
	}
	l, err := s.lockVolume(name, true)
	if err != nil {
		return nil, err
	}
	defer l.Release()
	v, err := s.getRecord(name)
	if err != nil {
		return nil, err
	}
	if v.ReadOnly {
		return nil, fmt.Errorf("cannot snapshot %q: it %w (clone it instead)", name, ErrSnapshot)
	}
	if v.State != Available {
		return nil, fmt.Errorf("%w: volume %q is %s", ErrInvalid, name, v.State)
	}
	// The snapshot takes the current image; the volume gets an overlay.
	// Until both records change together the image stays the volume's
	// alone: a snapshot interrupted before then leaves a record without a
	// path, which volume rm removes without touching the volume's image.
	sv := &Volume{Name: snap, Format: v.Format, Size: v.Size, Parent: v.Parent, ReadOnly: true}
	overlay := s.newImagePath(name, "qcow2")
	sl, err := s.reserve(sv)
	if err != nil {
		return nil, err
	}
	testHookSnapshotReserved()
	im, err := qcow2.Create(overlay, v.Size, qcow2.CreateOptions{BackingFile: filepath.Base(v.Path), BackingFormat: v.Format})
	if err == nil {
		err = im.Close()
	}
	if err == nil {
		err = os.Chmod(v.Path, 0o444)
	}
	if err == nil {
		err = s.update(func(tx *state.Tx) error {
			sv.State, sv.Path = Available, v.Path
			nv := *v
			nv.Path, nv.Format, nv.Parent = overlay, "qcow2", snap
			return errors.Join(s.put(tx, sv), s.put(tx, &nv))
		})
	}
	if err != nil {
		os.Remove(overlay)
		os.Chmod(v.Path, 0o644)
		sv.Path = "" // the image is the volume's: finish must not remove it
		_, ferr := s.finish(sv, sl, fmt.Errorf("snapshot %q as %q: %w", name, snap, err))
		return nil, ferr
	}
	if err := sl.Release(); err != nil {
		return nil, err
	}
	return s.Get(snap)
}

// testHookSnapshotReserved lets a test stop a snapshot between its two
// records.
var testHookSnapshotReserved = func() {}

func (s *Store) getRecord(name string) (*Volume, error) {
	var v *Volume
	err := s.view(func(tx *state.Tx) error {
		var err error
		v, err = s.get(tx, name)
		return err
	})
	return v, err
}

// Clone makes a new volume name as a qcow2 overlay on snapshot snap.
func (s *Store) Clone(snap, name string) (*Volume, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	sv, err := s.getRecord(snap)
	if err != nil {
		return nil, err
	}
	if !sv.ReadOnly {
		return nil, fmt.Errorf("cannot clone %q: it %w (snapshot it first)", snap, ErrNotSnapshot)
	}
	if sv.State != Available {
		return nil, fmt.Errorf("%w: snapshot %q is %s", ErrInvalid, snap, sv.State)
	}
	v := &Volume{Name: name, Format: "qcow2", Size: sv.Size, Path: s.newImagePath(name, "qcow2"), Parent: snap}
	l, err := s.reserve(v)
	if err != nil {
		return nil, err
	}
	im, err := qcow2.Create(v.Path, sv.Size, qcow2.CreateOptions{BackingFile: filepath.Base(sv.Path), BackingFormat: sv.Format})
	if err == nil {
		err = im.Close()
	}
	return s.finish(v, l, err)
}

// Remove deletes a volume and its image. It refuses while the volume is
// attached or while it is another volume's parent.
func (s *Store) Remove(name string) error {
	if _, err := s.getRecord(name); err != nil {
		return err
	}
	l, err := s.lockVolume(name, true)
	if err != nil {
		return err
	}
	defer l.Release()
	var v *Volume
	err = s.update(func(tx *state.Tx) error {
		var err error
		if v, err = s.get(tx, name); err != nil {
			return err
		}
		kids, err := children(tx, name)
		if err != nil {
			return err
		}
		if len(kids) > 0 {
			return fmt.Errorf("cannot remove volume %q: it %w %s", name, ErrParent, strings.Join(kids, ", "))
		}
		v.State = Deleted
		return s.put(tx, v)
	})
	if err != nil {
		return err
	}
	if v.Path != "" {
		if err := os.Remove(v.Path); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("remove volume %q: %w", name, err)
		}
	}
	return s.update(func(tx *state.Tx) error { return records.Delete(tx, name) })
}
