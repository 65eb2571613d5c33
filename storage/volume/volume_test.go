package volume

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/state"
)

func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// leftovers lists the files in the volume directory (images and lock
// files; the records are in the state store).
func leftovers(t *testing.T, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(s.Dir())
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func mustCreate(t *testing.T, s *Store, name string, size int64, format string) *Volume {
	t.Helper()
	v, err := s.Create(name, size, format)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func stateOf(t *testing.T, s *Store, name string) State {
	t.Helper()
	v, err := s.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	return v.State
}

func TestCreateAndList(t *testing.T) {
	s := newStore(t)
	if vs, err := s.List(); err != nil || len(vs) != 0 {
		t.Fatalf("List of an empty store = %v, %v", vs, err)
	}
	if _, err := os.Stat(s.Dir()); !os.IsNotExist(err) {
		t.Fatalf("listing created the store directory")
	}
	mustCreate(t, s, "b-raw", 8<<20, "raw")
	mustCreate(t, s, "a-qcow", 1<<30, "qcow2")
	vs, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 2 || vs[0].Name != "a-qcow" || vs[1].Name != "b-raw" {
		t.Fatalf("List = %+v", vs)
	}
	for _, v := range vs {
		if v.State != Available || v.ReadOnly || v.Parent != "" {
			t.Errorf("%s: %+v", v.Name, v)
		}
		d, err := os.Stat(v.Path)
		if err != nil {
			t.Fatal(err)
		}
		if v.Format == "raw" && d.Size() != v.Size {
			t.Errorf("raw image is %d bytes, want %d", d.Size(), v.Size)
		}
		if v.Allocated > 1<<20 {
			t.Errorf("%s: new volume allocates %d bytes", v.Name, v.Allocated)
		}
	}
	if got, _ := os.ReadFile(vs[0].Path); len(got) < 4 || string(got[:3]) != "QFI" {
		t.Errorf("qcow2 volume's image is not qcow2")
	}
}

func TestBadRequestsLeaveNothing(t *testing.T) {
	s := newStore(t)
	mustCreate(t, s, "taken", 1<<20, "qcow2")
	before := leftovers(t, s)
	tests := []struct {
		name string
		do   func() error
		want error
	}{
		{name: "duplicate name", do: func() error { _, err := s.Create("taken", 1<<20, "raw"); return err }, want: ErrExists},
		{name: "size 0", do: func() error { _, err := s.Create("z", 0, "raw"); return err }, want: ErrInvalid},
		{name: "size not whole sectors", do: func() error { _, err := s.Create("z", 1000, "raw"); return err }, want: ErrInvalid},
		{name: "bad name", do: func() error { _, err := s.Create("../etc", 1<<20, "raw"); return err }, want: ErrInvalid},
		{name: "empty name", do: func() error { _, err := s.Create("", 1<<20, "raw"); return err }, want: ErrInvalid},
		{name: "unknown format", do: func() error { _, err := s.Create("z", 1<<20, "vmdk"); return err }, want: ErrInvalid},
		{name: "qcow2 too large fails after the record", do: func() error { _, err := s.Create("z", 1<<62, "qcow2"); return err }},
		{name: "raw too large fails after the record", do: func() error { _, err := s.Create("z", 1<<62, "raw"); return err }},
		{name: "inspect missing", do: func() error { _, err := s.Get("nope"); return err }, want: ErrNotFound},
		{name: "rm missing", do: func() error { return s.Remove("nope") }, want: ErrNotFound},
		{name: "attach missing", do: func() error { _, err := s.Attach("nope", false); return err }, want: ErrNotFound},
		{name: "snapshot missing", do: func() error { _, err := s.Snapshot("nope", "s"); return err }, want: ErrNotFound},
		{name: "snapshot onto a taken name", do: func() error { _, err := s.Snapshot("taken", "taken"); return err }, want: ErrExists},
		{name: "clone a volume that is not a snapshot", do: func() error { _, err := s.Clone("taken", "c"); return err }, want: ErrNotSnapshot},
		{name: "clone missing", do: func() error { _, err := s.Clone("nope", "c"); return err }, want: ErrNotFound},
		{name: "import missing file", do: func() error { _, err := s.Import("/nonexistent/file", "i", ImportOptions{}); return err }, want: os.ErrNotExist},
		{name: "import onto a taken name", do: func() error {
			_, err := s.Import(writeTemp(t, bytes.Repeat([]byte{1}, 4096)), "taken", ImportOptions{})
			return err
		}, want: ErrExists},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do()
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if got := leftovers(t, s); !slices.Equal(got, before) {
				t.Fatalf("files left behind: %v (before: %v)", got, before)
			}
			vs, _ := s.List()
			if len(vs) != 1 {
				t.Fatalf("records left behind: %d volumes", len(vs))
			}
		})
	}
}

