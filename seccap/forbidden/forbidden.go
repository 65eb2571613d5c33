// Package forbidden makes the calls the VM process's sandbox must refuse,
// for the tests that show it does. The VM process calls AfterSandbox once
// its sandbox is applied and OnVCPU on each vCPU thread before its first
// KVM_RUN; built with the seccaptest build tag (only tests do), those make
// the call the environment variable Env asks for, and the control plane
// must then report the process killed by SIGSYS naming the call (or, for a
// path landlock refuses, the process says the call returned its error).
// In other builds they do nothing, and Try is not linked.
package forbidden

import (
	"fmt"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Calls names what Try can do, each with the system call it makes.
var Calls = map[string]string{
	"execve":      "execve(\"/bin/true\")",
	"open-shadow": "openat(\"/etc/shadow\", O_RDONLY)",
	"socket-inet": "socket(AF_INET, SOCK_STREAM)",
	"ptrace":      "ptrace(PTRACE_TRACEME)",
	"mount":       "mount(\"none\", \"/mnt\", \"tmpfs\")",
}

// Try makes the call name. It returns only if the call returned: its
// error (nil if the call succeeded, which a sandbox must not allow). The
// seccap tests call it directly.
func Try(name string) error {
	switch name {
	case "execve":
		return syscall.Exec("/bin/true", []string{"true"}, nil)
	case "open-shadow":
		f, err := os.Open("/etc/shadow")
		if err == nil {
			f.Close()
		}
		return err
	case "socket-inet":
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err == nil {
			unix.Close(fd)
		}
		return err
	case "ptrace":
		_, _, e := unix.RawSyscall(unix.SYS_PTRACE, unix.PTRACE_TRACEME, 0, 0)
		if e != 0 {
			return e
		}
		return nil
	case "mount":
		return unix.Mount("none", "/mnt", "tmpfs", 0, "")
	}
	return fmt.Errorf("forbidden call %q: want one of execve, open-shadow, socket-inet, ptrace, mount", name)
}

// Env is how a test asks a seccaptest build of the VM process for a
// forbidden call: CALL makes it on an ordinary goroutine once the sandbox
// is applied, CALL@vcpu on vCPU 0's thread right before its first
// KVM_RUN (where the vCPU filter is on too), and CALL@repeat every 100 ms
// on an ordinary goroutine while the VM runs on (for log mode, whose
// kernel log records are rate limited: the test waits until it sees one),
// and CALL@sigusr2 on an ordinary goroutine once the VM process receives
// SIGUSR2 (for a test that must first do something else, such as restart
// the daemon that supervises the VM).
const Env = "RAYVMM_SECCAPTEST_TRY"

// Requested reads Env: the call, and whether a vCPU thread makes it.
func Requested() (call string, onVCPU, ok bool) {
	call, where, ok := request()
	return call, where == "vcpu", ok && where != "repeat" && where != "sigusr2"
}

// Signalled reads Env: the call to make on SIGUSR2, if that is asked.
func Signalled() (call string, ok bool) {
	call, where, ok := request()
	return call, ok && where == "sigusr2"
}

// Repeated reads Env: the call to make again and again, if that is asked.
func Repeated() (call string, ok bool) {
	call, where, ok := request()
	return call, ok && where == "repeat"
}

func request() (call, where string, ok bool) {
	v := os.Getenv(Env)
	if v == "" {
		return "", "", false
	}
	call, where, _ = strings.Cut(v, "@")
	return call, where, true
}
