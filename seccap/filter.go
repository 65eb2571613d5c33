package seccap

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// The allow-lists. They were found by running rayvmm's VM process under
// strace -f (one file per thread) and under the filter in log mode while
// it booted rayguest and ran its blk (raw and qcow2 with a backing file,
// read-only and throttled), net (ping both ways through a TAP), console
// (pipe and terminal), API (pause, resume, metrics, shutdown), SMP and
// crash jobs; see README.md for the measured list. Everything the process
// does before Apply (open images, TAPs, sockets, create the VM, map guest
// memory, register irqfds and ioeventfds) is not on them.
//
// Groups are checked in order, so the calls on the exit path come first:
// the kernel caches the verdict of calls allowed whatever their arguments
// and runs the program only for the others (ioctl, futex, ...), and KVM_RUN
// is decided within a few instructions.

// call allows one system call: with any arguments when when is empty,
// else when all conditions of any one of its sets hold.
type call struct {
	name string
	when [][]cond
}

// cond is a test of one 64-bit argument.
type cond struct {
	arg int // 0 to 5
	op  op
	val uint64
}

type op int

const (
	eq     op = iota // argument == val
	ne               // argument != val
	noBits           // argument has none of the bits of val
)

// group is a commented block of the table.
type group struct {
	why   string
	calls []call
}

func calls(names ...string) []call {
	cs := make([]call, len(names))
	for i, n := range names {
		cs[i] = call{name: n}
	}
	return cs
}

// argIn allows name when argument arg is one of values.
func argIn(name string, arg int, values ...uint64) call {
	c := call{name: name}
	for _, v := range values {
		c.when = append(c.when, []cond{{arg, eq, v}})
	}
	return c
}

// onFD narrows every condition set of c to descriptor fd (argument 0).
func onFD(c call, fd int) call {
	if fd < 0 {
		return c
	}
	for i := range c.when {
		c.when[i] = append([]cond{{0, eq, uint64(fd)}}, c.when[i]...)
	}
	return c
}

// goThreadFlags are the clone flags of the Go runtime's newosproc.
const goThreadFlags = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
	unix.CLONE_SYSVSEM | unix.CLONE_SETTLS | unix.CLONE_THREAD

// futexOps are the only futex operations the Go runtime uses:
// FUTEX_WAIT_PRIVATE and FUTEX_WAKE_PRIVATE (linux/futex.h).
var futexOps = []uint64{0 | 128, 1 | 128}

// runtimeGroups are what the Go runtime does on any thread, vCPU threads
// included: a vCPU goroutine may block (futex), help the garbage
// collector (mmap, madvise, tgkill to preempt), take a preemption signal
// and exit its thread.
func runtimeGroups(pid int) []group {
	self := []cond{{0, eq, uint64(pid)}}
	return []group{
		{"Go runtime: locks, sleeps, scheduling (futex only FUTEX_WAIT/WAKE_PRIVATE: no PI or requeue futexes)", append([]call{
			argIn("futex", 1, futexOps...),
		}, calls("nanosleep", "sched_yield", "clock_gettime", "restart_syscall")...)},
		{"Go runtime: memory (never executable: mmap without PROT_EXEC, no mprotect)", append([]call{
			{name: "mmap", when: [][]cond{{{2, noBits, unix.PROT_EXEC}}}},
		}, calls("munmap", "madvise")...)},
		{"Go runtime: signals (preemption, kicks; tgkill and kill only to this process)", append([]call{
			{name: "tgkill", when: [][]cond{self}},
			{name: "kill", when: [][]cond{self}},
		}, calls("rt_sigreturn", "rt_sigprocmask", "sigaltstack", "getpid", "gettid")...)},
		{"Go runtime: a thread ends; fatal errors exit", calls("exit", "exit_group")},
		{"boot timer: CPU time at the first KVM_RUN and at ready", calls("getrusage")},
		{"log lines and the serial console's output", calls("write")},
	}
}

