// Package seccap is the VM process's sandbox: what an escaped guest would
// own is a process that can do almost nothing. Apply, called once every
// resource the VM needs is open and before the first KVM_RUN, makes it so:
//
//   - an optional jail (Jail, like Firecracker's jailer): a per-VM root
//     entered with pivot_root in new mount, pid, ipc and uts namespaces,
//     resource limits, and the drop to an unprivileged uid and gid;
//   - every capability dropped: effective, permitted, inheritable, the
//     bounding set and the ambient set, on every thread, with securebits
//     that keep a uid-0 process from getting them back;
//   - not dumpable, so no core file holds guest memory;
//   - no_new_privs;
//   - landlock, best effort by the kernel's ABI: no new file may be
//     opened, no TCP port bound, TCP connects only to the ports
//     Config.DialTCP names, no abstract Unix socket or signal outside the
//     process;
//   - a seccomp-bpf allow-list on every thread (TSYNC), with argument
//     filters (ioctl only the KVM and terminal requests the VM process
//     makes; socket only the families it needs; futex, clone, mmap, fcntl,
//     kill and rt_sigaction narrowed to what the Go runtime does), the
//     table in filter.go;
//
// and VCPUFilter, called on each vCPU's locked OS thread, stacks a second,
// tighter filter on that thread only: KVM_RUN on its own vCPU and the few
// calls its exit path makes.
//
// # Modes
//
// ModeStrict refuses anything off the lists: the refused call does not
// run and the process dies of SIGSYS. ModeLog lets it run and has the
// kernel log it (SECCOMP_RET_LOG, as Cloud Hypervisor's --seccomp log): how
// a missing call is found, in the kernel log (dmesg) as an audit record
// "type=1326 ... syscall=N". ModeOff applies nothing.
//
// # How the control plane learns which call was refused
//
// A process killed by SECCOMP_RET_KILL_PROCESS leaves its parent nothing
// but the signal; the kernel's audit record of the kill goes to the kernel
// log only while no audit daemon is registered, is rate limited there, and
// the audit netlink socket that would get it in every case works only from
// the initial network namespace. So strict mode refuses with
// SECCOMP_RET_TRAP instead, as Firecracker does, and the SIGSYS handler,
// a few instructions of assembly (sigsys_amd64.s) that run on the signal
// stack without the Go runtime, writes the refused call's number and
// architecture to Config.ReportFD (a pipe the control plane reads; see
// package seccap/report) and then makes a call that is itself refused while SIGSYS is
// blocked in its own handler: the kernel then resets SIGSYS to its default
// action and the process dies of SIGSYS. The handler cannot be replaced:
// rt_sigaction is refused for SIGSYS. The refused call never runs, whatever
// happens in the handler. The filter also carries SECCOMP_FILTER_FLAG_LOG,
// so the kernel logs the refusal as well. On architectures without the
// handler, strict mode uses SECCOMP_RET_KILL_PROCESS and the control plane
// reports the signal alone.
//
// # Dependencies
//
// github.com/elastic/go-seccomp-bpf was the library to write the filter
// with; it is not used, for two defects (v1.6.0) that each would open the
// sandbox: a failed argument condition leaves the argument in the
// accumulator, so later comparisons take it for the call number (mmap
// with PROT_EXEC passes as fstat, ioctl(fd, 1) as write; see bpf.go), and
// LoadFilter ignores seccomp(2)'s positive return value, which is how the
// kernel says TSYNC failed and nothing was installed. Its syscall tables
// would cost every VM process 0.2 to 0.5 ms and 160 KiB at start, too.
// The program is assembled here into struct sock_filter (bpf.go, with the
// call numbers of golang.org/x/sys/unix), checked call by call by
// golang.org/x/net/bpf's interpreter in the tests, and installed here
// (install_unsafe.go). Only the control plane's report (seccap/report)
// uses go-seccomp-bpf, for call names. Landlock is
// github.com/landlock-lsm/go-landlock.
//
// The VM process must be built with CGO_ENABLED=0 (the Makefile does):
// capabilities and landlock are per-thread state, changed on every thread
// with syscall.AllThreadsSyscall, which cgo binaries do not have.
package seccap

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Mode says how strictly the sandbox is applied.
type Mode string

// Modes.
const (
	ModeStrict Mode = "strict"
	ModeLog    Mode = "log"
	ModeOff    Mode = "off"
)

// Modes lists the values --sandbox takes.
var Modes = []Mode{ModeStrict, ModeLog, ModeOff}

// ParseMode reads a --sandbox value; "" is the default (DefaultMode).
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case "":
		return DefaultMode(), nil
	case ModeStrict, ModeLog, ModeOff:
		return m, nil
	}
	return "", fmt.Errorf("sandbox mode %q: want strict, log or off", s)
}

// DefaultMode is strict where the kernel has seccomp filters, else off.
func DefaultMode() Mode {
	if Supported() != nil {
		return ModeOff
	}
	return ModeStrict
}

