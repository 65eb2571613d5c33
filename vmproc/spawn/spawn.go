// Package spawn starts a VM process (rayvmm-vm): it forks and execs the
// binary with its standard descriptors and one end of a Unix socket pair as
// descriptor 3, over which package vmproc later sends the handoff and the
// VM's descriptors (SCM_RIGHTS), and which stays open as the lifeline.
//
// Starting is split from handing over so that a control plane can start
// the VM process before it knows the VM: rayvmm boot starts it from an
// early package initializer (cmd/rayvmm/internal/prestart), and the VM
// process's exec and Go runtime start then overlap with rayvmm's own
// start, its flag parsing and the opening of the VM's resources. What the
// forking thread must do before the fork (the sandbox's preparation,
// Prep) is fixed when the process starts; vmproc checks that the VM's
// sandbox fits it before handing over.
//
// The package links only the standard library, x/sys and seccap, so that
// a package initializer can use it early.
package spawn

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/seccap"
)

// Binary is the VM process's executable name.
const Binary = "rayvmm-vm"

// EnvBinary names the VM process's executable explicitly.
const EnvBinary = "RAYVMM_VM_BINARY"

// HandoffFD is the VM process's end of the handoff socket.
const HandoffFD = 3

// EnvHandoff marks a process started by Start: it holds the handoff
// descriptor's number. Without it, rayvmm-vm explains itself and exits.
const EnvHandoff = "RAYVMM_VM_HANDOFF_FD"

// ErrNoBinary means rayvmm-vm (or another of rayvmm's executables) was
// not found.
var ErrNoBinary = errors.New("not found")

// FindBinary locates rayvmm-vm: next to this executable, then
// $RAYVMM_VM_BINARY, then on PATH.
func FindBinary() (string, error) { return FindExecutable(Binary, EnvBinary) }

// FindExecutable locates one of rayvmm's executables, name: next to this
// executable (installed or built together), then the file the
// environment variable env names, then on PATH.
func FindExecutable(name, env string) (string, error) {
	var tried []string
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), name)
		if isExecutable(p) {
			return p, nil
		}
		tried = append(tried, p)
	}
	if p := os.Getenv(env); p != "" {
		if isExecutable(p) {
			return p, nil
		}
		tried = append(tried, "$"+env+"="+p)
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if p := filepath.Join(dir, name); dir != "" && isExecutable(p) {
			return p, nil
		}
	}
	tried = append(tried, "PATH")
	return "", fmt.Errorf("%s %w (looked in %s); build it with `make`, or set %s", name, ErrNoBinary, strings.Join(tried, ", "), env)
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// Prep is what the forking thread does to itself before the fork, so that
// the VM process starts with it (see seccap.PrepareForkThread and
// seccap.LandlockForkThread).
type Prep struct {
	// Sandboxed: no_new_privs and no capability it does not need.
	Sandboxed bool
	// Jailed: also new namespaces (seccap.Cloneflags), keeping the
	// capabilities the jail needs.
	Jailed bool
	// Landlock: started landlocked with these rules (DialUnix, DialTCP;
	// nil: not landlocked).
	Landlock *seccap.Config
}

// For is the preparation a VM process with sandbox c needs (nil: none):
// landlocked from its start unless it is jailed or the kernel has no
// landlock.
func For(c *seccap.Config) Prep {
	if c == nil || c.Mode == seccap.ModeOff {
		return Prep{}
	}
	p := Prep{Sandboxed: true, Jailed: c.Jail != nil}
	if !p.Jailed && seccap.LandlockABI() > 0 {
		p.Landlock = &seccap.Config{Mode: c.Mode, DialUnix: c.DialUnix, DialTCP: c.DialTCP}
	}
	return p
}

// Fits reports whether a VM process started with p can run sandbox c.
func (p Prep) Fits(c *seccap.Config) bool {
	q := For(c)
	if p.Sandboxed != q.Sandboxed || p.Jailed != q.Jailed || (p.Landlock == nil) != (q.Landlock == nil) {
		return false
	}
	return p.Landlock == nil || (slices.Equal(p.Landlock.DialUnix, q.Landlock.DialUnix) && slices.Equal(p.Landlock.DialTCP, q.Landlock.DialTCP))
}

// Options say how to start the VM process.
type Options struct {
	// Binary is rayvmm-vm's path; "" means FindBinary.
	Binary string
	// Stdin, Stdout and Stderr of the VM process; nil means /dev/null.
	Stdin, Stdout, Stderr *os.File
	// Detached starts the VM process in a session of its own with no
	// parent-death signal: it survives the control plane.
	Detached bool
	// Env is the VM process's environment (nil: none but EnvHandoff).
	Env  []string
	Prep Prep
	// CgroupDir, if set, is an open cgroup v2 directory to start the
	// process in (clone3 with CLONE_INTO_CGROUP).
	CgroupDir *os.File
}

// Child is a started VM process.
type Child struct {
	Pid int
	// StartTime is the process's start time in clock ticks since boot
	// (field 22 of /proc/PID/stat).
	StartTime uint64
	// Started is when the fork began.
	Started time.Time
	// Conn is this side of the handoff socket (blocking).
	Conn *os.File
	// Binary is the executable it runs, Options the options it was
	// started with.
	Binary  string
	Options Options

	proc    *os.Process
	waited  chan struct{}
	state   *os.ProcessState
	waitErr error
}

