package main

import (
	"bufio"
	"bytes"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/network/nettest"
	"github.com/rayvmm/rayvmm/state"
)

// schema0Release is the last commit whose rayvmm kept volumes in
// volumes/volumes.db and networks in networks/NAME.json (schema 0).
const schema0Release = "5e23d5e"

// buildRelease builds rayvmm as it was at commit rev, from this
// repository's history.
func buildRelease(t *testing.T, rev string) string {
	t.Helper()
	testenv.RequireTool(t, "git")
	root := testenv.RepoRoot()
	if out, err := exec.Command("git", "-C", root, "cat-file", "-e", rev+"^{commit}").CombinedOutput(); err != nil {
		testenv.Need(t, "needs the git history of commit "+rev+" to build that rayvmm: "+strings.TrimSpace(string(out)))
	}
	src := t.TempDir()
	tarball := filepath.Join(t.TempDir(), rev+".tar")
	if out, err := exec.Command("git", "-C", root, "archive", "-o", tarball, rev).CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", rev, err, out)
	}
	if out, err := exec.Command("tar", "-x", "-f", tarball, "-C", src).CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	bin := filepath.Join(t.TempDir(), "rayvmm-"+rev)
	build := exec.Command("go", "build", "-o", bin, "./cmd/rayvmm")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=readonly")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build rayvmm %s: %v\n%s", rev, err, out)
	}
	return bin
}

// rayvmmIn runs a rayvmm binary with a state directory, in network
// namespace ns if not nil, and fails the test unless it succeeds.
func rayvmmIn(t *testing.T, bin, stateDir string, ns *nettest.NS, args ...string) string {
	t.Helper()
	out, errOut, ok := tryIn(bin, stateDir, ns, args...)
	if !ok {
		t.Fatalf("%s %v: %s%s", filepath.Base(bin), args, out, errOut)
	}
	return out
}

