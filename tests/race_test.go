package tests

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// TestRaceDetector builds rayvmm and rayvmm-vm with the race detector and runs real
// guests through the concurrent paths: SMP vCPU threads, the serial input
// goroutine, virtio-blk with ioeventfd/irqfd and QoS, and shutdown. Any
// race report fails the test.
func TestRaceDetector(t *testing.T) {
	requireKVM(t)
	requireTool(t, "gcc") // -race needs cgo
	testenv.Short(t, "builds rayvmm again with -race")
	dir := t.TempDir()
	bin := filepath.Join(dir, "rayvmm")
	// Both processes: the guest runs in rayvmm-vm, found next to rayvmm.
	for out, pkg := range map[string]string{bin: "./cmd/rayvmm", filepath.Join(dir, "rayvmm-vm"): "./cmd/rayvmm-vm"} {
		build := exec.Command("go", "build", "-race", "-o", out, pkg)
		build.Dir = repoRoot
		build.Env = append(os.Environ(), "CGO_ENABLED=1")
		if msg, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build -race %s: %v\n%s", pkg, err, msg)
		}
	}
	img := sparseFile(t, 16<<20)
	runs := []struct {
		name  string
		stdin string
		args  []string
		want  string
	}{
		{"smp", "", []string{"boot", "--cpus", "4"}, "cpus 4"},
		{"echo", "one\ntwo\nquit\n", []string{"boot", "--cmdline", "rayguest.run=echo"}, "rayguest: bye"},
		{"blk", "", []string{"boot", "--cpus", "2", "--disk", "path=" + img + ",format=raw,iops=2000",
			"--metrics-file", filepath.Join(t.TempDir(), "m.json"),
			"--cmdline", "rayguest.run=blktest rayguest.blocks=64 rayguest.flushevery=16"}, "rayguest: blk vda ok"},
	}
	for _, r := range runs {
		t.Run(r.name, func(t *testing.T) {
			res := runCommand(t, strings.NewReader(r.stdin), 3*time.Minute, func(ctx context.Context) *exec.Cmd {
				return exec.CommandContext(ctx, bin, r.args...)
			})
			if strings.Contains(res.stderr, "DATA RACE") {
				t.Fatalf("race detector:\n%s", res.stderr)
			}
			if res.code != 0 || !strings.Contains(res.stdout, r.want) {
				t.Fatalf("exit %d, want %q\nstdout:\n%s\nstderr:\n%s", res.code, r.want, res.stdout, res.stderr)
			}
		})
	}
}