func writeTemp(t *testing.T, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "src.img")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func writeVol(t *testing.T, s *Store, name string, data []byte, off int64) {
	t.Helper()
	a, err := s.Attach(name, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Disk.WriteAt(context.Background(), data, off); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
}

func readVol(t *testing.T, s *Store, name string) []byte {
	t.Helper()
	a, err := s.Attach(name, true)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b := make([]byte, a.Disk.Size())
	if _, err := a.Disk.ReadAt(context.Background(), b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestAttachStates(t *testing.T) {
	s := newStore(t)
	mustCreate(t, s, "v", 4<<20, "qcow2")
	a, err := s.Attach("v", false)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := s.Get("v")
	if v.State != Attached || v.AttachedBy != os.Getpid() {
		t.Fatalf("attached volume: state %s by %d", v.State, v.AttachedBy)
	}
	refused := []struct {
		name string
		do   func() error
	}{
		{name: "second attach", do: func() error { _, err := s.Attach("v", false); return err }},
		{name: "read-only attach", do: func() error { _, err := s.Attach("v", true); return err }},
		{name: "rm", do: func() error { return s.Remove("v") }},
		{name: "snapshot", do: func() error { _, err := s.Snapshot("v", "s"); return err }},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.do(); !errors.Is(err, ErrAttached) || !strings.Contains(err.Error(), "pid") {
				t.Fatalf("got %v, want ErrAttached naming the pid", err)
			}
		})
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if st := stateOf(t, s, "v"); st != Available {
		t.Fatalf("after detach: %s", st)
	}
	if got := leftovers(t, s); len(got) != 1 {
		t.Fatalf("files after detach: %v (want just the image)", got)
	}
	// Read-only attaches share.
	r1, err := s.Attach("v", true)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := s.Attach("v", true)
	if err != nil {
		t.Fatalf("second read-only attach: %v", err)
	}
	if _, err := s.Attach("v", false); !errors.Is(err, ErrAttached) {
		t.Fatalf("read-write attach while read-only attached: %v", err)
	}
	r1.Close()
	if st := stateOf(t, s, "v"); st != Attached {
		t.Fatalf("with one read-only attach left: %s", st)
	}
	r2.Close()
	if err := s.Remove("v"); err != nil {
		t.Fatal(err)
	}
	if got := leftovers(t, s); len(got) != 0 {
		t.Fatalf("files after rm: %v", got)
	}
	if _, err := s.Get("v"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("inspect after rm: %v", err)
	}
}

// helperAttach holds a volume attached in a child process until killed.
func helperAttach() int {
	s, err := Open(os.Getenv("RAYVMM_VOLUME_STATE"))
	if err == nil {
		_, err = s.Attach(os.Getenv("RAYVMM_VOLUME_NAME"), false)
	}
	if err != nil {
		fmt.Println("E", err)
		return 1
	}
	fmt.Println("attached")
	testenv.Hold()
	return 0
}

// helperWait bounds each wait for a helper process: it turns a hang into
// a failure that names what was awaited; it measures nothing.
const helperWait = time.Minute

func TestAttachReleasedOnKill(t *testing.T) {
	state0 := t.TempDir()
	s, _ := Open(state0)
	mustCreate(t, s, "v", 1<<20, "raw")
	h := testenv.StartHelper(t, "attach", testenv.HelperOptions{Env: []string{"RAYVMM_VOLUME_STATE=" + state0, "RAYVMM_VOLUME_NAME=v"}})
	if line := h.Line(t, `the "attached" line`, helperWait); line != "attached" {
		t.Fatalf("helper: %q, want \"attached\"", line)
	}
	v, _ := s.Get("v")
	if v.State != Attached || v.AttachedBy != h.Cmd.Process.Pid {
		t.Fatalf("while the helper holds it: state %s by %d, want attached by %d", v.State, v.AttachedBy, h.Cmd.Process.Pid)
	}
	if _, err := s.Attach("v", false); !errors.Is(err, ErrAttached) {
		t.Fatalf("attach while another process has it: %v", err)
	}
	h.Kill(t, helperWait)
	if st := stateOf(t, s, "v"); st != Available {
		t.Fatalf("after kill -9 of the holder: %s, want available", st)
	}
	a, err := s.Attach("v", false)
	if err != nil {
		t.Fatalf("attach after the holder died: %v", err)
	}
	a.Close()
}

func fillBytes(seed byte, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed) * 2654435761
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x >> 24)
	}
	return b
}

