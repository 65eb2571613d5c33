package guestkernel

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// toolchain returns the first lines of "gcc --version" and "ld --version",
// the form toolchain.txt records for the committed build.
func toolchain() (string, error) {
	var b strings.Builder
	for _, tool := range []string{"gcc", "ld"} {
		out, err := exec.Command(tool, "--version").Output()
		if err != nil {
			return "", fmt.Errorf("%s --version: %w", tool, err)
		}
		line, _, _ := strings.Cut(string(out), "\n")
		b.WriteString(line + "\n")
	}
	return b.String(), nil
}

// refresh says how to bring the committed rayguest.elf and toolchain.txt
// up to date.
const refresh = "run `make guestkernel` (a clean rebuild that rewrites guestkernel/rayguest.elf and guestkernel/toolchain.txt) " +
	"with CI's toolchain, Debian 12's gcc and binutils, and commit both files"

// TestReproducible rebuilds rayguest from source into a temporary directory
// and requires the result to be byte-identical to the committed rayguest.elf
// (the file go:embed puts into rayvmm). With a different gcc or ld than
// toolchain.txt records the bytes may differ, so it cannot run; under
// RAYVMM_REQUIRE_KVM=1 (CI) that fails rather than skips, so CI never loses
// the check quietly.
func TestReproducible(t *testing.T) {
	testenv.RequireTool(t, "gcc", "ld", "strip", "make")
	have, err := toolchain()
	if err != nil {
		testenv.Need(t, fmt.Sprintf("cannot identify the toolchain: %v", err))
	}
	want, err := os.ReadFile("toolchain.txt")
	if err != nil {
		t.Fatalf("read toolchain.txt: %v", err)
	}
	if have != string(want) {
		testenv.Need(t, fmt.Sprintf("needs the toolchain that built rayguest.elf (toolchain.txt), or the bytes may differ:\nhave %swant %sto refresh the committed build, %s",
			have, want, refresh))
	}
	out := t.TempDir()
	cmd := exec.Command("make", "-s", "OUT="+out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make OUT=%s: %v\n%s", out, err, msg)
	}
	built, err := os.ReadFile(filepath.Join(out, "rayguest.elf"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(built, ELF) {
		off := 0
		for off < len(built) && off < len(ELF) && built[off] == ELF[off] {
			off++
		}
		t.Fatalf("fresh build (%d bytes) differs from committed rayguest.elf (%d bytes) from offset %#x: %s",
			len(built), len(ELF), off, refresh)
	}
}

// TestBootContract checks what a loader relies on: one PT_LOAD at 1 MiB
// (physical = virtual), the 64-bit entry inside it, and a PVH note
// (XEN_ELFNOTE_PHYS32_ENTRY) naming a different, 32-bit entry inside it.
func TestBootContract(t *testing.T) {
	f, err := elf.NewFile(bytes.NewReader(ELF))
	if err != nil {
		t.Fatalf("parse rayguest.elf: %v", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Fatalf("want ELF64 x86-64 executable, got %v %v %v", f.Class, f.Machine, f.Type)
	}
	var load *elf.Prog
	var pvh uint64
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			if load != nil {
				t.Fatalf("more than one PT_LOAD")
			}
			load = p
		case elf.PT_NOTE:
			if p.Align != 4 {
				t.Errorf("PT_NOTE alignment %d, want 4 (QEMU aligns the note name to it)", p.Align)
			}
			pvh = findPVHEntry(t, p)
		}
	}
	if load == nil {
		t.Fatal("no PT_LOAD")
	}
	inImage := func(a uint64) bool { return a >= load.Paddr && a < load.Paddr+load.Filesz }
	tests := []struct {
		name string
		ok   bool
		got  string
	}{
		{"load address 1 MiB", load.Paddr == 0x100000 && load.Vaddr == load.Paddr, fmt.Sprintf("paddr %#x vaddr %#x", load.Paddr, load.Vaddr)},
		{"memsz covers filesz", load.Memsz >= load.Filesz, fmt.Sprintf("filesz %#x memsz %#x", load.Filesz, load.Memsz)},
		{"entry in image", inImage(f.Entry), fmt.Sprintf("entry %#x", f.Entry)},
		{"PVH note present", pvh != 0, "no Xen PHYS32_ENTRY note"},
		{"PVH entry in image", inImage(pvh), fmt.Sprintf("pvh entry %#x", pvh)},
		{"PVH entry differs from 64-bit entry", pvh != f.Entry, fmt.Sprintf("both %#x", pvh)},
		{"image below 2 MiB", load.Paddr+load.Memsz <= 0x200000, fmt.Sprintf("ends at %#x", load.Paddr+load.Memsz)},
	}
	for _, tt := range tests {
		if !tt.ok {
			t.Errorf("%s: %s", tt.name, tt.got)
		}
	}
}

func findPVHEntry(t *testing.T, p *elf.Prog) uint64 {
	t.Helper()
	b := make([]byte, p.Filesz)
	if _, err := p.ReadAt(b, 0); err != nil {
		t.Fatalf("read PT_NOTE: %v", err)
	}
	for len(b) >= 12 {
		namesz := binary.LittleEndian.Uint32(b[0:])
		descsz := binary.LittleEndian.Uint32(b[4:])
		typ := binary.LittleEndian.Uint32(b[8:])
		name := (namesz + 3) &^ 3
		desc := (descsz + 3) &^ 3
		if uint64(12+name+desc) > uint64(len(b)) {
			t.Fatalf("truncated note")
		}
		if typ == 18 && string(b[12:12+namesz]) == "Xen\x00" {
			d := b[12+name : 12+name+descsz]
			switch descsz {
			case 4:
				return uint64(binary.LittleEndian.Uint32(d))
			case 8:
				return binary.LittleEndian.Uint64(d)
			}
			t.Fatalf("PVH note descriptor size %d", descsz)
		}
		b = b[12+name+desc:]
	}
	return 0
}

// guest describes one QEMU microvm run of rayguest.
type guest struct {
	machine string // default "microvm"
	cmdline string
	smp     int
	memMiB  int
	stdin   string
	extra   []string
}

// vm is a running QEMU microvm with rayguest.
type vm struct {
	cmd   *exec.Cmd
	lines chan string   // "rayguest: " lines as they come
	done  chan struct{} // closed when QEMU has exited
	err   error         // QEMU's exit error, valid after done
	mu    sync.Mutex
	all   []string // every stdout line, for failure messages
	errb  bytes.Buffer
}

func qemuArgs(t *testing.T, g guest) []string {
	t.Helper()
	kernel := filepath.Join(t.TempDir(), "rayguest.elf")
	if err := os.WriteFile(kernel, ELF, 0o644); err != nil {
		t.Fatal(err)
	}
	if g.smp == 0 {
		g.smp = 1
	}
	if g.memMiB == 0 {
		g.memMiB = 128
	}
	if g.machine == "" {
		g.machine = "microvm"
	}
	args := []string{"-M", g.machine, "-nodefaults", "-no-user-config", "-display", "none",
		"-serial", "stdio", "-no-reboot", "-smp", fmt.Sprint(g.smp), "-m", fmt.Sprint(g.memMiB),
		"-kernel", kernel, "-append", g.cmdline}
	if os.Getenv("RAYGUEST_QEMU_ACCEL") == "kvm" {
		args = append(args, "-enable-kvm", "-cpu", "host,-cx16,-arch-capabilities")
	} else {
		args = append(args, "-accel", "tcg")
	}
	return append(args, g.extra...)
}

// startQEMU starts the committed rayguest.elf under qemu-system-x86_64 -M
// microvm (TCG by default; RAYGUEST_QEMU_ACCEL=kvm uses /dev/kvm), inside
// network namespace netns when it is not "". The test's cleanup kills it.
func startQEMU(t *testing.T, g guest, netns string) *vm {
	t.Helper()
	testenv.RequireTool(t, "qemu-system-x86_64")
	qemu, _ := exec.LookPath("qemu-system-x86_64")
	name, args := qemu, qemuArgs(t, g)
	if netns != "" {
		name, args = "ip", append([]string{"netns", "exec", netns, qemu}, args...)
	}
	v := &vm{cmd: exec.Command(name, args...), lines: make(chan string, 1024), done: make(chan struct{})}
	// Its own process group, so stop reaches QEMU behind "ip netns exec".
	// No Pdeathsig: it fires when the forking OS thread exits, not the
	// process, and inNetns ends locked threads, which killed QEMU at
	// random in the middle of a test. The test's cleanup kills the group.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	v.cmd.Stdin = strings.NewReader(g.stdin)
	v.cmd.Stderr = &v.errb
	out, err := v.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			l := strings.TrimSuffix(sc.Text(), "\r")
			v.mu.Lock()
			v.all = append(v.all, l)
			v.mu.Unlock()
			if strings.HasPrefix(l, "rayguest: ") {
				v.lines <- l
			}
		}
		v.err = v.cmd.Wait()
		close(v.lines)
		close(v.done)
	}()
	t.Cleanup(v.stop)
	return v
}

