package tests

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The VM process (rayvmm-vm) as a user and a control plane see it: what
// it holds, that it dies with rayvmm boot, and what happens to the
// resources when either process is killed.

// bootRun is a rayvmm boot running in the background.
type bootRun struct {
	cmd   *exec.Cmd
	out   *lineWatcher
	stdin io.WriteCloser
	done  chan struct{}
	err   error // Wait's, once done is closed
}

// startBoot starts rayvmm (args after the binary) with its stdin a pipe
// and waits for want on its output.
func startBoot(t *testing.T, want string, args ...string) *bootRun {
	t.Helper()
	return startCmd(t, exec.Command(rayvmm, args...), want)
}

// startCmd starts cmd as a bootRun; it is killed when the test ends.
func startCmd(t *testing.T, cmd *exec.Cmd, want string) *bootRun {
	t.Helper()
	b := &bootRun{cmd: cmd, out: newLineWatcher(), done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = b.out, b.out
	// A VM process that outlives rayvmm (stopped by a test) holds the
	// output pipe: stop waiting for it soon after rayvmm is gone.
	cmd.WaitDelay = time.Second
	var err error
	if b.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		b.err = cmd.Wait()
		b.out.close()
		close(b.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-b.done
	})
	if want != "" {
		b.out.waitFor(t, want, guestWait)
	}
	return b
}

// wait waits for rayvmm to exit and returns its exit status.
func (b *bootRun) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-b.done:
	case <-time.After(guestWait):
		t.Fatalf("rayvmm did not exit in %v\n%s", guestWait, b.out.String())
	}
	checkNoPanic(t, b.out.String())
	return b.cmd.ProcessState.ExitCode()
}

// childrenOf lists the pids whose parent is pid.
func childrenOf(pid int) []int {
	var kids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if f := strings.Fields(string(b[i+1:])); len(f) > 1 && f[1] == strconv.Itoa(pid) {
			kids = append(kids, p)
		}
	}
	return kids
}

// vmProcess finds the rayvmm-vm process that rayvmm (pid) started.
func vmProcess(t *testing.T, pid int) int { return childRunning(t, pid, "rayvmm-vm") }

// childRunning finds the child of pid that runs the executable name.
func childRunning(t *testing.T, pid int, name string) int {
	t.Helper()
	deadline := time.Now().Add(guestWait)
	for time.Now().Before(deadline) {
		for _, k := range childrenOf(pid) {
			if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", k)); err == nil && filepath.Base(exe) == name {
				return k
			}
		}
		time.Sleep(10 * time.Millisecond) // polling /proc for a process that starts at once
	}
	t.Fatalf("no %s child of pid %d within %v", name, pid, guestWait)
	return 0
}

// alive reports whether pid exists and one of its threads is neither a
// zombie nor dead. The thread group's leader turns zombie as soon as it
// exits itself, while its other threads may still be exiting and still
// hold the process's descriptors (and so its locks).
func alive(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return false
	}
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if f := strings.Fields(string(b[i+1:])); len(f) > 0 && f[0] != "Z" && f[0] != "X" {
			return true
		}
	}
	return false
}

// waitGone waits until pid has exited.
func waitGone(t *testing.T, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d) still running after 30s", what, pid)
		}
		time.Sleep(10 * time.Millisecond) // polling /proc for an exit
	}
}

