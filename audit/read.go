package audit

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// snapshot is a consistent view of the log for a reader: the files there
// were, the whole last file (the only one a writer changes) and the
// sealing state, all taken under a shared lock. Older files are read
// later, without the lock: writers never touch them again.
type snapshot struct {
	dir   string
	files []int
	last  []byte
	head  *sealState // nil when there is no audit-seal.key
}

// takeSnapshot reads the log's state under LOCK_SH.
func takeSnapshot(dir, keyDir string) (*snapshot, error) {
	f, err := os.Open(filepath.Join(dir, lockName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s", ErrNoLog, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	defer f.Close()
	if err := flock(f, unix.LOCK_SH); err != nil {
		return nil, fmt.Errorf("audit: lock: %w", err)
	}
	defer flock(f, unix.LOCK_UN)
	s := &snapshot{dir: dir}
	if s.files, err = listFiles(dir); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if len(s.files) > 0 {
		if s.last, err = os.ReadFile(s.path(len(s.files) - 1)); err != nil {
			return nil, fmt.Errorf("audit: %w", err)
		}
	}
	if keyDir != "" {
		s.head, err = readSealState(keyDir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("audit: %w", err)
		}
	}
	return s, nil
}

func (s *snapshot) path(i int) string { return filepath.Join(s.dir, fileName(s.files[i])) }

// read returns file i's bytes.
func (s *snapshot) read(i int) ([]byte, error) {
	if i == len(s.files)-1 {
		return s.last, nil
	}
	b, err := os.ReadFile(s.path(i))
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return b, nil
}

// lines splits a file into lines without their newlines; partial is the
// bytes after the last newline, if any.
func lines(data []byte) (ls [][]byte, partial []byte) {
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			return ls, data
		}
		ls = append(ls, data[:i])
		data = data[i+1:]
	}
	return ls, nil
}

// Read calls fn with each record of the log in dir, in order. Lines that
// do not parse are passed to bad (which may be nil) with where they are;
// a partial last line is reported there as torn. Read checks no hash:
// that is Verify's job.
func Read(dir string, fn func(*Record) error, bad func(file string, line int, err error)) error {
	s, err := takeSnapshot(dir, "")
	if err != nil {
		return err
	}
	for i := range s.files {
		data, err := s.read(i)
		if err != nil {
			return err
		}
		ls, partial := lines(data)
		for j, line := range ls {
			r, err := Parse(line)
			if err != nil {
				if bad != nil {
					bad(fileName(s.files[i]), j+1, err)
				}
				continue
			}
			if err := fn(r); err != nil {
				return err
			}
		}
		if partial != nil && bad != nil {
			bad(fileName(s.files[i]), len(ls)+1, fmt.Errorf("%w: torn line (%d bytes, no newline)", ErrInvalid, len(partial)))
		}
	}
	return nil
}

// ReadAll returns every record that parses.
func ReadAll(dir string) ([]*Record, error) {
	var rs []*Record
	err := Read(dir, func(r *Record) error { rs = append(rs, r); return nil }, nil)
	return rs, err
}
