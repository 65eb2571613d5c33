package seccap

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/seccap/forbidden"
	"github.com/rayvmm/rayvmm/seccap/report"
)

// The tests below run the sandbox in a child process, this test binary
// started again with childEnv set: it creates a real KVM VM, applies the
// sandbox, starts vCPUs on locked threads that install the vCPU filter
// and run a guest that exits to it on every instruction, keeps the Go
// runtime busy (GC, timers, allocation) on other threads, says "ready",
// then obeys commands on stdin: what rayvmm-vm will do, without the
// devices.

const childEnv = "RAYVMM_SECCAP_TEST_CHILD"

// benchExits is how many I/O exits one "vcpu bench" runs.
const benchExits = 2000

// benchCalls is how many calls one "vcpu callbench" makes.
const benchCalls = 200000

type childSpec struct {
	Sandbox Config
	VCPUs   int
	// PreFilter puts a filter of its own on one locked thread before
	// Apply, so that TSYNC cannot synchronize it.
	PreFilter bool
}

func TestMain(m *testing.M) {
	if s := os.Getenv(childEnv); s != "" {
		os.Exit(child(s))
	}
	os.Exit(m.Run())
}

// child is the sandboxed process. Exit status: 0 after "exit", 3 when a
// forbidden call returned, 4 when the sandbox could not be applied, 5 on
// other errors.
func child(specJSON string) int {
	var s childSpec
	if err := json.Unmarshal([]byte(specJSON), &s); err != nil {
		fmt.Printf("bad spec: %v\n", err)
		return 5
	}
	vm, err := newTestVM()
	if err != nil {
		fmt.Printf("vm: %v\n", err)
		return 5
	}
	if s.PreFilter {
		ready := make(chan error)
		done := make(chan struct{})
		defer close(done)
		go func() {
			runtime.LockOSThread()
			p, err := assemble(nil, retAllow)
			if err == nil {
				err = load(p, false, false)
			}
			ready <- err
			<-done // keeps the thread until the child returns
		}()
		if err := <-ready; err != nil {
			fmt.Printf("prefilter: %v\n", err)
			return 5
		}
	}
	a, err := Apply(s.Sandbox)
	if err != nil {
		fmt.Printf("apply failed: %v\n", err)
		return 4
	}
	type vcpuThread struct {
		cmds chan string
	}
	var vcpus []vcpuThread
	started := make(chan error)
	for i := 0; i < s.VCPUs; i++ {
		t := vcpuThread{cmds: make(chan string)}
		vcpus = append(vcpus, t)
		go func() {
			runtime.LockOSThread()
			fmt.Printf("vcpu %d thread %d\n", i, unix.Gettid())
			c, err := vm.newVCPU(i)
			if err == nil {
				err = a.VCPUFilter(c.fd, vm.vmFD)
			}
			if err == nil {
				err = c.runIO(200)
			}
			started <- err
			for cmd := range t.cmds {
				switch cmd {
				case "run":
					if err := c.runIO(200); err != nil {
						fmt.Printf("vcpu run: %v\n", err)
					} else {
						fmt.Printf("vcpu run ok\n")
					}
				case "bench":
					start := time.Now()
					err := c.runIO(benchExits)
					fmt.Printf("bench %d %v\n", time.Since(start).Nanoseconds(), err)
				case "callbench":
					start := time.Now()
					err := futexWake(benchCalls)
					fmt.Printf("bench %d %v\n", time.Since(start).Nanoseconds(), err)
				case "read":
					var b [1]byte
					unix.Read(0, b[:])
					fmt.Printf("vcpu read returned\n")
				}
			}
		}()
	}
	for range s.VCPUs {
		if err := <-started; err != nil {
			fmt.Printf("vcpu: %v\n", err)
			return 5
		}
	}
	// Keep the runtime busy on other threads: collections, timers,
	// allocation, goroutines parking and waking.
	go func() {
		var keep [][]byte
		for i := 0; ; i++ {
			keep = append(keep, make([]byte, 64<<10))
			if len(keep) > 64 {
				keep = keep[:0]
				runtime.GC()
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	fmt.Printf("ready %s\n", a)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "exit":
			return 0
		case "try":
			err := forbidden.Try(f[1])
			fmt.Printf("returned: %v\n", err)
			return 3
		case "repeat":
			// The kernel log is rate limited: make the call until the
			// test has seen it logged (it then sends "exit").
			go func() {
				for i := 0; ; i++ {
					err := forbidden.Try(f[1])
					if i == 0 {
						fmt.Printf("returned: %v\n", err)
					}
					time.Sleep(100 * time.Millisecond)
				}
			}()
		case "vcpu":
			vcpus[0].cmds <- f[1]
		case "dial":
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err == nil {
				err = unix.Connect(fd, &unix.SockaddrUnix{Name: f[1]})
				unix.Close(fd)
			}
			fmt.Printf("dial %s: %v\n", f[1], err)
		}
	}
	return 0
}

// sandboxed is a running child.
type sandboxed struct {
	t     testing.TB
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
	out   strings.Builder
	rp    *report.Pipe
	ready string
}

// startChild starts a sandboxed child and waits for it to say ready.
// With prepared, it forks it from a thread PrepareForkThread prepared, as
// the control plane does.
func startChild(t testing.TB, s childSpec, cloneflags uintptr, prepared bool) *sandboxed {
	t.Helper()
	rp, err := report.NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rp.Close() })
	s.Sandbox.ReportFD = 3
	spec, _ := json.Marshal(s)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	cmd.ExtraFiles = []*os.File{rp.Writer()}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: cloneflags}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	started := make(chan error)
	go func() {
		// Never unlocked: PrepareForkThread changed the thread for good,
		// and the runtime discards it when this goroutine ends.
		runtime.LockOSThread()
		if prepared {
			if err := PrepareForkThread(s.Sandbox.Jail != nil); err != nil {
				started <- err
				return
			}
		}
		started <- cmd.Start()
	}()
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	rp.Launched()
	c := &sandboxed{t: t, cmd: cmd, in: in, lines: make(chan string, 100), rp: rp}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	c.ready = c.expect("ready")
	return c
}

