package main

// The --vsock seam of "rayvmm boot": the flag's parser, and the control
// plane's half of the device, which creates the host socket and hands it
// to the VM. The device itself opens nothing by path but <uds>_<port>.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/devices/virtio/vsock"
	"github.com/rayvmm/rayvmm/vmm"
)

// vsockSpec is what --vsock cid=N,uds=PATH asks for (the VM spec's
// vsock: {cid, uds}).
type vsockSpec struct {
	CID uint32
	UDS string // absolute
}

// sunPathMax is the longest path a Unix socket address holds (108 bytes
// with the terminating NUL).
const sunPathMax = 107

// parseVsockFlag parses --vsock cid=N,uds=PATH.
func parseVsockFlag(s string) (vsockSpec, error) {
	var v vsockSpec
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		k, val, ok := strings.Cut(kv, "=")
		if !ok || val == "" {
			return v, fmt.Errorf("%q: want cid=N,uds=PATH", kv)
		}
		if seen[k] {
			return v, fmt.Errorf("%s given twice", k)
		}
		seen[k] = true
		switch k {
		case "cid":
			n, err := strconv.ParseUint(val, 10, 32)
			if err != nil || n < 3 || n == 1<<32-1 {
				return v, fmt.Errorf("cid=%s: the guest CID must be a number from 3 to %d", val, uint32(1<<32-2))
			}
			v.CID = uint32(n)
		case "uds":
			p, err := filepath.Abs(val)
			if err != nil {
				return v, fmt.Errorf("uds=%s: %w", val, err)
			}
			v.UDS = p
		default:
			return v, fmt.Errorf("unknown key %q (want cid=N,uds=PATH)", k)
		}
	}
	switch {
	case v.CID == 0:
		return v, errors.New("cid=N is missing")
	case v.UDS == "":
		return v, errors.New("uds=PATH is missing")
	case len(vsock.PortPath(v.UDS, 1<<32-1)) > sunPathMax:
		return v, fmt.Errorf("uds=%s: path too long: %d bytes, and with _PORT behind it (the sockets guest connections go to) it must fit in %d",
			v.UDS, len(v.UDS), sunPathMax)
	}
	return v, nil
}

// errSocketInUse: a live process accepts connections on the path.
var errSocketInUse = errors.New("in use: a running VM (or another program) accepts connections on it")

// listenVsock creates the vsock host socket at path, mode 0600. A socket
// file nobody accepts on (left by a killed VM) is reclaimed; a live one,
// or anything that is not a socket, is refused. The socket is bound in a
// private directory beside path, made 0600 and renamed into place (never
// over an existing file), so nobody can connect before its mode is set.
// remove deletes the file if it is still the one made here; the caller
// closes the listener.
func listenVsock(path string) (ln *net.UnixListener, remove func() error, err error) {
	if err := reclaimStale(path); err != nil {
		return nil, nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".rv")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	if len(tmp) > sunPathMax {
		// No room for the detour: bind in place (a file made meanwhile
		// makes that fail). Until the chmod the socket has the umask's
		// mode; connecting needs write permission, which the usual
		// umask (022) gives no one else.
		tmp = path
	}
	ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, nil, fmt.Errorf("%s: %w", path, errSocketInUse)
		}
		return nil, nil, err
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, nil, err
	}
	if tmp != path {
		if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); err != nil {
			ln.Close()
			if errors.Is(err, unix.EEXIST) {
				return nil, nil, fmt.Errorf("%s: %w", path, errSocketInUse)
			}
			return nil, nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	remove = func() error {
		// Same inode number and change time: still ours (a successor's
		// socket may reuse the number of ours, removed as stale).
		var cur unix.Stat_t
		if unix.Lstat(path, &cur) == nil && cur.Dev == st.Dev && cur.Ino == st.Ino && cur.Ctim == st.Ctim {
			return os.Remove(path)
		}
		return nil // gone, or a successor's socket now
	}
	return ln, remove, nil
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
		return fmt.Errorf("%s: %w", path, errSocketInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: cannot tell whether it is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s: removing the stale socket: %w", path, err)
	}
	return nil
}

// attachVsock creates the host socket for spec and places the device. The
// returned function removes the socket file and closes the control plane's
// listener (the device has its own descriptor, closed with the VM).
func attachVsock(v *vmm.VM, spec vsockSpec) (func(), error) {
	ln, remove, err := listenVsock(spec.UDS)
	if err != nil {
		return nil, err
	}
	cleanup := func() {
		remove()
		ln.Close()
	}
	if _, err := v.AttachVsock(vmm.VsockConfig{CID: spec.CID, Listener: ln, Path: spec.UDS}); err != nil {
		cleanup()
		return nil, err
	}
	return cleanup, nil
}
