package state

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// Schema 0 is the layout before state.db, from the release before it:
//
//	volumes/volumes.db      bbolt, bucket "volumes": name -> JSON record
//	volumes/NAME.lock       a volume's lock (unchanged in schema 1)
//	networks/NAME.json      one JSON record per network
//	networks/.NAME.json.*   temporary files of a save that was killed
//	networks/NAME.attach    flock held by VMs attached to the network
//	networks/.lock          flock ordering network commands (kept: schema 1
//	                        orders them with the same file)
//
// The upgrade to schema 1, under an exclusive flock on the state
// directory itself:
//
//  1. moves volumes.db and the network records into backup-schema0/ (each
//     a rename that never replaces a file), and deletes the attach and
//     temporary files;
//  2. builds the new database in a temporary file from what is in
//     backup-schema0/: the volume records and the network records, byte
//     for byte, and the schema version;
//  3. renames it to state.db.
//
// A process killed anywhere leaves either no state.db (the next use moves
// what is left, drops the temporary file and builds the database again
// from the backup, which then holds everything) or a complete one. A
// second process waits on the directory lock and then finds state.db.
// The backup stays for the user to delete.

// BackupDir is where an upgrade moves the files it imported.
const BackupDir = "backup-schema0"

const (
	legacyVolumesDB = "volumes.db"
	tempPrefix      = "." + DBName + ".tmp-"
)

// Upgraded is what the meta bucket's "upgraded" key records.
type Upgraded struct {
	From     int       `json:"from_schema"`
	At       time.Time `json:"at"`
	Volumes  int       `json:"volumes"`
	Networks int       `json:"networks"`
	Backup   string    `json:"backup"`
}

// testHookUpgradeStep is called between the upgrade's steps; tests kill
// the process there.
var testHookUpgradeStep = func(step string) {}

// prepare makes sure state.db exists if it must: always for an update,
// and for a view only if there is a schema 0 state to upgrade.
func (s *Store) prepare(create bool) error {
	if _, err := os.Stat(s.Path()); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("state store: %w", err)
	}
	if !create && !s.legacyPresent() {
		return nil
	}
	return s.create()
}

// legacyPresent reports whether the state directory holds schema 0 state
// (or an interrupted upgrade's backup).
func (s *Store) legacyPresent() bool {
	for _, p := range []string{
		filepath.Join(s.dir, "volumes", legacyVolumesDB),
		filepath.Join(s.dir, BackupDir),
	} {
		if _, err := os.Lstat(p); err == nil {
			return true
		}
	}
	return len(legacyNetworkRecords(filepath.Join(s.dir, "networks"))) > 0
}

// legacyNetworkRecords lists the network record files in dir.
func legacyNetworkRecords(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if name, ok := strings.CutSuffix(e.Name(), ".json"); ok && !e.IsDir() && name != "" && !strings.HasPrefix(name, ".") {
			out = append(out, e.Name())
		}
	}
	return out
}

// create makes state.db, upgrading schema 0 state, under the state
// directory's lock.
func (s *Store) create() error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	d, err := os.Open(s.dir)
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	defer d.Close()
	if err := flockWait(d, true, s.timeout()); err != nil {
		return fmt.Errorf("state directory %s: %w", s.dir, err)
	}
	if _, err := os.Stat(s.Path()); err == nil {
		return nil // made while we waited
	}
	stale, _ := filepath.Glob(filepath.Join(s.dir, tempPrefix+"*"))
	for _, p := range stale {
		os.Remove(p) // from a process killed while it built the database
	}
	info, err := s.moveLegacy()
	if err != nil {
		return fmt.Errorf("upgrade state directory %s: %w", s.dir, err)
	}
	testHookUpgradeStep("moved")
	tmp := filepath.Join(s.dir, fmt.Sprintf("%s%d", tempPrefix, os.Getpid()))
	if err := s.build(tmp, info); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("upgrade state directory %s: %w", s.dir, err)
	}
	testHookUpgradeStep("built")
	if err := os.Rename(tmp, s.Path()); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("create state store: %w", err)
	}
	if err := d.Sync(); err != nil {
		return fmt.Errorf("create state store: sync %s: %w", s.dir, err)
	}
	return nil
}