// processGroups is the allow-list of every thread of the VM process.
func processGroups(c Config, landlockFS bool, pid int) []group {
	g := []group{
		{"KVM: the run loop and its exit path (first: decided in a few instructions), a vCPU's set-up on its thread, interrupts of the serial port",
			[]call{argIn("ioctl", 1, kvmRun, kvmIRQLineState, kvmGetRegs, kvmGetSregs, kvmTranslate,
				kvmCreateVCPU, kvmGetTSCKHz, kvmSetCPUID2, kvmSetMSRs, kvmSetSregs, kvmSetRegs, kvmGetMPSt)}},
	}
	g = append(g, runtimeGroups(pid)...)
	g = append(g,
		group{"Go runtime: new threads (clone only with the runtime's thread flags: no fork, no namespaces), GOMAXPROCS updates", []call{
			argIn("clone", 0, goThreadFlags),
			{name: "sched_getaffinity"},
		}},
		group{"a vCPU thread stacks its own filter: thread-only (no TSYNC, no listener fd); a filter can only restrict further", []call{
			{name: "seccomp", when: [][]cond{
				{{0, eq, unix.SECCOMP_SET_MODE_FILTER}, {1, eq, 0}},
				{{0, eq, unix.SECCOMP_SET_MODE_FILTER}, {1, eq, unix.SECCOMP_FILTER_FLAG_LOG}},
			}},
		}},
		group{"Go runtime: the netpoller (API socket, TAPs, pipes, eventfds); rt_sigaction for anything but SIGSYS, whose handler is the sandbox's", []call{
			{name: "epoll_pwait"}, {name: "epoll_ctl"},
			{name: "rt_sigaction", when: [][]cond{{{0, ne, uint64(unix.SIGSYS)}}}},
		}},
		group{"descriptors handed over: disk images (pread64, pwrite64), TAPs, eventfds, pipes, the console; os.File's Seek, Stat, SetBlocking, CloseOnExec, and net.Buffers (writev)", append(calls(
			"read", "pread64", "pwrite64", "writev", "lseek", "fstat", "close"),
			argIn("fcntl", 1, unix.F_GETFD, unix.F_SETFD, unix.F_GETFL, unix.F_SETFL, unix.F_DUPFD_CLOEXEC))},
		group{"disk images: flush, grow (qcow2), discard and write zeroes", calls("fsync", "fdatasync", "ftruncate", "fallocate")},
		group{"the API socket (handed over listening): connections (net.UnixListener.Accept, CloseWrite)", calls(
			"accept4", "getsockname", "shutdown")},
		group{"the console: its terminal's raw mode is restored at the end", []call{
			argIn("ioctl", 1, tcgets, tcsets, tcsetsw, tcsetsf, tiocgwinsz)}},
	)
	var families []uint64
	if len(c.DialUnix) > 0 {
		families = append(families, unix.AF_UNIX)
	}
	if len(c.DialTCP) > 0 {
		families = append(families, unix.AF_INET, unix.AF_INET6)
	}
	if len(families) > 0 {
		g = append(g, group{"sockets dialled by path (vsock's <uds>_<PORT>) or to TCP ports (shard reconnects): only these families; net.Dial's connect, SO_ERROR, addresses and socket options", []call{
			argIn("socket", 0, families...), {name: "connect"}, {name: "getsockopt"}, {name: "setsockopt"}, {name: "getpeername"}}})
	}
	if c.Vsock {
		g = append(g, group{"the vsock device: its epoll loop (one per activation), host sockets read with readv, the CONNECT line peeked, a peer's shutdown polled", []call{
			argIn("epoll_create1", 0, unix.EPOLL_CLOEXEC), {name: "readv"}, argIn("recvfrom", 3, unix.MSG_PEEK), {name: "ppoll"}}})
	}
	var links []uint64
	for _, fd := range c.RecvFDSockets {
		if fd > 0 {
			links = append(links, uint64(fd))
		}
	}
	if len(links) > 0 {
		g = append(g, group{"the sharded data path: NBD sockets received over its links (SCM_RIGHTS), on those descriptors only", []call{
			argIn("recvmsg", 0, links...)}})
	}
	if landlockFS {
		g = append(g, group{"files by path: landlock refuses every one (only allowed here because landlock is enforced)", calls("openat")})
	}
	return g
}

// vcpuGroups is the tighter list a vCPU thread adds on top: KVM_RUN and
// the exit path's calls on its own vCPU (and the VM for the serial IRQ),
// plus the runtime's.
func vcpuGroups(vcpuFD, vmFD, pid int) []group {
	g := []group{
		{"KVM: this vCPU's run loop and the registers a crash report reads", []call{
			onFD(argIn("ioctl", 1, kvmRun, kvmGetRegs, kvmGetSregs, kvmTranslate), vcpuFD),
			onFD(argIn("ioctl", 1, kvmIRQLineState), vmFD),
		}},
	}
	return append(g, runtimeGroups(pid)...)
}

// defaultAction is what a call off the list gets.
func defaultAction(m Mode, trap bool) uint32 {
	switch {
	case m == ModeLog:
		return retLog
	case trap:
		return retTrap
	}
	return retKillProcess
}

func processProgram(c Config, a *Applied) ([]unix.SockFilter, error) {
	return assemble(processGroups(c, a.LandlockABI > 0, a.pid), defaultAction(c.Mode, a.Trap))
}

// Table renders the allow-lists for a config, one line per group, for
// documentation and `rayvmm-vm --print-filter`-style diagnostics.
func Table(c Config) string {
	var b strings.Builder
	write := func(title string, gs []group) {
		fmt.Fprintf(&b, "%s\n", title)
		for _, g := range gs {
			fmt.Fprintf(&b, "  # %s\n  ", g.why)
			for i, cl := range g.calls {
				if i > 0 {
					b.WriteString(", ")
				}
				b.WriteString(describe(cl))
			}
			b.WriteString("\n")
		}
	}
	write("every thread:", processGroups(c, true, 0))
	write("vCPU threads, on top:", vcpuGroups(-1, -1, 0))
	return b.String()
}

// describe renders a call and its conditions.
func describe(c call) string {
	if len(c.when) == 0 {
		return c.name
	}
	var alts []string
	for _, w := range c.when {
		var parts []string
		for _, cond := range w {
			v := fmt.Sprintf("%#x", cond.val)
			if (c.name == "tgkill" || c.name == "kill") && cond.arg == 0 {
				v = "getpid()"
			}
			if c.name == "ioctl" && cond.arg == 1 {
				if n, ok := ioctlNames[cond.val]; ok {
					v = n
				}
			}
			op := map[op]string{eq: "==", ne: "!=", noBits: "has none of"}[cond.op]
			parts = append(parts, fmt.Sprintf("arg%d %s %s", cond.arg, op, v))
		}
		alts = append(alts, strings.Join(parts, " && "))
	}
	if len(alts) > 1 && len(c.when[0]) == 1 {
		// arg N == a || arg N == b ... reads better as a set.
		var vs []string
		for _, a := range alts {
			vs = append(vs, a[strings.LastIndex(a, " ")+1:])
		}
		return fmt.Sprintf("%s(arg%d in {%s})", c.name, c.when[0][0].arg, strings.Join(vs, ", "))
	}
	return fmt.Sprintf("%s(%s)", c.name, strings.Join(alts, " || "))
}
