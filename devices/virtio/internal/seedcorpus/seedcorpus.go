// Package seedcorpus forwards to internal/seedcorpus, where the helper
// moved so that packages outside devices/virtio (shards/nbd) can use it.
package seedcorpus

import (
	"testing"

	"github.com/rayvmm/rayvmm/internal/seedcorpus"
)

// Seed is internal/seedcorpus.Seed.
type Seed = seedcorpus.Seed

// Check is internal/seedcorpus.Check.
func Check(t *testing.T, target string, seeds []Seed, update bool) {
	t.Helper()
	seedcorpus.Check(t, target, seeds, update)
}
