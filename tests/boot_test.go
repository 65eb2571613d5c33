package tests

import (
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

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

var bannerRE = regexp.MustCompile(`rayguest: rayguest \S+ memory (\d+) bytes \((\d+) MiB\) cpus (\d+)`)

// banner parses rayguest's banner: usable memory in bytes and CPU count.
func banner(t *testing.T, out string) (mem uint64, cpus int) {
	t.Helper()
	m := bannerRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no banner in guest output:\n%s", out)
	}
	mem, _ = strconv.ParseUint(m[1], 10, 64)
	cpus, _ = strconv.Atoi(m[3])
	return mem, cpus
}

// usableRAM is what the guest should count for a --memory below 3 GiB:
// everything but the 0x9fc00-0xfffff hole (EBDA, VGA, BIOS) the e820 map
// reserves. Computed here from the layout, not from rayvmm's code.
func usableRAM(mem uint64) uint64 { return mem - (0x100000 - 0x9fc00) }

func TestBootDefault(t *testing.T) {
	requireKVM(t)
	r := run(t, nil, 60*time.Second, "boot")
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "rayguest: ready\n") {
		t.Fatalf("no ready line:\n%s", r.stdout)
	}
	mem, cpus := banner(t, r.stdout)
	if cpus != 1 || mem != usableRAM(128<<20) {
		t.Fatalf("banner says %d bytes, %d cpus; want %d bytes (128M default), 1 cpu", mem, cpus, usableRAM(128<<20))
	}
	if !strings.Contains(r.stdout, "rayguest: poweroff") {
		t.Fatalf("default job did not power off:\n%s", r.stdout)
	}
}

func TestBootCPUsAndMemory(t *testing.T) {
	requireKVM(t)
	tests := []struct {
		name   string
		args   []string
		mem    uint64
		cpus   int
		expect []string
	}{
		{"two cpus", []string{"--cpus", "2"}, 128 << 20, 2, []string{"rayguest: cpu 1 up"}},
		{"256M", []string{"--memory", "256M"}, 256 << 20, 1, nil},
		{"4 cpus 64M", []string{"--cpus", "4", "--memory", "64M"}, 64 << 20, 4, []string{"rayguest: cpu 1 up", "rayguest: cpu 2 up", "rayguest: cpu 3 up"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, nil, 120*time.Second, append([]string{"boot"}, tc.args...)...)
			if r.code != 0 {
				t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
			}
			for _, e := range tc.expect {
				if !strings.Contains(r.stdout, e) {
					t.Errorf("missing %q in:\n%s", e, r.stdout)
				}
			}
			if strings.Contains(r.stdout, "FAIL") {
				t.Errorf("guest reported a failure:\n%s", r.stdout)
			}
			mem, cpus := banner(t, r.stdout)
			if mem != usableRAM(tc.mem) || cpus != tc.cpus {
				t.Fatalf("banner: %d bytes, %d cpus; want %d bytes, %d cpus", mem, cpus, usableRAM(tc.mem), tc.cpus)
			}
		})
	}
}

func TestEcho(t *testing.T) {
	requireKVM(t)
	in := strings.NewReader("hello world\nsecond line\nquit\n")
	r := run(t, in, 60*time.Second, "boot", "--cmdline", "rayguest.run=echo")
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{"rayguest: echo hello world\n", "rayguest: echo second line\n", "rayguest: bye"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("missing %q in:\n%s", want, r.stdout)
		}
	}
}

// TestEchoInteractive feeds lines one at a time, each after the previous
// echo came back, so the guest's receive interrupt path is exercised while
// it waits.
func TestEchoInteractive(t *testing.T) {
	requireKVM(t)
	cmd := exec.Command(rayvmm, "boot", "--cmdline", "rayguest.run=echo")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := startProc(t, cmd)
	p.out.waitFor(t, "rayguest: ready", 30*time.Second)
	for _, l := range []string{"one", "two", "three"} {
		io.WriteString(stdin, l+"\n")
		p.out.waitFor(t, "rayguest: echo "+l+"\n", 30*time.Second)
	}
	io.WriteString(stdin, "quit\n")
	if err := p.exited(t, `"quit"`, time.Minute); err != nil {
		t.Fatalf("after quit: %v\n%s", err, p.out.String())
	}
}

