package seccap

import (
	"errors"
	"fmt"
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

// checkAllThreads fails early, with the reason, where per-thread state
// cannot be changed on every thread.
func checkAllThreads() error {
	if _, _, e := syscall.AllThreadsSyscall(unix.SYS_GETPID, 0, 0, 0); e == unix.ENOTSUP {
		return errors.New("this binary links cgo, so its threads' capabilities and landlock domain cannot all be changed; build it with CGO_ENABLED=0")
	}
	return nil
}

// allThreadsPrctl is prctl on every thread.
func allThreadsPrctl(option, arg2, arg3 uintptr) error {
	_, _, e := syscall.AllThreadsSyscall6(unix.SYS_PRCTL, option, arg2, arg3, 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// dropPrivileges takes every capability away from every thread, for good:
// the bounding set and securebits first (they need CAP_SETPCAP), then the
// ambient set, the jail's uid and gid if any, then the effective,
// permitted and inheritable sets; and makes the process not dumpable.
//
// A process started without CAP_SETPCAP (rayvmm run by a user in the kvm
// group) cannot shrink its bounding set; it has no capabilities to use
// anyway, and no_new_privs keeps it from gaining any.
func dropPrivileges(j *Jail) error {
	setpcap, err := capEffective(unix.CAP_SETPCAP)
	if err != nil {
		return err
	}
	if setpcap {
		last, err := lastCap()
		if err != nil {
			return err
		}
		for c := 0; c <= last; c++ {
			if err := allThreadsPrctl(unix.PR_CAPBSET_DROP, uintptr(c), 0); err != nil {
				return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
			}
		}
		// A uid-0 process gains no capabilities from an execve (which
		// is refused anyway) nor keeps any across a uid change, and
		// cannot raise ambient ones.
		bits := uintptr(secbitNoRoot | secbitNoRootLocked | secbitNoSetuidFixupLocked |
			secbitKeepCapsLocked | secbitNoCapAmbientRaise | secbitNoCapAmbientRaiseLocked)
		if err := allThreadsPrctl(unix.PR_SET_SECUREBITS, bits, 0); err != nil {
			return fmt.Errorf("prctl(PR_SET_SECUREBITS): %w", err)
		}
	}
	if err := allThreadsPrctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0); err != nil && err != unix.EINVAL {
		return fmt.Errorf("clear the ambient capabilities: %w", err)
	}
	if j != nil {
		if err := j.becomeUser(); err != nil {
			return fmt.Errorf("jail: %w", err)
		}
	}
	if err := capsetZero(); err != nil {
		return err
	}
	// Not dumpable: no core file of guest memory when the sandbox kills
	// the process, and no ptrace by other processes of its uid.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE): %w", err)
	}
	if err := allThreadsPrctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	return nil
}

// lastCap is the highest capability number the kernel knows: the last
// one PR_CAPBSET_READ accepts (no /proc needed, which a jail lacks).
func lastCap() (int, error) {
	for c := 0; c < 64; c++ {
		if _, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0); err != nil {
			if c == 0 {
				return 0, fmt.Errorf("prctl(PR_CAPBSET_READ): %w", err)
			}
			return c - 1, nil
		}
	}
	return 63, nil
}