func TestSnapshotChain(t *testing.T) {
	for _, format := range []string{"qcow2", "raw"} {
		t.Run(format, func(t *testing.T) {
			s := newStore(t)
			const size = 8 << 20
			mustCreate(t, s, "vol", size, format)
			writeVol(t, s, "vol", fillBytes(1, size), 0)
			state1 := readVol(t, s, "vol")
			if _, err := s.Snapshot("vol", "s1"); err != nil {
				t.Fatal(err)
			}
			writeVol(t, s, "vol", fillBytes(2, 1<<20), 3<<20+512)
			state2 := readVol(t, s, "vol")
			if bytes.Equal(state1, state2) {
				t.Fatal("second write changed nothing")
			}
			if _, err := s.Snapshot("vol", "s2"); err != nil {
				t.Fatal(err)
			}
			writeVol(t, s, "vol", fillBytes(3, 4096), 0) // after both snapshots
			for _, c := range []struct{ snap, clone string }{{"s1", "c1"}, {"s2", "c2"}} {
				if _, err := s.Clone(c.snap, c.clone); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(readVol(t, s, "c1"), state1) {
				t.Error("clone of s1 does not hold the state at the first snapshot")
			}
			if !bytes.Equal(readVol(t, s, "c2"), state2) {
				t.Error("clone of s2 does not hold the state at the second snapshot")
			}
			if !bytes.Equal(readVol(t, s, "s1"), state1) {
				t.Error("snapshot s1 changed")
			}
			v, _ := s.Get("vol")
			if v.Parent != "s2" || v.Format != "qcow2" || len(v.Chain) != 3 {
				t.Fatalf("vol after two snapshots: %+v", v)
			}
			s2, _ := s.Get("s2")
			if !s2.ReadOnly || s2.Parent != "s1" {
				t.Fatalf("s2: %+v", s2)
			}
			// Writes through a clone leave its snapshot alone.
			writeVol(t, s, "c1", fillBytes(9, 8192), 0)
			if !bytes.Equal(readVol(t, s, "s1"), state1) {
				t.Error("writing a clone changed its snapshot")
			}
			refused := []struct {
				name string
				err  error
				do   func() error
			}{
				{name: "rm a parent", err: ErrParent, do: func() error { return s.Remove("s1") }},
				{name: "attach a snapshot read-write", err: ErrSnapshot, do: func() error { _, err := s.Attach("s1", false); return err }},
				{name: "snapshot a snapshot", err: ErrSnapshot, do: func() error { _, err := s.Snapshot("s1", "x"); return err }},
			}
			for _, r := range refused {
				if err := r.do(); !errors.Is(err, r.err) {
					t.Errorf("%s: %v, want %v", r.name, err, r.err)
				}
			}
			if fi, err := os.Stat(s2.Path); err != nil || fi.Mode().Perm()&0o222 != 0 {
				t.Errorf("snapshot image mode %v, %v: want read-only", fi.Mode(), err)
			}
			checkChainWithQemu(t, v)
			// Removing from the leaves up works.
			for _, n := range []string{"c1", "c2", "vol", "s2", "s1"} {
				if err := s.Remove(n); err != nil {
					t.Fatalf("rm %s: %v", n, err)
				}
			}
			if got := leftovers(t, s); len(got) != 0 {
				t.Fatalf("files left: %v", got)
			}
		})
	}
}

// checkChainWithQemu compares qemu-img's view of a volume's backing chain
// with the one rayvmm recorded, and has qemu-img check every layer.
func checkChainWithQemu(t *testing.T, v *Volume) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		if os.Getenv("RAYVMM_REQUIRE_KVM") == "1" {
			t.Fatal("qemu-img not installed and RAYVMM_REQUIRE_KVM=1")
		}
		t.Log("qemu-img not installed: skipping the qemu-img chain check")
		return
	}
	out, err := exec.Command("qemu-img", "info", "--backing-chain", "--output=json", v.Path).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	var infos []struct {
		Filename string `json:"filename"`
	}
	if err := json.Unmarshal(out, &infos); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, i := range infos {
		got = append(got, i.Filename)
	}
	if !slices.Equal(got, v.Chain) {
		t.Fatalf("qemu-img info --backing-chain: %v\nrecorded chain: %v", got, v.Chain)
	}
	for _, p := range got {
		if strings.HasSuffix(p, ".qcow2") {
			if out, err := exec.Command("qemu-img", "check", p).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img check %s: %v\n%s", p, err, out)
			}
		}
	}
}

