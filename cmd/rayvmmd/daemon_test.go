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
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--backoff-scale", "0"}, "--backoff-scale 0: want a number above 0"},
		{[]string{"--backoff-scale", "-2"}, "--backoff-scale -2"},
		{[]string{"--socket-group", "no-such-group-rayvmm"}, "--socket-group no-such-group-rayvmm"},
		{[]string{"--cgroup-parent", "/abs"}, `cgroup parent "/abs"`},
		{[]string{"extra"}, "unknown command"},
	} {
		// Flag values stay set between Executes in one process: give each
		// its default again first.
		base := []string{"daemon", "--state-dir", state, "--socket", sock, "--backoff-scale", "1", "--socket-group", "", "--cgroup-parent", "rayvmm"}
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