// Start starts the VM process. In foreground mode (not Detached) it gets
// SIGTERM when this process exits, and it stops when Conn is closed (the
// handoff's lifeline, see package vmproc).
func Start(o Options) (*Child, error) {
	bin := o.Binary
	if bin == "" {
		var err error
		if bin, err = FindBinary(); err != nil {
			return nil, err
		}
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("handoff socket: %w", err)
	}
	conn, theirs := os.NewFile(uintptr(fds[0]), "handoff"), os.NewFile(uintptr(fds[1]), "handoff")
	defer theirs.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		conn.Close()
		return nil, err
	}
	defer null.Close()
	std := func(f *os.File) *os.File {
		if f == nil {
			return null
		}
		return f
	}
	attr := &os.ProcAttr{
		Env:   append(append([]string(nil), o.Env...), EnvHandoff+"="+strconv.Itoa(HandoffFD)),
		Files: []*os.File{std(o.Stdin), std(o.Stdout), std(o.Stderr), theirs},
		Sys:   &syscall.SysProcAttr{},
	}
	if o.CgroupDir != nil {
		attr.Sys.UseCgroupFD, attr.Sys.CgroupFD = true, int(o.CgroupDir.Fd())
	}
	if o.Detached {
		attr.Sys.Setsid = true
	} else {
		attr.Sys.Pdeathsig = syscall.SIGTERM
	}
	if o.Prep.Jailed {
		// A new pid namespace takes a fork: this one (see seccap.Jail).
		attr.Sys.Cloneflags = seccap.Cloneflags
	}
	// Descriptors this process inherited without close-on-exec (from a
	// shell, a test harness) would leak into the VM process, which must
	// hold only what the handoff lists: mark them all; the ones in
	// attr.Files are dup'ed into place without the flag.
	if err := closeOnExecAll(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("start VM process: %w", err)
	}
	c := &Child{Conn: conn, Binary: bin, Options: o, waited: make(chan struct{}), Started: time.Now()}
	started := make(chan error, 1)
	// The parent-death signal is sent when the thread that forked exits,
	// so fork from a thread locked for the child's whole life: this
	// goroutine also waits for the child and ends (its thread with it)
	// only after the child is gone.
	go func() {
		runtime.LockOSThread()
		if o.Prep.Sandboxed {
			// The VM process starts with no capability it does not need
			// and no_new_privs on every thread, so that its sandbox need
			// not stop the world to change them. This thread is never
			// unlocked: the runtime discards it when the goroutine ends.
			if err := seccap.PrepareForkThread(o.Prep.Jailed); err != nil {
				started <- fmt.Errorf("sandbox: %w", err)
				return
			}
			if o.Prep.Landlock != nil {
				if err := seccap.LandlockForkThread(*o.Prep.Landlock, bin); err != nil {
					started <- fmt.Errorf("sandbox: %w", err)
					return
				}
			}
		}
		proc, err := os.StartProcess(bin, []string{Binary}, attr)
		if err != nil {
			started <- err
			return
		}
		c.proc, c.Pid = proc, proc.Pid
		started <- nil
		c.state, c.waitErr = proc.Wait()
		close(c.waited)
	}()
	if err := <-started; err != nil {
		conn.Close()
		return nil, fmt.Errorf("start VM process %s: %w", bin, err)
	}
	c.StartTime, _ = ProcessStartTime(c.Pid)
	return c, nil
}

// closeOnExecAll sets FD_CLOEXEC on every descriptor from 3 up.
func closeOnExecAll() error {
	err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	// Kernels before 5.11: walk the descriptor table.
	ents, rerr := os.ReadDir("/proc/self/fd")
	if rerr != nil {
		return fmt.Errorf("close-on-exec: %w, and %w", err, rerr)
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd >= 3 {
			unix.CloseOnExec(fd)
		}
	}
	return nil
}

// Wait waits for the VM process to exit; it may be called more than once.
func (c *Child) Wait() (*os.ProcessState, error) {
	<-c.waited
	return c.state, c.waitErr
}

// Done is closed once the process has exited and Wait would not block.
func (c *Child) Done() <-chan struct{} { return c.waited }

// Signal sends sig to the VM process unless it has exited.
func (c *Child) Signal(sig os.Signal) error {
	select {
	case <-c.waited:
		return os.ErrProcessDone
	default:
	}
	return c.proc.Signal(sig)
}

// Kill kills the VM process and waits for it to be gone.
func (c *Child) Kill() {
	c.Signal(os.Kill)
	<-c.waited
}

// Discard ends a VM process that was not handed a VM: it reads EOF on the
// handoff socket and exits; Discard waits for that.
func (c *Child) Discard() {
	c.Conn.Close()
	<-c.waited
}

// ProcessStartTime reads a process's start time in clock ticks since boot
// from /proc/PID/stat.
func ProcessStartTime(pid int) (uint64, error) {
	st, _, err := ProcStat(pid)
	return st, err
}

// ProcStat reads a process's start time and state letter (R, S, Z, ...)
// from /proc/PID/stat.
func ProcStat(pid int) (uint64, byte, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(s[i+1:])
	const startField = 22 - 3 // fields 3.. follow the name
	if len(f) <= startField || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	st, err := strconv.ParseUint(f[startField], 10, 64)
	return st, f[0][0], err
}

// PassEnv is the environment a VM process keeps: nothing but what the Go
// runtime reads, and the variables named in extra, where they are set.
func PassEnv(extra ...string) []string {
	var env []string
	for _, k := range append([]string{"GODEBUG", "GOTRACEBACK", "GOMAXPROCS", "GOGC", "GOMEMLIMIT"}, extra...) {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	return env
}
