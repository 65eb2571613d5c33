package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/seccap/forbidden"
)

// The VM process's sandbox (package seccap) as rayvmm boot applies it:
// strict by default (every other test runs under it), what
// /proc/PID/status shows of it, the guests' devices in a jail as an
// unprivileged user, forbidden calls killed and named by the control
// plane, and log mode.

// nobody is the unprivileged uid and gid the jailed tests run the VM as.
const nobody = 65534

// jailFlags returns --jail flags for a jail directory of the test's own.
func jailFlags(t *testing.T) (dir string, flags []string) {
	dir = t.TempDir()
	return dir, []string{"--jail", dir, "--uid", strconv.Itoa(nobody), "--gid", strconv.Itoa(nobody)}
}

// procStatus reads /proc/PID/status (or a task's) as a map.
func procStatus(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// checkSandboxed checks what /proc shows of a sandboxed VM process: no
// capabilities, no_new_privs, seccomp filter mode, and cpus threads
// (the vCPUs') with one filter more than the others.
func checkSandboxed(t *testing.T, pid, cpus int) map[string]string {
	t.Helper()
	st := procStatus(t, fmt.Sprintf("/proc/%d/status", pid))
	for k, want := range map[string]string{
		"NoNewPrivs": "1", "Seccomp": "2",
		"CapInh": "0000000000000000", "CapPrm": "0000000000000000", "CapEff": "0000000000000000",
		"CapBnd": "0000000000000000", "CapAmb": "0000000000000000",
	} {
		if st[k] != want {
			t.Errorf("VM process %s: %q, want %q", k, st[k], want)
		}
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	filters := map[int]int{} // filters -> threads
	for _, task := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s", pid, task.Name())
		comm, _ := os.ReadFile(dir + "/comm")
		if strings.HasPrefix(string(comm), "kvm-nx-lpage") {
			continue // KVM's kernel worker, forked off a vCPU thread (see seccap/README.md)
		}
		ts := procStatus(t, dir+"/status")
		n, err := strconv.Atoi(ts["Seccomp_filters"])
		if err != nil || ts["Seccomp"] != "2" || ts["NoNewPrivs"] != "1" || ts["CapEff"] != "0000000000000000" {
			t.Errorf("thread %s: Seccomp %q, Seccomp_filters %q, NoNewPrivs %q, CapEff %q", task.Name(), ts["Seccomp"], ts["Seccomp_filters"], ts["NoNewPrivs"], ts["CapEff"])
		}
		filters[n]++
	}
	if len(filters) != 2 || filters[2] != cpus || filters[1] == 0 {
		t.Errorf("threads by number of seccomp filters: %v; want %d vCPU threads with 2 and the others with 1", filters, cpus)
	}
	return st
}

// TestSandboxStatus: a VM process under the default sandbox has no
// capabilities, no_new_privs, the seccomp filter on every thread and a
// second one on each vCPU thread; with --sandbox off, none of that.
func TestSandboxStatus(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	b := startBoot(t, "rayguest: cpu 1 up", "--state-dir", state, "boot", "--cpus", "2", "--cmdline", "rayguest.run=echo")
	vm := vmProcess(t, b.cmd.Process.Pid)
	checkSandboxed(t, vm, 2)
	io.WriteString(b.stdin, "quit\n")
	if code := b.wait(t); code != 0 {
		t.Fatalf("exit %d\n%s", code, b.out.String())
	}

	off := startBoot(t, "rayguest: ready", "--state-dir", state, "boot", "--sandbox", "off", "--cmdline", "rayguest.run=echo")
	st := procStatus(t, fmt.Sprintf("/proc/%d/status", vmProcess(t, off.cmd.Process.Pid)))
	if st["Seccomp"] != "0" || st["NoNewPrivs"] != "0" || st["CapEff"] == "0000000000000000" {
		t.Errorf("--sandbox off: Seccomp %q, NoNewPrivs %q, CapEff %q; want no sandbox (root's capabilities)", st["Seccomp"], st["NoNewPrivs"], st["CapEff"])
	}
	io.WriteString(off.stdin, "quit\n")
	if code := off.wait(t); code != 0 {
		t.Fatalf("exit %d\n%s", code, off.out.String())
	}
}

// TestJailedBlk: blktest on a raw file and on a qcow2 volume, the VM
// process jailed as nobody; the data lands in both images.
func TestJailedBlk(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "data", "--size", "16M", "--format", "qcow2")
	img := sparseFile(t, diskSize)
	dir, jail := jailFlags(t)
	out := bootOK(t, state, append(jail, "--name", "jblk", "--disk", "path="+img+",format=raw", "--disk", "volume=data",
		"--cmdline", "rayguest.run=blktest rayguest.seed=7 rayguest.blocks=32")...)
	sums := blkSums(t, out)
	want := expectImage(diskSize, 7, 32)
	if sums["vda"] != guestSum(want[:32*4096]) || sums["vdb"] != sums["vda"] {
		t.Fatalf("guest sums %v, want %s for both\n%s", sums, guestSum(want[:32*4096]), out)
	}
	if got, err := os.ReadFile(img); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the raw file does not hold the pattern the jailed guest wrote (%v)", err)
	}
	if !bytes.Equal(toRaw(t, inspect(t, state, "data").Path), want) {
		t.Fatal("the volume does not hold the pattern the jailed guest wrote")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("jail left behind: %v", ents)
	}
}

