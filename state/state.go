// Package state is rayvmm's state store: the metadata of everything
// rayvmm keeps between runs (volumes, networks, and later pods, audit
// and shard records) in one bbolt database, <state-dir>/state.db, with
// one bucket per kind of record, records encoded as JSON, transactions
// across buckets, and a schema version.
//
// The database is opened for one transaction at a time and closed again,
// so a long-running VMM never holds it: bbolt's file lock (shared for a
// read, exclusive for a write) is held for milliseconds, and a process
// that finds it held waits up to Store.Timeout and then fails with
// ErrBusy naming the file, rather than hanging.
//
// What is attached or running is never stored: it is derived from locks
// that live processes hold (see Lock), which the kernel drops when a
// process dies, kill -9 included.
//
// A state directory from before the store (schema 0: volumes/volumes.db
// and networks/NAME.json) is upgraded on first use: its files are moved to
// <state-dir>/backup-schema0 and imported into a new state.db that appears
// in one rename, under a lock on the state directory, so an upgrade killed
// at any point is finished by the next use and two first uses import once.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// DBName is the store's file in the state directory.
const DBName = "state.db"

// SchemaVersion is the layout of the store this rayvmm reads and writes:
// 1 is the first state.db (0 was volumes.db plus network JSON files).
// A store with a higher version was written by a newer rayvmm and is
// refused.
const SchemaVersion = 1

// DefaultTimeout is how long an operation waits for another process's
// transaction (or upgrade) before it gives up with ErrBusy.
const DefaultTimeout = 10 * time.Second

// Errors by category.
var (
	// ErrBusy: another process held the store (or a lock an operation
	// waits for) for longer than the timeout.
	ErrBusy = errors.New("busy")
	// ErrSchema: the store has a schema this rayvmm does not know.
	ErrSchema = errors.New("unknown state schema")
	// ErrInvalid: a bad argument, such as an empty state directory.
	ErrInvalid = errors.New("invalid state request")
)

var (
	metaBucket = []byte("meta")
	schemaKey  = []byte("schema")
)

// Store is the state store of one state directory. It keeps no file open
// between transactions, and is safe for concurrent use.
type Store struct {
	dir string
	// Timeout bounds every wait for another process: for the database's
	// file lock, the upgrade lock and Serialize locks taken through the
	// store. Zero means DefaultTimeout.
	Timeout time.Duration
}

// Open returns the store of stateDir. It creates nothing: the directory
// and the database are made by the first Update (a View of a state
// directory that does not exist sees empty buckets).
func Open(stateDir string) (*Store, error) {
	if stateDir == "" {
		return nil, fmt.Errorf("%w: empty state directory", ErrInvalid)
	}
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		return nil, fmt.Errorf("state store: %w", err)
	}
	return &Store{dir: abs}, nil
}

// Dir is the state directory.
func (s *Store) Dir() string { return s.dir }

// Path is the database file.
func (s *Store) Path() string { return filepath.Join(s.dir, DBName) }

// KindDir is the directory for one kind's files (images, lock files):
// <state-dir>/<kind>.
func (s *Store) KindDir(kind string) string { return filepath.Join(s.dir, kind) }

// LockPath is the lock file of one named object of a kind:
// <state-dir>/<kind>/<name>.lock.
func (s *Store) LockPath(kind, name string) string {
	return filepath.Join(s.dir, kind, name+".lock")
}

func (s *Store) timeout() time.Duration {
	if s.Timeout > 0 {
		return s.Timeout
	}
	return DefaultTimeout
}

// Tx is a transaction. Buckets read through a Tx of a store that has no
// database yet are empty.
type Tx struct {
	tx   *bolt.Tx
	path string
}

// Writable reports whether the transaction may change records.
func (tx *Tx) Writable() bool { return tx.tx != nil && tx.tx.Writable() }

// Update runs fn in a read-write transaction, creating the state
// directory and database (upgrading a schema 0 state directory) first.
// If fn returns an error nothing it did is kept.
func (s *Store) Update(fn func(*Tx) error) error {
	if err := s.prepare(true); err != nil {
		return err
	}
	return s.run(true, fn)
}

// View runs fn in a read-only transaction. Other readers run at the same
// time; writers wait.
func (s *Store) View(fn func(*Tx) error) error {
	if err := s.prepare(false); err != nil {
		return err
	}
	if _, err := os.Stat(s.Path()); errors.Is(err, os.ErrNotExist) {
		return fn(&Tx{path: s.Path()})
	}
	return s.run(false, fn)
}

// run opens the database, runs fn in a transaction and closes it again.
func (s *Store) run(write bool, fn func(*Tx) error) error {
	db, err := s.open(!write)
	if err != nil {
		return err
	}
	do := db.View
	if write {
		do = db.Update
	}
	err = do(func(btx *bolt.Tx) error {
		if err := checkSchema(btx, s.Path()); err != nil {
			return err
		}
		return fn(&Tx{tx: btx, path: s.Path()})
	})
	return errors.Join(err, closeDB(db))
}

// open opens the database, waiting at most the timeout for its lock.
func (s *Store) open(readOnly bool) (*bolt.DB, error) {
	db, err := bolt.Open(s.Path(), 0o600, &bolt.Options{Timeout: s.timeout(), ReadOnly: readOnly})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("state store %s: another process has held it for %v: %w", s.Path(), s.timeout(), ErrBusy)
	}
	if err != nil {
		return nil, fmt.Errorf("state store %s: %w", s.Path(), err)
	}
	return db, nil
}

func closeDB(db *bolt.DB) error {
	if err := db.Close(); err != nil {
		return fmt.Errorf("state store %s: close: %w", db.Path(), err)
	}
	return nil
}

// checkSchema refuses a store this rayvmm does not understand.
func checkSchema(btx *bolt.Tx, path string) error {
	v, err := schemaOf(btx)
	if err != nil {
		return fmt.Errorf("state store %s: %w", path, err)
	}
	if v != SchemaVersion {
		return fmt.Errorf("state store %s has schema %d, this rayvmm knows %d (a newer rayvmm wrote it): %w", path, v, SchemaVersion, ErrSchema)
	}
	return nil
}

func schemaOf(btx *bolt.Tx) (int, error) {
	b := btx.Bucket(metaBucket)
	if b == nil {
		return 0, fmt.Errorf("no meta bucket: %w", ErrSchema)
	}
	raw := b.Get(schemaKey)
	v, err := strconv.Atoi(string(raw))
	if err != nil {
		return 0, fmt.Errorf("schema version %q: %w", raw, ErrSchema)
	}
	return v, nil
}

// setSchema records the schema version and what the upgrade found.
func setSchema(btx *bolt.Tx, info any) error {
	b, err := btx.CreateBucketIfNotExists(metaBucket)
	if err != nil {
		return err
	}
	if err := b.Put(schemaKey, []byte(strconv.Itoa(SchemaVersion))); err != nil {
		return err
	}
	if info == nil {
		return nil
	}
	raw, err := json.Marshal(info)
	if err != nil {
		return err
	}
	return b.Put([]byte("upgraded"), raw)
}

// Meta returns a value of the meta bucket ("schema", "upgraded"), for
// diagnostics and tests.
func (tx *Tx) Meta(key string) []byte {
	if tx.tx == nil {
		return nil
	}
	if b := tx.tx.Bucket(metaBucket); b != nil {
		return append([]byte(nil), b.Get([]byte(key))...)
	}
	return nil
}
