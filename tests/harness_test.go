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
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// rayvmm is the path of the binary under test, built once in TestMain.
var rayvmm string

// repoRoot is the repository's top directory.
var repoRoot string

func TestMain(m *testing.M) {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Dir(filepath.Dir(file))
	dir, err := os.MkdirTemp("", "rayvmm-tests-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	rayvmm = filepath.Join(dir, "rayvmm")
	build := exec.Command("go", "build", "-o", rayvmm, "./cmd/rayvmm")
	build.Dir = repoRoot
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building rayvmm: %v\n%s", err, out)
		os.Exit(1)
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
	deadline := time.After(timeout)
	for !strings.Contains(w.String(), s) {
		if w.isClosed() {
			t.Fatalf("process exited without printing %q; output:\n%s", s, w.String())
		}
		select {
		case <-w.cond:
		case <-deadline:
			t.Fatalf("no %q within %v; output so far:\n%s", s, timeout, w.String())
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
