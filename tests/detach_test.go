package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/guestkernel"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmproc"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// The detached launch mode, as the pods daemon will use it: the VM
// process gets a session of its own and no lifeline, survives the process
// that launched it, and is found again by pid, start time and API socket.

const detachHelperEnv = "RAYVMM_TEST_DETACH"

// detached is what the helper reports.
type detached struct {
	Pid       int    `json:"pid"`
	StartTime uint64 `json:"start_time"`
	Socket    string `json:"socket"`
}

// detachHelper is a stand-in daemon: it opens a VM's resources, launches
// its VM process detached, prints where it is and exits.
func detachHelper() int {
	var args struct {
		State, Socket, Binary, Log string
		Spec                       spec.VM
	}
	if err := json.Unmarshal([]byte(os.Getenv(detachHelperEnv)), &args); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	s := &args.Spec
	s.Defaults()
	res, err := control.Open(context.Background(), s, control.Options{StateDir: args.State, BuiltinKernel: guestkernel.ELF})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	log, err := os.Create(args.Log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	res.Handoff.LogLevel = "INFO"
	p, err := vmproc.Launch(res.Handoff, res.Files, vmproc.Options{Binary: args.Binary, Stderr: log, Detached: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	res.Launched()
	json.NewEncoder(os.Stdout).Encode(detached{Pid: p.Pid, StartTime: p.StartTime, Socket: args.Socket})
	return 0 // the volume lock and the network hold stay with the VM process
}

// TestDetachedSurvivesLauncher: a detached VM process outlives its
// launcher (which exits at once), keeps its volume locked, is in its own
// session, is recognised by pid and start time, answers on its API socket,
// and shuts down through it.
func TestDetachedSurvivesLauncher(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "data", "--size", "16M")
	sock := filepath.Join(t.TempDir(), "api.sock")
	logPath := filepath.Join(t.TempDir(), "vm.log")
	arg, _ := json.Marshal(map[string]any{
		"State": state, "Socket": sock, "Binary": rayvmmVM, "Log": logPath,
		"Spec": map[string]any{"name": "detached", "cmdline": "rayguest.run=echo", "apiSocket": sock, "disks": []any{map[string]any{"volume": "data"}}},
	})
	helper := exec.Command(os.Args[0], "-test.run=^$")
	helper.Env = append(os.Environ(), detachHelperEnv+"="+string(arg))
	out, err := helper.Output()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	var d detached
	if err := json.Unmarshal(out, &d); err != nil {
		t.Fatalf("helper said %q: %v", out, err)
	}
	t.Cleanup(func() { unix.Kill(d.Pid, unix.SIGKILL) })
	if !vmproc.Alive(d.Pid, d.StartTime) {
		t.Fatalf("the detached VM process (pid %d) died with its launcher", d.Pid)
	}
	if vmproc.Alive(d.Pid, d.StartTime+1) {
		t.Fatal("Alive does not tell a process by its start time")
	}
	if sid, _ := unix.Getsid(d.Pid); sid != d.Pid {
		t.Fatalf("the detached VM process is in session %d, not its own", sid)
	}
	deadline := time.Now().Add(guestWait)
	for {
		if code, body := curl(t, sock, "GET", "/", ""); code == 200 && strings.Contains(body, `"state":"Running"`) && strings.Contains(body, `"id":"detached"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the detached VM does not answer on %s", sock)
		}
		time.Sleep(50 * time.Millisecond) // polling the API until the VM runs
	}
	if st := inspect(t, state, "data").State; st != "attached" {
		t.Fatalf("volume %s while its detached VM runs, its launcher gone; want attached", st)
	}
	curlOK(t, sock, "PUT", "/actions", `{"action_type": "Shutdown"}`, 204)
	waitGone(t, d.Pid, "the detached VM process after Shutdown")
	if st := inspect(t, state, "data").State; st != "available" {
		t.Fatalf("volume %s after its detached VM exited", st)
	}
	log, _ := os.ReadFile(logPath)
	if !strings.Contains(string(log), "stopped: API request: Shutdown") {
		t.Fatalf("the VM process's log does not say how it ended:\n%s", log)
	}
}
