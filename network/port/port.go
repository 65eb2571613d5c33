// Package port is the data path of a guest NIC's host side, the part the
// VM process runs: a Port moves whole Ethernet frames; a TAP is a Port on an
// already-open TAP file descriptor (handed over by the control plane, which
// created it and put it on a bridge); a Trunk is a Port that carries several
// VLANs to the guest as 802.1Q-tagged frames, tagging and untagging between
// the guest and one TAP per VLAN, because the host kernel may have no
// 802.1Q.
//
// It opens nothing by name and links nothing but the standard library and
// x/sys: creating TAPs, bridges and NAT rules is package network's job, in
// the control plane.
package port

import (
	"errors"
	"fmt"
	"os"
	"syscall"

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

// TAP is an open Linux TAP interface. Its file descriptor is non-blocking
// and registered with Go's poller, so Close interrupts a blocked Read.
type TAP struct {
	f    *os.File
	raw  syscall.RawConn // the same descriptor, for TryRead
	name string
}

// NewTAP takes over f, an open TAP descriptor (IFF_TAP|IFF_NO_PI) of the
// interface name: the TAP gets its own non-blocking, close-on-exec
// duplicate, and f is closed. (A descriptor inherited across exec may have
// lost O_NONBLOCK, which its file description shares with the process that
// passed it, and only a non-blocking descriptor is pollable.)
func NewTAP(f *os.File, name string) (*TAP, error) {
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("TAP %s: %w", name, err)
	}
	fd := -1
	var derr error
	if err := rc.Control(func(old uintptr) { fd, derr = unix.FcntlInt(old, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, fmt.Errorf("TAP %s: %w", name, err)
	}
	if derr != nil {
		return nil, fmt.Errorf("TAP %s: dup: %w", name, derr)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TAP %s: set non-blocking: %w", name, err)
	}
	nf := os.NewFile(uintptr(fd), "tap:"+name)
	raw, err := nf.SyscallConn()
	if err != nil {
		nf.Close()
		return nil, fmt.Errorf("TAP %s: %w", name, err)
	}
	return &TAP{f: nf, raw: raw, name: name}, nil
}

// Name is the interface name.
func (t *TAP) Name() string { return t.name }

// File is the TAP's descriptor, for handing it to another process. The
// TAP still owns it.
func (t *TAP) File() *os.File { return t.f }

// Read reads one frame.
func (t *TAP) Read(p []byte) (int, error) { return t.f.Read(p) }

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
func (t *TAP) Write(p []byte) (int, error) { return t.f.Write(p) }

// Close closes the descriptor; a non-persistent TAP disappears once no
// process holds it open.
func (t *TAP) Close() error {
	if err := t.f.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("close TAP %s: %w", t.name, err)
	}
	return nil
}