func TestCrash(t *testing.T) {
	requireKVM(t)
	r := run(t, nil, 60*time.Second, "boot", "--cmdline", "rayguest.run=crash")
	if r.code == 0 {
		t.Fatalf("a triple-faulting guest exited 0\nstdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	}
	if !regexp.MustCompile(`guest shut down \(triple fault\) on vcpu 0 at RIP 0x[0-9a-f]+`).MatchString(r.stderr) {
		t.Fatalf("stderr does not name the triple fault and RIP:\n%s", r.stderr)
	}
	if n := strings.Count(strings.TrimSpace(r.stderr), "\n"); n != 0 {
		t.Fatalf("error is %d lines, want one:\n%s", n+1, r.stderr)
	}
}

// TestBadInput checks that each bad input gets a one-line error naming the
// problem and a non-zero exit.
func TestBadInput(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	notKernel := write("notkernel", []byte("this is a text file, not a kernel\n"))
	truncELF := write("trunc.elf", append([]byte("\x7fELF\x02\x01\x01"), make([]byte, 40)...))
	guest := filepath.Join(repoRoot, "guestkernel", "rayguest.elf")
	img, err := os.ReadFile(guest)
	if err != nil {
		t.Fatal(err)
	}
	truncGuest := write("trunc-guest.elf", img[:len(img)/2])
	bigInitrd := filepath.Join(dir, "big.initrd")
	if err := os.WriteFile(bigInitrd, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(bigInitrd, 64<<20); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing kernel", []string{"--kernel", filepath.Join(dir, "nope")}, "no such file"},
		{"not a kernel", []string{"--kernel", notKernel}, "neither an ELF kernel nor a bzImage"},
		{"truncated ELF header", []string{"--kernel", truncELF}, "truncated ELF"},
		{"truncated ELF body", []string{"--kernel", truncGuest}, "truncated ELF"},
		{"memory 0", []string{"--memory", "0"}, "--memory"},
		{"memory 1K", []string{"--memory", "1K"}, "too small"},
		{"memory too big", []string{"--memory", "64T"}, "more than this host"},
		{"memory junk", []string{"--memory", "lots"}, "--memory"},
		{"cpus 0", []string{"--cpus", "0"}, "--cpus"},
		{"cpus 1000", []string{"--cpus", "1000"}, "1000 vCPUs"},
		{"cmdline too long", []string{"--cmdline", strings.Repeat("x", 5000)}, "command line is 5000 bytes"},
		{"no kvm device", []string{"--kvm-device", "/nonexistent"}, "/nonexistent"},
		{"kvm device not kvm", []string{"--kvm-device", "/dev/null"}, "/dev/null"},
		{"initrd too big", []string{"--memory", "32M", "--initrd", bigInitrd}, "initrd of 67108864 bytes does not fit"},
		{"bad cpu template", []string{"--cpu-template", "fast"}, "unknown CPU template"},
		{"stray argument", []string{"extra"}, "unknown command"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, nil, 30*time.Second, append([]string{"boot"}, tc.args...)...)
			if r.code == 0 {
				t.Fatalf("exit 0 for bad input\nstdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
			}
			msg := strings.TrimSpace(r.stderr)
			if strings.Count(msg, "\n") != 0 || !strings.HasPrefix(msg, "rayvmm: ") {
				t.Fatalf("want one line starting with \"rayvmm: \", got:\n%s", r.stderr)
			}
			if !strings.Contains(msg, tc.want) {
				t.Fatalf("error %q does not mention %q", msg, tc.want)
			}
			if strings.Contains(r.stdout, "rayguest: ready") {
				t.Fatalf("the guest ran despite the bad input")
			}
		})
	}
}

// ptyVM is rayvmm running in echo mode with a pseudo-terminal as its
// controlling terminal and stdio, as a user at a shell would run it.
type ptyVM struct {
	cmd    *exec.Cmd
	ptmx   *os.File
	tty    *os.File
	out    *lineWatcher
	before *unix.Termios // the terminal's settings before rayvmm started
}

func startOnPTY(t *testing.T) *ptyVM {
	t.Helper()
	ptmx, tty, err := pty.Open()
	if err != nil {
		testenv.Need(t, fmt.Sprintf("needs a pseudo-terminal: %v", err))
	}
	t.Cleanup(func() { ptmx.Close(); tty.Close() })
	before, err := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	p := &ptyVM{ptmx: ptmx, tty: tty, out: newLineWatcher(), before: before}
	go io.Copy(p.out, ptmx)
	p.cmd = exec.Command(rayvmm, "boot", "--cmdline", "rayguest.run=echo")
	p.cmd.Stdin, p.cmd.Stdout, p.cmd.Stderr = tty, tty, tty
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill() })
	p.out.waitFor(t, "cpus 1", 30*time.Second)
	return p
}

// wait waits up to limit for rayvmm to exit after what the test did and
// returns how long it took.
func (p *ptyVM) wait(t *testing.T, after string, limit time.Duration) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		return time.Since(start), err
	case <-time.After(limit):
		t.Fatalf("rayvmm still running %v after %s; output:\n%s", limit, after, p.out.String())
		return 0, nil
	}
}

// checkRestored fails unless the terminal is as rayvmm found it.
func (p *ptyVM) checkRestored(t *testing.T) {
	t.Helper()
	after, err := unix.IoctlGetTermios(int(p.tty.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if *after != *p.before {
		t.Fatalf("terminal settings not restored:\nbefore %+v\nafter  %+v", p.before, after)
	}
}

// TestSIGTERMRestoresTerminal runs rayvmm on a pseudo-terminal in echo mode
// (raw mode, the guest waiting for input), sends SIGTERM, and checks that it
// stops with status 0 and leaves the terminal settings as it found them.
func TestSIGTERMRestoresTerminal(t *testing.T) {
	requireKVM(t)
	p := startOnPTY(t)
	raw, err := unix.IoctlGetTermios(int(p.tty.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if raw.Lflag&unix.ICANON != 0 {
		t.Fatalf("terminal still in canonical mode while the guest runs: rayvmm did not set raw mode")
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	// The guest waits for input for ever: only the signal can end it, so
	// a deadline is all that is needed (how long it takes is not a test).
	took, err := p.wait(t, "SIGTERM", time.Minute)
	t.Logf("stopped %v after SIGTERM", took)
	if err != nil {
		t.Errorf("rayvmm after SIGTERM: %v\n%s", err, p.out.String())
	}
	p.checkRestored(t)
	checkNoPanic(t, p.out.String())
}

// TestCtrlAX types Ctrl-A x on a terminal: rayvmm quits with status 0 and
// restores the terminal, and the keys before it reached the guest.
func TestCtrlAX(t *testing.T) {
	requireKVM(t)
	p := startOnPTY(t)
	io.WriteString(p.ptmx, "typed\r")
	p.out.waitFor(t, "rayguest: echo typed", 30*time.Second)
	io.WriteString(p.ptmx, "\x01x")
	if _, err := p.wait(t, "Ctrl-A x", time.Minute); err != nil {
		t.Fatalf("Ctrl-A x: %v\n%s", err, p.out.String())
	}
	p.checkRestored(t)
}
