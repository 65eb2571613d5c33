package policy

import (
	"fmt"
	"sync/atomic"
)

// Store is the policy in force, read from a file. Reload reads the file
// again and swaps the new policy in only once all of it parsed: a file
// that does not parse leaves the old policy in force (the daemon reloads
// on SIGHUP). Store is safe for concurrent use.
type Store struct {
	path string
	cur  atomic.Pointer[Policy]
}

// Open reads the policy file; it fails if the file does not parse.
func Open(file string) (*Store, error) {
	p, err := Load(file)
	if err != nil {
		return nil, err
	}
	s := &Store{path: file}
	s.cur.Store(p)
	return s, nil
}

// Path is the policy file.
func (s *Store) Path() string { return s.path }

// Policy is the policy in force.
func (s *Store) Policy() *Policy { return s.cur.Load() }

// Reload reads the file again. On error the old policy stays in force,
// and the error says so.
func (s *Store) Reload() error {
	p, err := Load(s.path)
	if err != nil {
		return fmt.Errorf("%w; the policy in force is unchanged", err)
	}
	s.cur.Store(p)
	return nil
}

// Decide answers a request with the policy in force.
func (s *Store) Decide(sub Subject, a Action, o Object) (Decision, error) {
	return s.Policy().Decide(sub, a, o)
}
