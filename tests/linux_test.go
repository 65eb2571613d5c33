package tests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/vmm/boot"
)

// extractVmlinux unpacks the ELF vmlinux from a bzImage: the setup header
// says where the xz payload is; xz decompresses it (the payload ends with a
// 4-byte size, hence --single-stream).
func extractVmlinux(t *testing.T, bz string) string {
	t.Helper()
	requireTool(t, "xz")
	img, err := os.ReadFile(bz)
	if err != nil {
		t.Fatal(err)
	}
	h, err := boot.ParseSetupHeader(img)
	if err != nil {
		t.Fatal(err)
	}
	start := h.ProtectedStart + int(h.PayloadOffset)
	end := start + int(h.PayloadLength)
	if end > len(img) || !bytes.HasPrefix(img[start:], []byte("\xfd7zXZ\x00")) {
		t.Fatalf("%s: payload at %#x is not xz", bz, start)
	}
	out := filepath.Join(t.TempDir(), "vmlinux")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("xz", "-dc", "--single-stream")
	cmd.Stdin = bytes.NewReader(img[start:end])
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = f, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("xz: %v %s", err, stderr.Bytes())
	}
	if st, err := f.Stat(); err != nil || st.Size() < 1<<20 {
		t.Fatalf("xz produced no vmlinux (%v)", err)
	}
	return out
}

// TestLinuxBoot boots Debian's stock kernel as far as this host lets it.
// Under PVM the kernel dies in KVM's instruction emulator after printing its
// banner, command line and memory map; the test checks those and that rayvmm
// reports the failure cleanly. On real KVM the kernel gets further (to
// looking for a root file system), and the test stops it with SIGTERM.
func TestLinuxBoot(t *testing.T) {
	requireKVM(t)
	vmlinux := extractVmlinux(t, testenv.DebianBzImage(t))
	const cmdline = "console=ttyS0 earlyprintk=serial"
	cmd := exec.Command(rayvmm, "boot", "--kernel", vmlinux, "--memory", "256M", "--cmdline", cmdline)
	out, errw := newLineWatcher(), newLineWatcher()
	cmd.Stdout, cmd.Stderr = out, errw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	done := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		out.close()
		done <- err
	}()
	out.waitFor(t, "Linux version", 5*time.Minute)
	out.waitForLine(t, "BIOS-e820: [mem 0x0000000000100000", 2*time.Minute)
	pvm := true
	if _, err := os.Stat("/sys/module/kvm_pvm"); err != nil {
		// Real KVM: Linux keeps going (it is running: it printed its
		// memory map); stop it and check the stop is clean.
		pvm = false
		cmd.Process.Signal(syscall.SIGTERM)
	}
	// The output is checked once rayvmm has exited and all of it is in.
	select {
	case err := <-done:
		if !pvm && err != nil {
			t.Errorf("rayvmm after SIGTERM: %v\n%s", err, errw.String())
		}
		if pvm && err == nil {
			t.Fatalf("Linux died in the emulator but rayvmm exited 0\n%s", out.String())
		}
	case <-time.After(10 * time.Minute):
		t.Fatalf("rayvmm still running 10 minutes after Linux printed its memory map (pvm %v)\n%s", pvm, out.String())
	}
	text := out.String()
	if !regexp.MustCompile(`Command line: ` + regexp.QuoteMeta(cmdline) + `\r?\n`).MatchString(text) {
		t.Errorf("Linux did not print the exact command line %q:\n%s", cmdline, text)
	}
	// The map Linux prints must match --memory 256M.
	for _, want := range []string{
		"BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
		"BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
		"BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("missing %q in:\n%s", want, text)
		}
	}
	if n := len(regexp.MustCompile(`BIOS-e820: `).FindAllString(text, -1)); n != 3 {
		t.Errorf("Linux saw %d e820 entries, want 3", n)
	}
	if !pvm {
		checkNoPanic(t, errw.String())
		return
	}
	msg := strings.TrimSpace(errw.String())
	t.Logf("rayvmm: %s", msg)
	checkNoPanic(t, msg)
	if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "RIP 0x") {
		t.Fatalf("want a one-line error naming the cause and RIP, got:\n%s", msg)
	}
}