func (v *vm) stop() {
	select {
	case <-v.done:
		return
	default:
	}
	syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
	<-v.done
}

func (v *vm) output() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return strings.Join(v.all, "\n") + "\nstderr:\n" + v.errb.String()
}

// waitLine returns the next output line matching pattern. It fails the
// test if QEMU exits first or nothing matches within two minutes (a hang).
func (v *vm) waitLine(t *testing.T, pattern string) string {
	t.Helper()
	re := regexp.MustCompile("^" + pattern + "$")
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case l, ok := <-v.lines:
			if !ok {
				t.Fatalf("qemu exited before a line matching %q; output:\n%s", pattern, v.output())
			}
			if re.MatchString(l) {
				return l
			}
		case <-timeout:
			t.Fatalf("no line matching %q; output:\n%s", pattern, v.output())
		}
	}
}

// bootQEMU boots rayguest under QEMU, waits for QEMU to exit (rayguest
// powers off there by triple-faulting; -no-reboot makes QEMU exit), and
// returns the "rayguest: " lines.
func bootQEMU(t *testing.T, g guest) []string {
	t.Helper()
	v := startQEMU(t, g, "")
	var lines []string
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case l, ok := <-v.lines:
			if ok {
				lines = append(lines, l)
				continue
			}
			<-v.done
			if v.err != nil {
				t.Fatalf("qemu failed: %v\noutput:\n%s", v.err, v.output())
			}
			return lines
		case <-timeout:
			t.Fatalf("qemu did not exit (guest hung?); output:\n%s", v.output())
		}
	}
}

