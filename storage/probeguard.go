package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
)

// ErrProbedFormat refuses a guest write that would change what format an
// auto-detected raw image is detected as next time.
var ErrProbedFormat = errors.New("write would make a raw image that was opened without format=raw look like qcow2")

// qcow2Magic is what DetectFormat looks for at offset 0.
var qcow2Magic = []byte("QFI\xfb")

// probeGuard wraps a raw disk whose format was detected rather than given.
// A guest that writes a qcow2 header at offset 0 of such a disk would get
// the image opened as qcow2 on the next boot, and a qcow2 header can name a
// host file as its backing file: so such writes fail, as QEMU does for
// probed raw images. Giving format=raw lifts the guard.
//
// Writes that touch the magic's bytes are serialized (mu), so that two
// concurrent writes, each with half of the magic, cannot both pass the
// check against the old bytes.
type probeGuard struct {
	Disk
	mu sync.Mutex
}

func newProbeGuard(d Disk) *probeGuard { return &probeGuard{Disk: d} }

func (g *probeGuard) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(qcow2Magic)) {
		return g.Disk.WriteAt(ctx, p, off)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	head := make([]byte, len(qcow2Magic))
	if _, err := g.Disk.ReadAt(ctx, head, 0); err != nil {
		return 0, fmt.Errorf("probe guard: %w", err)
	}
	copy(head[off:], p)
	if bytes.Equal(head, qcow2Magic) {
		return 0, ErrProbedFormat
	}
	return g.Disk.WriteAt(ctx, p, off)
}

// Discard and WriteZeroes keep the guarded disk's optional capabilities;
// zeroes can never form the qcow2 magic.
func (g *probeGuard) Discard(ctx context.Context, off, n int64) error {
	if d, ok := g.Disk.(Discarder); ok {
		return d.Discard(ctx, off, n)
	}
	return errors.ErrUnsupported
}

func (g *probeGuard) WriteZeroes(ctx context.Context, off, n int64, unmap bool) error {
	if z, ok := g.Disk.(ZeroWriter); ok {
		return z.WriteZeroes(ctx, off, n, unmap)
	}
	return errors.ErrUnsupported
}
