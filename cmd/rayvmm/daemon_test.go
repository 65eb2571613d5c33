package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// rayvmm daemon runs rayvmmd with the same arguments: found next to
// rayvmm, else through $RAYVMMD_BINARY; missing, it says where it looked,
// on one line.
func TestDaemonExec(t *testing.T) {
	bin := buildRayvmm(t)
	run := func(env []string, args ...string) (string, string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append([]string{"PATH=/nonexistent"}, env...)
		var o, e strings.Builder
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		return o.String(), e.String(), err
	}
	_, stderr, err := run(nil, "daemon", "--help")
	if err == nil || !strings.Contains(stderr, "rayvmmd not found") || !strings.Contains(stderr, "RAYVMMD_BINARY") || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
		t.Errorf("without rayvmmd: %v, %q", err, stderr)
	}
	// A stand-in rayvmmd that prints its arguments shows what is passed.
	fake := filepath.Join(t.TempDir(), "rayvmmd")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho \"$@\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := run([]string{"RAYVMMD_BINARY=" + fake}, "--state-dir", "/tmp/s", "daemon", "--socket", "/tmp/x.sock", "-v")
	if err != nil || strings.TrimSpace(stdout) != "--state-dir /tmp/s daemon --socket /tmp/x.sock -v" {
		t.Errorf("rayvmm daemon ran rayvmmd with %q (%v, %s)", stdout, err, stderr)
	}
}
