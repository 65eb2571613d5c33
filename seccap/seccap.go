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
// Apply is Prepare (what needs nothing from the VM: the SIGSYS handler and
// the filter's assembly, done while the VM is being built) and
// Prepared.Apply. The launcher takes what it can onto the thread that
// forks the VM process, so that the process starts that way:
// PrepareForkThread (capabilities, no_new_privs) and, without a jail,
// LandlockForkThread (Config.Landlocked): on kernels before landlock ABI 8
// landlocking a running process stops the world, which also interrupts
// the KVM ioctls that build the VM.
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
	"sync"
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
// actions the sandbox uses. The answer is the same for the life of the
// process: it is found once.
func Supported() error { return supported() }

var supported = sync.OnceValue(checkSupported)

func checkSupported() error {
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
	// Vsock: the VM has a virtio-vsock device, whose worker makes an
	// epoll instance per activation and reads host sockets with readv,
	// recvfrom(MSG_PEEK) (the CONNECT line) and ppoll (has the peer
	// shut down).
	Vsock bool `json:"vsock,omitempty"`
	// RecvFDSockets are the sharded data path's links (package
	// shards/link): Unix sockets, one per sharded disk, on which the VM
	// process receives the NBD sockets of its replicas with recvmsg and
	// SCM_RIGHTS, also to reconnect. recvmsg is allowed on these
	// descriptors only; the VM process sets them itself (the numbers its
	// links have once opened), before the filter is made.
	RecvFDSockets []int `json:"recv_fd_sockets,omitempty"`
	// Jail, when set, confines the process first (see Jail).
	Jail *Jail `json:"jail,omitempty"`
	// Landlocked: the process was started landlocked with this config's
	// rules (LandlockForkThread on the thread that started it), so Apply
	// does not restrict its threads again. Never with a jail.
	Landlocked bool `json:"landlocked,omitempty"`
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
	// Took is how long Apply took, and Prepared how long Prepare took
	// before it (while the VM was being built, in the VM process).
	Took, Prepared time.Duration
	// Jail is the jail the process entered, if any.
	Jail *Jail

	pid int
}

// Apply sandboxes the calling process, every thread of it, for good. Call
// it once every resource is open and before any vCPU runs; it must not
// run concurrently with goroutines that create threads in odd states
// (none do in the VM process). ModeOff applies nothing. It is Prepare
// followed by Prepared.Apply.
func Apply(c Config) (*Applied, error) {
	p, err := Prepare(c)
	if err != nil {
		return nil, err
	}
	return p.Apply()
}

// Prepared is a sandbox half applied by Prepare; Apply finishes it.
type Prepared struct {
	c    Config
	a    *Applied
	prog []unix.SockFilter
	took time.Duration
}

// Prepare does the part of the sandbox that need not wait for the VM to be
// built, so that the VM process can do it on another goroutine while it
// builds the VM (its cost then adds nothing to the boot): it loads
// time.Local (/etc/localtime, read lazily on the first log line that
// formats a time), installs strict mode's SIGSYS handler and assembles
// the process filter. It refuses nothing yet, and it signals no other
// thread (a stop-the-world would interrupt the KVM ioctls that build the
// VM with EINTR): that is all Apply's.
func Prepare(c Config) (*Prepared, error) {
	start := time.Now()
	p := &Prepared{c: c, a: &Applied{Mode: c.Mode, pid: os.Getpid()}}
	switch c.Mode {
	case ModeStrict, ModeLog:
	case ModeOff:
		return p, nil
	default:
		return nil, fmt.Errorf("sandbox: mode %q: want strict, log or off", c.Mode)
	}
	// Not Supported(), which reads /proc: a kernel without the actions
	// used makes seccomp(2) fail below.
	if builtWithCgo {
		return nil, fmt.Errorf("sandbox: %w", errCgo)
	}
	_ = time.Local.String()
	if c.Jail != nil && c.Landlocked {
		return nil, errors.New("sandbox: landlocked before a jail (the jail's mounts come first)")
	}
	a := p.a
	// The filter allows openat only where landlock refuses every path:
	// made for the kernel's ABI, enforced by the launcher or by Apply.
	a.LandlockABI = LandlockABI()
	a.Trap = c.Mode == ModeStrict && haveTrapHandler
	if a.Trap {
		if err := installSIGSYSHandler(c.ReportFD); err != nil {
			return nil, fmt.Errorf("sandbox: %w", err)
		}
	}
	var err error
	if p.prog, err = processProgram(c, a); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	p.took = time.Since(start)
	return p, nil
}

// Apply finishes the sandbox Prepare began: the jail, if any, then the
// capabilities, no_new_privs, landlock (with a jail) and the seccomp
// filter on every thread. Call it once every resource is open and before
// any vCPU runs.
func (p *Prepared) Apply() (*Applied, error) {
	start := time.Now()
	c, a := p.c, p.a
	if c.Mode == ModeOff {
		return a, nil
	}
	if c.Jail != nil {
		if err := c.Jail.enter(); err != nil {
			return nil, fmt.Errorf("sandbox: jail: %w", err)
		}
		a.Jail = c.Jail
	}
	if err := dropPrivileges(c.Jail); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	if c.Landlocked {
		if a.LandlockABI > 0 {
			a.Landlock = describeLandlock(c) + " since exec"
		}
	} else {
		abi, rules, err := restrictLandlock(c)
		if err != nil {
			return nil, fmt.Errorf("sandbox: landlock: %w", err)
		}
		if abi != a.LandlockABI {
			return nil, fmt.Errorf("sandbox: landlock ABI %d, the filter was made for %d", abi, a.LandlockABI)
		}
		a.Landlock = rules
	}
	if err := load(p.prog, true, a.Trap); err != nil {
		return nil, fmt.Errorf("sandbox: seccomp: %w", err)
	}
	a.Took = time.Since(start)
	a.Prepared = p.took
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
	jail := ""
	if a.Jail != nil {
		jail = fmt.Sprintf(", jailed in %s as %d:%d", a.Jail.Root, a.Jail.UID, a.Jail.GID)
	}
	return fmt.Sprintf("sandbox %s: seccomp on every thread (%s), capabilities dropped, no_new_privs, %s%s, in %v (and %v prepared beforehand)",
		a.Mode, refuse, ll, jail, a.Took.Round(time.Microsecond), a.Prepared.Round(time.Microsecond))
}

func hasWord(s, w string) bool { return slices.Contains(strings.Fields(s), w) }
