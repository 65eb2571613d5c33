package vmproc

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.HelperMain(map[string]func() int{
		// hold stands in for a VM process: it stays until its stdin closes.
		"hold": func() int { testenv.Hold(); return 0 },
	})
	os.Exit(m.Run())
}

// cgroup2Mount finds a cgroup v2 mount.
func cgroup2Mount() string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, x := range fields {
			if x == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" {
				return fields[4]
			}
		}
	}
	return ""
}

// TestLaunchIntoCgroup: with CgroupDir the VM process is started inside
// that cgroup v2 group (CLONE_INTO_CGROUP), never anywhere else.
func TestLaunchIntoCgroup(t *testing.T) {
	testenv.RequireRoot(t)
	mnt := cgroup2Mount()
	if mnt == "" {
		testenv.Need(t, "needs a cgroup2 mount")
	}
	name := fmt.Sprintf("rayvmm-vmproc-test-%d", os.Getpid())
	dir := filepath.Join(mnt, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var before string
	p, err := Launch(&Handoff{}, &Files{}, Options{
		Binary: os.Args[0], Stdin: r, Detached: true, CgroupDir: cg,
		Env: []string{"RAYVMM_TEST_HELPER=hold"},
		BeforeHandoff: func(p *Process) error {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.Pid))
			before = string(b)
			return err
		},
	})
	r.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(before, "0::/"+name+"\n") {
		t.Errorf("before its handoff the process is in\n%s, want 0::/%s", before, name)
	}
	if procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs")); strings.TrimSpace(string(procs)) != fmt.Sprint(p.Pid) {
		t.Errorf("cgroup.procs = %q, want %d", procs, p.Pid)
	}
	w.Close()
	if _, err := p.Wait(); err != nil {
		t.Fatal(err)
	}
}
