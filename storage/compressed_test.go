package storage_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/storage"
)

// mixedContent is size bytes of what disks hold, cluster by cluster:
// zeroes, text that compresses well, random bytes that do not compress
// (qemu-img stores those uncompressed), runs of one byte, and a cluster
// that is half text and half random.
func mixedContent(size, cluster int) []byte {
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for c, off := 0, 0; off < size; c, off = c+1, off+cluster {
		p := b[off : off+cluster]
		switch c % 5 {
		case 1:
			for i := 0; i < len(p); {
				i += copy(p[i:], fmt.Sprintf("cluster %d line %d of a text file that compresses well\n", c, i))
			}
		case 2:
			for i := range p {
				p[i] = byte(r.Uint32())
			}
		case 3:
			for i := range p {
				p[i] = byte(c)
			}
		case 4:
			for i := range p[:len(p)/2] {
				p[i] = byte('a' + i%26)
			}
			for i := len(p) / 2; i < len(p); i++ {
				p[i] = byte(r.Uint32())
			}
		}
	}
	return b
}

// TestReadCompressedImages: an image qemu-img compressed (zlib, its
// default, and zstd, which qemu 5.1 added) reads back through OpenDisk
// exactly as its raw source, for small and large clusters.
func TestReadCompressedImages(t *testing.T) {
	testenv.RequireTool(t, "qemu-img")
	for _, compression := range []string{"zlib", "zstd"} {
		for _, cluster := range []int{512, 4096, 65536, 2 << 20} {
			t.Run(fmt.Sprintf("%s/%d", compression, cluster), func(t *testing.T) {
				dir := t.TempDir()
				src, img := filepath.Join(dir, "src.raw"), filepath.Join(dir, "c.qcow2")
				want := mixedContent(max(8<<20, 5*cluster), cluster)
				if err := os.WriteFile(src, want, 0o644); err != nil {
					t.Fatal(err)
				}
				opts := fmt.Sprintf("compression_type=%s,cluster_size=%d", compression, cluster)
				if out, err := exec.Command("qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, src, img).CombinedOutput(); err != nil {
					t.Fatalf("qemu-img convert: %v\n%s", err, out)
				}
				info, _ := exec.Command("qemu-img", "info", img).CombinedOutput()
				if !bytes.Contains(info, []byte("compression type: "+compression)) {
					t.Fatalf("qemu-img did not make a %s image:\n%s", compression, info)
				}
				d, err := storage.OpenDisk(img, "", true)
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				if d.Size() != int64(len(want)) {
					t.Fatalf("size %d, want %d", d.Size(), len(want))
				}
				// Reads of a whole disk, and of pieces that start and end
				// inside compressed clusters.
				got := make([]byte, len(want))
				if _, err := d.ReadAt(context.Background(), got, 0); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("read of the whole disk differs from the source at byte %d", firstDiff(got, want))
				}
				for _, off := range []int{cluster / 3, cluster + 100, 3*cluster - 7} {
					p := got[:min(cluster, len(want)-off)]
					if _, err := d.ReadAt(context.Background(), p, int64(off)); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(p, want[off:off+len(p)]) {
						t.Fatalf("read at %d differs from the source", off)
					}
				}
			})
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
