package seccap

import (
	"errors"
	"fmt"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"
)

// securebits (include/uapi/linux/securebits.h).
const (
	secbitNoRoot                  = 1 << 0
	secbitNoRootLocked            = 1 << 1
	secbitNoSetuidFixupLocked     = 1 << 3
	secbitKeepCapsLocked          = 1 << 5
	secbitNoCapAmbientRaise       = 1 << 6
	secbitNoCapAmbientRaiseLocked = 1 << 7
)

// allThreadsPrctl is prctl on every thread. Each call stops the world
// and signals every thread, which costs from tens of microseconds to
// milliseconds on a loaded host, so the sandbox makes as few as it can.
func allThreadsPrctl(option, arg2, arg3 uintptr) error {
	_, _, e := syscall.AllThreadsSyscall6(unix.SYS_PRCTL, option, arg2, arg3, 0, 0, 0)
	if e == unix.ENOTSUP {
		return errCgo
	}
	if e != 0 {
		return e
	}
	return nil
}

var errCgo = errors.New("this binary is built with cgo, whose threads the sandbox cannot reach; build it with CGO_ENABLED=0 (the Makefile does)")

// jailCaps are the capabilities a jailed VM process needs before it is
// sandboxed: its mounts, pivot_root and hostname; the change of uid and
// gid; and dropping these four from the bounding set afterwards.
var jailCaps = []int{unix.CAP_SYS_ADMIN, unix.CAP_SETUID, unix.CAP_SETGID, unix.CAP_SETPCAP}

// PrepareForkThread is for the control plane, on the OS thread that is
// about to start a VM process: it drops from that thread's bounding set
// every capability the VM process does not need before its sandbox is
// applied (all of them, or the four a jail needs), and sets its
// no_new_privs. A VM process started from the thread then begins that
// way on every thread, and Apply need not change them one by one on each
// of its threads, which stops the world each time. The thread must be
// locked (runtime.LockOSThread) and stay locked until its goroutine ends,
// so that the runtime discards it. Without CAP_SETPCAP (a control plane
// run by an unprivileged user) there is no capability to drop.
func PrepareForkThread(jailed bool) error {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	setpcap, err := capEffective(unix.CAP_SETPCAP)
	if err != nil || !setpcap {
		return err
	}
	// Every capability the kernel knows, without reading the set first
	// (one system call each, on the path to every boot): dropping one
	// that is not in the set does nothing, and EINVAL means past the last.
	for c := 0; c < 64; c++ {
		if jailed && slices.Contains(jailCaps, c) {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			if err == unix.EINVAL && c > 0 {
				return nil
			}
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	return nil
}

// boundingSet lists the calling thread's bounding set.
func boundingSet() ([]int, error) {
	var caps []int
	for c := 0; c < 64; c++ {
		in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0)
		if err != nil {
			if c == 0 {
				return nil, fmt.Errorf("prctl(PR_CAPBSET_READ): %w", err)
			}
			break // past the last capability the kernel knows
		}
		if in == 1 {
			caps = append(caps, c)
		}
	}
	return caps, nil
}

// hasAmbient reports whether the calling thread has ambient capabilities.
func hasAmbient(bset []int) bool {
	for _, c := range bset {
		if in, err := unix.PrctlRetInt(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_IS_SET, uintptr(c), 0, 0); err == nil && in == 1 {
			return true
		}
	}
	return false
}

// dropPrivileges takes every capability away from every thread, for good:
// the bounding set and securebits first (they need CAP_SETPCAP), then the
// ambient set, the jail's uid and gid if any, then the effective,
// permitted and inheritable sets; and sets no_new_privs on every thread
// and makes the process not dumpable. Each step that has something to do
// changes every thread; a step with nothing to do (a VM process started
// from a thread PrepareForkThread prepared has no capabilities to drop and
// no_new_privs already) costs a few system calls on this thread only.
//
// A process started without CAP_SETPCAP (rayvmm run by a user in the kvm
// group) cannot shrink its bounding set; it has no capabilities to use
// anyway, and no_new_privs keeps it from gaining any.
func dropPrivileges(j *Jail) error {
	setpcap, err := capEffective(unix.CAP_SETPCAP)
	if err != nil {
		return err
	}
	bset, err := boundingSet()
	if err != nil {
		return err
	}
	if setpcap && len(bset) > 0 {
		// A uid-0 process gains no capabilities from an execve (which
		// is refused anyway) nor keeps any across a uid change, and
		// cannot raise ambient ones.
		bits := uintptr(secbitNoRoot | secbitNoRootLocked | secbitNoSetuidFixupLocked |
			secbitKeepCapsLocked | secbitNoCapAmbientRaise | secbitNoCapAmbientRaiseLocked)
		if err := allThreadsPrctl(unix.PR_SET_SECUREBITS, bits, 0); err != nil {
			return fmt.Errorf("prctl(PR_SET_SECUREBITS): %w", err)
		}
		for _, c := range bset {
			if err := allThreadsPrctl(unix.PR_CAPBSET_DROP, uintptr(c), 0); err != nil {
				return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
			}
		}
	}
	if hasAmbient(bset) {
		if err := allThreadsPrctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0); err != nil {
			return fmt.Errorf("clear the ambient capabilities: %w", err)
		}
	}
	if j != nil {
		if err := j.becomeUser(); err != nil {
			return fmt.Errorf("jail: %w", err)
		}
	}
	if any, err := hasCapabilities(); err != nil {
		return err
	} else if any {
		if err := capsetZero(); err != nil {
			return err
		}
	}
	// Not dumpable: no core file of guest memory when the sandbox kills
	// the process, and no ptrace by other processes of its uid.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE): %w", err)
	}
	return noNewPrivs()
}

// noNewPrivs sets no_new_privs on every thread, which landlock and
// seccomp need. A process that has it on this thread had it when it
// started (PrepareForkThread), and so has every thread: then it costs
// one prctl.
func noNewPrivs() error {
	if nnp, err := unix.PrctlRetInt(unix.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0); err != nil || nnp != 1 {
		if err := allThreadsPrctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
			return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
		}
	}
	return nil
}
