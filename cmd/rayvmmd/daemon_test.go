package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad flags are refused with one line naming the flag, before anything
// is made: no state directory, no socket.
func TestDaemonBadFlags(t *testing.T) {
	dir := t.TempDir()
	state, sock := filepath.Join(dir, "state"), filepath.Join(dir, "d.sock")
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("rules:\n- effect: allow\n  subjects: [\"*\"]\n  actions: [attach]\n  objects: [{kind: volume}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--backoff-scale", "0"}, "--backoff-scale 0: want a number above 0"},
		{[]string{"--backoff-scale", "-2"}, "--backoff-scale -2"},
		{[]string{"--socket-group", "no-such-group-rayvmm"}, "--socket-group no-such-group-rayvmm"},
		{[]string{"--cgroup-parent", "/abs"}, `cgroup parent "/abs"`},
		{[]string{"extra"}, "unknown command"},
		{[]string{"--policy", "/nonexistent/policy.yaml"}, "--policy: "},
		{[]string{"--policy", bad}, `line 4: rules[0].actions[0]: unknown action "attach"`},
	} {
		// Flag values stay set between Executes in one process: give each
		// its default again first.
		base := []string{"daemon", "--state-dir", state, "--socket", sock, "--backoff-scale", "1", "--socket-group", "", "--cgroup-parent", "rayvmm", "--policy", DefaultPolicy}
		rootCmd.SetArgs(append(base, tt.args...))
		err := rootCmd.Execute()
		if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: %v, want one line with %q", tt.args, err, tt.want)
		}
		for _, p := range []string{state, sock} {
			if _, err := os.Stat(p); err == nil {
				t.Errorf("%v: %s was made", tt.args, p)
			}
		}
	}
}
