package vmproc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
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

// DaemonBinary is rayvmm's third executable: the daemon and everything
// that links etcd (sharded volumes), which rayvmm runs for those commands.
const DaemonBinary = "rayvmmd"

// EnvDaemonBinary names rayvmmd's executable explicitly.
const EnvDaemonBinary = "RAYVMMD_BINARY"

// ErrNoBinary means rayvmm-vm (or rayvmmd) was not found.
var ErrNoBinary = errors.New("not found")

// FindBinary locates rayvmm-vm: next to this executable, then
// $RAYVMM_VM_BINARY, then on PATH.
func FindBinary() (string, error) { return FindExecutable(Binary, EnvBinary) }

// FindDaemon locates rayvmmd the same way: next to this executable, then
// $RAYVMMD_BINARY, then on PATH.
func FindDaemon() (string, error) { return FindExecutable(DaemonBinary, EnvDaemonBinary) }

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

// Files collects the descriptors to hand over; Add returns the descriptor
// number the VM process sees, for the Handoff's tables.
type Files struct {
	files []*os.File
}

// Add queues f for the VM process and returns its descriptor number there.
// The caller keeps f and closes it once Launch returned.
func (fs *Files) Add(f *os.File) int {
	fs.files = append(fs.files, f)
	return FirstResourceFD + len(fs.files) - 1
}

// Ref is Add returning a File reference named name.
func (fs *Files) Ref(f *os.File, name string) File { return File{FD: fs.Add(f), Name: name} }

// Options say how to start the VM process.
type Options struct {
	// Binary is rayvmm-vm's path; "" means FindBinary.
	Binary string
	// Stdin, Stdout and Stderr of the VM process; nil means /dev/null.
	Stdin, Stdout, Stderr *os.File
	// Detached starts the VM process in a session of its own, with no
	// lifeline and no parent-death signal: it survives the control plane.
	Detached bool
	// Env is the VM process's environment (nil: none but the handoff's).
	Env []string
	// CgroupDir, if set, is an open cgroup v2 directory the VM process is
	// started in (clone3 with CLONE_INTO_CGROUP): it never runs anywhere
	// else, and no migration is paid for (cgroup v1 has no such thing:
	// move it in BeforeHandoff).
	CgroupDir *os.File
	// BeforeHandoff, if set, runs once the VM process exists and before
	// it is handed anything: it is still waiting for its handoff, so what
	// BeforeHandoff does (put it in a cgroup, record its pid durably)
	// comes before it runs any guest code. An error kills the process and
	// fails Launch.
	BeforeHandoff func(*Process) error
	// Gate holds the guest back until Process.Go (see Handoff.Gate).
	Gate bool
}

// Process is a started VM process.
type Process struct {
	Pid int
	// StartTime is the process's start time in clock ticks since boot
	// (field 22 of /proc/PID/stat): with the pid it identifies the process
	// across pid reuse, for re-adoption.
	StartTime uint64

	proc     *os.Process
	lifeline *os.File // the handoff pipe's write end: foreground mode, or until the go
	detached bool
	waited   chan struct{}
	state    *os.ProcessState
	waitErr  error
}