// ErrUnsupported means the kernel cannot apply the sandbox.
var ErrUnsupported = errors.New("sandbox not supported by this kernel")

// Supported reports whether the kernel has seccomp filters with the
// actions the sandbox uses.
func Supported() error {
	if builtWithCgo {
		return errCgo
	}
	// PR_GET_SECCOMP fails with EINVAL without CONFIG_SECCOMP.
	if _, err := unix.PrctlRetInt(unix.PR_GET_SECCOMP, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("%w: prctl(PR_GET_SECCOMP): %w", ErrUnsupported, err)
	}
	b, err := os.ReadFile("/proc/sys/kernel/seccomp/actions_avail")
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	for _, a := range []string{"trap", "log", "kill_process"} {
		if !hasWord(string(b), a) {
			return fmt.Errorf("%w: seccomp action %s missing from %s", ErrUnsupported, a, b)
		}
	}
	return nil
}

// Config is one VM process's sandbox. It is plain data, so that the
// control plane can hand it to the VM process.
type Config struct {
	Mode Mode `json:"mode"`
	// ReportFD is where strict mode's SIGSYS handler writes the refused
	// call (see package seccap/report); -1 (or 0) for nowhere.
	ReportFD int `json:"report_fd,omitempty"`
	// DialUnix lists the directories the VM process connects to Unix
	// sockets in, by path: the vsock device's guest-initiated connections
	// to <uds>_<PORT>. Empty: socket(AF_UNIX) and connect are refused.
	DialUnix []string `json:"dial_unix,omitempty"`
	// DialTCP lists the TCP ports the VM process may connect to (the
	// shard data path's reconnects). Empty: socket(AF_INET, AF_INET6)
	// is refused.
	DialTCP []uint16 `json:"dial_tcp,omitempty"`
	// Jail, when set, confines the process first (see Jail).
	Jail *Jail `json:"jail,omitempty"`
}

// Applied is what Apply did, for the VM process's log line and VCPUFilter.
type Applied struct {
	Mode Mode
	// Landlock is the landlock ABI the kernel has (0: none), and
	// LandlockRules what was enforced with it.
	LandlockABI int
	Landlock    string
	// Trap says strict mode refuses through the SIGSYS handler (else
	// through SECCOMP_RET_KILL_PROCESS).
	Trap bool
	// Took is how long Apply took.
	Took time.Duration

	pid int
}

// Apply sandboxes the calling process, every thread of it, for good. Call
// it once every resource is open and before any vCPU runs; it must not
// run concurrently with goroutines that create threads in odd states
// (none do in the VM process). ModeOff applies nothing.
func Apply(c Config) (*Applied, error) {
	start := time.Now()
	a := &Applied{Mode: c.Mode, pid: os.Getpid()}
	switch c.Mode {
	case ModeStrict, ModeLog:
	case ModeOff:
		return a, nil
	default:
		return nil, fmt.Errorf("sandbox: mode %q: want strict, log or off", c.Mode)
	}
	// Not Supported(), which reads /proc: a kernel without the actions
	// used makes seccomp(2) fail below.
	if builtWithCgo {
		return nil, fmt.Errorf("sandbox: %w", errCgo)
	}
	// time.Local is loaded lazily from /etc/localtime, on the first log
	// line that formats a time: load it while files may still be opened.
	_ = time.Local.String()
	if c.Jail != nil {
		if err := c.Jail.enter(); err != nil {
			return nil, fmt.Errorf("sandbox: jail: %w", err)
		}
	}
	if err := dropPrivileges(c.Jail); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	abi, rules, err := restrictLandlock(c)
	if err != nil {
		return nil, fmt.Errorf("sandbox: landlock: %w", err)
	}
	a.LandlockABI, a.Landlock = abi, rules
	a.Trap = c.Mode == ModeStrict && haveTrapHandler
	if a.Trap {
		if err := installSIGSYSHandler(c.ReportFD); err != nil {
			return nil, fmt.Errorf("sandbox: %w", err)
		}
	}
	p, err := processProgram(c, a)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	if err := load(p, true, a.Trap); err != nil {
		return nil, fmt.Errorf("sandbox: seccomp: %w", err)
	}
	a.Took = time.Since(start)
	return a, nil
}

// String describes what was applied, for the VM process's log.
func (a *Applied) String() string {
	if a.Mode == ModeOff {
		return "sandbox off"
	}
	ll := "landlock unavailable"
	if a.LandlockABI > 0 {
		ll = fmt.Sprintf("landlock ABI %d %s", a.LandlockABI, a.Landlock)
	}
	refuse := "refused calls kill with SIGSYS"
	if a.Mode == ModeLog {
		refuse = "refused calls are only logged"
	}
	return fmt.Sprintf("sandbox %s: seccomp on every thread (%s), capabilities dropped, no_new_privs, %s, in %v",
		a.Mode, refuse, ll, a.Took.Round(time.Microsecond))
}

func hasWord(s, w string) bool { return slices.Contains(strings.Fields(s), w) }
