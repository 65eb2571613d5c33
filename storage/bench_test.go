package storage_test

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/rayvmm/rayvmm/storage"
)

const benchDiskSize = 64 << 20

// benchDisk makes a disk of the given format with every byte written, so
// that random I/O hits allocated clusters.
func benchDisk(b *testing.B, format string) storage.Disk {
	b.Helper()
	d, err := storage.CreateDisk(filepath.Join(b.TempDir(), "bench."+format), format, benchDiskSize)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < benchDiskSize; off += int64(len(buf)) {
		if _, err := d.WriteAt(context.Background(), buf, off); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { d.Close() })
	return d
}

// BenchmarkRandom4K compares 4 KiB random reads and writes on qcow2 (all
// clusters allocated) with a raw file, in one run: `go test -bench
// Random4K ./storage`.
func BenchmarkRandom4K(b *testing.B) {
	for _, format := range []string{"raw", "qcow2"} {
		for _, write := range []bool{false, true} {
			name := format + "/read"
			if write {
				name = format + "/write"
			}
			b.Run(name, func(b *testing.B) {
				d := benchDisk(b, format)
				r := rand.New(rand.NewPCG(1, 2))
				buf := make([]byte, 4096)
				b.SetBytes(4096)
				b.ResetTimer()
				for b.Loop() {
					off := r.Int64N(benchDiskSize/4096) * 4096
					var err error
					if write {
						_, err = d.WriteAt(context.Background(), buf, off)
					} else {
						_, err = d.ReadAt(context.Background(), buf, off)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
	// First writes to an empty qcow2: each allocates a cluster.
	b.Run("qcow2/allocating-write", func(b *testing.B) {
		d, err := storage.CreateDisk(filepath.Join(b.TempDir(), "a.qcow2"), "qcow2", 1<<40)
		if err != nil {
			b.Fatal(err)
		}
		defer d.Close()
		buf := make([]byte, 4096)
		b.SetBytes(4096)
		i := int64(0)
		for b.Loop() {
			if _, err := d.WriteAt(context.Background(), buf, i*(64<<10)); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}
