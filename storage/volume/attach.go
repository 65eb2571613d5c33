package volume

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/rayvmm/rayvmm/state"
	"github.com/rayvmm/rayvmm/storage"
)

// Attachment is a volume opened for a VMM. The volume stays attached,
// and refuses other attaches, snapshot and rm, until Close or until the
// process exits (however it exits).
type Attachment struct {
	Volume *Volume
	// Disk is the opened image (and its backing chain).
	Disk storage.Disk
	lock *state.Lock
}

// Attach opens volume name for a VMM. A read-write attach holds the
// volume's lock exclusively and is refused while anyone else holds it; a
// read-only attach shares it with other read-only attaches. A snapshot
// can only be attached read-only.
func (s *Store) Attach(name string, readOnly bool) (*Attachment, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	if _, err := s.getRecord(name); err != nil {
		return nil, err // before creating a lock file for a missing volume
	}
	l, err := s.lockVolume(name, !readOnly)
	if err != nil {
		return nil, err
	}
	a, err := s.attachLocked(name, readOnly, l)
	if err != nil {
		return nil, errors.Join(err, l.Release())
	}
	return a, nil
}

func (s *Store) attachLocked(name string, readOnly bool, l *state.Lock) (*Attachment, error) {
	v, err := s.getRecord(name)
	if err != nil {
		return nil, err
	}
	if v.State != Available {
		return nil, fmt.Errorf("%w: volume %q is %s", ErrInvalid, name, v.State)
	}
	if v.ReadOnly && !readOnly {
		return nil, fmt.Errorf("cannot attach %q read-write: it %w (clone it, or attach it read-only)", name, ErrSnapshot)
	}
	d, err := storage.OpenDisk(v.Path, v.Format, readOnly)
	if err != nil {
		return nil, fmt.Errorf("attach volume %q: %w", name, err)
	}
	l.SetOwner()
	v.State = Attached
	return &Attachment{Volume: v, Disk: d, lock: l}, nil
}

// LockFile is the descriptor that holds the volume's lock (an open file
// description lock). A control plane hands it to the VM process with the
// disk, so that the volume stays locked for as long as either process
// holds it, kill -9 of either included.
func (a *Attachment) LockFile() *os.File { return a.lock.File() }

// Detach closes this process's descriptor of the volume's lock without
// releasing the lock, for a control plane whose VM process holds it (and
// so the volume) on its own; Release lets go of the lock file once that
// process is gone.
func (a *Attachment) Detach() error { return a.lock.Close() }

// Release removes the lock file of volume name left by a VM process that
// held it and exited (see Detach), unless someone holds it now.
func (s *Store) Release(name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	return state.Sweep(s.lockPath(name))
}

// Close flushes and closes the disk (unless the caller took it and set
// Disk to nil) and releases the volume.
func (a *Attachment) Close() error {
	var errs []error
	if a.Disk != nil {
		errs = append(errs, a.Disk.Flush(context.Background()), a.Disk.Close())
		a.Disk = nil
	}
	errs = append(errs, a.lock.Release())
	return errors.Join(errs...)
}
