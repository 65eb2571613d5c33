package volume

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// A volume's lock is an open file description lock (F_OFD_SETLK) on
// <name>.lock next to its images. Like flock it belongs to the open file,
// so it dies with the process, kill -9 included; unlike flock it can be
// tested (F_OFD_GETLK) without being taken, so `volume list` never makes
// a VMM's attach fail by probing. Exclusive for a read-write attach and
// for snapshot, clone and rm; shared for read-only attaches.
type lock struct {
	f    *os.File
	path string
}

// errLocked is returned by tryLock when someone else holds the lock.
var errLocked = errors.New("lock held")

func ofdLock(f *os.File, typ int16) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: 0, Len: 0}
	err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
		return errLocked
	}
	return err
}

// tryLock takes the lock at path without waiting, creating the file.
func tryLock(path string, exclusive bool) (*lock, error) {
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
			return &lock{f: f, path: path}, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("lock %s: the file keeps changing", path)
}

// setOwner records our pid in the lock file, for error messages.
func (l *lock) setOwner() {
	if l.f.Truncate(0) == nil {
		l.f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
}

// release drops the lock, removing the file unless another process holds
// a shared lock on it too.
func (l *lock) release() error {
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

// lockHolder reports whether the lock at path is held, and the pid that
// last recorded itself as its owner (0 if unknown).
func lockHolder(path string) (bool, int) {
	f, err := os.Open(path)
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
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	return true, pid
}