// expect waits for a line starting with prefix.
func (c *sandboxed) expect(prefix string) string {
	c.t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				c.t.Fatalf("child exited before printing %q; it printed:\n%s", prefix, c.out.String())
			}
			c.out.WriteString(l + "\n")
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-deadline:
			c.t.Fatalf("no %q line from the child in 30 s; it printed:\n%s", prefix, c.out.String())
		}
	}
}

func (c *sandboxed) send(cmd string) {
	c.t.Helper()
	if _, err := io.WriteString(c.in, cmd+"\n"); err != nil {
		c.t.Fatalf("send %q: %v", cmd, err)
	}
}

// wait waits for the child to exit and returns its state and what the
// report pipe explains.
func (c *sandboxed) wait() (*os.ProcessState, error) {
	c.t.Helper()
	for l := range c.lines {
		c.out.WriteString(l + "\n")
	}
	c.cmd.Wait()
	return c.cmd.ProcessState, c.rp.Explain(c.cmd.ProcessState)
}

// procStatus reads /proc/PID/task/TID/status (TID 0: the process's).
func procStatus(t *testing.T, pid, tid int) map[string]string {
	t.Helper()
	p := fmt.Sprintf("/proc/%d/status", pid)
	if tid != 0 {
		p = fmt.Sprintf("/proc/%d/task/%d/status", pid, tid)
	}
	b, err := os.ReadFile(p)
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

// threadFilters counts each thread's seccomp filters.
func threadFilters(t *testing.T, pid int) map[int]int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := map[int]int{}
	for _, e := range ents {
		tid, _ := strconv.Atoi(e.Name())
		n, err := strconv.Atoi(procStatus(t, pid, tid)["Seccomp_filters"])
		if err != nil {
			t.Fatalf("thread %d: Seccomp_filters: %v", tid, err)
		}
		m[tid] = n
	}
	return m
}

func needSandboxHost(t testing.TB) {
	t.Helper()
	testenv.RequireKVM(t)
	if err := Supported(); err != nil {
		testenv.Need(t, "needs a kernel and a build the sandbox supports: "+err.Error())
	}
}

