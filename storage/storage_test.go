package storage_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
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
			if _, err := d.WriteAt(data, 70000); err != nil {
				t.Fatal(err)
			}
			if err := d.Flush(); err != nil {
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
			if _, err := d.ReadAt(got, 70000); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, data))
			}
			if _, err := d.WriteAt(data, 0); err == nil {
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

func TestProbedRawRefusesQcow2Magic(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := storage.OpenDisk(p, "", false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	hdr := append([]byte("QFI\xfb"), make([]byte, 508)...)
	if _, err := d.WriteAt(hdr, 0); !errors.Is(err, storage.ErrProbedFormat) {
		t.Fatalf("qcow2 magic written to a probed raw image: %v", err)
	}
	if _, err := d.WriteAt([]byte("\xfb"), 3); err != nil {
		t.Fatalf("a write that does not complete the magic: %v", err)
	}
	if _, err := d.WriteAt([]byte("QFI"), 0); !errors.Is(err, storage.ErrProbedFormat) {
		t.Fatalf("magic completed in two writes: %v", err)
	}
	if _, err := d.WriteAt([]byte("data"), 4096); err != nil {
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
	if _, err := d2.WriteAt(hdr, 0); err != nil {
		t.Fatalf("explicit raw: %v", err)
	}
}
