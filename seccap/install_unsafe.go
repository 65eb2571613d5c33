package seccap

import (
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// load installs a filter program on the calling thread, or with tsync on
// every thread of the process. log adds SECCOMP_FILTER_FLAG_LOG: refusals
// by trap are logged by the kernel too.
func load(prog []unix.SockFilter, tsync, log bool) error {
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	var flags uintptr
	if tsync {
		flags |= unix.SECCOMP_FILTER_FLAG_TSYNC
	}
	if log {
		flags |= unix.SECCOMP_FILTER_FLAG_LOG
	}
	r, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, flags, uintptr(unsafe.Pointer(&fprog)))
	switch {
	case e != 0:
		return fmt.Errorf("seccomp(SECCOMP_SET_MODE_FILTER): %w", e)
	case r != 0:
		// TSYNC failed: r is the thread that could not be synchronized
		// (it has a filter of its own that is not an ancestor of ours),
		// and nothing was installed.
		return fmt.Errorf("seccomp: thread %d cannot take the process filter (it has another filter); nothing was installed", r)
	}
	return nil
}

// capsetZero clears the effective, permitted and inheritable sets of
// every thread.
func capsetZero() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	_, _, e := syscall.AllThreadsSyscall(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0)
	if e == unix.ENOTSUP {
		return errCgo
	}
	if e != 0 {
		return fmt.Errorf("capset: %w", e)
	}
	return nil
}

// capGet reads the calling thread's effective, permitted and inheritable
// sets.
func capGet() ([2]unix.CapUserData, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return data, fmt.Errorf("capget: %w", err)
	}
	return data, nil
}

// capEffective reports whether the calling thread holds capability c.
func capEffective(c int) (bool, error) {
	data, err := capGet()
	return data[c/32].Effective&(1<<(c%32)) != 0, err
}

// hasCapabilities reports whether the calling thread has any capability
// in its effective, permitted or inheritable set.
func hasCapabilities() (bool, error) {
	data, err := capGet()
	for _, d := range data {
		if d.Effective|d.Permitted|d.Inheritable != 0 {
			return true, err
		}
	}
	return false, err
}

// sigaction is the kernel's struct sigaction on amd64 and arm64.
type sigaction struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}

// setSIGSYSAction installs handler (a function entered by the kernel with
// the C ABI) for SIGSYS, on the signal stack, with siginfo.
func setSIGSYSAction(handler, restorer uintptr) error {
	sa := sigaction{handler: handler, flags: saSiginfo | saOnstack}
	if restorer != 0 {
		sa.flags |= saRestorer
		sa.restorer = restorer
	}
	_, _, e := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(unix.SIGSYS), uintptr(unsafe.Pointer(&sa)), 0, 8, 0, 0)
	if e != 0 {
		return fmt.Errorf("rt_sigaction(SIGSYS): %w", e)
	}
	return nil
}

// sa_flags (asm-generic/signal.h; SA_RESTORER is x86's: the handler
// returns through restorer).
const (
	saSiginfo  = 0x4
	saRestorer = 0x04000000
	saOnstack  = 0x08000000
)
