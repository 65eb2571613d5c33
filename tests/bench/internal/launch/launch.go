// Package launch starts VMM processes for the benchmarks and measures them:
// wall time from just before fork/exec to a line on the console and to the
// end of the run, peak RSS from wait4, and optionally /proc/PID/smaps
// samples while it runs.
//
// Both times are when the launcher saw the event, each an upper bound on
// when it happened:
//   - ready: when the read that completed the line returned, in a
//     goroutine that does nothing but read the console and stamp;
//   - exit: when the run was over, the later of wait4's return and the end
//     of the console output (EOF on a pipe; EIO on a pseudo-terminal's
//     master once the child's side is closed and everything it wrote has
//     been read).
//
// Output can be read after wait4 returns: on a pseudo-terminal the kernel
// passes what the child wrote to the master through a work queue, and on a
// loaded machine that, or the reading goroutine, can run after the parent
// has reaped the child. A line the child wrote is always read before its
// console ends, so ready <= exit holds by construction, and exit means
// "the process is gone and everything it printed has arrived". Outcome.Reaped
// keeps wait4's own time.
//
// It runs inside tests/bench/launcher, a small process of its own, and not
// in the benchmark program: a child's ru_maxrss starts from the parent's
// peak RSS (Linux records the old address space's high-water mark when the
// child execs, and a vfork-style child execs from its parent's), so only a
// parent smaller than the VMMs measures their peak RSS truthfully. The
// launcher reports its own peak so a result at or below it can be flagged.
package launch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
)

// Request is what the launcher is asked to run: Copies instances of Argv
// started at once.
type Request struct {
	Argv []string `json:"argv"`
	// TTY runs the process on a pseudo-terminal (gokvm only reads its
	// console, and only exits once its vCPUs stop, when stdin is a
	// terminal); otherwise stdout and stderr are pipes and stdin /dev/null.
	TTY bool `json:"tty,omitempty"`
	// Wait is the console line whose first appearance is timed.
	Wait   string `json:"wait,omitempty"`
	Copies int    `json:"copies,omitempty"` // 0 means 1
	// SampleEvery > 0 samples /proc/PID/smaps that often, looking for a
	// mapping of GuestKiB (guest RAM).
	SampleEvery time.Duration `json:"sample_every,omitempty"`
	GuestKiB    int64         `json:"guest_kib,omitempty"`
	// SampleChild, when set, samples the child of the started process
	// whose executable has this name (rayvmm boot's VM process, rayvmm-vm)
	// instead of the started process itself, and records the started
	// process's own peak as ControlHWMKiB.
	SampleChild string        `json:"sample_child,omitempty"`
	Timeout     time.Duration `json:"timeout,omitempty"`

	hooks *hooks // tests only
}

// Response is the launcher's answer.
type Response struct {
	Outcomes []Outcome `json:"outcomes"`
	// Wall is from the first start to the last exit.
	Wall time.Duration `json:"wall_ns"`
	// LauncherHWMKiB is the launcher's own peak RSS when it started the
	// children: no child's MaxRSSKiB can read lower than this.
	LauncherHWMKiB int64 `json:"launcher_hwm_kib"`
}

// Outcome is one process run, timed from just before fork/exec.
type Outcome struct {
	Ready time.Duration `json:"ready_ns"` // 0: the line never appeared
	// Exit is when the process had been reaped and its output had ended
	// (see the package comment); never before Ready or Reaped.
	Exit time.Duration `json:"exit_ns"`
	// Reaped is when wait4 returned.
	Reaped    time.Duration `json:"reaped_ns"`
	MaxRSSKiB int64         `json:"max_rss_kib"` // ru_maxrss from wait4
	Code      int           `json:"code"`        // exit status, -1 when killed by a signal
	Output    string        `json:"output"`
	Stderr    string        `json:"stderr"`
	Err       string        `json:"error,omitempty"` // could not start, or timed out
	// Sample is the last smaps sample, taken while the process ran, that
	// found the guest RAM mapping.
	Sample *MemSample `json:"sample,omitempty"`
	// ParentHWMKiB is the launcher's peak RSS (Response.LauncherHWMKiB):
	// a MaxRSSKiB at or below it only says "at most this much".
	ParentHWMKiB int64 `json:"parent_hwm_kib"`
}