// Launch starts the VM process with h and the descriptors in fs. In
// foreground mode the VM process dies with this process (see the package
// comment); the descriptors in fs may be closed here once Launch returns.
func Launch(h *Handoff, fs *Files, o Options) (*Process, error) {
	bin := o.Binary
	if bin == "" {
		var err error
		if bin, err = FindBinary(); err != nil {
			return nil, err
		}
	}
	sandboxed := h.Sandbox != nil && h.Sandbox.Mode != seccap.ModeOff
	jailed := sandboxed && h.Sandbox.Jail != nil
	// Not jailed, the VM process starts landlocked (from the thread that
	// forks it): its sandbox then stops no world while it builds the VM.
	landlock := sandboxed && !jailed && seccap.LandlockABI() > 0
	if landlock {
		h.Sandbox.Landlocked = true
	}
	h.Version = Version
	h.ParentPID = os.Getpid()
	h.Lifeline = !o.Detached
	h.Gate = o.Gate
	h.LaunchedAt = time.Now()
	payload, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("launch VM process: handoff: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("launch VM process: handoff pipe: %w", err)
	}
	defer r.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("launch VM process: %w", err)
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
		Files: append([]*os.File{std(o.Stdin), std(o.Stdout), std(o.Stderr), r}, fs.files...),
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
	if jailed {
		// A new pid namespace takes a fork: this one (see seccap.Jail).
		attr.Sys.Cloneflags = seccap.Cloneflags
	}
	// Descriptors this process inherited without close-on-exec (from a
	// shell, a test harness) would leak into the VM process, which must
	// hold only what the handoff lists: mark them all; the ones in
	// attr.Files are dup'ed into place without the flag.
	if err := closeOnExecAll(); err != nil {
		w.Close()
		return nil, fmt.Errorf("launch VM process: %w", err)
	}
	p := &Process{waited: make(chan struct{}), detached: o.Detached}
	started := make(chan error, 1)
	// The parent-death signal is sent when the thread that forked exits,
	// so fork from a thread locked for the child's whole life: this
	// goroutine also waits for the child and ends (its thread with it)
	// only after the child is gone.
	go func() {
		runtime.LockOSThread()
		if sandboxed {
			// The VM process starts with no capability it does not need
			// and no_new_privs on every thread, so that its sandbox need
			// not stop the world to change them. This thread is never
			// unlocked: the runtime discards it when the goroutine ends.
			if err := seccap.PrepareForkThread(jailed); err != nil {
				started <- fmt.Errorf("sandbox: %w", err)
				return
			}
			if landlock {
				if err := seccap.LandlockForkThread(*h.Sandbox, bin); err != nil {
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
		p.proc, p.Pid = proc, proc.Pid
		started <- nil
		p.state, p.waitErr = proc.Wait()
		close(p.waited)
	}()
	if err := <-started; err != nil {
		w.Close()
		return nil, fmt.Errorf("launch VM process %s: %w", bin, err)
	}
	p.StartTime, _ = ProcessStartTime(p.Pid)
	if o.BeforeHandoff != nil {
		if err := o.BeforeHandoff(p); err != nil {
			w.Close()
			p.proc.Kill()
			<-p.waited
			return nil, err
		}
	}
	if _, err := w.Write(payload); err != nil {
		w.Close()
		p.proc.Kill()
		<-p.waited
		return nil, fmt.Errorf("launch VM process: write handoff: %w", err)
	}
	if o.Detached && !o.Gate {
		w.Close()
	} else {
		p.lifeline = w
	}
	return p, nil
}

// Go lets a gated VM process run its guest (see Options.Gate); a detached
// one's handoff descriptor is closed with it.
func (p *Process) Go() error {
	if p.lifeline == nil {
		return errors.New("VM process: go: no gate")
	}
	_, err := p.lifeline.Write([]byte{GoByte})
	if p.detached {
		p.lifeline.Close()
		p.lifeline = nil
	}
	if err != nil {
		return fmt.Errorf("VM process: go: %w", err)
	}
	return nil
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
func (p *Process) Wait() (*os.ProcessState, error) {
	<-p.waited
	return p.state, p.waitErr
}

// Done is closed once the process has exited and Wait would not block.
func (p *Process) Done() <-chan struct{} { return p.waited }

// Signal sends sig to the VM process unless it has exited.
func (p *Process) Signal(sig os.Signal) error {
	select {
	case <-p.waited:
		return os.ErrProcessDone
	default:
	}
	return p.proc.Signal(sig)
}

// CutLifeline closes the lifeline (foreground mode): the VM process stops
// cleanly, as if the control plane had exited; before the go, its guest
// never runs.
func (p *Process) CutLifeline() error {
	if p.lifeline == nil {
		return nil
	}
	err := p.lifeline.Close()
	p.lifeline = nil
	return err
}

// ProcessStartTime reads a process's start time in clock ticks since boot
// from /proc/PID/stat.
func ProcessStartTime(pid int) (uint64, error) {
	st, _, err := procStat(pid)
	return st, err
}

// procStat reads a process's start time and state letter (R, S, Z, ...)
// from /proc/PID/stat.
func procStat(pid int) (uint64, byte, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	const startField = 22 - 3 // fields 3.. follow the name
	if len(f) <= startField || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	st, err := strconv.ParseUint(f[startField], 10, 64)
	return st, f[0][0], err
}

// Alive reports whether the process pid still exists and is the one that
// started at startTime (not a later process that reused the pid): how a
// daemon re-adopts a detached VM process.
// A zombie (exited, not yet reaped by a parent that is not this
// process) is not alive.
func Alive(pid int, startTime uint64) bool {
	st, state, err := procStat(pid)
	return err == nil && st == startTime && state != 'Z' && state != 'X'
}

// ErrKilled is the category of a VM process killed by a signal: it could
// not report how it ended itself.
var ErrKilled = errors.New("VM process killed")

// KilledError says which signal killed a VM process, for the control
// plane's one-line message; nil when it exited with a status.
func KilledError(st *os.ProcessState) error {
	ws, ok := st.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() {
		return nil
	}
	return fmt.Errorf("%w by signal %d (%v)", ErrKilled, int(ws.Signal()), ws.Signal())
}
