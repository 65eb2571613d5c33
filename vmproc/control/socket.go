package control

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrSocketInUse means a live process accepts connections on a socket
// path.
var ErrSocketInUse = errors.New("in use: a running VM (or another program) accepts connections on it")

// maxSocketPath is sun_path's size less its NUL.
const maxSocketPath = 107

// ListenSocket makes a listening Unix stream socket at path, mode 0600:
// a VM's API socket and its vsock socket. A socket file nothing accepts
// on (left by a killed VM) is reclaimed; a live one, or anything that is
// not a socket, is refused. The socket is bound in a private directory
// beside path, made 0600 and renamed into place without replacing
// anything (a file made meanwhile is refused as in use), so nobody can
// connect before its mode is set. remove deletes the file if it is still
// the one made here, not a successor's that reclaimed it; the caller
// closes the listener, which leaves the file in place.
func ListenSocket(path string) (l *net.UnixListener, remove func() error, err error) {
	if err := reclaimStale(path); err != nil {
		return nil, nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".rv")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	if len(tmp) > maxSocketPath {
		// No room for the detour: bind in place (a file made meanwhile
		// makes that fail). Until the chmod the socket has the umask's
		// mode; connecting needs write permission, which the usual umask
		// (022) gives no one else.
		tmp = path
	}
	l, err = net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, nil, fmt.Errorf("%s: %w", path, ErrSocketInUse)
		}
		return nil, nil, err
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, nil, err
	}
	if tmp != path {
		if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); err != nil {
			l.Close()
			if errors.Is(err, unix.EEXIST) {
				return nil, nil, fmt.Errorf("%s: %w", path, ErrSocketInUse)
			}
			return nil, nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		l.Close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	remove = func() error {
		// Same inode number and change time: still ours (a successor's
		// socket may reuse the number of ours, removed as stale).
		var cur unix.Stat_t
		if unix.Lstat(path, &cur) == nil && cur.Dev == st.Dev && cur.Ino == st.Ino && cur.Ctim == st.Ctim {
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		return nil // gone, or a successor's socket now
	}
	return l, remove, nil
}

// reclaimStale removes a socket file at path that nothing accepts
// connections on.
func reclaimStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: %w", path, ErrSocketInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: cannot tell whether it is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s: removing the stale socket: %w", path, err)
	}
	return nil
}
