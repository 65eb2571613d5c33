package tests

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// rayvmm, rayvmmVM and rayvmmd are the paths of the binaries under test
// (the CLI, the VM process it starts and the daemon binary), built once
// in TestMain.
var rayvmm, rayvmmVM, rayvmmd string

// repoRoot is the repository's top directory.
var repoRoot string

func TestMain(m *testing.M) {
	if os.Getenv(detachHelperEnv) != "" {
		os.Exit(detachHelper())
	}
	if os.Getenv(gateHelperEnv) != "" {
		os.Exit(gateHelper())
	}
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Dir(filepath.Dir(file))
	dir, err := os.MkdirTemp("", "rayvmm-tests-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	rayvmm = filepath.Join(dir, "rayvmm")
	// Runs without --state-dir (every boot writes the audit log) stay out
	// of the host's /var/lib/rayvmm.
	os.Setenv("RAYVMM_STATE_DIR", filepath.Join(dir, "state"))
	rayvmmVM = filepath.Join(dir, "rayvmm-vm")
	rayvmmd = filepath.Join(dir, "rayvmmd")
	// rayvmm finds rayvmm-vm and rayvmmd next to itself.
	for bin, pkg := range map[string]string{rayvmm: "./cmd/rayvmm", rayvmmVM: "./cmd/rayvmm-vm", rayvmmd: "./cmd/rayvmmd"} {
		build := exec.Command("go", "build", "-o", bin, pkg)
		build.Dir = repoRoot
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", pkg, err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireKVM needs root and /dev/kvm (see testenv).
func requireKVM(t testing.TB) {
	t.Helper()
	testenv.RequireKVM(t)
}

// requireTool needs a host tool and returns its path.
func requireTool(t testing.TB, name string) string {
	t.Helper()
	testenv.RequireTool(t, name)
	p, _ := exec.LookPath(name)
	return p
}

// result is what a finished rayvmm run produced.
type result struct {
	stdout, stderr string
	code           int
	elapsed        time.Duration
}

// run runs rayvmm to completion with a deadline and returns its output.
func run(t testing.TB, stdin io.Reader, timeout time.Duration, args ...string) result {
	t.Helper()
	return runCommand(t, stdin, timeout, func(ctx context.Context) *exec.Cmd {
		return exec.CommandContext(ctx, rayvmm, args...)
	})
}

// runCommand runs the command build makes (rayvmm, possibly behind a
// prefix such as "ip netns exec NS") to completion with a deadline, and
// fails the test on a timeout or a Go panic in its stderr.
func runCommand(t testing.TB, stdin io.Reader, timeout time.Duration, build func(context.Context) *exec.Cmd) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := build(ctx)
	var out, errb bytes.Buffer
	cmd.Stdin = stdin
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String(), elapsed: time.Since(start)}
	if ctx.Err() != nil {
		t.Fatalf("%s did not finish in %v\nstdout:\n%s\nstderr:\n%s", strings.Join(cmd.Args, " "), timeout, r.stdout, r.stderr)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", cmd.Args[0], err)
	}
	checkNoPanic(t, r.stderr)
	return r
}

// checkNoPanic fails on a Go panic or stack trace in rayvmm's stderr.
func checkNoPanic(t testing.TB, stderr string) {
	t.Helper()
	for _, bad := range []string{"panic:", "goroutine ", "runtime error", ".go:"} {
		if strings.Contains(stderr, bad) {
			t.Fatalf("rayvmm's stderr contains %q:\n%s", bad, stderr)
		}
	}
}

// lineWatcher collects a process's output and lets a test wait for a line.
type lineWatcher struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	cond   chan struct{}
	closed bool
}

func newLineWatcher() *lineWatcher { return &lineWatcher{cond: make(chan struct{}, 1)} }

func (w *lineWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.buf.Write(p)
	w.mu.Unlock()
	select {
	case w.cond <- struct{}{}:
	default:
	}
	return len(p), nil
}

// close marks the writer finished (the process exited): waitFor stops
// waiting for output that can no longer come.
func (w *lineWatcher) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	select {
	case w.cond <- struct{}{}:
	default:
	}
}

func (w *lineWatcher) isClosed() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.closed
}

func (w *lineWatcher) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// waitFor waits until the output contains s.
func (w *lineWatcher) waitFor(t testing.TB, s string, timeout time.Duration) {
	t.Helper()
	w.waitUntil(t, fmt.Sprintf("%q", s), timeout, func(out string) bool { return strings.Contains(out, s) })
}

// waitForLine waits until the output holds a whole line (ended by a
// newline) that contains s: output arrives in pieces, and a piece can end
// in the middle of a line.
func (w *lineWatcher) waitForLine(t testing.TB, s string, timeout time.Duration) {
	t.Helper()
	w.waitUntil(t, fmt.Sprintf("a whole line containing %q", s), timeout, func(out string) bool {
		i := strings.Index(out, s)
		return i >= 0 && strings.Contains(out[i:], "\n")
	})
}

// waitUntil waits until done holds for the output so far; what names it
// for the failure message.
func (w *lineWatcher) waitUntil(t testing.TB, what string, timeout time.Duration, done func(string) bool) {
	t.Helper()
	deadline := time.After(timeout)
	for !done(w.String()) {
		if w.isClosed() {
			if done(w.String()) { // the last output came with the close
				return
			}
			t.Fatalf("process exited without printing %s; output:\n%s", what, w.String())
		}
		select {
		case <-w.cond:
		case <-deadline:
			t.Fatalf("no %s within %v; output so far:\n%s", what, timeout, w.String())
		}
	}
}

// waitClosed waits until the process behind the watcher has exited.
func (w *lineWatcher) waitClosed(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for !w.isClosed() {
		select {
		case <-w.cond:
		case <-deadline:
			t.Fatalf("the process did not exit within %v; output so far:\n%s", timeout, w.String())
		}
	}
}

// proc is a rayvmm process a test started and talks to while it runs.
type proc struct {
	cmd  *exec.Cmd
	out  *lineWatcher // stdout and stderr
	done chan struct{}
	err  error // cmd.Wait's result, valid once done is closed
}

// startProc starts cmd (set Stdin first if the test writes to it) with
// its output watched; the test's cleanup kills it if it still runs.
func startProc(t testing.TB, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{cmd: cmd, out: newLineWatcher(), done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Args[0], err)
	}
	go func() { p.err = cmd.Wait(); p.out.close(); close(p.done) }()
	t.Cleanup(func() {
		if err := p.kill(); err != nil {
			t.Error(err)
		}
	})
	return p
}

// exited waits for the process to exit after what the test did (for the
// failure message: "quit", "SIGTERM"), and returns cmd.Wait's error.
func (p *proc) exited(t testing.TB, after string, timeout time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		checkNoPanic(t, p.out.String())
		return p.err
	case <-time.After(timeout):
		t.Fatalf("%s still running %v after %s; output:\n%s", p.cmd.Args[0], timeout, after, p.out.String())
		return nil
	}
}

// kill ends the process with SIGKILL, if it still runs, and waits for it.
func (p *proc) kill() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
		return nil
	case <-time.After(time.Minute):
		return fmt.Errorf("%s (pid %d) still running a minute after SIGKILL", p.cmd.Args[0], p.cmd.Process.Pid)
	}
}
