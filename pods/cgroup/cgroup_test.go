package cgroup

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

var limits = Limits{MilliCPU: 500, Memory: 96 << 20, Pids: 64}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// fakeV1 is a v1 hierarchy as the kernel mounts one: a directory per
// controller.
func fakeV1(t *testing.T) string {
	root := t.TempDir()
	for _, c := range v1Controllers {
		if err := os.Mkdir(filepath.Join(root, c), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// fakeV2 is a unified hierarchy: the kernel makes cgroup.subtree_control
// in every directory, so the fake has it where rayvmm's groups go.
func fakeV2(t *testing.T, parent, pod string) string {
	root := t.TempDir()
	for _, d := range []string{"", parent, filepath.Join(parent, pod)} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, d, "cgroup.subtree_control"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestV1Fake(t *testing.T) {
	root := fakeV1(t)
	m, err := New(V1, root, "rayvmm")
	if err != nil {
		t.Fatal(err)
	}
	g, err := m.Create("web", "front", limits)
	if err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{
		"cpu/rayvmm/web/front/cpu.cfs_quota_us":         "50000",
		"cpu/rayvmm/web/front/cpu.cfs_period_us":        "100000",
		"memory/rayvmm/web/front/memory.limit_in_bytes": strconv.Itoa(96 << 20),
		"pids/rayvmm/web/front/pids.max":                "64",
	} {
		if got := readFile(t, filepath.Join(root, file)); got != want {
			t.Errorf("%s = %q, want %q", file, got, want)
		}
	}
	os.WriteFile(filepath.Join(root, "memory/rayvmm/web/front/memory.oom_control"), []byte("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"), 0o644)
	if n, err := g.OOMKills(); n != 2 || err != nil {
		t.Errorf("OOMKills = %d, %v; want 2", n, err)
	}
	if err := g.Add(4242); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(root, "memory/rayvmm/web/front/cgroup.procs")); got != "4242" {
		t.Errorf("cgroup.procs = %q", got)
	}
	if !m.Exists("web", "front") {
		t.Error("Exists is false for a group just made")
	}
	if f, err := g.OpenDir(); f != nil || err != nil {
		t.Errorf("OpenDir of a v1 group: %v, %v; v1 processes are moved in", f, err)
	}
	// The process left (the kernel empties cgroup.procs): the pod's
	// groups go.
	for _, c := range v1Controllers {
		os.WriteFile(filepath.Join(root, c, "rayvmm/web/front/cgroup.procs"), nil, 0o644)
	}
	if err := m.RemovePod("web"); err != nil {
		t.Fatal(err)
	}
	if m.Exists("web", "") {
		t.Error("the pod's groups are still there")
	}
}

func TestV2Fake(t *testing.T) {
	root := fakeV2(t, "rayvmm", "web")
	m, err := New(V2, root, "rayvmm")
	if err != nil {
		t.Fatal(err)
	}
	g, err := m.Create("web", "front", limits)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "rayvmm/web/front")
	for file, want := range map[string]string{
		"cpu.max":    "50000 100000",
		"memory.max": strconv.Itoa(96 << 20),
		"pids.max":   "64",
	} {
		if got := readFile(t, filepath.Join(dir, file)); got != want {
			t.Errorf("%s = %q, want %q", file, got, want)
		}
	}
	// The controllers are enabled for the children of every ancestor.
	for _, d := range []string{"", "rayvmm", "rayvmm/web"} {
		got := strings.Fields(readFile(t, filepath.Join(root, d, "cgroup.subtree_control")))
		for _, c := range []string{"+cpu", "+memory", "+pids"} {
			if !slices.Contains(got, c) {
				t.Errorf("%s/cgroup.subtree_control = %q, lacks %s", d, got, c)
			}
		}
	}
	os.WriteFile(filepath.Join(dir, "memory.events"), []byte("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"), 0o644)
	if n, err := g.OOMKills(); n != 1 || err != nil {
		t.Errorf("OOMKills = %d, %v; want 1", n, err)
	}
	if err := g.Add(4242); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(dir, "cgroup.procs")); got != "4242" {
		t.Errorf("cgroup.procs = %q", got)
	}
	if procs, err := g.Procs(); err != nil || !slices.Equal(procs, []int{4242}) {
		t.Errorf("Procs = %v, %v", procs, err)
	}
	if _, err := m.Load("web", "front"); err != nil {
		t.Errorf("Load: %v", err)
	}
	if f, err := g.OpenDir(); err != nil || f == nil || f.Name() != dir {
		t.Errorf("OpenDir of a v2 group: %v, %v", f, err)
	} else {
		f.Close()
	}
	if err := g.Delete(); err == nil {
		t.Error("Delete of a group holding a process succeeded")
	}
	os.WriteFile(filepath.Join(dir, "cgroup.procs"), nil, 0o644)
	if err := m.RemovePod("web"); err != nil {
		t.Fatal(err)
	}
	if m.Exists("web", "") {
		t.Error("the pod's group is still there")
	}
	if _, err := m.Load("web", "front"); err == nil {
		t.Error("Load of a removed group succeeded")
	}
}

func TestUnwritable(t *testing.T) {
	// A root that is a file: nothing can be made under it.
	root := filepath.Join(t.TempDir(), "file")
	os.WriteFile(root, nil, 0o644)
	for _, v := range []Version{V1, V2} {
		m, _ := New(v, root, "rayvmm")
		if _, err := m.Create("web", "front", limits); err == nil || !strings.Contains(err.Error(), "cannot set up the VM's cgroup") {
			t.Errorf("v%d: Create under a file: %v", v, err)
		}
	}
	for _, bad := range []string{"", "/abs", "a/../b", "a//b"} {
		if _, err := New(V1, "/sys/fs/cgroup", bad); err == nil {
			t.Errorf("parent %q accepted", bad)
		}
	}
}

// TestV1Host makes a real group in this host's v1 hierarchy, puts a
// process in it and reads its use back.
func TestV1Host(t *testing.T) {
	testenv.RequireRoot(t)
	m, err := Detect(fmt.Sprintf("rayvmm-test-%d", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	if m.Version() != V1 {
		testenv.Need(t, "needs a cgroup v1 host (this one is v2; TestV2Fake covers v2)")
	}
	t.Cleanup(func() { os.Remove(filepath.Join(DefaultRoot, "memory", m.parent)) })
	for _, c := range v1Controllers {
		t.Cleanup(func() { os.Remove(filepath.Join(DefaultRoot, c, m.parent)) })
	}
	g, err := m.Create("pod", "vm", limits)
	if err != nil {
		t.Fatal(err)
	}
	// The shell waits for a line, so that what it runs after is charged
	// to the group (v1 does not move charges made before).
	cmd := exec.Command("sh", "-c", "read x; dd if=/dev/zero bs=1M count=4 2>/dev/null | cat >/dev/null; echo done; exec sleep 600")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if err := g.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	in.Write([]byte("go\n"))
	line := make([]byte, 5)
	if _, err := io.ReadFull(out, line); err != nil || string(line) != "done\n" {
		t.Fatalf("the shell in the group said %q, %v", line, err)
	}
	dirs := m.Dirs(g.Path())
	if got := readFile(t, filepath.Join(dirs["cpu"], "cpu.cfs_quota_us")); got != "50000" {
		t.Errorf("cpu.cfs_quota_us = %s", got)
	}
	if got := readFile(t, filepath.Join(dirs["memory"], "memory.limit_in_bytes")); got != strconv.Itoa(96<<20) {
		t.Errorf("memory.limit_in_bytes = %s", got)
	}
	if got := readFile(t, filepath.Join(dirs["pids"], "pids.max")); got != "64" {
		t.Errorf("pids.max = %s", got)
	}
	for c, d := range dirs {
		if got := strings.Fields(readFile(t, filepath.Join(d, "cgroup.procs"))); !slices.Contains(got, strconv.Itoa(cmd.Process.Pid)) {
			t.Errorf("%s cgroup.procs = %q, want %d", c, got, cmd.Process.Pid)
		}
	}
	st, err := g.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if n, err := g.OOMKills(); n != 0 || err != nil {
		t.Errorf("OOMKills = %d, %v", n, err)
	}
	if st.MemoryBytes == 0 || st.CPUSeconds == 0 {
		t.Errorf("stats: %+v", st)
	}
	if err := g.Delete(); err == nil {
		t.Error("Delete of a group holding a process succeeded")
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := g.Delete(); err != nil {
		t.Fatal(err)
	}
	if err := m.RemovePod("pod"); err != nil {
		t.Fatal(err)
	}
	if m.Exists("pod", "") {
		t.Error("the pod's groups are still there")
	}
}