// expectLines requires the patterns to match successive output lines, in
// order (other lines may come between).
func expectLines(t *testing.T, lines []string, patterns ...string) {
	t.Helper()
	i := 0
	for _, p := range patterns {
		re := regexp.MustCompile("^" + p + "$")
		for i < len(lines) && !re.MatchString(lines[i]) {
			i++
		}
		if i == len(lines) {
			t.Fatalf("no line matching %q (in order); output:\n%s", p, strings.Join(lines, "\n"))
		}
		i++
	}
}

func rejectLines(t *testing.T, lines []string, patterns ...string) {
	t.Helper()
	for _, p := range patterns {
		re := regexp.MustCompile("^" + p + "$")
		for _, l := range lines {
			if re.MatchString(l) {
				t.Fatalf("unexpected line %q; output:\n%s", l, strings.Join(lines, "\n"))
			}
		}
	}
}

const banner = `rayguest: rayguest \S+ memory \d+ bytes \(\d+ MiB\) cpus `

func TestJobs(t *testing.T) {
	long := strings.Repeat("0123456789abcdef", 20) // 320 bytes
	tests := []struct {
		name    string
		g       guest
		want    []string
		notWant []string
	}{
		{name: "default job is poweroff", g: guest{cmdline: "console=ttyS0 unknown.key=1"},
			want: []string{"rayguest: ready", banner + "1", "rayguest: poweroff"}},
		{name: "two cpus", g: guest{cmdline: "rayguest.run=poweroff", smp: 2},
			want: []string{"rayguest: ready", "rayguest: cpu 1 up", banner + "2", "rayguest: poweroff"}},
		{name: "four cpus", g: guest{cmdline: "rayguest.run=poweroff", smp: 4},
			want:    []string{"rayguest: cpu 1 up", "rayguest: cpu 2 up", "rayguest: cpu 3 up", banner + "4"},
			notWant: []string{"rayguest: cpu . FAIL"}},
		{name: "echo", g: guest{cmdline: "rayguest.run=echo", stdin: "hello world\r\n\r\n\n" + long + "\nquit\n"},
			want:    []string{"rayguest: echo hello world", "rayguest: echo " + long, "rayguest: bye"},
			notWant: []string{"rayguest: echo ", "rayguest: echo quit"}},
		{name: "crash", g: guest{cmdline: "rayguest.run=crash"},
			want: []string{"rayguest: crash: triple fault now"}, notWant: []string{"rayguest: poweroff"}},
		{name: "exception report", g: guest{cmdline: "rayguest.run=fault"},
			want: []string{"rayguest: exception 14 rip=[0-9a-f]+ err=0 cr2=100000000"}},
		{name: "pio", g: guest{cmdline: "rayguest.run=pio:250"},
			want: []string{"rayguest: pio 250 done"}},
		{name: "unknown job", g: guest{cmdline: "rayguest.run=dance"},
			want: []string{"rayguest: unknown job dance"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lines := bootQEMU(t, tt.g)
			expectLines(t, lines, tt.want...)
			rejectLines(t, lines, tt.notWant...)
		})
	}
}

// TestMemory checks the banner's usable-RAM figure: the sum of the RAM
// entries of the memory map, a little under -m.
func TestMemory(t *testing.T) {
	for _, mib := range []int{64, 300} {
		t.Run(fmt.Sprintf("%dMiB", mib), func(t *testing.T) {
			lines := bootQEMU(t, guest{memMiB: mib})
			re := regexp.MustCompile(`memory (\d+) bytes \((\d+) MiB\)`)
			for _, l := range lines {
				if m := re.FindStringSubmatch(l); m != nil {
					var bytes, got int
					fmt.Sscan(m[1], &bytes)
					fmt.Sscan(m[2], &got)
					if got != bytes>>20 || got > mib || got < mib-2 {
						t.Fatalf("banner %q for -m %d", l, mib)
					}
					return
				}
			}
			t.Fatalf("no banner in %q", lines)
		})
	}
}
