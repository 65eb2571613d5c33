// Package launch starts VMM processes for the benchmarks and measures them:
// wall time from just before fork/exec to a line on the console and to the
// process's exit, peak RSS from wait4, and optionally /proc/PID/smaps samples
// while it runs.
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
	Ready     time.Duration `json:"ready_ns"` // 0: the line never appeared
	Exit      time.Duration `json:"exit_ns"`
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

// lineWatcher records when a line first appears in a stream.
type lineWatcher struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	want  string
	start time.Time
	at    time.Duration
}

func (w *lineWatcher) Write(p []byte) (int, error) {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.at == 0 && w.want != "" && bytes.Contains(w.buf.Bytes(), []byte(w.want)) {
		w.at = now.Sub(w.start)
	}
	return len(p), nil
}

func (w *lineWatcher) result() (time.Duration, string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.at, w.buf.String()
}

func runOne(ctx context.Context, req Request) Outcome {
	ctx, cancel := context.WithTimeout(ctx, req.Timeout)
	defer cancel()
	cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
	var errBuf bytes.Buffer
	var rd io.ReadCloser
	var childEnds []io.Closer
	if req.TTY {
		ptmx, tty, err := pty.Open()
		if err != nil {
			return Outcome{Code: -1, Err: fmt.Sprintf("open pty: %v", err)}
		}
		defer ptmx.Close()
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
		rd, childEnds = ptmx, []io.Closer{tty}
	} else {
		r, w, err := os.Pipe()
		if err != nil {
			return Outcome{Code: -1, Err: fmt.Sprintf("pipe: %v", err)}
		}
		defer r.Close()
		cmd.Stdout, cmd.Stderr = w, &errBuf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		rd, childEnds = r, []io.Closer{w}
	}
	// Stop waiting for the stderr copy soon after the process is gone,
	// even if something it started still holds the pipe.
	cmd.WaitDelay = time.Second
	watch := &lineWatcher{want: req.Wait}
	copied := make(chan struct{})

	watch.start = time.Now()
	err := cmd.Start()
	for _, c := range childEnds {
		c.Close() // the child holds its own copy
	}
	if err != nil {
		return Outcome{Code: -1, Err: fmt.Sprintf("start %s: %v", req.Argv[0], err)}
	}
	go func() {
		io.Copy(watch, rd) // ends with EOF (pipe) or EIO (pty) once the child exits
		close(copied)
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
	exitAt := time.Since(watch.start)
	close(stopSampling)
	<-sampled
	select {
	case <-copied:
	case <-time.After(2 * time.Second): // a grandchild kept the output open
	}

	o := Outcome{Exit: exitAt, Code: -1, Stderr: errBuf.String(), Sample: last}
	o.Ready, o.Output = watch.result()
	// On a pseudo-terminal the line can be read after the process has
	// exited (the reader runs behind); it was written before, so the exit
	// bounds when it appeared.
	if o.Ready > exitAt {
		o.Ready = exitAt
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
