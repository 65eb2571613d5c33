package tests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestBadInputLeavesNoVMProcess: rayvmm boot starts its VM process ahead,
// before it has read its flags (cmd/rayvmm/internal/prestart). A boot that
// then fails on bad input must leave no process behind and nothing from
// the VM process on stderr: when rayvmm has exited, no process holds its
// stderr any more.
func TestBadInputLeavesNoVMProcess(t *testing.T) {
	requireKVM(t)
	for _, args := range [][]string{
		{"boot", "--memory", "lots"},
		{"boot", "--kernel", filepath.Join(t.TempDir(), "nope")},
		{"boot", "--sandbox", "off", "--cpus", "0"},
	} {
		t.Run(strings.Join(args[1:], " "), func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			var st syscall.Stat_t
			if err := syscall.Fstat(int(r.Fd()), &st); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(rayvmm, append([]string{"--state-dir", t.TempDir()}, args...)...)
			cmd.Stderr = w
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			w.Close()
			err = cmd.Wait()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 {
				t.Fatalf("rayvmm %v: %v, want a non-zero exit", args, err)
			}
			// rayvmm has exited: whoever still holds its stderr is a
			// process it left behind.
			pipe := fmt.Sprintf("pipe:[%d]", st.Ino)
			procs, _ := filepath.Glob("/proc/[0-9]*/fd/*")
			for _, fd := range procs {
				if target, _ := os.Readlink(fd); target == pipe && !strings.HasPrefix(fd, fmt.Sprintf("/proc/%d/", os.Getpid())) {
					exe, _ := os.Readlink(filepath.Join(filepath.Dir(filepath.Dir(fd)), "exe"))
					t.Errorf("%s (%s) holds rayvmm's stderr after rayvmm exited", fd, exe)
				}
			}
			r.SetReadDeadline(time.Now().Add(10 * time.Second))
			out := make([]byte, 4096)
			n, _ := r.Read(out)
			msg := strings.TrimSpace(string(out[:n]))
			if strings.Count(msg, "\n") != 0 || !strings.HasPrefix(msg, "rayvmm: ") {
				t.Fatalf("want one line from rayvmm, got:\n%s", out[:n])
			}
		})
	}
}

// TestVMProcessStartedAheadUnfit: the VM process started ahead is prepared
// for the sandbox the flags ask for (here the default); a --config file
// that asks for another one (off) gets a VM process started the usual way,
// and the one started ahead is discarded quietly.
func TestVMProcessStartedAheadUnfit(t *testing.T) {
	requireKVM(t)
	cfg := filepath.Join(t.TempDir(), "vm.yaml")
	if err := os.WriteFile(cfg, []byte("sandbox:\n  mode: \"off\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := run(t, nil, 60*time.Second, "--state-dir", t.TempDir(), "boot", "--config", cfg, "-v")
	if r.code != 0 || !strings.Contains(r.stdout, "rayguest: ready") {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(r.stderr, "rayvmm-vm:") || strings.Contains(r.stderr, "sandbox strict") {
		t.Fatalf("stderr:\n%s", r.stderr)
	}
}