// TestVMProcessIsRayvmmVM: the guest runs in bin/rayvmm-vm, a child of
// rayvmm boot, and its descriptors are only the kinds it needs: the KVM
// device and KVM's anonymous descriptors, its disk images (with their
// backing chain) and the volume's lock, its TAPs and its holds on their
// network (one per NIC), its API socket and its vsock socket (each told
// apart by the address it was bound to, in /proc/PID/net/unix), eventfds,
// the Go runtime's epoll, the console (stdin, stdout and stderr: pipes
// here), the handoff socket (the lifeline; unbound), the pipe it reports
// how the VM ended on and the sandbox's SIGSYS report pipe. Nothing else:
// no kernel file, no state directory, no netlink socket, nothing inherited
// from elsewhere.
func TestVMProcessIsRayvmmVM(t *testing.T) {
	requireKVM(t)
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-f", "qcow2", base, "16M")
	top := filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	h.must(t, "volume", "create", "data", "--size", "16M")
	// The sockets in directories of their own: /proc/net/unix shows the
	// address each was bound to, in a private directory beside it.
	apiDir, vsockDir := filepath.Join(dir, "api"), filepath.Join(dir, "vsock")
	for _, d := range []string{apiDir, vsockDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(apiDir, "api.sock")
	b := startCmd(t, h.command(context.Background(), "boot", "--cmdline", "rayguest.run=echo",
		"--disk", "path="+top, "--disk", "volume=data", "--net", "network=lan,trunk=10:20", "--net", "network=lan",
		"--api-socket", sock, "--vsock", "cid=3,uds="+filepath.Join(vsockDir, "v.sock")), "rayguest: ready")
	vm := vmProcess(t, b.cmd.Process.Pid)
	bound := unixSockets(t, vm)
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", vm))
	if exe != rayvmmVM {
		t.Fatalf("the VM process is %s, want %s", exe, rayvmmVM)
	}
	vol := inspect(t, h.state, "data")
	allowed := map[string]*regexp.Regexp{
		"KVM device":            regexp.MustCompile(`^/dev/kvm$`),
		"KVM VM and vCPUs":      regexp.MustCompile(`^anon_inode:kvm-(vm|vcpu:\d+)$`),
		"eventfd":               regexp.MustCompile(`^anon_inode:\[eventfd\]$`),
		"Go's poller":           regexp.MustCompile(`^anon_inode:\[eventpoll\]$`),
		"TAP":                   regexp.MustCompile(`^/dev/net/tun$`),
		"API socket":            regexp.MustCompile(`^` + regexp.QuoteMeta(apiDir) + `/`),
		"vsock socket":          regexp.MustCompile(`^` + regexp.QuoteMeta(vsockDir) + `/`),
		"pipe":                  regexp.MustCompile(`^pipe:\[\d+\]$`),
		"handoff socket":        regexp.MustCompile(`^$`), // unbound: a socket pair's end
		"disk images":           regexp.MustCompile(`^(` + regexp.QuoteMeta(top) + `|` + regexp.QuoteMeta(base) + `|` + regexp.QuoteMeta(vol.Path) + `)$`),
		"the volume's lock":     regexp.MustCompile(`^` + regexp.QuoteMeta(filepath.Join(h.state, "volumes", "data.lock")) + `$`),
		"network holds":         regexp.MustCompile(`^` + regexp.QuoteMeta(filepath.Join(h.state, "networks", "lan.lock")) + `$`),
		"console (stdin /null)": regexp.MustCompile(`^/dev/null$`),
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", vm))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", vm, fd.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if m := regexp.MustCompile(`^socket:\[(\d+)\]$`).FindStringSubmatch(target); m != nil {
			target = bound[m[1]] // its address, "" if it has none
		}
		kind := ""
		for k, re := range allowed {
			if re.MatchString(target) {
				kind = k
			}
		}
		if kind == "" {
			t.Errorf("VM process holds fd %s -> %s, not a kind it should hold", fd.Name(), target)
		}
		seen[kind]++
		t.Logf("fd %s -> %s (%s)", fd.Name(), target, kind)
	}
	for _, want := range []struct {
		kind string
		n    int
	}{{"KVM device", 1}, {"TAP", 3}, {"API socket", 1}, {"vsock socket", 1}, {"disk images", 3}, {"the volume's lock", 1}, {"network holds", 2}, {"pipe", 5}, {"handoff socket", 1}} {
		if seen[want.kind] != want.n {
			t.Errorf("%d descriptors of %s, want %d", seen[want.kind], want.kind, want.n)
		}
	}
	if seen["KVM VM and vCPUs"] < 2 {
		t.Errorf("no KVM VM and vCPU descriptors")
	}
	io.WriteString(b.stdin, "quit\n")
	if code := b.wait(t); code != 0 {
		t.Fatalf("exit %d\n%s", code, b.out.String())
	}
}

// unixSockets maps the inode of each Unix socket in pid's network
// namespace to the address it is bound to (/proc/PID/net/unix).
func unixSockets(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n")[1:] {
		// Num RefCount Protocol Flags Type St Inode [Path]
		if f := strings.Fields(l); len(f) >= 8 {
			out[f[6]] = f[7]
		}
	}
	return out
}