func TestImport(t *testing.T) {
	s := newStore(t)
	data := make([]byte, 5<<20+1000) // not whole sectors
	copy(data[4096:], fillBytes(4, 100000))
	copy(data[3<<20:], fillBytes(5, 1<<20))
	src := writeTemp(t, data)
	var calls, last int64
	v, err := s.Import(src, "imp", ImportOptions{Progress: func(done, total int64) {
		calls++
		if total != int64(len(data)) || done < last {
			t.Errorf("progress %d/%d after %d", done, total, last)
		}
		last = done
	}})
	if err != nil {
		t.Fatal(err)
	}
	if last != int64(len(data)) || calls < 5 {
		t.Errorf("progress ended at %d after %d calls", last, calls)
	}
	if v.Format != "raw" || v.Size != 5<<20+1024 {
		t.Fatalf("imported %+v", v)
	}
	got := readVol(t, s, "imp")
	if !bytes.Equal(got[:len(data)], data) || !bytes.Equal(got[len(data):], make([]byte, 24)) {
		t.Fatal("imported content differs")
	}
	if v.Allocated >= int64(len(data)) {
		t.Errorf("import is not sparse: %d bytes allocated", v.Allocated)
	}
	// Raw source into a qcow2 volume, then that qcow2 back out as a new
	// volume in its own format.
	if _, err := s.Import(src, "imp-q", ImportOptions{Format: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	q, _ := s.Get("imp-q")
	v2, err := s.Import(q.Path, "imp-q2", ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if v2.Format != "qcow2" || !bytes.Equal(readVol(t, s, "imp-q2")[:len(data)], data) {
		t.Fatalf("qcow2 re-import: %+v", v2)
	}
	// A corrupt qcow2 is refused and leaves nothing.
	bad := append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 200)...)
	before := leftovers(t, s)
	if _, err := s.Import(writeTemp(t, bad), "bad", ImportOptions{}); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("import of a corrupt qcow2: %v", err)
	}
	if !slices.Equal(leftovers(t, s), before) {
		t.Fatal("failed import left files")
	}
}

func TestStateDirCanMove(t *testing.T) {
	parent := t.TempDir()
	s, _ := Open(filepath.Join(parent, "a"))
	mustCreate(t, s, "v", 1<<20, "qcow2")
	writeVol(t, s, "v", fillBytes(7, 4096), 0)
	if _, err := s.Snapshot("v", "snap"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(parent, "a"), filepath.Join(parent, "b")); err != nil {
		t.Fatal(err)
	}
	s, _ = Open(filepath.Join(parent, "b"))
	if got := readVol(t, s, "v"); !bytes.Equal(got[:4096], fillBytes(7, 4096)) {
		t.Fatal("volume content lost after moving the state directory")
	}
	v, _ := s.Get("v")
	if !strings.HasPrefix(v.Path, filepath.Join(parent, "b")) {
		t.Fatalf("path %s not under the moved directory", v.Path)
	}
}

// helperReserve reserves volume "half" and exits holding its lock, as a
// process killed between the record and the image does.
func helperReserve() int {
	s, _ := Open(os.Getenv("RAYVMM_VOLUME_STATE"))
	v := &Volume{Name: "half", Format: "qcow2", Size: 1 << 20, Path: s.newImagePath("half", "qcow2")}
	if _, err := s.reserve(v); err != nil {
		fmt.Println(err)
		return 1
	}
	return 3
}

// A volume whose creation was interrupted (the process died between the
// record and the image) shows as created and can be removed.
func TestInterruptedCreateCanBeRemoved(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	h := testenv.StartHelper(t, "reserve", testenv.HelperOptions{Env: []string{"RAYVMM_VOLUME_STATE=" + dir}})
	out, err := h.Wait(t, helperWait)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
		t.Fatalf("helper: %v: %q %s", err, out, h.Stderr())
	}
	if got := leftovers(t, s); !slices.Equal(got, []string{"half.lock"}) {
		t.Fatalf("files after the maker died: %v, want its lock file", got)
	}
	if st := stateOf(t, s, "half"); st != Created {
		t.Fatalf("state %s, want created", st)
	}
	if _, err := s.Attach("half", false); !errors.Is(err, ErrInvalid) {
		t.Fatalf("attach of a half-created volume: %v", err)
	}
	if err := s.Remove("half"); err != nil {
		t.Fatal(err)
	}
	if got := leftovers(t, s); len(got) != 0 {
		t.Fatalf("left behind: %v", got)
	}
	mustCreate(t, s, "half", 1<<20, "qcow2")
}

