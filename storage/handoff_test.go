package storage_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/storage/qcow2"
	"github.com/rayvmm/rayvmm/storage/raw"
)

// chainOf makes base.raw <- mid.qcow2 <- top.qcow2 (relative backing
// names, as qemu-img records them), each layer with its own block of data,
// and returns the top's path.
func chainOf(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{'b'}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, l := range []struct{ name, backing, format string }{{"mid.qcow2", "base.raw", "raw"}, {"top.qcow2", "mid.qcow2", "qcow2"}} {
		im, err := qcow2.Create(filepath.Join(dir, l.name), 1<<20, qcow2.CreateOptions{BackingFile: l.backing, BackingFormat: l.format})
		if err != nil {
			t.Fatal(err)
		}
		off := int64(64 << 10)
		if l.name == "top.qcow2" {
			off = 128 << 10
		}
		if _, err := im.WriteAt(context.Background(), bytes.Repeat([]byte(l.name[:1]), 4096), off); err != nil {
			t.Fatal(err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "top.qcow2")
}

// handOver duplicates the descriptors, as exec hands them to a child: the
// copies share the open file descriptions (and their locks).
func handOver(t *testing.T, files []storage.ImageFile) []storage.ImageFile {
	t.Helper()
	out := make([]storage.ImageFile, len(files))
	for i, f := range files {
		fd, err := unix.Dup(int(f.File.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		out[i] = f
		out[i].File = os.NewFile(uintptr(fd), f.File.Name())
	}
	return out
}

func readByte(t *testing.T, d storage.Disk, off int64) byte {
	t.Helper()
	b := make([]byte, 1)
	if _, err := d.ReadAt(context.Background(), b, off); err != nil {
		t.Fatal(err)
	}
	return b[0]
}

// TestHandOverChain: a qcow2 disk with a two-file backing chain, handed
// over as descriptors, reads every layer, writes, and keeps the image
// locked after the original opener released it.
func TestHandOverChain(t *testing.T) {
	top := chainOf(t)
	d, err := storage.OpenDisk(top, "", false)
	if err != nil {
		t.Fatal(err)
	}
	files, probed, err := storage.Files(d)
	if err != nil || probed || len(files) != 3 {
		t.Fatalf("Files = %d files, probed %v, %v", len(files), probed, err)
	}
	if files[1].Name != "mid.qcow2" || files[2].Name != "base.raw" || files[2].Format != "raw" {
		t.Fatalf("chain %+v", files)
	}
	got, err := storage.FromFiles(handOver(t, files), false, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := storage.Release(d); err != nil {
		t.Fatal(err)
	}
	for off, want := range map[int64]byte{0: 'b', 64 << 10: 'm', 128 << 10: 't'} {
		if b := readByte(t, got, off); b != want {
			t.Fatalf("byte at %d = %q, want %q", off, b, want)
		}
	}
	if _, err := storage.OpenDisk(top, "", false); !errors.Is(err, raw.ErrInUse) {
		t.Fatalf("second read-write open while the handed-over disk is open: %v, want ErrInUse", err)
	}
	if _, err := got.WriteAt(context.Background(), []byte("new"), 0); err != nil {
		t.Fatal(err)
	}
	if err := got.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := storage.OpenDisk(top, "", true)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if b := readByte(t, again, 0); b != 'n' {
		t.Fatalf("write through the handed-over disk lost: %q", b)
	}
}

// TestHandOverRefusesMismatch: files that are not the image's chain, in
// the wrong order, or too few or too many, are refused.
func TestHandOverRefusesMismatch(t *testing.T) {
	top := chainOf(t)
	d, err := storage.OpenDisk(top, "", true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	files, _, err := storage.Files(d)
	if err != nil {
		t.Fatal(err)
	}
	swapped := []storage.ImageFile{files[0], files[2], files[1]}
	renamed := append([]storage.ImageFile(nil), files...)
	renamed[1].Name = "other.qcow2"
	wrongFormat := append([]storage.ImageFile(nil), files...)
	wrongFormat[2].Format = "qcow2"
	for _, tt := range []struct {
		name  string
		files []storage.ImageFile
	}{
		{"swapped", swapped}, {"renamed", renamed}, {"wrong format", wrongFormat},
		{"missing base", files[:2]}, {"extra file", append(append([]storage.ImageFile(nil), files...), files[2])},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := storage.FromFiles(handOver(t, tt.files), true, false)
			if !errors.Is(err, qcow2.ErrChainMismatch) {
				t.Fatalf("FromFiles = %v, want ErrChainMismatch", err)
			}
		})
	}
}

// TestHandOverProbedRaw: a raw image whose format was detected keeps its
// guard against a guest writing a qcow2 header after the hand-over.
func TestHandOverProbedRaw(t *testing.T) {
	d, err := storage.OpenDisk(writeFile(t, t.TempDir(), "disk.img", 1<<20), "", false)
	if err != nil {
		t.Fatal(err)
	}
	files, probed, err := storage.Files(d)
	if err != nil || !probed {
		t.Fatalf("probed %v, %v", probed, err)
	}
	got, err := storage.FromFiles(handOver(t, files), false, probed)
	if err != nil {
		t.Fatal(err)
	}
	storage.Release(d)
	defer got.Close()
	if _, err := got.WriteAt(context.Background(), append([]byte("QFI\xfb"), make([]byte, 508)...), 0); !errors.Is(err, storage.ErrProbedFormat) {
		t.Fatalf("qcow2 magic through a handed-over probed raw disk: %v", err)
	}
}
