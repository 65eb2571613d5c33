package storage

import (
	"bytes"
	"errors"
	"fmt"
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
type probeGuard struct {
	Disk
}

func (g probeGuard) WriteAt(p []byte, off int64) (int, error) {
	if off < int64(len(qcow2Magic)) && off >= 0 {
		head := make([]byte, len(qcow2Magic))
		if _, err := g.Disk.ReadAt(head, 0); err != nil {
			return 0, fmt.Errorf("probe guard: %w", err)
		}
		copy(head[off:], p)
		if bytes.Equal(head, qcow2Magic) {
			return 0, ErrProbedFormat
		}
	}
	return g.Disk.WriteAt(p, off)
}

// Discard and WriteZeroes keep the guarded disk's optional capabilities;
// zeroes can never form the qcow2 magic.
func (g probeGuard) Discard(off, n int64) error {
	if d, ok := g.Disk.(Discarder); ok {
		return d.Discard(off, n)
	}
	return errors.ErrUnsupported
}

func (g probeGuard) WriteZeroes(off, n int64, unmap bool) error {
	if z, ok := g.Disk.(ZeroWriter); ok {
		return z.WriteZeroes(off, n, unmap)
	}
	return errors.ErrUnsupported
}
