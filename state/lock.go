package state

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Two kinds of lock files, both held by open files so that the kernel
// drops them when their process dies, kill -9 included:
//
//   - Lock marks a live use of one object (a VMM attached to a volume or
//     a network). It is an open file description lock (F_OFD_SETLK): like
//     flock it belongs to the open file, and unlike flock it can be tested
//     (F_OFD_GETLK) without being taken, so `volume list` or `net inspect`
//     never makes a VMM's attach fail, or see another inspection, by
//     probing. Taking one never waits. The file goes away with its last
//     holder.
//   - Serial orders the multi-step operations of one kind (network create,
//     attach, rm) across processes: a flock, waited for up to a timeout.
//     Its file stays.

// ErrLocked is returned by TryLock when another holder's lock conflicts.
var ErrLocked = errors.New("lock held")

// Lock is a held object lock; see TryLock.
type Lock struct {
	f    *os.File
	path string
}

func ofdLock(f *os.File, typ int16) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: 0, Len: 0}
	err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
		return ErrLocked
	}
	return err
}

// TryLock takes the lock at path without waiting, creating the file (its
// directory must exist): exclusive, or shared with other shared holders.
// It fails with ErrLocked if someone holds a conflicting lock.
func TryLock(path string, exclusive bool) (*Lock, error) {
	typ := int16(unix.F_RDLCK)
	if exclusive {
		typ = unix.F_WRLCK
	}
	for range 100 {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open lock file: %w", err)
		}
		if err := ofdLock(f, typ); err != nil {
			f.Close()
			return nil, err
		}
		// The holder before us may have removed the file between our open
		// and our lock: then we locked an orphan and must start again.
		var a, b unix.Stat_t
		if unix.Fstat(int(f.Fd()), &a) == nil && unix.Stat(path, &b) == nil && a.Ino == b.Ino && a.Dev == b.Dev {
			return &Lock{f: f, path: path}, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("lock %s: the file keeps changing", path)
}

// SetOwner records the calling process's pid in the lock file, for
// Holder (and so for error messages naming who holds it).
func (l *Lock) SetOwner() {
	if l.f.Truncate(0) == nil {
		l.f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
}

// File is the open file that holds the lock. Handing it to another
// process (a VM process) shares the lock: it stays held while either
// process has the file open. Release must then wait until the other
// process is gone, since it drops the lock for every holder of the file.
func (l *Lock) File() *os.File { return l.f }

// Release drops the lock, removing the file unless another process holds
// a shared lock on it too. Releasing a nil or released Lock does nothing.
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	var err error
	if ofdLock(l.f, unix.F_WRLCK) == nil {
		if rerr := os.Remove(l.path); rerr != nil && !os.IsNotExist(rerr) {
			err = fmt.Errorf("remove lock file: %w", rerr)
		}
	}
	if cerr := l.f.Close(); cerr != nil && err == nil {
		err = cerr
	}
	l.f = nil
	return err
}

// Close closes this process's file of the lock without releasing it:
// for a lock whose file was handed to another process (a detached VM
// process), which keeps holding it, and whose lock Release would take
// from it. Closing a nil or released Lock does nothing.
func (l *Lock) Close() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}

// Sweep removes the lock file at path if no one holds a lock on it: what
// is left of a lock whose holders closed it without releasing it (a
// detached VM process that exited). It never waits and never disturbs a
// holder; a file someone holds stays.
func Sweep(path string) error {
	l, err := TryLock(path, true)
	if errors.Is(err, ErrLocked) || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		if _, serr := os.Stat(path); errors.Is(serr, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return l.Release()
}

// Holder reports whether anyone holds the lock at path, and the pid that
// last recorded itself as its owner (0 if unknown). It takes nothing.
func Holder(path string) (held bool, pid int) {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return false, 0
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil || lk.Type == unix.F_UNLCK {
		return false, 0
	}
	b := make([]byte, 32)
	n, _ := f.ReadAt(b, 0)
	pid, _ = strconv.Atoi(strings.TrimSpace(string(b[:n])))
	return true, pid
}

// Serial is a held Serialize lock.
type Serial struct{ f *os.File }

// flockRetry is how often a Serialize wait tries again.
const flockRetry = 5 * time.Millisecond

// Serialize takes the flock on the file at path (created if missing),
// exclusively or shared, waiting at most timeout (zero: DefaultTimeout)
// for its holders. A timeout is ErrBusy.
func Serialize(path string, exclusive bool, timeout time.Duration) (*Serial, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := flockWait(f, exclusive, timeout); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return &Serial{f: f}, nil
}

// flockWait takes a flock on f, polling until timeout.
func flockWait(f *os.File, exclusive bool, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	how := unix.LOCK_SH | unix.LOCK_NB
	if exclusive {
		how = unix.LOCK_EX | unix.LOCK_NB
	}
	deadline := time.Now().Add(timeout)
	for {
		err := unix.Flock(int(f.Fd()), how)
		switch {
		case err == nil:
			return nil
		case err == unix.EINTR:
			continue
		case err != unix.EWOULDBLOCK:
			return err
		case time.Now().After(deadline):
			return fmt.Errorf("another process has held it for %v: %w", timeout, ErrBusy)
		}
		time.Sleep(flockRetry)
	}
}

// Unlock releases the lock. Unlocking a nil Serial does nothing.
func (s *Serial) Unlock() {
	if s != nil && s.f != nil {
		s.f.Close()
		s.f = nil
	}
}
