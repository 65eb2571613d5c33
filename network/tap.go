package network

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/songgao/water"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Port is the host end of a guest NIC: Read returns one whole Ethernet
// frame (blocking until one arrives), Write sends one. Close makes a
// blocked Read return an error for which errors.Is(err, os.ErrClosed)
// holds. Read and Write may be called from different goroutines.
type Port interface {
	Read(frame []byte) (int, error)
	Write(frame []byte) (int, error)
	Close() error
}

// TAP is a Linux TAP interface opened through songgao/water. Its file
// descriptor is non-blocking and registered with Go's poller, so Close
// interrupts a blocked Read.
type TAP struct {
	ifc     *water.Interface
	raw     syscall.RawConn // the same descriptor, for TryRead
	name    string
	created bool // by OpenTAP, so it goes away on Close
}

// OpenTAP opens the TAP interface name in the calling thread's network
// namespace, creating it when it does not exist. A TAP it creates is not
// persistent: the kernel deletes it when the descriptor closes, also when
// the process is killed. An existing TAP (made persistent by someone else,
// e.g. "ip tuntap add") stays persistent and survives Close.
func OpenTAP(name string) (*TAP, error) {
	if err := checkIfName(name, "tap"); err != nil {
		return nil, err
	}
	existing, err := tapExists(name)
	if err != nil {
		return nil, err
	}
	cfg := water.Config{DeviceType: water.TAP}
	cfg.Name = name
	// water always issues TUNSETPERSIST with this flag: keep a TAP that was
	// already there (and so persistent) persistent.
	cfg.Persist = existing
	ifc, raw, err := openCloexec(cfg)
	if err != nil {
		return nil, fmt.Errorf("open TAP %s: %w", name, err)
	}
	return &TAP{ifc: ifc, raw: raw, name: ifc.Name(), created: !existing}, nil
}

// openCloexec is water.New with the descriptor made close-on-exec. water
// opens /dev/net/tun without O_CLOEXEC, so a process started meanwhile (by
// any goroutine) would inherit the TAP and keep it alive after Close and
// after rayvmm exits. Holding syscall.ForkLock for reading until the flag
// is set keeps os/exec from forking in between, as the standard library
// does for descriptors it cannot open close-on-exec atomically.
func openCloexec(cfg water.Config) (*water.Interface, syscall.RawConn, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	ifc, err := water.New(cfg)
	if err != nil {
		return nil, nil, err
	}
	f, ok := ifc.ReadWriteCloser.(*os.File)
	if !ok {
		ifc.Close()
		return nil, nil, fmt.Errorf("water returned a %T, not a file", ifc.ReadWriteCloser)
	}
	// Not f.Fd(): it would put the descriptor in blocking mode, and Close
	// could no longer interrupt a Read.
	raw, err := f.SyscallConn()
	if err == nil {
		err = raw.Control(func(fd uintptr) { unix.CloseOnExec(int(fd)) })
	}
	if err != nil {
		ifc.Close()
		return nil, nil, err
	}
	return ifc, raw, nil
}

// Name is the interface name.
func (t *TAP) Name() string { return t.name }

// Read reads one frame.
func (t *TAP) Read(p []byte) (int, error) { return t.ifc.Read(p) }

// TryRead reads one frame if one is waiting; ok is false at once if none
// is (the descriptor is non-blocking).
func (t *TAP) TryRead(p []byte) (n int, ok bool, err error) {
	var rerr error
	if err := t.raw.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), p)
		return true // one attempt: never wait
	}); err != nil {
		return 0, false, err
	}
	switch {
	case rerr == unix.EAGAIN:
		return 0, false, nil
	case rerr != nil:
		return 0, false, fmt.Errorf("read TAP %s: %w", t.name, rerr)
	}
	return n, true, nil
}

// Write writes one frame.
func (t *TAP) Write(p []byte) (int, error) { return t.ifc.Write(p) }

// Close closes the descriptor; a TAP that OpenTAP created disappears.
func (t *TAP) Close() error {
	if err := t.ifc.Close(); err != nil && !isClosed(err) {
		return fmt.Errorf("close TAP %s: %w", t.name, err)
	}
	return nil
}

func isClosed(err error) bool { return errors.Is(err, os.ErrClosed) }

// tapExists reports whether a TAP called name exists; another kind of
// interface with that name is an error.
func tapExists(name string) (bool, error) {
	l, err := netlink.LinkByName(name)
	switch {
	case isNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("look up %s: %w", name, err)
	}
	if t, ok := l.(*netlink.Tuntap); !ok || t.Mode != netlink.TUNTAP_MODE_TAP {
		return false, fmt.Errorf("interface %s exists and is a %s, not a TAP", name, l.Type())
	}
	return true, nil
}