// TestJailedNet: a jailed guest serves ping and UDP echo through its TAP.
func TestJailedNet(t *testing.T) {
	requireTool(t, "ping")
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	_, jail := jailFlags(t)
	g := startProc(t, h.command(context.Background(), append([]string{"boot", "--name", "jnet", "--net", "network=lan",
		"--cmdline", "rayguest.ip=192.0.2.2/24 rayguest.run=serve"}, jail...)...))
	g.out.waitFor(t, "rayguest: serving", guestWait)
	if out, err := h.ns.Run("ping", "-c", "3", "-W", "10", "192.0.2.2"); err != nil || !strings.Contains(out, "3 received") {
		t.Fatalf("ping -c 3 192.0.2.2: %v\n%s", err, out)
	}
	g.cmd.Process.Signal(syscall.SIGTERM)
	if err := g.exited(t, "SIGTERM", guestWait); err != nil {
		t.Fatalf("rayvmm after SIGTERM: %v\n%s", err, g.out.String())
	}
}

// TestJailedVsock: host-to-guest and guest-to-host vsock with the VM
// process jailed as nobody (the socket directory is bound into the jail);
// the process is pid 1 of its own pid namespace, nobody, with no
// capabilities; the jail goes with the VM.
func TestJailedVsock(t *testing.T) {
	requireKVM(t)
	sockDir := t.TempDir()
	if err := os.Chmod(sockDir, 0o755); err != nil { // searchable by nobody
		t.Fatal(err)
	}
	uds := filepath.Join(sockDir, "v.sock")
	got := echoListener(t, uds+"_1234") // the guest connects here, as nobody
	dir, jail := jailFlags(t)
	vm := startVsock(t, uds, "rayguest.run=vsock-echo", echoReady, append(jail, "--name", "jvsock")...)
	pid := vmProcess(t, vm.cmd.Process.Pid)
	st := checkSandboxed(t, pid, 1)
	if st["Uid"] != "65534\t65534\t65534\t65534" || st["Gid"] != "65534\t65534\t65534\t65534" || st["Groups"] != "" {
		t.Errorf("jailed VM process Uid %q, Gid %q, Groups %q; want nobody's, no groups", st["Uid"], st["Gid"], st["Groups"])
	}
	if ns := strings.Fields(st["NSpid"]); len(ns) != 2 || ns[1] != "1" {
		t.Errorf("NSpid %q: want pid 1 of a pid namespace of its own", st["NSpid"])
	}
	c, _ := dialGuest(t, uds, 52)
	if back, err := echoRoundTrip(c, []byte("through the jail")); err != nil || string(back) != "through the jail" {
		t.Fatalf("echo: %q, %v", back, err)
	}
	vm.stop(t)
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("jail left behind: %v", ents)
	}

	// Guest to host: the jailed guest's connection reaches <uds>_1234.
	vm = startVsock(t, uds, "rayguest.run=vsock-connect:1234", "", append(jail, "--name", "jvsock")...)
	if code := vm.wait(t); code != 0 || !strings.Contains(vm.out.String(), "rayguest: vsock ok") {
		t.Fatalf("exit %d\n%s", code, vm.out.String())
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, connectPattern()) {
			t.Fatalf("host got %d bytes, not the 64 KiB pattern", len(b))
		}
	case <-time.After(guestWait):
		t.Fatal("the host side never saw the jailed guest's connection end")
	}
}

