// Package seedcorpus keeps a fuzz target's seed corpus in
// testdata/fuzz/<target> in step with the seeds a test builds in code, so
// the hostile inputs are written once, readable, and run by plain
// `go test`.
package seedcorpus

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// Seed is one named []byte input of a fuzz target.
type Seed struct {
	Name string
	Data []byte
}

// Check compares testdata/fuzz/<target>/<name> with each seed in the go
// fuzzing corpus format, or rewrites the files when update is set.
func Check(t *testing.T, target string, seeds []Seed, update bool) {
	t.Helper()
	dir := filepath.Join("testdata", "fuzz", target)
	for _, s := range seeds {
		want := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(s.Data)))
		p := filepath.Join(dir, s.Name)
		if update {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if got, err := os.ReadFile(p); err != nil || string(got) != want {
			t.Errorf("seed %s is missing or stale (run go test -run TestSeedCorpus -update-seeds): %v", p, err)
		}
	}
}