// TestSandboxStatus: what /proc shows of a sandboxed process: no new
// privileges, seccomp in filter mode, no capabilities in any set, and
// every vCPU thread with one filter more than the other threads.
func TestSandboxStatus(t *testing.T) {
	needSandboxHost(t)
	for _, prepared := range []bool{false, true} {
		t.Run(fmt.Sprintf("prepared=%v", prepared), func(t *testing.T) { testSandboxStatus(t, prepared) })
	}
}

func testSandboxStatus(t *testing.T, prepared bool) {
	c := startChild(t, childSpec{Sandbox: Config{Mode: ModeStrict}, VCPUs: 2}, 0, prepared)
	pid := c.cmd.Process.Pid
	st := procStatus(t, pid, 0)
	for k, want := range map[string]string{
		"NoNewPrivs": "1", "Seccomp": "2",
		"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "CapInh": "0000000000000000",
		"CapBnd": "0000000000000000", "CapAmb": "0000000000000000",
	} {
		if st[k] != want {
			t.Errorf("/proc/%d/status %s: %q, want %q", pid, k, st[k], want)
		}
	}
	// Every thread has the process filter, each vCPU thread one more.
	// KVM's NX huge page recovery worker (kvm-nx-lpage-recovery), a
	// kernel thread the first KVM_RUN forks off its vCPU thread into the
	// process, inherits that thread's filters; it never runs user code.
	vcpus := map[int]bool{}
	for _, l := range strings.Split(c.out.String(), "\n") {
		var n, tid int
		if _, err := fmt.Sscanf(l, "vcpu %d thread %d", &n, &tid); err == nil {
			vcpus[tid] = true
		}
	}
	if len(vcpus) != 2 {
		t.Fatalf("the child named vCPU threads %v, want 2", vcpus)
	}
	for tid, n := range threadFilters(t, pid) {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", pid, tid))
		switch {
		case vcpus[tid] && n != 2:
			t.Errorf("vCPU thread %d: Seccomp_filters %d, want 2", tid, n)
		case strings.HasPrefix(string(comm), "kvm-"):
		case !vcpus[tid] && n != 1:
			t.Errorf("thread %d (%s): Seccomp_filters %d, want 1", tid, strings.TrimSpace(string(comm)), n)
		}
	}
	// The guest still runs under both filters.
	c.send("vcpu run")
	c.expect("vcpu run ok")
	c.send("exit")
	ps, err := c.wait()
	if err != nil || ps.ExitCode() != 0 {
		t.Errorf("child: %v, %v; want exit status 0\n%s", ps, err, c.out.String())
	}
	if !strings.Contains(c.ready, "sandbox strict: seccomp on every thread") {
		t.Errorf("ready line %q does not describe the sandbox", c.ready)
	}
	t.Log(c.ready)
}

// TestForbiddenCalls: each forbidden call kills the process with SIGSYS
// and the control plane names the call, or landlock refuses it.
func TestForbiddenCalls(t *testing.T) {
	needSandboxHost(t)
	tests := []struct {
		call     string
		vcpu     bool
		want     string // the control plane's line, or the returned error
		returned bool
	}{
		{call: "execve", want: "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)"},
		{call: "socket-inet", want: "VM process killed by the sandbox (SIGSYS): syscall 41 (socket)"},
		{call: "ptrace", want: "VM process killed by the sandbox (SIGSYS): syscall 101 (ptrace)"},
		{call: "mount", want: "VM process killed by the sandbox (SIGSYS): syscall 165 (mount)"},
		{call: "open-shadow", want: "returned: open /etc/shadow: permission denied", returned: true},
		// Allowed on other threads, but not on a vCPU's.
		{call: "read", vcpu: true, want: "VM process killed by the sandbox (SIGSYS): syscall 0 (read)"},
	}
	for _, tt := range tests {
		t.Run(tt.call, func(t *testing.T) {
			c := startChild(t, childSpec{Sandbox: Config{Mode: ModeStrict}, VCPUs: 1}, 0, false)
			if tt.vcpu {
				c.send("vcpu " + tt.call)
			} else {
				c.send("try " + tt.call)
			}
			if tt.returned {
				c.expect(tt.want)
				if ps, _ := c.wait(); ps.ExitCode() != 3 {
					t.Errorf("child: %v, want exit status 3", ps)
				}
				return
			}
			ps, err := c.wait()
			if ws := ps.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGSYS {
				t.Fatalf("child: %v, want killed by SIGSYS; it printed:\n%s", ps, c.out.String())
			}
			if !errors.Is(err, report.ErrKilled) || err.Error() != tt.want {
				t.Errorf("report: %v\nwant: %s", err, tt.want)
			}
			if strings.Contains(c.out.String(), "returned") {
				t.Errorf("the forbidden call returned:\n%s", c.out.String())
			}
		})
	}
}