// TestVMProcessDiesWithBoot: kill -9 of rayvmm boot leaves nothing
// running: the VM process sees its lifeline close and stops, its TAP goes
// with it, and the terminal it shared is not its problem any more.
func TestVMProcessDiesWithBoot(t *testing.T) {
	requireKVM(t)
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	b := startCmd(t, h.command(context.Background(), "boot", "--cmdline", "rayguest.run=echo", "--net", "network=lan"), "rayguest: ready")
	vm := vmProcess(t, b.cmd.Process.Pid)
	if len(h.taps(t)) != 1 {
		t.Fatalf("TAPs while running: %v", h.taps(t))
	}
	b.cmd.Process.Signal(syscall.SIGKILL)
	b.wait(t)
	waitGone(t, vm, "the VM process after kill -9 of rayvmm boot")
	if taps := h.taps(t); len(taps) != 0 {
		t.Fatalf("TAPs left after kill -9: %v", taps)
	}
}

// TestVMProcessKilled: kill -9 of the VM process ends rayvmm boot with
// status 1 and one line saying so.
func TestVMProcessKilled(t *testing.T) {
	requireKVM(t)
	b := startBoot(t, "rayguest: ready", "boot", "--cmdline", "rayguest.run=echo")
	vm := vmProcess(t, b.cmd.Process.Pid)
	syscall.Kill(vm, syscall.SIGKILL)
	if code := b.wait(t); code != 1 {
		t.Fatalf("exit %d after the VM process was killed, want 1\n%s", code, b.out.String())
	}
	if !strings.Contains(b.out.String(), "rayvmm: VM process killed by signal 9 (killed)") {
		t.Fatalf("no one-line message:\n%s", b.out.String())
	}
}

// TestVolumeLockAcrossKill: a volume stays locked while its VM runs, also
// when the control plane was killed with -9 (the VM process holds the
// lock, and is stopped here so that it outlives rayvmm boot for a while),
// and is free again once the VM process is gone; kill -9 of the VM
// process frees it too.
func TestVolumeLockAcrossKill(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "data", "--size", "16M")
	b := startBoot(t, "rayguest: ready", "--state-dir", state, "boot", "--cmdline", "rayguest.run=echo", "--disk", "volume=data")
	vm := vmProcess(t, b.cmd.Process.Pid)
	// Freeze the VM process, then kill the control plane: the VM runs on
	// (stopped) without rayvmm boot.
	syscall.Kill(vm, syscall.SIGSTOP)
	b.cmd.Process.Signal(syscall.SIGKILL)
	b.wait(t)
	if !alive(vm) {
		t.Fatal("the stopped VM process died with rayvmm boot; the test cannot show the lock")
	}
	if st := inspect(t, state, "data").State; st != "attached" {
		t.Fatalf("volume %s while its VM process runs without rayvmm boot, want attached", st)
	}
	r := run(t, nil, time.Minute, "--state-dir", state, "volume", "snapshot", "data", "s1")
	if r.code == 0 || !strings.Contains(r.stderr, "attached") {
		t.Fatalf("snapshot of a volume whose VM runs: exit %d, %s", r.code, r.stderr)
	}
	// Let it go: it finds its lifeline cut (and its parent-death signal
	// pending) and stops.
	syscall.Kill(vm, syscall.SIGCONT)
	waitGone(t, vm, "the VM process after its control plane died")
	if st := inspect(t, state, "data").State; st != "available" {
		t.Fatalf("volume %s after its VM process exited, want available", st)
	}

	b = startBoot(t, "rayguest: ready", "--state-dir", state, "boot", "--cmdline", "rayguest.run=echo", "--disk", "volume=data")
	vm = vmProcess(t, b.cmd.Process.Pid)
	syscall.Kill(vm, syscall.SIGKILL)
	b.wait(t)
	if st := inspect(t, state, "data").State; st != "available" {
		t.Fatalf("volume %s after kill -9 of its VM process, want available", st)
	}
	rayvmmOK(t, state, "volume", "snapshot", "data", "s1")
}

