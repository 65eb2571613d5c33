package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/rayvmm/rayvmm/storage"
)

// ImportOptions tune Import.
type ImportOptions struct {
	// Format of the new volume; "" keeps the source's format.
	Format string
	// Progress, if set, is called as bytes are copied.
	Progress func(done, total int64)
}

// importChunk is the copy unit; all-zero chunks are skipped so the new
// image stays sparse.
const importChunk = 1 << 20

// Import makes volume name from the image file at path (raw or qcow2,
// detected; a qcow2's backing chain is flattened into the copy).
func (s *Store) Import(path, name string, opts ImportOptions) (*Volume, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	src, err := storage.OpenDisk(path, "", true)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", path, err)
	}
	defer src.Close()
	format := opts.Format
	if format == "" {
		if format, err = storage.DetectFormat(path); err != nil {
			return nil, err
		}
	}
	if format != "raw" && format != "qcow2" {
		return nil, fmt.Errorf("%w: format %q (want raw or qcow2)", ErrInvalid, format)
	}
	size := (src.Size() + 511) &^ 511 // whole sectors for virtio-blk
	if size == 0 {
		return nil, fmt.Errorf("%w: import %s: the image is empty", ErrInvalid, path)
	}
	v := &Volume{Name: name, Format: format, Size: size, Path: s.newImagePath(name, format)}
	l, err := s.reserve(v)
	if err != nil {
		return nil, err
	}
	return s.finish(v, l, copyDisk(v.Path, format, size, src, opts.Progress))
}

func copyDisk(dst, format string, size int64, src storage.Disk, progress func(int64, int64)) (err error) {
	d, err := storage.CreateDisk(dst, format, size)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := d.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	ctx := context.Background() // local files: nothing to interrupt
	buf := make([]byte, importChunk)
	total := src.Size()
	for off := int64(0); off < total; off += importChunk {
		n := min(importChunk, total-off)
		if _, err := src.ReadAt(ctx, buf[:n], off); err != nil {
			return fmt.Errorf("import: read at %d: %w", off, err)
		}
		if !allZero(buf[:n]) {
			if _, err := d.WriteAt(ctx, buf[:n], off); err != nil {
				return fmt.Errorf("import: write at %d: %w", off, err)
			}
		}
		if progress != nil {
			progress(off+n, total)
		}
	}
	if err := d.Flush(ctx); err != nil {
		return errors.Join(fmt.Errorf("import: flush"), err)
	}
	return nil
}

// allZero reports whether b holds only zero bytes. It needs no zero
// buffer, so nothing is allocated at start-up by every rayvmm command.
func allZero(b []byte) bool {
	return len(b) == 0 || b[0] == 0 && bytes.Equal(b[1:], b[:len(b)-1])
}