func tryIn(bin, stateDir string, ns *nettest.NS, args ...string) (stdout, stderr string, ok bool) {
	argv := append([]string{bin, "--state-dir", stateDir}, args...)
	if ns != nil {
		argv = append([]string{"ip", "netns", "exec", ns.Name}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	return o.String(), e.String(), err == nil
}

// TestUpgradeFromSchema0 builds the rayvmm release before the state store,
// has it make volumes (with a snapshot, a clone and an import) and
// networks (plain, isolated, NAT, VXLAN overlay) and boot a VM attached
// to a volume and a network, then runs this rayvmm on the same state
// directory while that VM still runs: `volume list`, `volume inspect` and
// `net list` print what the old rayvmm printed, the old VM's volume and
// network cannot be removed, and once it is killed they can.
func TestUpgradeFromSchema0(t *testing.T) {
	testenv.RequireKVM(t)
	old := buildRelease(t, schema0Release)
	bin := buildRayvmm(t)
	ns := nettest.New(t)
	st := filepath.Join(t.TempDir(), "state")

	src := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(src, bytes.Repeat([]byte("schema zero "), 100000), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"volume", "create", "data", "--size", "64M"},
		{"volume", "create", "scratch", "--size", "8M", "--format", "raw"},
		{"volume", "snapshot", "data", "monday"},
		{"volume", "clone", "monday", "copy"},
		{"volume", "import", src, "imported"},
		{"net", "create", "lan", "--subnet", "192.0.2.0/24"},
		{"net", "create", "iso", "--subnet", "198.51.100.0/24", "--isolated", "--mtu", "9000"},
		{"net", "create", "out", "--subnet", "203.0.113.0/25", "--nat"},
		{"net", "create", "ov", "--subnet", "203.0.113.128/25", "--isolated", "--overlay", "vxlan:42,remote=192.0.2.200,local=192.0.2.100"},
	} {
		rayvmmIn(t, old, st, ns, args...)
	}

	// An old VM on volume copy and network lan, running through the upgrade.
	vm := exec.Command("ip", "netns", "exec", ns.Name, old, "--state-dir", st, "boot", "--name", "oldvm",
		"--disk", "volume=copy", "--net", "network=lan", "--cmdline", "rayguest.run=echo")
	stdin, _ := vm.StdinPipe()
	stdout, _ := vm.StdoutPipe()
	vm.Stderr = os.Stderr
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { vm.Process.Kill(); vm.Wait() }()
	waitLine(t, stdout, "rayguest: ready")

	listings := [][]string{{"volume", "list"}, {"net", "list"}}
	for _, v := range []string{"copy", "data", "monday", "scratch", "imported"} {
		listings = append(listings, []string{"volume", "inspect", v})
	}
	before := map[string]string{}
	for _, args := range listings {
		before[strings.Join(args, " ")] = rayvmmIn(t, old, st, nil, args...)
	}
	if !strings.Contains(before["volume list"], "attached") {
		t.Fatalf("old rayvmm does not show copy attached:\n%s", before["volume list"])
	}
	for _, args := range listings {
		key := strings.Join(args, " ")
		if got := rayvmmIn(t, bin, st, nil, args...); got != before[key] {
			t.Errorf("rayvmm %s after the upgrade:\n%s\nbefore it (rayvmm %s):\n%s", key, got, schema0Release, before[key])
		}
	}
	if _, err := os.Stat(filepath.Join(st, state.DBName)); err != nil {
		t.Fatalf("no state store after the upgrade: %v", err)
	}
	var left []string
	filepath.WalkDir(st, func(p string, d fs.DirEntry, err error) error {
		if err == nil && (d.Name() == "volumes.db" || strings.HasSuffix(d.Name(), ".json") || strings.HasSuffix(d.Name(), ".attach")) && !strings.Contains(p, state.BackupDir) {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("schema 0 files outside %s after the upgrade: %v", state.BackupDir, left)
	}

	// The old VM still holds what it holds.
	if _, errOut, ok := tryIn(bin, st, ns, "volume", "rm", "copy"); ok || !strings.Contains(errOut, "is attached") {
		t.Errorf("volume rm of the old VM's volume: ok=%v %s", ok, errOut)
	}
	if _, errOut, ok := tryIn(bin, st, ns, "net", "rm", "lan"); ok || !strings.Contains(errOut, "in use") {
		t.Errorf("net rm of the old VM's network: ok=%v %s", ok, errOut)
	}
	io.WriteString(stdin, "still there\n")
	waitLine(t, stdout, "rayguest: echo still there")

	vm.Process.Signal(syscall.SIGKILL)
	vm.Wait()
	if out := rayvmmIn(t, bin, st, nil, "volume", "list"); strings.Contains(out, "attached") {
		t.Fatalf("volume list after kill -9 of the old VM:\n%s", out)
	}
	for _, args := range [][]string{
		{"volume", "rm", "copy"}, {"volume", "rm", "imported"},
		{"net", "rm", "lan"}, {"net", "rm", "out"},
		{"volume", "create", "fresh", "--size", "1M"},
		{"net", "create", "new", "--subnet", "192.0.2.0/25"},
	} {
		rayvmmIn(t, bin, st, ns, args...)
	}
	nets := rayvmmIn(t, bin, st, nil, "net", "list")
	vols := rayvmmIn(t, bin, st, nil, "volume", "list")
	for _, w := range []string{"iso", "ov", "new"} {
		if !strings.Contains(nets, w+" ") {
			t.Errorf("net list lacks %s:\n%s", w, nets)
		}
	}
	if strings.Contains(nets, "lan ") || !strings.Contains(vols, "fresh ") || strings.Contains(vols, "copy ") {
		t.Errorf("after rm and create:\n%s\n%s", nets, vols)
	}
}

// waitLine reads r until a line contains want, or fails after a deadline
// that names it.
func waitLine(t *testing.T, r io.Reader, want string) {
	t.Helper()
	found := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if strings.Contains(sc.Text(), want) {
				found <- nil
				return
			}
		}
		found <- io.ErrUnexpectedEOF
	}()
	select {
	case err := <-found:
		if err != nil {
			t.Fatalf("output ended before %q", want)
		}
	case <-time.After(time.Minute):
		t.Fatalf("no %q within a minute", want)
	}
}

// TestUpgradeFixtureNetList: the schema 0 state directory in
// state/testdata/schema0 (written by rayvmm 5e23d5e) lists the same
// networks after the upgrade as that rayvmm listed, and its volumes.
func TestUpgradeFixtureNetList(t *testing.T) {
	bin := buildRayvmm(t)
	fixture := filepath.Join(testenv.RepoRoot(), "state", "testdata", "schema0")
	st := filepath.Join(t.TempDir(), "state")
	err := filepath.WalkDir(fixture, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(fixture, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(st, rel), 0o700)
		}
		if rel == "net-list.txt" {
			return nil
		}
		b, err := os.ReadFile(p)
		if err == nil {
			err = os.WriteFile(filepath.Join(st, rel), b, 0o600)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(filepath.Join(fixture, "net-list.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if got := rayvmmIn(t, bin, st, nil, "net", "list"); got != string(want) {
		t.Fatalf("net list after the upgrade:\n%s\nrayvmm %s printed:\n%s", got, schema0Release, want)
	}
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(rayvmmIn(t, bin, st, nil, "volume", "list")), "\n")[1:] {
		names = append(names, strings.Fields(l)[0])
	}
	if want := []string{"copy", "data", "monday", "scratch"}; !slices.Equal(names, want) {
		t.Fatalf("volume list after the upgrade: %v, want %v", names, want)
	}
}