// TestVMBinary: rayvmm finds rayvmm-vm next to itself, else through
// $RAYVMM_VM_BINARY or PATH, and says clearly when it cannot; rayvmm-vm
// run by hand explains itself.
func TestVMBinary(t *testing.T) {
	requireKVM(t)
	r := runCommand(t, nil, time.Minute, func(ctx context.Context) *exec.Cmd { return exec.CommandContext(ctx, rayvmmVM) })
	if r.code != 2 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || !strings.Contains(r.stderr, "not meant to be run by hand") {
		t.Fatalf("rayvmm-vm by hand: exit %d, stderr %q", r.code, r.stderr)
	}
	alone := filepath.Join(t.TempDir(), "rayvmm")
	copyFile(t, rayvmm, alone)
	cases := []struct {
		name string
		env  []string
		ok   bool
	}{
		{"missing", []string{"PATH=/nonexistent"}, false},
		{"from the environment", []string{"PATH=/nonexistent", "RAYVMM_VM_BINARY=" + rayvmmVM}, true},
		{"on PATH", []string{"PATH=" + filepath.Dir(rayvmmVM)}, true},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			r := runCommand(t, nil, time.Minute, func(ctx context.Context) *exec.Cmd {
				c := exec.CommandContext(ctx, alone, "boot")
				c.Env = tt.env
				return c
			})
			if tt.ok {
				if r.code != 0 || !strings.Contains(r.stdout, "rayguest: poweroff") {
					t.Fatalf("exit %d\n%s%s", r.code, r.stdout, r.stderr)
				}
				return
			}
			msg := strings.TrimSpace(r.stderr)
			if r.code == 0 || strings.Contains(msg, "\n") || !strings.Contains(msg, "rayvmm-vm not found") || !strings.Contains(msg, "RAYVMM_VM_BINARY") {
				t.Fatalf("exit %d, stderr %q; want one line saying rayvmm-vm is missing and how to point at it", r.code, r.stderr)
			}
		})
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// TestAPISocketReclaimed: a socket left by a killed VM is reclaimed; one a
// running VM serves is refused, with nothing left behind; a clean exit
// removes it.
func TestAPISocketReclaimed(t *testing.T) {
	requireKVM(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	b := startBoot(t, "rayguest: ready", "boot", "--cmdline", "rayguest.run=echo", "--api-socket", sock)
	st, err := os.Stat(sock)
	if err != nil || st.Mode().Type() != os.ModeSocket || st.Mode().Perm() != 0o600 {
		t.Fatalf("API socket %v, %v; want a socket of mode 0600", st, err)
	}
	r := run(t, nil, time.Minute, "boot", "--api-socket", sock)
	if r.code == 0 || !strings.Contains(r.stderr, "in use: a running VM") || strings.Contains(r.stdout, "rayguest: ready") {
		t.Fatalf("second VM on a live socket: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	b.cmd.Process.Signal(syscall.SIGKILL)
	b.wait(t)
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("the killed VM's socket is gone already (%v); the test cannot show the reclaim", err)
	}
	r = run(t, nil, time.Minute, "boot", "--api-socket", sock)
	if r.code != 0 || !strings.Contains(r.stdout, "rayguest: poweroff") {
		t.Fatalf("boot on a stale socket: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after a clean exit: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Dir(sock)); len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("left in the socket's directory: %v", names)
	}
}

// TestTerminalRestoredAfterVMProcessKilled: the VM process puts the
// terminal in raw mode and restores it when it ends; killed with -9 it
// cannot, and rayvmm boot restores it instead.
func TestTerminalRestoredAfterVMProcessKilled(t *testing.T) {
	requireKVM(t)
	p := startOnPTY(t)
	vm := vmProcess(t, p.cmd.Process.Pid)
	syscall.Kill(vm, syscall.SIGKILL)
	if _, err := p.wait(t, "its VM process was killed", 30*time.Second); err == nil {
		t.Fatal("rayvmm boot exited 0 after its VM process was killed")
	}
	p.checkRestored(t)
	p.out.waitFor(t, "rayvmm: VM process killed by signal 9 (killed)", 30*time.Second)
}