// seccaptestBinaries builds rayvmm-vm with the seccaptest tag next to
// copies of rayvmm and rayvmmd (which find it there), once.
var seccaptestBinaries = sync.OnceValues(func() (string, error) {
	dir := filepath.Join(filepath.Dir(rayvmm), "seccaptest") // removed with TestMain's
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", err
	}
	build := exec.Command("go", "build", "-tags", "seccaptest", "-o", filepath.Join(dir, "rayvmm-vm"), "./cmd/rayvmm-vm")
	build.Dir = repoRoot
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build -tags seccaptest: %v\n%s", err, out)
	}
	for _, bin := range []string{rayvmmd, rayvmm} {
		b, err := os.ReadFile(bin)
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(bin)), b, 0o755); err != nil {
			return "", err
		}
	}
	return filepath.Join(dir, "rayvmm"), nil
})

// seccaptestRayvmm returns a rayvmm whose VM process makes the forbidden
// call the environment asks for (forbidden.Env).
func seccaptestRayvmm(t *testing.T) string {
	t.Helper()
	bin, err := seccaptestBinaries()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// TestSandboxForbiddenCalls: each forbidden call, on an ordinary thread
// and on a vCPU thread, kills the VM process with SIGSYS, and rayvmm boot
// says which call in one line and records a critical vm.sandbox-kill; a
// file open is refused by landlock instead. The guest never runs.
func TestSandboxForbiddenCalls(t *testing.T) {
	requireKVM(t)
	bin := seccaptestRayvmm(t)
	killed := func(nr int, name string) string {
		return fmt.Sprintf("rayvmm: VM process killed by the sandbox (SIGSYS): syscall %d (%s)", nr, name)
	}
	for _, tc := range []struct {
		try  string
		code int
		want string
	}{
		{"execve", 1, killed(59, "execve")},
		{"socket-inet", 1, killed(41, "socket")},
		{"ptrace", 1, killed(101, "ptrace")},
		{"mount", 1, killed(165, "mount")},
		{"open-shadow", 3, "rayvmm: seccaptest: open-shadow returned: open /etc/shadow: permission denied"},
		{"execve@vcpu", 1, killed(59, "execve")},
		{"open-shadow@vcpu", 1, killed(257, "openat")},
		{"socket-inet@vcpu", 1, killed(41, "socket")},
	} {
		t.Run(tc.try, func(t *testing.T) {
			state := t.TempDir()
			r := runCommand(t, nil, guestWait, func(ctx context.Context) *exec.Cmd {
				cmd := exec.CommandContext(ctx, bin, "--state-dir", state, "boot", "--name", "victim")
				cmd.Env = append(os.Environ(), forbidden.Env+"="+tc.try)
				return cmd
			})
			if r.code != tc.code || strings.TrimSpace(r.stderr) != tc.want || r.stdout != "" {
				t.Fatalf("exit %d, stdout %q, stderr %q; want exit %d and only %q", r.code, r.stdout, r.stderr, tc.code, tc.want)
			}
			if tc.code != 1 {
				return
			}
			rs := auditRecords(t, state)
			last := rs[len(rs)-1]
			if last.Action != audit.VMSandboxKill || last.Level != audit.Critical || last.Result != strings.TrimPrefix(tc.want, "rayvmm: ") {
				t.Fatalf("last audit record %s %s %q, want a critical %s with the line", last.Action, last.Level, last.Result, audit.VMSandboxKill)
			}
		})
	}
	// Without the tag the hooks do nothing: the same request boots.
	r := runCommand(t, nil, guestWait, func(ctx context.Context) *exec.Cmd {
		cmd := exec.CommandContext(ctx, rayvmm, "--state-dir", t.TempDir(), "boot")
		cmd.Env = append(os.Environ(), forbidden.Env+"=execve")
		return cmd
	})
	if r.code != 0 || !strings.Contains(r.stdout, "rayguest: poweroff") {
		t.Fatalf("the plain rayvmm-vm with %s set: exit %d\n%s%s", forbidden.Env, r.code, r.stdout, r.stderr)
	}
}

// kmsg reads the kernel log from where it was opened.
type kmsg struct{ f *os.File }

func openKmsg(t *testing.T) *kmsg {
	t.Helper()
	f, err := os.OpenFile("/dev/kmsg", os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatalf("the kernel log: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	return &kmsg{f: f}
}

// find waits for a record holding every one of subs.
func (k *kmsg) find(t *testing.T, within time.Duration, subs ...string) string {
	t.Helper()
	k.f.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 8192)
next:
	for {
		n, err := k.f.Read(buf)
		if errors.Is(err, syscall.EPIPE) {
			continue // records were overwritten before we read them
		}
		if err != nil {
			t.Fatalf("no kernel log record with %q within %v (%v)", subs, within, err)
		}
		rec := string(buf[:n])
		for _, s := range subs {
			if !strings.Contains(rec, s) {
				continue next
			}
		}
		return rec
	}
}

// TestSandboxLogMode: with --sandbox log a forbidden call runs (the VM
// goes on and exits 0) and the kernel logs it (a seccomp audit record,
// type 1326, with the log action); the boot is recorded as log mode and
// audit report lists it.
func TestSandboxLogMode(t *testing.T) {
	requireKVM(t)
	bin := seccaptestRayvmm(t)
	log := openKmsg(t)
	state := t.TempDir()
	cmd := exec.Command(bin, "--state-dir", state, "boot", "--sandbox", "log", "--name", "logged", "--cmdline", "rayguest.run=echo")
	cmd.Env = append(os.Environ(), forbidden.Env+"=socket-inet@repeat")
	b := startCmd(t, cmd, "rayguest: ready")
	vm := vmProcess(t, b.cmd.Process.Pid)
	// The kernel log is rate limited and shared with the whole machine:
	// the call is made every 100 ms until a record of it shows.
	rec := log.find(t, guestWait, "type=1326", fmt.Sprintf(" pid=%d ", vm), " syscall=41 ")
	if !strings.Contains(rec, "code=0x7ffc0000") {
		t.Fatalf("kernel log record %q: want the log action (code=0x7ffc0000)", rec)
	}
	io.WriteString(b.stdin, "quit\n")
	if code := b.wait(t); code != 0 {
		t.Fatalf("log mode: exit %d\n%s", code, b.out.String())
	}
	r := run(t, nil, time.Minute, "--state-dir", state, "audit", "report")
	if !strings.Contains(r.stdout, "VM logged ran with the sandbox in log mode") {
		t.Fatalf("audit report does not list the log-mode run:\n%s", r.stdout)
	}
}

// TestSandboxBadInput: bad sandbox and jail settings get one line naming
// the problem and a non-zero exit, and leave nothing behind (no socket,
// no jail directory).
func TestSandboxBadInput(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	jail := filepath.Join(dir, "jail")
	if err := os.MkdirAll(filepath.Join(jail, "taken"), 0o755); err != nil {
		t.Fatal(err)
	}
	api := filepath.Join(dir, "api.sock")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"mode", []string{"--sandbox", "lax"}, `sandbox.mode: "lax": want strict, log or off`},
		{"relative jail", []string{"--jail", "jail", "--uid", "1", "--gid", "1"}, `sandbox.jail.dir: "jail" is not an absolute path`},
		{"root in the jail", []string{"--jail", jail, "--uid", "0", "--gid", "1"}, "sandbox.jail.uid: 0: want an unprivileged uid"},
		{"uid without jail", []string{"--uid", "5"}, "--uid: needs --jail"},
		{"jail without sandbox", []string{"--sandbox", "off", "--jail", jail, "--uid", "1", "--gid", "1"}, "sandbox.jail: needs mode strict or log"},
		{"jail taken", []string{"--name", "taken", "--jail", jail, "--uid", "1", "--gid", "1"}, "is VM \"taken\" jailed already"},
		{"a disk fails after the jail was made", []string{"--name", "late", "--jail", jail, "--uid", "1", "--gid", "1", "--disk", "path=" + filepath.Join(dir, "nope.img")}, "disks[0]: disk "},
		{"the VM fails in its jail", []string{"--name", "late", "--jail", jail, "--uid", "1", "--gid", "1", "--cmdline", strings.Repeat("x", 5000)}, "this kernel accepts at most"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, nil, guestWait, append([]string{"--state-dir", t.TempDir(), "boot", "--api-socket", api}, tc.args...)...)
			msg := strings.TrimSpace(r.stderr)
			if r.code == 0 || strings.Count(msg, "\n") != 0 || !strings.HasPrefix(msg, "rayvmm: ") || !strings.Contains(msg, tc.want) {
				t.Fatalf("exit %d, stderr %q; want one line with %q", r.code, r.stderr, tc.want)
			}
			if _, err := os.Lstat(api); err == nil {
				t.Fatal("the API socket was left behind")
			}
			if ents, _ := os.ReadDir(jail); len(ents) != 1 {
				t.Fatalf("jail directory holds %v, want only the taken one", ents)
			}
		})
	}
}
