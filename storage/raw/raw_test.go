package raw

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func allocated(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

func TestRawFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d.raw")
	d, err := Create(p, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if a := allocated(t, p); a != 0 {
		t.Fatalf("new image allocates %d bytes, want a sparse file", a)
	}
	if _, err := Create(p, 1<<20); !errors.Is(err, os.ErrExist) {
		t.Fatalf("create over an existing file: %v, want ErrExist", err)
	}
	data := bytes.Repeat([]byte{7}, 1<<20)
	if _, err := d.WriteAt(data, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	before := allocated(t, p)
	if err := d.Discard(4<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if after := allocated(t, p); after >= before {
		t.Fatalf("discard freed nothing: %d -> %d allocated bytes", before, after)
	}
	got := make([]byte, 1<<20)
	if _, err := d.ReadAt(got, 4<<20); err != nil || !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatalf("discarded range does not read as zeroes (%v)", err)
	}
	if _, err := d.WriteAt(data[:8192], 0); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(4096, 100, false); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Repeat([]byte{7}, 4096), make([]byte, 100)...)
	want = append(want, bytes.Repeat([]byte{7}, 8192-4196)...)
	if _, err := d.ReadAt(got[:8192], 0); err != nil || !bytes.Equal(got[:8192], want) {
		t.Fatalf("write zeroes: wrong content (%v)", err)
	}
	tests := []struct {
		name string
		off  int64
		n    int
	}{
		{name: "negative", off: -1, n: 1},
		{name: "past end", off: 16 << 20, n: 1},
		{name: "straddles end", off: 16<<20 - 1, n: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := d.ReadAt(make([]byte, tt.n), tt.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("read: %v", err)
			}
			if _, err := d.WriteAt(make([]byte, tt.n), tt.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("write: %v", err)
			}
			if err := d.Discard(tt.off, int64(tt.n)); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("discard: %v", err)
			}
		})
	}
	ro, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write to read-only: %v", err)
	}
	if err := ro.Discard(0, 512); !errors.Is(err, ErrReadOnly) {
		t.Errorf("discard on read-only: %v", err)
	}
	if ro.Size() != 16<<20 {
		t.Errorf("size %d", ro.Size())
	}
}
