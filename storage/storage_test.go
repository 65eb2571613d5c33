package storage_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/storage/raw"
)

func TestOpenDiskFormats(t *testing.T) {
	for _, format := range storage.Formats {
		t.Run(format, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "d."+format)
			d, err := storage.CreateDisk(p, format, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			data := bytes.Repeat([]byte{0xa5}, 3000)
			if _, err := d.WriteAt(context.Background(), data, 70000); err != nil {
				t.Fatal(err)
			}
			if err := d.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}
			d.Close()
			if got, err := storage.DetectFormat(p); err != nil || got != format {
				t.Fatalf("DetectFormat = %q, %v; want %q", got, err, format)
			}
			d, err = storage.OpenDisk(p, "", true)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			got := make([]byte, 3000)
			if _, err := d.ReadAt(context.Background(), got, 70000); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, data))
			}
			if _, err := d.WriteAt(context.Background(), data, 0); err == nil {
				t.Fatal("write to a read-only disk succeeded")
			}
		})
	}
}

func TestOpenDiskErrors(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, path, format, want string
	}{
		{name: "missing file", path: filepath.Join(dir, "nope.img"), want: "no such file"},
		{name: "unknown format", path: filepath.Join(dir, "nope.img"), format: "vmdk", want: `unknown format "vmdk"`},
		{name: "directory", path: dir, format: "raw", want: "is a directory"},
		{name: "raw bytes opened as qcow2", path: writeFile(t, dir, "r.img", 4096), format: "qcow2", want: "bad magic"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := storage.OpenDisk(tt.path, tt.format, false)
			if err == nil {
				d.Close()
				t.Fatal("open succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not mention %q", err, tt.want)
			}
		})
	}
	// A FIFO or a character device is refused at once: a read-only open
	// of a FIFO, or format detection, must not wait for a writer.
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{fifo, "/dev/null"} {
		for _, format := range []string{"", "raw", "qcow2"} {
			for _, ro := range []bool{true, false} {
				d, err := storage.OpenDisk(path, format, ro)
				if err == nil {
					d.Close()
					t.Fatalf("open %s (format %q, read-only %v) succeeded", path, format, ro)
				}
				if !errors.Is(err, raw.ErrNotFile) {
					t.Fatalf("open %s (format %q, read-only %v): %v, want %v", path, format, ro, err, raw.ErrNotFile)
				}
			}
		}
	}
	if _, err := storage.CreateDisk(filepath.Join(dir, "x"), "vmdk", 1); err == nil {
		t.Fatal("CreateDisk of an unknown format succeeded")
	}
}

func writeFile(t *testing.T, dir, name string, n int) string {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, make([]byte, n), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// openProbed makes a zeroed 1 MiB image and opens it without a format:
// raw, detected, so guarded.
func openProbed(t *testing.T) (string, storage.Disk) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := storage.OpenDisk(p, "", false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return p, d
}

// TestProbedRawConcurrentHalves: the virtio-blk device writes at once;
// two concurrent writes, each with half of the qcow2 magic, must not both
// pass the guard's check against the old bytes.
func TestProbedRawConcurrentHalves(t *testing.T) {
	_, d := openProbed(t)
	ctx := context.Background()
	for i := range 300 {
		if _, err := d.WriteAt(ctx, make([]byte, 4), 0); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for _, half := range []struct {
			b   string
			off int64
		}{{"QF", 0}, {"I\xfb", 2}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.WriteAt(ctx, []byte(half.b), half.off)
			}()
		}
		wg.Wait()
		head := make([]byte, 4)
		if _, err := d.ReadAt(ctx, head, 0); err != nil {
			t.Fatal(err)
		}
		if string(head) == "QFI\xfb" {
			t.Fatalf("round %d: two concurrent writes made the qcow2 magic", i)
		}
	}
}

func TestProbedRawRefusesQcow2Magic(t *testing.T) {
	p, d := openProbed(t)
	hdr := append([]byte("QFI\xfb"), make([]byte, 508)...)
	if _, err := d.WriteAt(context.Background(), hdr, 0); !errors.Is(err, storage.ErrProbedFormat) {
		t.Fatalf("qcow2 magic written to a probed raw image: %v", err)
	}
	if _, err := d.WriteAt(context.Background(), []byte("\xfb"), 3); err != nil {
		t.Fatalf("a write that does not complete the magic: %v", err)
	}
	if _, err := d.WriteAt(context.Background(), []byte("QFI"), 0); !errors.Is(err, storage.ErrProbedFormat) {
		t.Fatalf("magic completed in two writes: %v", err)
	}
	if _, err := d.WriteAt(context.Background(), []byte("data"), 4096); err != nil {
		t.Fatal(err)
	}
	if _, ok := d.(storage.Discarder); !ok {
		t.Fatal("guard hides Discard")
	}
	d.Close()
	if f, _ := storage.DetectFormat(p); f != "raw" {
		t.Fatalf("image now detects as %s", f)
	}
	// With format=raw the user said what it is: the write goes through.
	d2, err := storage.OpenDisk(p, "raw", false)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	if _, err := d2.WriteAt(context.Background(), hdr, 0); err != nil {
		t.Fatalf("explicit raw: %v", err)
	}
}
