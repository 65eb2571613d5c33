// Package testenv decides, in one place, whether a test that needs
// something from the host (root, /dev/kvm, a tool such as qemu-img, the
// Debian kernel) can run: it skips the test with the reason, or fails it
// when RAYVMM_REQUIRE_KVM=1 is set, as CI does, so that nothing CI is meant
// to exercise is skipped there quietly.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// Required reports whether RAYVMM_REQUIRE_KVM=1 turns skips into failures.
func Required() bool { return os.Getenv("RAYVMM_REQUIRE_KVM") == "1" }

// Need skips t with why, or fails it when Required; an empty why passes.
func Need(t testing.TB, why string) {
	t.Helper()
	if why == "" {
		return
	}
	if Required() {
		t.Fatalf("RAYVMM_REQUIRE_KVM=1, but this test %s", why)
	}
	t.Skip(why)
}

// Short skips t when tests run with -short: that is the choice of whoever
// runs them, not something the host lacks, so it never fails.
func Short(t testing.TB, why string) {
	t.Helper()
	if testing.Short() {
		t.Skip(why + " (skipped with -short)")
	}
}

// RequireRoot needs root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Need(t, "needs root")
	}
}

// RequireKVM needs root and a /dev/kvm that opens.
func RequireKVM(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		Need(t, fmt.Sprintf("needs /dev/kvm: %v", err))
		return
	}
	f.Close()
}

// RequireTool needs host tools on PATH (CI installs them from Debian).
func RequireTool(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			Need(t, fmt.Sprintf("needs %s, which is not installed", n))
		}
	}
}

// RepoRoot is the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// DebianBzImage returns the path of the Debian kernel `make linux-kernel`
// unpacked (or RAYVMM_LINUX_DIR names), or skips.
func DebianBzImage(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("RAYVMM_LINUX_DIR")
	if dir == "" {
		dir = filepath.Join(RepoRoot(), "build", "linux")
	}
	m, _ := filepath.Glob(filepath.Join(dir, "root", "boot", "vmlinuz-*"))
	if len(m) == 0 {
		Need(t, fmt.Sprintf("needs Debian's kernel in %s: run `make linux-kernel`", dir))
		return ""
	}
	return m[0]
}
