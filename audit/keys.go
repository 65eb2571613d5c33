package audit

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Key files, in the key directory (root-only, outside the log directory):
//
//	audit-verify.key  K0, the verification key: written once, mode 0400.
//	                  Copy it off the host and delete it there to keep
//	                  past seals unforgeable by a later root (see the
//	                  package doc); `audit verify --key FILE` reads it.
//	audit-seal.key    the sealing state: epoch e, Ke, and the last seal
//	                  made (seq, hash). Mode 0600, replaced after every
//	                  seal; the old key is gone from it.
const (
	VerifyKeyFile = "audit-verify.key"
	SealKeyFile   = "audit-seal.key"
)

const (
	verifyKeyHeader = "rayvmm-audit-verify-key-v1"
	sealKeyHeader   = "rayvmm-audit-seal-key-v1"
	evolveLabel     = "rayvmm-audit-evolve-v1"
)

// ErrKey is wrapped by errors about the key files.
var ErrKey = errors.New("audit key")

// evolve is the one-way step from one epoch's key to the next:
// K(e+1) = SHA-256("rayvmm-audit-evolve-v1" ‖ Ke).
func evolve(k Hash) Hash {
	h := sha256.New()
	h.Write([]byte(evolveLabel))
	h.Write(k[:])
	var out Hash
	h.Sum(out[:0])
	return out
}

// keyAt derives epoch e's key from K0.
func keyAt(k0 Hash, e uint64) Hash {
	for range e {
		k0 = evolve(k0)
	}
	return k0
}

// sealState is audit-seal.key: the key for the next seal, its epoch, and
// the last seal written (epoch-1), for naming a cut-off tail.
type sealState struct {
	Epoch      uint64
	Key        Hash
	SealedSeq  uint64 // 0: no seal yet
	SealedHash Hash
}

func (s *sealState) encode() []byte {
	return fmt.Appendf(nil, "%s epoch=%d key=%s sealed-seq=%d sealed-hash=%s\n", sealKeyHeader, s.Epoch, s.Key, s.SealedSeq, s.SealedHash)
}

func decodeSealState(b []byte) (*sealState, error) {
	f := strings.Fields(string(b))
	if len(f) != 5 || f[0] != sealKeyHeader {
		return nil, fmt.Errorf("%w: not a %s file", ErrKey, sealKeyHeader)
	}
	var s sealState
	var err error
	vals := map[string]string{}
	for _, kv := range f[1:] {
		k, v, _ := strings.Cut(kv, "=")
		vals[k] = v
	}
	if s.Epoch, err = strconv.ParseUint(vals["epoch"], 10, 64); err != nil {
		return nil, fmt.Errorf("%w: epoch: %w", ErrKey, err)
	}
	if s.SealedSeq, err = strconv.ParseUint(vals["sealed-seq"], 10, 64); err != nil {
		return nil, fmt.Errorf("%w: sealed-seq: %w", ErrKey, err)
	}
	if s.Key, err = decodeHash(vals["key"]); err != nil {
		return nil, fmt.Errorf("%w: key: %w", ErrKey, err)
	}
	if s.SealedHash, err = decodeHash(vals["sealed-hash"]); err != nil {
		return nil, fmt.Errorf("%w: sealed-hash: %w", ErrKey, err)
	}
	return &s, nil
}

func decodeHash(s string) (Hash, error) {
	var h Hash
	if len(s) != 64 {
		return h, errors.New("want 64 hex digits")
	}
	_, err := hex.Decode(h[:], []byte(s))
	return h, err
}

// ReadVerifyKey reads a verification key file (audit-verify.key).
func ReadVerifyKey(path string) (Hash, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Hash{}, fmt.Errorf("%w: %w", ErrKey, err)
	}
	f := strings.Fields(string(b))
	if len(f) != 2 || f[0] != verifyKeyHeader {
		return Hash{}, fmt.Errorf("%w: %s: not a %s file", ErrKey, path, verifyKeyHeader)
	}
	k, err := decodeHash(f[1])
	if err != nil {
		return Hash{}, fmt.Errorf("%w: %s: %w", ErrKey, path, err)
	}
	return k, nil
}

// readSealState reads audit-seal.key; a missing file is fs.ErrNotExist.
func readSealState(keyDir string) (*sealState, error) {
	b, err := os.ReadFile(filepath.Join(keyDir, SealKeyFile))
	if err != nil {
		return nil, err
	}
	s, err := decodeSealState(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(keyDir, SealKeyFile), err)
	}
	return s, nil
}

// writeSealState replaces audit-seal.key: a temporary file, synced, then
// renamed over it. The directory is not synced: if the rename is lost in
// a crash, the file still holds the previous epoch, and the next writer
// finds that epoch's seal in the log and steps past it (see reconcile).
func writeSealState(keyDir string, s *sealState) error {
	tmp, err := os.CreateTemp(keyDir, ".seal-*")
	if err != nil {
		return fmt.Errorf("%w: %w", ErrKey, err)
	}
	_, werr := tmp.Write(s.encode())
	serr := syncFile(tmp)
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("%w: write %s: %w", ErrKey, SealKeyFile, err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(keyDir, SealKeyFile)); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("%w: %w", ErrKey, err)
	}
	return nil
}

// removeStaleTemps removes temporary seal files a killed writer left.
func removeStaleTemps(keyDir string) {
	m, _ := filepath.Glob(filepath.Join(keyDir, ".seal-*"))
	for _, p := range m {
		os.Remove(p)
	}
}

// checkKeyDir makes the key directory (mode 0700) or checks that an
// existing one is a directory owned by us that nobody else can enter.
func checkKeyDir(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("%w: %w", ErrKey, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%w: %w", ErrKey, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrKey, err)
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("%w: %s is not a directory", ErrKey, dir)
	case fi.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("%w: key directory %s has mode %#o: others could read the key (want 0700)", ErrKey, dir, fi.Mode().Perm())
	case st != nil && int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%w: key directory %s belongs to uid %d, not to us (uid %d)", ErrKey, dir, st.Uid, os.Geteuid())
	}
	return nil
}

// createKeys makes K0 on first use: audit-verify.key (0400), then
// audit-seal.key at epoch 0, then syncs the directory. A writer killed
// in between left the verification key: it is reused.
func createKeys(keyDir string) (*sealState, error) {
	if err := checkKeyDir(keyDir); err != nil {
		return nil, err
	}
	path := filepath.Join(keyDir, VerifyKeyFile)
	k0, err := ReadVerifyKey(path)
	if errors.Is(err, fs.ErrNotExist) {
		if _, err := rand.Read(k0[:]); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrKey, err)
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrKey, err)
		}
		_, werr := fmt.Fprintf(f, "%s %s\n", verifyKeyHeader, k0)
		serr := syncFile(f)
		if err := errors.Join(werr, serr, f.Close()); err != nil {
			os.Remove(path)
			return nil, fmt.Errorf("%w: write %s: %w", ErrKey, path, err)
		}
	} else if err != nil {
		return nil, err
	}
	s := &sealState{Key: k0}
	if err := writeSealState(keyDir, s); err != nil {
		return nil, err
	}
	if err := syncDir(keyDir); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrKey, err)
	}
	return s, nil
}

// keysEqual compares keys in constant time.
func keysEqual(a, b Hash) bool { return subtle.ConstantTimeCompare(a[:], b[:]) == 1 }