// moveLegacy moves schema 0 records into the backup directory and
// deletes schema 0's attach and temporary files. It returns nil if there
// was nothing (a new state directory).
func (s *Store) moveLegacy() (*Upgraded, error) {
	backup := filepath.Join(s.dir, BackupDir)
	vdir, ndir := filepath.Join(s.dir, "volumes"), filepath.Join(s.dir, "networks")
	var moves [][2]string
	if _, err := os.Lstat(filepath.Join(vdir, legacyVolumesDB)); err == nil {
		moves = append(moves, [2]string{filepath.Join(vdir, legacyVolumesDB), filepath.Join(backup, legacyVolumesDB)})
	}
	for _, name := range legacyNetworkRecords(ndir) {
		moves = append(moves, [2]string{filepath.Join(ndir, name), filepath.Join(backup, "networks", name)})
	}
	if _, err := os.Lstat(backup); err != nil && len(moves) == 0 {
		return nil, nil
	}
	if err := os.MkdirAll(filepath.Join(backup, "networks"), 0o700); err != nil {
		return nil, err
	}
	for _, m := range moves {
		if err := unix.Renameat2(unix.AT_FDCWD, m[0], unix.AT_FDCWD, m[1], unix.RENAME_NOREPLACE); err != nil {
			if errors.Is(err, unix.EEXIST) {
				return nil, fmt.Errorf("both %s and %s exist (was an older rayvmm run after the upgrade began?): move one away and run again", m[0], m[1])
			}
			return nil, fmt.Errorf("move %s to %s: %w", m[0], m[1], err)
		}
		testHookUpgradeStep("move")
	}
	// Schema 1 holds network attach locks in NAME.lock files that exist
	// only while held, so the old attach files and a killed save's
	// temporary files go.
	ents, _ := os.ReadDir(ndir)
	for _, e := range ents {
		n := e.Name()
		if strings.HasSuffix(n, ".attach") || strings.HasPrefix(n, ".") && strings.Contains(n, ".json.") {
			os.Remove(filepath.Join(ndir, n))
		}
	}
	for _, dir := range []string{vdir, ndir, filepath.Join(backup, "networks"), backup, s.dir} {
		if err := syncDir(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("sync %s: %w", dir, err)
		}
	}
	return &Upgraded{From: 0, Backup: backup}, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// build writes a new database at path: the schema version and, if info
// is set, every record in the backup directory.
func (s *Store) build(path string, info *Upgraded) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: s.timeout()})
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	err = db.Update(func(btx *bolt.Tx) error {
		if info == nil {
			return setSchema(btx, nil)
		}
		var err error
		if info.Volumes, err = importVolumes(btx, filepath.Join(info.Backup, legacyVolumesDB), s.timeout()); err != nil {
			return err
		}
		if info.Networks, err = importNetworks(btx, filepath.Join(info.Backup, "networks")); err != nil {
			return err
		}
		info.At = time.Now().UTC().Truncate(time.Second)
		return setSchema(btx, info)
	})
	return errors.Join(err, db.Close())
}

// importVolumes copies schema 0's volume records, unchanged, into the
// "volumes" bucket.
func importVolumes(btx *bolt.Tx, path string, timeout time.Duration) (n int, err error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	old, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: timeout})
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	defer old.Close()
	// bbolt panics on some kinds of damage; a damaged file must stop the
	// upgrade with an error that names it, and leave it in place.
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("read %s: damaged database: %v", path, p)
		}
	}()
	err = old.View(func(otx *bolt.Tx) error {
		ob := otx.Bucket([]byte("volumes"))
		if ob == nil {
			return nil
		}
		nb, err := btx.CreateBucketIfNotExists([]byte("volumes"))
		if err != nil {
			return err
		}
		return ob.ForEach(func(k, v []byte) error {
			n++
			return nb.Put(append([]byte(nil), k...), append([]byte(nil), v...))
		})
	})
	if err != nil {
		return 0, fmt.Errorf("import volumes from %s: %w", path, err)
	}
	return n, nil
}

// importNetworks copies schema 0's network record files, byte for byte,
// into the "networks" bucket under their file names' stems. They are
// checked when read, as they were before.
func importNetworks(btx *bolt.Tx, dir string) (int, error) {
	names := legacyNetworkRecords(dir)
	if len(names) == 0 {
		return 0, nil
	}
	nb, err := btx.CreateBucketIfNotExists([]byte("networks"))
	if err != nil {
		return 0, err
	}
	for _, name := range names {
		raw, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return 0, fmt.Errorf("import network record: %w", err)
		}
		if err := nb.Put([]byte(strings.TrimSuffix(name, ".json")), raw); err != nil {
			return 0, fmt.Errorf("import network record %s: %w", name, err)
		}
	}
	return len(names), nil
}
