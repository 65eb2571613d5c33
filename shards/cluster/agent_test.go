package cluster

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// script writes an executable shell script standing in for rayvmmd: it
// gets the same arguments and descriptors (3: its end of the link, 4: the
// ready pipe) as the real agent.
func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "rayvmmd")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestAgentLifetime: an agent that attached serves until the VM's end of
// the link is closed, then exits and the detach returns cleanly; the
// arguments name the volume, the state directory and the endpoints.
func TestAgentLifetime(t *testing.T) {
	argsFile := filepath.Join(t.TempDir(), "args")
	bin := script(t, `echo "$@" > `+argsFile+`
echo ok >&4
exec 4>&-
cat <&3 >/dev/null`)
	a := &Agents{StateDir: "/state", Endpoints: []string{"http://e1", "http://e2"}, Binary: bin, Wait: 20 * time.Second}
	end, detach, err := a.Attach(context.Background(), "vol", "vm1")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(argsFile)
	for _, want := range []string{"--state-dir /state", "--etcd-endpoints http://e1,http://e2", "shard attach vol", "--link-fd 3 --ready-fd 4"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("agent arguments %q lack %q", b, want)
		}
	}
	end.Close() // the VM process is gone
	if err := detach(); err != nil {
		t.Fatalf("detach after the VM's end closed: %v", err)
	}
}

// TestAgentFailures: an agent that reports an error, one that exits
// without a word and one that never answers each give an error naming
// what happened, and no agent is left running.
func TestAgentFailures(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	for _, tc := range []struct {
		name, body, want string
		wait             time.Duration
	}{
		{"reports", `echo 'no such sharded volume "vol"' >&4`, `no such sharded volume "vol"`, time.Minute},
		{"exits", `exit 3`, "exited without attaching it: exit status 3", time.Minute},
		{"silent", `echo $$ > ` + pidFile + `; exec sleep 600`, "did not attach it within", time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &Agents{StateDir: "/state", Binary: script(t, tc.body), Wait: tc.wait}
			end, _, err := a.Attach(context.Background(), "vol", "vm1")
			if err == nil || !strings.Contains(err.Error(), tc.want) || end != nil {
				t.Fatalf("Attach: %v, end %v; want an error with %q", err, end, tc.want)
			}
		})
	}
	b, err := os.ReadFile(pidFile)
	if os.IsNotExist(err) {
		return // killed before its first line ran (a loaded machine)
	}
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Fatalf("the silent agent (pid %d) is still running", pid)
	}
}

// TestAgentMissing: no rayvmmd binary is a clear error.
func TestAgentMissing(t *testing.T) {
	a := &Agents{StateDir: "/state", Binary: filepath.Join(t.TempDir(), "none")}
	if _, _, err := a.Attach(context.Background(), "vol", "vm1"); err == nil || !strings.Contains(err.Error(), "start its agent") {
		t.Fatalf("Attach with no binary: %v", err)
	}
}