// Run starts req.Copies processes at once and waits for all of them.
func Run(ctx context.Context, req Request) Response {
	n := max(req.Copies, 1)
	if req.Timeout == 0 {
		req.Timeout = 60 * time.Second
	}
	resp := Response{Outcomes: make([]Outcome, n)}
	var wg sync.WaitGroup
	gate := make(chan struct{})
	for i := range resp.Outcomes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			resp.Outcomes[i] = runOne(ctx, req)
		}()
	}
	start := time.Now()
	close(gate)
	wg.Wait()
	resp.Wall = time.Since(start)
	// Measured last, so it is at least what any child inherited.
	resp.LauncherHWMKiB = selfHWM()
	for i := range resp.Outcomes {
		resp.Outcomes[i].ParentHWMKiB = resp.LauncherHWMKiB
	}
	return resp
}

// console reads a child's output and stamps when the awaited line first
// appears and when the output ends.
type console struct {
	start time.Time
	want  []byte
	ended chan struct{} // closed once the output ended or could not be read

	mu     sync.Mutex
	buf    bytes.Buffer
	at     time.Duration // when want first appeared; 0: not yet
	end    time.Duration // when a read returned EOF (or EIO, or an error)
	frozen bool          // the run is over: later bytes are not its own
}

// read reads r until it ends. The stamp is taken as soon as a read returns,
// before anything else is done with the bytes.
func (c *console) read(r io.Reader, beforeRead func()) {
	defer close(c.ended)
	buf := make([]byte, 32<<10)
	for {
		if beforeRead != nil {
			beforeRead()
		}
		n, err := r.Read(buf)
		now := time.Since(c.start)
		c.mu.Lock()
		if c.frozen {
			c.mu.Unlock()
			return
		}
		c.buf.Write(buf[:n])
		if c.at == 0 && len(c.want) > 0 && bytes.Contains(c.buf.Bytes(), c.want) {
			c.at = now
		}
		if err != nil {
			c.end = now
		}
		c.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// freeze ends the run's output: bytes read later are ignored, so nothing
// is stamped after the moment the caller takes next.
func (c *console) freeze() {
	c.mu.Lock()
	c.frozen = true
	c.mu.Unlock()
}

func (c *console) result() (ready, end time.Duration, output string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.at, c.end, c.buf.String()
}

// outputGrace is how long the launcher waits, once the process is reaped,
// for its output to end before it looks for processes holding it.
const outputGrace = 2 * time.Second

// hooks let tests force orders of events that the kernel and the scheduler
// otherwise produce only now and then.
type hooks struct {
	beforeRead func()        // before each read of the console
	reaped     func()        // right after wait4 returned
	grace      time.Duration // replaces outputGrace when > 0
	graceOver  func()        // once the grace ran out and holders were looked for
}

func runOne(ctx context.Context, req Request) Outcome {
	ctx, cancel := context.WithTimeout(ctx, req.Timeout)
	defer cancel()
	var h hooks
	if req.hooks != nil {
		h = *req.hooks
	}
	cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
	var errBuf bytes.Buffer
	var rd, errRd *os.File
	var childEnds []*os.File
	if req.TTY {
		ptmx, tty, err := pty.Open()
		if err != nil {
			return Outcome{Code: -1, Err: fmt.Sprintf("open pty: %v", err)}
		}
		defer ptmx.Close()
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
		rd, childEnds = ptmx, []*os.File{tty}
	} else {
		r, w, err := os.Pipe()
		if err != nil {
			return Outcome{Code: -1, Err: fmt.Sprintf("pipe: %v", err)}
		}
		defer r.Close()
		er, ew, err := os.Pipe()
		if err != nil {
			w.Close()
			return Outcome{Code: -1, Err: fmt.Sprintf("pipe: %v", err)}
		}
		defer er.Close()
		// Both ends are files, so cmd.Wait returns right after wait4,
		// without waiting for a copy of its own.
		cmd.Stdout, cmd.Stderr = w, ew
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		rd, errRd, childEnds = r, er, []*os.File{w, ew}
	}
	out := &console{want: []byte(req.Wait), ended: make(chan struct{})}
	errDone := make(chan struct{})
	outputs := identify(childEnds)

	out.start = time.Now()
	err := cmd.Start()
	for _, c := range childEnds {
		c.Close() // the child holds its own copy
	}
	if err != nil {
		return Outcome{Code: -1, Err: fmt.Sprintf("start %s: %v", req.Argv[0], err)}
	}
	go out.read(rd, h.beforeRead)
	go func() {
		defer close(errDone)
		if errRd != nil {
			io.Copy(&errBuf, errRd)
		}
	}()
	var last *MemSample
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		if req.SampleEvery <= 0 {
			return
		}
		t := time.NewTicker(req.SampleEvery)
		defer t.Stop()
		pid := cmd.Process.Pid
		if req.SampleChild != "" {
			pid = 0
		}
		for {
			if pid == 0 {
				pid = childNamed(cmd.Process.Pid, req.SampleChild)
			}
			if pid != 0 {
				if m, err := ReadSmaps(pid, req.GuestKiB); err == nil && m.GuestFound {
					m.HWMKiB = hwm(pid)
					if req.SampleChild != "" {
						m.ControlHWMKiB = hwm(cmd.Process.Pid)
					}
					last = m
				}
			}
			select {
			case <-stopSampling:
				return
			case <-t.C:
			}
		}
	}()
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var werr error
	timedOut := false
	select {
	case werr = <-waited:
	case <-ctx.Done():
		// The whole process group: the VMM and anything it started.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		werr = <-waited
		timedOut = true
	}
	reaped := time.Since(out.start)
	if h.reaped != nil {
		h.reaped()
	}
	close(stopSampling)
	<-sampled

	// The run is over when its output has ended too. If it has not
	// ended after a grace period, look at who still holds it: nobody
	// means the end is on its way (a loaded machine), so keep waiting;
	// processes the VMM left behind are killed, and the run reports them.
	grace := outputGrace
	if h.grace > 0 {
		grace = h.grace
	}
	var held string
	select {
	case <-out.ended:
	case <-time.After(grace):
		if pids := holders(outputs); len(pids) > 0 {
			held = describe(pids)
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if h.graceOver != nil {
			h.graceOver()
		}
		select {
		case <-out.ended:
		case <-ctx.Done():
		}
	}
	open := false
	select {
	case <-out.ended:
	default:
		open = true // only at the request's timeout
	}
	out.freeze()
	ready, end, output := out.result()
	exit := max(reaped, end)
	if open {
		exit = time.Since(out.start) // after every stamp: the output is frozen
	}
	select {
	case <-errDone:
	case <-ctx.Done():
	}
	o := Outcome{Ready: ready, Exit: exit, Reaped: reaped, Output: output, Code: -1, Sample: last}
	select {
	case <-errDone:
		o.Stderr = errBuf.String()
	default: // still held at the timeout: not safe to read
	}
	if ps := cmd.ProcessState; ps != nil {
		o.Code = ps.ExitCode()
		if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
			o.MaxRSSKiB = ru.Maxrss
		}
	}
	var ee *exec.ExitError
	switch {
	case timedOut:
		o.Err = fmt.Sprintf("killed after %v", req.Timeout)
	case werr != nil && !errors.As(werr, &ee):
		o.Err = werr.Error()
	case open:
		o.Err = fmt.Sprintf("output still open at the %v timeout", req.Timeout)
	case held != "":
		o.Err = fmt.Sprintf("output held by %s %v after the process exited (killed)", held, grace)
	}
	return o
}

// childNamed is the pid of a child of parent whose executable's name is
// name, or 0.
func childNamed(parent int, name string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 || f[1] != strconv.Itoa(parent) {
			continue
		}
		if exe, err := os.Readlink("/proc/" + e.Name() + "/exe"); err == nil && filepath.Base(exe) == name {
			return pid
		}
	}
	return 0
}

// selfHWM is this process's peak RSS so far (VmHWM), in KiB.
func selfHWM() int64 { return hwm(os.Getpid()) }

// hwm is a process's peak RSS so far (VmHWM: its address space's own
// high-water mark, which exec starts afresh), in KiB; 0 if unknown.
func hwm(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			var kib int64
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kib)
			return kib
		}
	}
	return 0
}