// TestLogMode: log mode kills nothing; the kernel logs the call.
func TestLogMode(t *testing.T) {
	needSandboxHost(t)
	kmsg := openKmsg(t)
	c := startChild(t, childSpec{Sandbox: Config{Mode: ModeLog}, VCPUs: 1}, 0, true)
	c.send("repeat socket-inet")
	c.expect("returned: <nil>")
	rec := kmsg.find(t, fmt.Sprintf("pid=%d ", c.cmd.Process.Pid), "syscall=41 ")
	c.send("exit")
	if ps, err := c.wait(); ps.ExitCode() != 0 || err != nil {
		t.Errorf("child: %v, %v; want exit status 0: nothing killed", ps, err)
	}
	if !strings.Contains(rec, "type=1326") || !strings.Contains(rec, "code=0x7ffc0000") {
		t.Errorf("kernel log record %q: want a seccomp (type=1326) log (code=0x7ffc0000) record", rec)
	}
}

// TestTSYNCFailureIsAnError: when a thread carries a filter of its own,
// TSYNC cannot install the process filter, which the kernel says with a
// positive return value; Apply must fail rather than run unfiltered.
func TestTSYNCFailureIsAnError(t *testing.T) {
	needSandboxHost(t)
	rp, err := report.NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer rp.Close()
	spec, _ := json.Marshal(childSpec{Sandbox: Config{Mode: ModeStrict}, VCPUs: 1, PreFilter: true})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	out, _ := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() != 4 || !strings.Contains(string(out), "cannot take the process filter") {
		t.Errorf("child: %v\n%s\nwant Apply to fail naming the thread", cmd.ProcessState, out)
	}
}

// kmsgReader reads the kernel log from where it was opened.
type kmsgReader struct{ f *os.File }

func openKmsg(t *testing.T) *kmsgReader {
	t.Helper()
	f, err := os.OpenFile("/dev/kmsg", os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		testenv.Need(t, fmt.Sprintf("needs the kernel log: %v", err))
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &kmsgReader{f: f}
}

// find waits for a kernel log record holding every one of subs; kauditd
// writes them asynchronously.
func (k *kmsgReader) find(t *testing.T, subs ...string) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	buf := make([]byte, 8192)
	var seen []string
	for time.Now().Before(deadline) {
		n, err := unix.Read(int(k.f.Fd()), buf)
		if err == unix.EAGAIN {
			time.Sleep(10 * time.Millisecond) // the kernel log has no readiness signal we can wait on without a poller
			continue
		}
		if err == unix.EPIPE { // overwritten records; go on
			continue
		}
		if err != nil {
			t.Fatalf("read /dev/kmsg: %v", err)
		}
		rec := string(buf[:n])
		seen = append(seen, rec)
		match := true
		for _, s := range subs {
			match = match && strings.Contains(rec, s)
		}
		if match {
			return rec
		}
	}
	t.Fatalf("no kernel log record with %q in 15 s; saw %d records:\n%s", subs, len(seen), strings.Join(seen, ""))
	return ""
}

