package seccap

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/seccap/forbidden"
	"github.com/rayvmm/rayvmm/seccap/report"
)

// TestSeccaptestHooks builds a stand-in for the VM process with and
// without the seccaptest tag: with it, the forbidden call the environment
// asks for is made, on a goroutine or on a vCPU-filtered thread, and the
// report names it; without it, the hooks do nothing.
func TestSeccaptestHooks(t *testing.T) {
	needSandboxHost(t)
	dir := t.TempDir()
	build := func(name string, tags ...string) string {
		bin := filepath.Join(dir, name)
		args := append([]string{"build", "-o", bin}, tags...)
		cmd := exec.Command("go", append(args, "./testdata/hookvm")...)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
		return bin
	}
	tagged, plain := build("tagged", "-tags", "seccaptest"), build("plain")
	run := func(bin, try string) (string, error) {
		rp, err := report.NewPipe()
		if err != nil {
			t.Fatal(err)
		}
		defer rp.Close()
		cmd := exec.Command(bin)
		cmd.Env = append(os.Environ(), forbidden.Env+"="+try)
		cmd.ExtraFiles = []*os.File{rp.Writer()}
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		rp.Launched()
		cmd.Wait()
		if err := rp.Explain(cmd.ProcessState); err != nil {
			return out.String(), err
		}
		return out.String() + cmd.ProcessState.String(), nil
	}
	for _, tt := range []struct {
		bin, try, want string
	}{
		{tagged, "execve", "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)"},
		{tagged, "mount@vcpu", "VM process killed by the sandbox (SIGSYS): syscall 165 (mount)"},
		{tagged, "open-shadow", "rayvmm: seccaptest: open-shadow returned: open /etc/shadow: permission denied\nexit status 3"},
		{plain, "execve", "nothing happened\nexit status 0"},
	} {
		out, err := run(tt.bin, tt.try)
		got := out
		if err != nil {
			got = err.Error()
		}
		if got != tt.want {
			t.Errorf("%s with %s:\n got %q\nwant %q", filepath.Base(tt.bin), tt.try, got, tt.want)
		}
	}
}
