package vmproc

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/vmproc/spawn"
)

// Binary is the VM process's executable name.
const Binary = spawn.Binary

// EnvBinary names the VM process's executable explicitly.
const EnvBinary = spawn.EnvBinary

// DaemonBinary is rayvmm's third executable: the daemon and everything
// that links etcd (sharded volumes), which rayvmm runs for those commands.
const DaemonBinary = "rayvmmd"

// EnvDaemonBinary names rayvmmd's executable explicitly.
const EnvDaemonBinary = "RAYVMMD_BINARY"

// ErrNoBinary means rayvmm-vm (or rayvmmd) was not found.
var ErrNoBinary = spawn.ErrNoBinary

// FindBinary locates rayvmm-vm: next to this executable, then
// $RAYVMM_VM_BINARY, then on PATH.
func FindBinary() (string, error) { return spawn.FindBinary() }

// FindDaemon locates rayvmmd the same way: next to this executable, then
// $RAYVMMD_BINARY, then on PATH.
func FindDaemon() (string, error) { return FindExecutable(DaemonBinary, EnvDaemonBinary) }

// FindExecutable locates one of rayvmm's executables (see
// spawn.FindExecutable).
func FindExecutable(name, env string) (string, error) { return spawn.FindExecutable(name, env) }

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
	// Gate holds the guest back until Process.Go (see Handoff.Gate).
	Gate bool
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
}

// Process is a started VM process.
type Process struct {
	Pid int
	// StartTime is the process's start time in clock ticks since boot
	// (field 22 of /proc/PID/stat): with the pid it identifies the process
	// across pid reuse, for re-adoption.
	StartTime uint64

	child    *spawn.Child
	lifeline *os.File // the handoff socket: foreground mode, or until the go
	detached bool
}

// Launch starts the VM process with h and the descriptors in fs. In
// foreground mode the VM process dies with this process (see the package
// comment); the descriptors in fs may be closed here once Launch returns.
func Launch(h *Handoff, fs *Files, o Options) (*Process, error) {
	h.ReadyAt = time.Now()
	c, err := spawn.Start(spawn.Options{
		Binary: o.Binary, Stdin: o.Stdin, Stdout: o.Stdout, Stderr: o.Stderr,
		Detached: o.Detached, Env: o.Env, Prep: spawn.For(h.Sandbox), CgroupDir: o.CgroupDir,
	})
	if err != nil {
		return nil, fmt.Errorf("launch VM process: %w", err)
	}
	return hand(c, h, fs, o.Gate, o.BeforeHandoff)
}

// ErrUnfit means a VM process started ahead of its VM (see package spawn)
// was started with a sandbox preparation that does not fit the VM's.
var ErrUnfit = errors.New("the VM process started ahead was prepared for another sandbox")

// Hand hands h and the descriptors in fs to the VM process c started, over
// its handoff socket, and returns it as a Process (gate: see
// Options.Gate). The descriptors in fs may be closed here once Hand
// returns. A c whose preparation does not fit h's sandbox is refused with
// ErrUnfit and left as it is (Discard it); on any other error c is killed.
func Hand(c *spawn.Child, h *Handoff, fs *Files, gate bool) (*Process, error) {
	return hand(c, h, fs, gate, nil)
}

func hand(c *spawn.Child, h *Handoff, fs *Files, gate bool, before func(*Process) error) (*Process, error) {
	if !c.Options.Prep.Fits(h.Sandbox) {
		return nil, ErrUnfit
	}
	if h.Sandbox != nil {
		h.Sandbox.Landlocked = c.Options.Prep.Landlock != nil
	}
	h.Version = Version
	h.ParentPID = os.Getpid()
	h.Lifeline = !c.Options.Detached
	h.Gate = gate
	h.LaunchedAt = c.Started
	if h.ReadyAt.IsZero() {
		h.ReadyAt = time.Now() // started ahead
	}
	p := &Process{Pid: c.Pid, StartTime: c.StartTime, child: c, detached: c.Options.Detached}
	if before != nil {
		if err := before(p); err != nil {
			c.Conn.Close()
			c.Kill()
			return nil, err
		}
	}
	if err := send(c.Conn, h, fs); err != nil {
		c.Conn.Close()
		c.Kill()
		return nil, fmt.Errorf("launch VM process: hand over: %w", err)
	}
	if c.Options.Detached && !gate {
		c.Conn.Close()
	} else {
		p.lifeline = c.Conn
	}
	return p, nil
}

// maxFDs is how many descriptors one handoff can carry (the kernel's
// SCM_MAX_FD).
const maxFDs = 253

// maxHandoff bounds the handoff's JSON.
const maxHandoff = 16 << 20

// send writes the handoff on the socket: its length (4 bytes, little
// endian), then its JSON; the descriptors in fs travel with the first
// bytes, in order.
func send(conn *os.File, h *Handoff, fs *Files) error {
	payload, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if len(payload) > maxHandoff {
		return fmt.Errorf("%d bytes, more than %d", len(payload), maxHandoff)
	}
	if len(fs.files) > maxFDs {
		return fmt.Errorf("%d descriptors, more than %d", len(fs.files), maxFDs)
	}
	fds := make([]int, len(fs.files))
	for i, f := range fs.files {
		fds[i] = int(f.Fd())
	}
	msg := binary.LittleEndian.AppendUint32(make([]byte, 0, 4+len(payload)), uint32(len(payload)))
	msg = append(msg, payload...)
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Write(func(fd uintptr) bool {
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		for len(msg) > 0 {
			n, err := unix.SendmsgN(int(fd), msg, oob, nil, unix.MSG_NOSIGNAL)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				serr = err
				return true
			}
			msg, oob = msg[n:], nil
		}
		return true
	})
	runtime.KeepAlive(fs.files)
	if err != nil {
		return err
	}
	return serr
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

// Wait waits for the VM process to exit; it may be called more than once.
func (p *Process) Wait() (*os.ProcessState, error) { return p.child.Wait() }

// Done is closed once the process has exited and Wait would not block.
func (p *Process) Done() <-chan struct{} { return p.child.Done() }

// Signal sends sig to the VM process unless it has exited.
func (p *Process) Signal(sig os.Signal) error { return p.child.Signal(sig) }

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
func ProcessStartTime(pid int) (uint64, error) { return spawn.ProcessStartTime(pid) }

// Alive reports whether the process pid still exists and is the one that
// started at startTime (not a later process that reused the pid): how a
// daemon re-adopts a detached VM process.
// A zombie (exited, not yet reaped by a parent that is not this
// process) is not alive.
func Alive(pid int, startTime uint64) bool {
	st, state, err := spawn.ProcStat(pid)
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
