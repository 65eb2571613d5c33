package testenv

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Helper processes. A test that needs a second process (one that holds a
// lock or a TAP until it is killed with SIGKILL, one to kill mid-way) runs
// its own test binary again with RAYVMM_TEST_HELPER naming a helper;
// TestMain hands control to it through HelperMain before any test runs.
//
// The contract, which keeps these tests from depending on timing:
//   - the helper prints a line on stdout when it is ready (holding what the
//     test wants to observe) and the test waits for that line, never sleeps;
//   - every wait of the test has a deadline whose failure names what it
//     waited for and shows the helper's stderr;
//   - a helper that must stay alive until it is killed blocks in Hold, not
//     in `select {}`: with no other goroutine the Go runtime ends such a
//     process at once ("all goroutines are asleep - deadlock!").

const helperEnv = "RAYVMM_TEST_HELPER"

// HelperMain runs the helper RAYVMM_TEST_HELPER names and exits with the
// status it returns; in a normal test run it returns at once. Call it
// first in TestMain.
func HelperMain(helpers map[string]func() int) {
	name := os.Getenv(helperEnv)
	if name == "" {
		return
	}
	run, ok := helpers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "%s=%s: no such helper\n", helperEnv, name)
		os.Exit(2)
	}
	os.Exit(run())
}

// Hold blocks until the test that started this helper closes the helper's
// stdin, or exits and so closes it: a wait that nothing but the parent or
// a signal ends. It is the way for a helper to stay alive holding
// something.
func Hold() {
	io.Copy(io.Discard, os.Stdin)
}

// HelperOptions says how to start a helper.
type HelperOptions struct {
	// Env is added to the test's environment.
	Env []string
	// Prefix runs the helper behind a command that execs it, such as
	// "ip netns exec NS".
	Prefix []string
}

// HelperProc is a running helper process. Its stdin stays open until the
// test ends (or Release), so a helper in Hold lives that long.
type HelperProc struct {
	Cmd    *exec.Cmd
	name   string
	stdin  io.WriteCloser
	lines  chan string
	exited chan struct{}
	err    error // Cmd.Wait's result, valid once exited is closed
	stderr lockedBuffer
}

// StartHelper starts this test binary as the helper name. The test's
// cleanup kills it if it is still running.
func StartHelper(t testing.TB, name string, opts HelperOptions) *HelperProc {
	t.Helper()
	argv := append(append([]string(nil), opts.Prefix...), os.Args[0], "-test.run=^$")
	h := &HelperProc{
		Cmd:    exec.Command(argv[0], argv[1:]...),
		name:   name,
		lines:  make(chan string, 1024),
		exited: make(chan struct{}),
	}
	h.Cmd.Env = append(append(os.Environ(), helperEnv+"="+name), opts.Env...)
	h.Cmd.Stderr = &h.stderr
	out, err := h.Cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("helper %s: %v", name, err)
	}
	if h.stdin, err = h.Cmd.StdinPipe(); err != nil {
		t.Fatalf("helper %s: %v", name, err)
	}
	if err := h.Cmd.Start(); err != nil {
		t.Fatalf("start helper %s: %v", name, err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
		h.err = h.Cmd.Wait()
		close(h.exited)
	}()
	t.Cleanup(func() {
		h.stdin.Close()
		h.Cmd.Process.Kill()
		if _, ok, _ := h.wait(time.Minute); !ok {
			t.Errorf("helper %s (pid %d) still running a minute after SIGKILL", name, h.Cmd.Process.Pid)
		}
	})
	return h
}

// Next returns the helper's next line of output, or false once its
// output ended. It fails t if no line comes within timeout; what says
// what the line was to tell (for the message).
func (h *HelperProc) Next(t testing.TB, what string, timeout time.Duration) (string, bool) {
	t.Helper()
	select {
	case l, ok := <-h.lines:
		return l, ok
	case <-time.After(timeout):
		t.Fatalf("helper %s: no line within %v (waiting for %s); stderr:\n%s", h.name, timeout, what, h.stderr.String())
		return "", false
	}
}

// Line is Next for a line that must come: the helper ending its output
// first fails t.
func (h *HelperProc) Line(t testing.TB, what string, timeout time.Duration) string {
	t.Helper()
	l, ok := h.Next(t, what, timeout)
	if !ok {
		<-h.exited
		t.Fatalf("helper %s ended (%v) before printing %s; stderr:\n%s", h.name, h.err, what, h.stderr.String())
	}
	return l
}

// Release closes the helper's stdin, which ends Hold.
func (h *HelperProc) Release() { h.stdin.Close() }

// Kill sends SIGKILL and waits for the helper to exit; see Wait.
func (h *HelperProc) Kill(t testing.TB, timeout time.Duration) ([]string, error) {
	t.Helper()
	h.Cmd.Process.Signal(syscall.SIGKILL)
	return h.Wait(t, timeout)
}

// Wait waits for the helper to exit and returns the lines it printed that
// were not read yet and its exit error. It fails t if the helper is still
// running after timeout.
func (h *HelperProc) Wait(t testing.TB, timeout time.Duration) ([]string, error) {
	t.Helper()
	rest, ok, err := h.wait(timeout)
	if !ok {
		t.Fatalf("helper %s still running after %v (waiting for it to exit); output %q, stderr:\n%s",
			h.name, timeout, rest, h.stderr.String())
	}
	return rest, err
}

// wait reads the helper's output to its end and waits for its exit; false
// when timeout passed first.
func (h *HelperProc) wait(timeout time.Duration) (rest []string, ok bool, err error) {
	deadline := time.After(timeout)
	for {
		select {
		case l, more := <-h.lines:
			if more {
				rest = append(rest, l)
				continue
			}
			<-h.exited // closed right after lines, once Cmd.Wait returned
			return rest, true, h.err
		case <-deadline:
			return rest, false, nil
		}
	}
}

// Stderr is what the helper wrote to stderr so far.
func (h *HelperProc) Stderr() string { return h.stderr.String() }

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.TrimSpace(b.b.String())
}
