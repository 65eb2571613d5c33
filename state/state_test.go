package state

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The fixture testdata/schema0 is a state directory written by rayvmm
// 5e23d5e (see testdata/gen-schema0.sh): volumes.db with four volumes,
// four network records with their attach files and the network lock,
// and the lock file of a volume whose VMM was killed.

// copyFixture copies testdata/schema0 into a new state directory.
func copyFixture(t testing.TB) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "state")
	err := filepath.WalkDir(filepath.Join("testdata", "schema0"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(filepath.Join("testdata", "schema0"), p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o700)
		}
		if rel == "net-list.txt" {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// fixtureRecords is every record of the fixture by bucket, as schema 0
// stored it: the values in volumes.db and the network files' bytes.
func fixtureRecords(t testing.TB) map[string]map[string]string {
	t.Helper()
	want := map[string]map[string]string{"volumes": {}, "networks": {}}
	tmp := filepath.Join(t.TempDir(), "v.db")
	b, err := os.ReadFile(filepath.Join("testdata", "schema0", "volumes", "volumes.db"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(tmp, b, 0o600)
	db, err := bolt.Open(tmp, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("volumes")).ForEach(func(k, v []byte) error {
			want["volumes"][string(k)] = string(v)
			return nil
		})
	})
	m, _ := filepath.Glob(filepath.Join("testdata", "schema0", "networks", "*.json"))
	for _, p := range m {
		b, _ := os.ReadFile(p)
		want["networks"][strings.TrimSuffix(filepath.Base(p), ".json")] = string(b)
	}
	if len(want["volumes"]) != 4 || len(want["networks"]) != 4 {
		t.Fatalf("fixture: %d volumes, %d networks", len(want["volumes"]), len(want["networks"]))
	}
	return want
}

// storedRecords is every record in the store's volumes and networks
// buckets, as bytes.
func storedRecords(t testing.TB, s *Store) map[string]map[string]string {
	t.Helper()
	got := map[string]map[string]string{"volumes": {}, "networks": {}}
	err := s.View(func(tx *Tx) error {
		for name := range got {
			if b := tx.tx.Bucket([]byte(name)); b != nil {
				b.ForEach(func(k, v []byte) error {
					got[name][string(k)] = string(v)
					return nil
				})
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// files lists the files under dir (relative, sorted), skipping state.db.
func files(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() != DBName {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	slices.Sort(out)
	return out
}

// wantAfterUpgrade is the fixture's files after an upgrade: the records
// in the backup, the attach files gone, the lock files kept.
var wantAfterUpgrade = []string{
	"backup-schema0/networks/iso.json", "backup-schema0/networks/lan.json",
	"backup-schema0/networks/out.json", "backup-schema0/networks/ov.json",
	"backup-schema0/volumes.db",
	"networks/.lock",
	"volumes/copy.lock",
}

// checkUpgraded checks that dir was upgraded from the fixture with
// nothing lost and nothing left over.
func checkUpgraded(t testing.TB, dir string) {
	t.Helper()
	s, _ := Open(dir)
	if got, want := storedRecords(t, s), fixtureRecords(t); !maps.EqualFunc(got, want, maps.Equal) {
		t.Fatalf("records after the upgrade:\n%v\nwant:\n%v", got, want)
	}
	if got := files(t, dir); !slices.Equal(got, wantAfterUpgrade) {
		t.Fatalf("files after the upgrade: %v\nwant %v", got, wantAfterUpgrade)
	}
	for _, p := range wantAfterUpgrade[:5] {
		got, _ := os.ReadFile(filepath.Join(dir, p))
		want, _ := os.ReadFile(filepath.Join("testdata", "schema0", strings.Replace(strings.TrimPrefix(p, BackupDir+"/"), "volumes.db", "volumes/volumes.db", 1)))
		if !bytes.Equal(got, want) {
			t.Fatalf("backup %s differs from the original", p)
		}
	}
	s.View(func(tx *Tx) error {
		if v := string(tx.Meta("schema")); v != "1" {
			t.Errorf("schema %q, want 1", v)
		}
		if u := string(tx.Meta("upgraded")); !strings.Contains(u, `"from_schema":0`) || !strings.Contains(u, `"volumes":4,"networks":4`) {
			t.Errorf("upgraded = %s", u)
		}
		return nil
	})
}

func TestUpgradeSchema0(t *testing.T) {
	for _, first := range []string{"view", "update"} {
		t.Run("first use is an "+first, func(t *testing.T) {
			dir := copyFixture(t)
			s, _ := Open(dir)
			var err error
			if first == "view" {
				err = s.View(func(*Tx) error { return nil })
			} else {
				err = s.Update(func(*Tx) error { return nil })
			}
			if err != nil {
				t.Fatal(err)
			}
			checkUpgraded(t, dir)
		})
	}
}

// TestFreshStateDir: a view of a state directory that does not exist
// creates nothing; the first update makes state.db and no backup.
func TestFreshStateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, _ := Open(dir)
	if err := s.View(func(tx *Tx) error {
		_, ok, err := NewBucket[string]("things", nil).Get(tx, "x")
		if ok || err != nil {
			t.Errorf("Get in an empty store: %v, %v", ok, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a view created the state directory: %v", err)
	}
	if err := s.Update(func(*Tx) error { return nil }); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 || ents[0].Name() != DBName {
		t.Fatalf("state directory after the first update: %v", ents)
	}
	s.View(func(tx *Tx) error {
		if string(tx.Meta("schema")) != "1" || tx.Meta("upgraded") != nil {
			t.Errorf("meta: schema %q, upgraded %q", tx.Meta("schema"), tx.Meta("upgraded"))
		}
		return nil
	})
}

// TestMain runs this test binary as a helper process when asked to.
func TestMain(m *testing.M) {
	if dir := os.Getenv("RAYVMM_STATE_UPGRADE"); dir != "" {
		helperUpgrade(dir, os.Getenv("RAYVMM_STATE_KILL_AT"))
	}
	if dir := os.Getenv("RAYVMM_STATE_FIRST_USE"); dir != "" {
		helperFirstUse(dir, os.Getenv("RAYVMM_STATE_ID"))
	}
	if path := os.Getenv("RAYVMM_STATE_LOCK"); path != "" {
		helperLock(path)
	}
	os.Exit(m.Run())
}

// helperUpgrade upgrades dir and exits 0, or dies with status 9 (as if
// killed) at the killAt'th step named like "move:3", "moved:1",
// "built:1".
func helperUpgrade(dir, killAt string) {
	step, nth, _ := strings.Cut(killAt, ":")
	n, _ := strconv.Atoi(nth)
	seen := 0
	testHookUpgradeStep = func(s string) {
		if s == step {
			if seen++; seen == n {
				os.Exit(9)
			}
		}
	}
	s, _ := Open(dir)
	fmt.Println("ready")
	if err := s.View(func(*Tx) error { return nil }); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// TestUpgradeKilled kills the upgrade at each of its steps, and then at
// moments spread over its run: the next use finishes it with every
// record, byte for byte, and nothing left over.
func TestUpgradeKilled(t *testing.T) {
	steps := []string{"move:1", "move:3", "move:5", "moved:1", "built:1"}
	for _, step := range steps {
		t.Run(step, func(t *testing.T) {
			dir := copyFixture(t)
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "RAYVMM_STATE_UPGRADE="+dir, "RAYVMM_STATE_KILL_AT="+step)
			out, err := cmd.CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 9 {
				t.Fatalf("helper: %v\n%s", err, out)
			}
			if _, err := os.Stat(filepath.Join(dir, DBName)); err == nil {
				t.Fatal("state.db exists after an upgrade killed before its rename")
			}
			checkUpgraded(t, dir)
		})
	}
	t.Run("at moments spread over its run", func(t *testing.T) {
		// start runs the helper on a fresh copy and returns once it is
		// about to upgrade.
		start := func() (string, *exec.Cmd) {
			dir := copyFixture(t)
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "RAYVMM_STATE_UPGRADE="+dir)
			stdout, _ := cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
				t.Fatalf("helper: %q, %v", line, err)
			}
			return dir, cmd
		}
		dir, cmd := start()
		t0 := time.Now()
		if err := cmd.Wait(); err != nil {
			t.Fatal(err)
		}
		run := time.Since(t0)
		checkUpgraded(t, dir)
		var before, after, done int
		const kills = 30
		for i := range kills {
			dir, cmd := start()
			time.Sleep(run * time.Duration(i) / kills)
			cmd.Process.Signal(syscall.SIGKILL)
			switch _, err := os.Stat(filepath.Join(dir, DBName)); {
			case cmd.Wait() == nil:
				done++
			case err == nil:
				after++
			default:
				before++
			}
			checkUpgraded(t, dir)
		}
		t.Logf("an upgrade takes %v; of %d kills spread over it, %d came before state.db existed, %d after, %d after the process had finished", run, kills, before, after, done)
	})
}

// helperFirstUse waits for "go" on stdin, then in its first transaction
// on dir deletes network "lan" and adds a record of its own.
func helperFirstUse(dir, id string) {
	fmt.Println("ready")
	if line, _ := bufio.NewReader(os.Stdin).ReadString('\n'); line != "go\n" {
		os.Exit(2)
	}
	s, _ := Open(dir)
	s.Timeout = time.Minute
	things := NewBucket[string]("things", nil)
	err := s.Update(func(tx *Tx) error {
		if b := tx.tx.Bucket([]byte("networks")); b != nil {
			b.Delete([]byte("lan"))
		}
		v := "made by " + id
		return things.Put(tx, id, &v)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// TestConcurrentFirstUse: processes using an old state directory at the
// same moment import it once: a record one of them deleted after the
// upgrade is not brought back by another's import, and every process's
// own record is there.
func TestConcurrentFirstUse(t *testing.T) {
	for round := range 3 {
		dir := copyFixture(t)
		const n = 8
		var cmds []*exec.Cmd
		var stdins []io.WriteCloser
		for i := range n {
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "RAYVMM_STATE_FIRST_USE="+dir, fmt.Sprintf("RAYVMM_STATE_ID=p%d", i))
			in, _ := cmd.StdinPipe()
			out, _ := cmd.StdoutPipe()
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
				t.Fatalf("helper %d: %q, %v", i, line, err)
			}
			cmds, stdins = append(cmds, cmd), append(stdins, in)
		}
		for _, in := range stdins {
			io.WriteString(in, "go\n")
		}
		for i, cmd := range cmds {
			if err := cmd.Wait(); err != nil {
				t.Fatalf("round %d: helper %d: %v", round, i, err)
			}
		}
		s, _ := Open(dir)
		got := storedRecords(t, s)
		want := fixtureRecords(t)
		delete(want["networks"], "lan")
		if !maps.EqualFunc(got, want, maps.Equal) {
			t.Fatalf("round %d: records %v\nwant %v", round, got, want)
		}
		things, err := func() (out []*string, err error) {
			err = s.View(func(tx *Tx) error { out, err = NewBucket[string]("things", nil).All(tx); return err })
			return
		}()
		if err != nil || len(things) != n {
			t.Fatalf("round %d: %d own records, %v; want %d", round, len(things), err, n)
		}
	}
}

// TestDamagedLegacyDatabase: a schema 0 volumes.db that is not a bbolt
// database stops the upgrade with an error naming it, leaves it in the
// backup, and makes no state.db; no panic.
func TestDamagedLegacyDatabase(t *testing.T) {
	dir := copyFixture(t)
	if err := os.WriteFile(filepath.Join(dir, "volumes", "volumes.db"), bytes.Repeat([]byte("not a database "), 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	s, _ := Open(dir)
	for range 2 {
		err := s.View(func(*Tx) error { return nil })
		if err == nil || !strings.Contains(err.Error(), filepath.Join(BackupDir, "volumes.db")) {
			t.Fatalf("upgrade with a damaged volumes.db: %v", err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, DBName)); err == nil {
		t.Fatal("state.db made from a damaged upgrade")
	}
}

// TestBusy: a process that holds the database longer than the timeout
// makes others fail with ErrBusy naming the file, not hang.
func TestBusy(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	if err := s.Update(func(*Tx) error { return nil }); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(s.Path(), 0o600, nil) // holds the file lock exclusively
	if err != nil {
		t.Fatal(err)
	}
	s.Timeout = 300 * time.Millisecond
	for name, op := range map[string]func(func(*Tx) error) error{"update": s.Update, "view": s.View} {
		err := op(func(*Tx) error { return nil })
		if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), s.Path()) {
			t.Fatalf("%s while another holds the store: %v, want ErrBusy naming %s", name, err, s.Path())
		}
	}
	db.Close()
	if err := s.View(func(*Tx) error { return nil }); err != nil {
		t.Fatalf("view once the store is free: %v", err)
	}
}

// TestNewerSchema: a store a newer rayvmm wrote is refused, not misread.
func TestNewerSchema(t *testing.T) {
	s, _ := Open(t.TempDir())
	s.Update(func(*Tx) error { return nil })
	db, _ := bolt.Open(s.Path(), 0o600, nil)
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket(metaBucket).Put(schemaKey, []byte("2")) })
	db.Close()
	for name, op := range map[string]func(func(*Tx) error) error{"update": s.Update, "view": s.View} {
		if err := op(func(*Tx) error { return nil }); !errors.Is(err, ErrSchema) || !strings.Contains(err.Error(), "schema 2") {
			t.Fatalf("%s of a schema 2 store: %v", name, err)
		}
	}
}

type thing struct {
	Name string `json:"name"`
	Size int    `json:"size"`
}

func checkThing(key string, v *thing) error {
	if v.Name != key {
		return fmt.Errorf("names %q", v.Name)
	}
	if v.Size < 0 {
		return errors.New("negative size")
	}
	return nil
}

func TestBucket(t *testing.T) {
	s, _ := Open(t.TempDir())
	things := NewBucket("things", checkThing)
	err := s.Update(func(tx *Tx) error {
		for _, n := range []string{"b", "a", "c"} {
			if err := things.Put(tx, n, &thing{Name: n, Size: len(n)}); err != nil {
				return err
			}
		}
		if err := things.Put(tx, "d", &thing{Name: "d", Size: -1}); err == nil || !strings.Contains(err.Error(), "negative size") {
			t.Errorf("Put of a record that fails its check: %v", err)
		}
		return things.Delete(tx, "c")
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(func(tx *Tx) error {
		things.Put(tx, "x", &thing{Name: "x"})
		return errors.New("roll back")
	}); err == nil {
		t.Fatal("Update hid fn's error")
	}
	s.View(func(tx *Tx) error {
		all, err := things.All(tx)
		if err != nil || len(all) != 2 || all[0].Name != "a" || all[1].Name != "b" {
			t.Errorf("All = %v, %v; want a, b", all, err)
		}
		if things.Has(tx, "x") || things.Has(tx, "c") {
			t.Error("a rolled back or deleted record is there")
		}
		if err := things.Put(tx, "y", &thing{Name: "y"}); err == nil {
			t.Error("Put in a read-only transaction")
		}
		return nil
	})
	// A record damaged on disk is an error naming the store, bucket and key.
	db, _ := bolt.Open(s.Path(), 0o600, nil)
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte("things")).Put([]byte("a"), []byte(`{"name":"b"}`)) })
	db.Close()
	s.View(func(tx *Tx) error {
		_, _, err := things.Get(tx, "a")
		if err == nil || !strings.Contains(err.Error(), s.Path()) || !strings.Contains(err.Error(), `things record "a": names "b"`) {
			t.Errorf("Get of a damaged record: %v", err)
		}
		if _, err := things.All(tx); err == nil {
			t.Error("All with a damaged record")
		}
		return nil
	})
}

// helperLock takes the lock at path shared, says so, and blocks until
// killed.
func helperLock(path string) {
	l, err := TryLock(path, false)
	if err != nil {
		fmt.Println("E", err)
		os.Exit(1)
	}
	l.SetOwner()
	fmt.Println("locked")
	for {
		time.Sleep(time.Hour) // until killed; a timer keeps the runtime from calling this a deadlock
	}
}

func TestLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	if held, _ := Holder(path); held {
		t.Fatal("lock held before anyone took it")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "RAYVMM_STATE_LOCK="+path)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "locked\n" {
		t.Fatalf("helper: %q", line)
	}
	if held, pid := Holder(path); !held || pid != cmd.Process.Pid {
		t.Fatalf("Holder = %v, %d; want the helper %d", held, pid, cmd.Process.Pid)
	}
	if _, err := TryLock(path, true); !errors.Is(err, ErrLocked) {
		t.Fatalf("exclusive lock while shared by another: %v", err)
	}
	shared, err := TryLock(path, false)
	if err != nil {
		t.Fatalf("second shared lock: %v", err)
	}
	if err := shared.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal("released while another holder remains: the file must stay")
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if held, _ := Holder(path); held {
		t.Fatal("lock held after its holder was killed")
	}
	l, err := TryLock(path, true)
	if err != nil {
		t.Fatalf("exclusive lock after the holder died: %v", err)
	}
	if held, _ := Holder(path); !held {
		t.Fatal("Holder does not see our own lock")
	}
	l.Release()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lock file left after the last release: %v", err)
	}
}

func TestSerialize(t *testing.T) {
	path := filepath.Join(t.TempDir(), ".lock")
	a, err := Serialize(path, false, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Serialize(path, false, time.Second)
	if err != nil {
		t.Fatalf("two shared: %v", err)
	}
	if _, err := Serialize(path, true, 200*time.Millisecond); !errors.Is(err, ErrBusy) {
		t.Fatalf("exclusive while shared: %v, want ErrBusy", err)
	}
	a.Unlock()
	b.Unlock()
	c, err := Serialize(path, true, time.Second)
	if err != nil {
		t.Fatalf("exclusive once free: %v", err)
	}
	c.Unlock()
}