// Attaches racing with releases (which remove the lock file) never let
// two holders in at once.
func TestAttachRace(t *testing.T) {
	s := newStore(t)
	mustCreate(t, s, "v", 1<<20, "raw")
	var holders, wins atomic.Int32
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 40 {
				a, err := s.Attach("v", false)
				if errors.Is(err, ErrAttached) {
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				if holders.Add(1) != 1 {
					t.Error("two attaches held the volume at once")
				}
				wins.Add(1)
				time.Sleep(50 * time.Microsecond)
				holders.Add(-1)
				a.Close()
			}
		}()
	}
	wg.Wait()
	if wins.Load() == 0 {
		t.Fatal("no attach ever succeeded")
	}
	if got := leftovers(t, s); len(got) != 1 {
		t.Fatalf("files after the race: %v", got)
	}
}

// helperSnapshot snapshots a volume in a child process and dies as if
// killed once the snapshot's record is made.
func helperSnapshot() int {
	testHookSnapshotReserved = func() { os.Exit(3) }
	s, err := Open(os.Getenv("RAYVMM_VOLUME_STATE"))
	if err == nil {
		_, err = s.Snapshot("vol", "snap")
	}
	fmt.Printf("snapshot returned: %v\n", err)
	return 1
}

func TestMain(m *testing.M) {
	testenv.HelperMain(map[string]func() int{"attach": helperAttach, "snapshot": helperSnapshot, "reserve": helperReserve})
	os.Exit(m.Run())
}

// A snapshot killed half way (after its record was made) leaves a record
// in state created that volume rm removes, without taking the volume's
// image with it.
func TestInterruptedSnapshotKeepsVolume(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	mustCreate(t, s, "vol", 1<<20, "raw")
	data := fillBytes(3, 1<<20)
	writeVol(t, s, "vol", data, 0)
	h := testenv.StartHelper(t, "snapshot", testenv.HelperOptions{Env: []string{"RAYVMM_VOLUME_STATE=" + dir}})
	out, err := h.Wait(t, helperWait)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
		t.Fatalf("helper: %v: %q %s", err, out, h.Stderr())
	}
	if st := stateOf(t, s, "snap"); st != Created {
		t.Fatalf("interrupted snapshot: state %s, want created", st)
	}
	if err := s.Remove("snap"); err != nil {
		t.Fatalf("rm of the interrupted snapshot: %v", err)
	}
	if !bytes.Equal(readVol(t, s, "vol"), data) {
		t.Fatal("volume content changed")
	}
	if _, err := s.Snapshot("vol", "snap"); err != nil {
		t.Fatalf("snapshot after cleaning up: %v", err)
	}
}

// A volume being made cannot be removed under its maker: rm during an
// import is refused, and the import finishes with a usable volume.
func TestRemoveDuringImport(t *testing.T) {
	s := newStore(t)
	data := fillBytes(6, 3<<20)
	src := writeTemp(t, data)
	var rmErr error
	tried := false
	_, err := s.Import(src, "imp", ImportOptions{Progress: func(done, total int64) {
		if !tried {
			tried = true
			rmErr = s.Remove("imp")
		}
	}})
	if rmErr == nil {
		t.Fatalf("rm during the import succeeded (import: %v)", err)
	}
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	if !bytes.Equal(readVol(t, s, "imp"), data) {
		t.Fatal("imported volume differs from its source")
	}
}

// A clone's record is refused once volume rm of its snapshot has begun,
// even if the clone read the snapshot as available just before.
func TestCloneRacingRemoveOfItsSnapshot(t *testing.T) {
	s := newStore(t)
	mustCreate(t, s, "vol", 1<<20, "qcow2")
	if _, err := s.Snapshot("vol", "snap"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Clone("snap", "c1"); err != nil {
		t.Fatal(err)
	}
	// What rm's first transaction leaves once it has found no children.
	for _, name := range []string{"c1", "vol"} {
		if err := s.Remove(name); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.update(func(tx *state.Tx) error {
		v, err := s.get(tx, "snap")
		if err != nil {
			return err
		}
		v.State = Deleted
		return s.put(tx, v)
	}); err != nil {
		t.Fatal(err)
	}
	v := &Volume{Name: "c2", Format: "qcow2", Size: 1 << 20, Path: s.newImagePath("c2", "qcow2"), Parent: "snap"}
	l, err := s.reserve(v)
	if err == nil {
		l.Release()
		t.Fatal("clone record reserved on a snapshot being removed")
	}
	if err := s.Remove("snap"); err != nil {
		t.Fatalf("rm finishing: %v", err)
	}
	if got := leftovers(t, s); len(got) != 0 {
		t.Fatalf("left behind: %v", got)
	}
}