// TestJail runs the sandboxed child jailed, as an unprivileged uid and
// gid that have no passwd entry, in its own namespaces: the guest runs,
// a Unix socket in a bound directory can be dialled by path, one outside
// cannot, forbidden calls are still killed, and Remove leaves nothing.
func TestJail(t *testing.T) {
	needSandboxHost(t)
	const uid, gid = 64011, 64011
	base := t.TempDir()
	sockDir := filepath.Join(t.TempDir(), "vsock")
	if err := os.Mkdir(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(sockDir, "v.sock_1024")
	lfd := listenUnix(t, sock)
	_ = lfd
	outside := filepath.Join(t.TempDir(), "outside.sock")
	listenUnix(t, outside)

	for _, tt := range []struct {
		name string
		run  func(t *testing.T, c *sandboxed, j *Jail)
	}{
		{"runs", func(t *testing.T, c *sandboxed, j *Jail) {
			pid := c.cmd.Process.Pid
			st := procStatus(t, pid, 0)
			want := fmt.Sprintf("%d\t%d\t%d\t%d", uid, uid, uid, uid)
			if st["Uid"] != want || st["Gid"] != strings.ReplaceAll(want, strconv.Itoa(uid), strconv.Itoa(gid)) {
				t.Errorf("Uid %q Gid %q, want %q", st["Uid"], st["Gid"], want)
			}
			if f := strings.Fields(st["NSpid"]); len(f) != 2 || f[1] != "1" {
				t.Errorf("NSpid %q: want the process to be pid 1 of its own pid namespace", st["NSpid"])
			}
			if st["CapEff"] != "0000000000000000" || st["CapBnd"] != "0000000000000000" || st["Seccomp"] != "2" || st["NoNewPrivs"] != "1" {
				t.Errorf("status: %v", st)
			}
			inside, err1 := os.Stat(fmt.Sprintf("/proc/%d/root/", pid))
			jroot, err2 := os.Stat(j.Root)
			if err1 != nil || err2 != nil || !os.SameFile(inside, jroot) {
				t.Errorf("the process's root is not %s (%v, %v)", j.Root, err1, err2)
			}
			for _, ns := range []string{"mnt", "pid", "ipc", "uts"} {
				a, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
				b, _ := os.Readlink("/proc/self/ns/" + ns)
				if a == b {
					t.Errorf("the jailed process shares our %s namespace", ns)
				}
			}
			c.send("vcpu run")
			c.expect("vcpu run ok")
			c.send("dial " + sock)
			if l := c.expect("dial " + sock); !strings.HasSuffix(l, "<nil>") {
				t.Errorf("%s: want the vsock-style socket inside the jail to answer", l)
			}
			c.send("dial " + outside)
			if l := c.expect("dial " + outside); !strings.HasSuffix(l, "no such file or directory") {
				t.Errorf("%s: want a socket outside the jail not to exist there", l)
			}
			c.send("exit")
			if ps, err := c.wait(); ps.ExitCode() != 0 || err != nil {
				t.Errorf("child: %v, %v\n%s", ps, err, c.out.String())
			}
		}},
		{"execve killed", func(t *testing.T, c *sandboxed, _ *Jail) {
			c.send("try execve")
			if _, err := c.wait(); err == nil || err.Error() != "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)" {
				t.Errorf("report %v\n%s", err, c.out.String())
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			j, err := PrepareJail(base, "vm-"+strings.ReplaceAll(tt.name, " ", "-"), uid, gid, []Bind{{Path: sockDir}})
			if err != nil {
				t.Fatal(err)
			}
			c := startChild(t, childSpec{Sandbox: Config{Mode: ModeStrict, Jail: j, DialUnix: []string{sockDir}}, VCPUs: 1}, Cloneflags, true)
			tt.run(t, c, j)
			c.cmd.Process.Kill()
			c.cmd.Wait()
			if err := j.Remove(); err != nil {
				t.Errorf("Remove: %v", err)
			}
			if ents, _ := os.ReadDir(base); len(ents) != 0 {
				t.Errorf("Remove left %v in %s", ents, base)
			}
			if _, err := os.Stat(sock); err != nil {
				t.Errorf("the bound directory's socket: %v", err)
			}
		})
	}
}

// listenUnix listens on a Unix socket anyone may connect to.
func listenUnix(t *testing.T, path string) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o777); err != nil {
		t.Fatal(err)
	}
	return fd
}
