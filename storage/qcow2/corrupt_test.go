package qcow2

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// goodImage returns the bytes of a small valid image with one data
// cluster: header @0, refcount table @64K, refcount block @128K, L1
// @192K, L2 @256K, data @320K.
func goodImage(t testing.TB) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "good.qcow2")
	im, err := Create(p, 1<<20, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(context.Background(), fill(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 6<<16 || be.Uint64(b[3<<16:]) != flagCopied|4<<16 || be.Uint64(b[4<<16:]) != flagCopied|5<<16 {
		t.Fatalf("unexpected layout of the fixture image (%d bytes)", len(b))
	}
	return b
}

func TestCorruptImagesRefused(t *testing.T) {
	const l1, l2 = 3 << 16, 4 << 16
	tests := []struct {
		name    string
		mutate  func(b []byte) []byte
		want    error // at open
		readErr bool  // opens, but reading offset 0 fails
	}{
		{name: "bad magic", mutate: func(b []byte) []byte { b[0] = 'X'; return b }, want: ErrCorrupt},
		{name: "truncated header", mutate: func(b []byte) []byte { return b[:50] }, want: ErrCorrupt},
		{name: "version 4", mutate: func(b []byte) []byte { be.PutUint32(b[4:], 4); return b }, want: ErrUnsupported},
		{name: "cluster bits 8", mutate: func(b []byte) []byte { be.PutUint32(b[20:], 8); return b }, want: ErrCorrupt},
		{name: "cluster bits 22", mutate: func(b []byte) []byte { be.PutUint32(b[20:], 22); return b }, want: ErrCorrupt},
		{name: "header length too small", mutate: func(b []byte) []byte { be.PutUint32(b[100:], 80); return b }, want: ErrCorrupt},
		{name: "encrypted", mutate: func(b []byte) []byte { be.PutUint32(b[32:], 1); return b }, want: ErrUnsupported},
		{name: "unknown incompatible bit", mutate: func(b []byte) []byte { b[79] |= 1 << 5; return b }, want: ErrUnsupported},
		{name: "external data file", mutate: func(b []byte) []byte { b[79] |= incDataFile; return b }, want: ErrUnsupported},
		{name: "extended L2", mutate: func(b []byte) []byte { b[79] |= incExtendedL2; return b }, want: ErrUnsupported},
		{name: "unknown compression type", mutate: func(b []byte) []byte { b[104], b[79] = 2, b[79]|incCompression; return b }, want: ErrUnsupported},
		{name: "zstd without the compression type bit", mutate: func(b []byte) []byte { b[104] = compressionZstd; return b }, want: ErrCorrupt},
		{name: "compression type bit with zlib", mutate: func(b []byte) []byte { b[79] |= incCompression; return b }, want: ErrCorrupt},
		{name: "compression type bit, header without the type", mutate: func(b []byte) []byte {
			b[79] |= incCompression
			b[104] = compressionZstd
			be.PutUint32(b[100:], v3HeaderLen)
			return b
		}, want: ErrCorrupt},
		{name: "refcount order 7", mutate: func(b []byte) []byte { be.PutUint32(b[96:], 7); return b }, want: ErrCorrupt},
		{name: "virtual size beyond L1", mutate: func(b []byte) []byte { be.PutUint64(b[24:], 1<<40); return b }, want: ErrCorrupt},
		{name: "huge L1", mutate: func(b []byte) []byte { be.PutUint32(b[36:], 1<<30); return b }, want: ErrCorrupt},
		{name: "L1 unaligned", mutate: func(b []byte) []byte { be.PutUint64(b[40:], l1+8); return b }, want: ErrCorrupt},
		{name: "L1 outside file", mutate: func(b []byte) []byte { be.PutUint64(b[40:], 1<<40); return b }, want: ErrCorrupt},
		{name: "refcount table at 0", mutate: func(b []byte) []byte { be.PutUint64(b[48:], 0); return b }, want: ErrCorrupt},
		{name: "refcount table outside file", mutate: func(b []byte) []byte { be.PutUint64(b[48:], 1<<30); return b }, want: ErrCorrupt},
		{name: "refcount table too big", mutate: func(b []byte) []byte { be.PutUint32(b[56:], 1<<20); return b }, want: ErrCorrupt},
		{name: "backing name too long", mutate: func(b []byte) []byte {
			be.PutUint64(b[8:], 1024)
			be.PutUint32(b[16:], 5000)
			return b
		}, want: ErrCorrupt},
		{name: "backing name outside first cluster", mutate: func(b []byte) []byte {
			be.PutUint64(b[8:], 1<<16-4)
			be.PutUint32(b[16:], 10)
			return b
		}, want: ErrCorrupt},
		{name: "backing name offset wraps around", mutate: func(b []byte) []byte {
			be.PutUint64(b[8:], 1<<64-1)
			be.PutUint32(b[16:], 2)
			return b
		}, want: ErrCorrupt},
		{name: "header extension runs off the cluster", mutate: func(b []byte) []byte {
			be.PutUint32(b[112:], 0x12345678)
			be.PutUint32(b[116:], 1<<20)
			return b
		}, want: ErrCorrupt},
		{name: "snapshot table outside file", mutate: func(b []byte) []byte {
			be.PutUint32(b[60:], 1)
			be.PutUint64(b[64:], 1<<40)
			return b
		}, want: ErrCorrupt},
		{name: "L1 entry outside file", mutate: func(b []byte) []byte { be.PutUint64(b[l1:], flagCopied|1<<40); return b }, want: ErrCorrupt},
		{name: "L1 entry unaligned", mutate: func(b []byte) []byte { be.PutUint64(b[l1:], flagCopied|(l2+512)); return b }, want: ErrCorrupt},
		{name: "L1 entry reserved bits", mutate: func(b []byte) []byte { b[l1+7] |= 1; return b }, want: ErrCorrupt},
		{name: "L2 entry outside file", mutate: func(b []byte) []byte { be.PutUint64(b[l2:], flagCopied|1<<40); return b }, readErr: true},
		{name: "L2 entry unaligned", mutate: func(b []byte) []byte { be.PutUint64(b[l2:], flagCopied|(5<<16+512)); return b }, readErr: true},
		{name: "L2 entry reserved bits", mutate: func(b []byte) []byte { b[l2] |= 0x10; return b }, readErr: true},
		{name: "compressed cluster outside file", mutate: func(b []byte) []byte { be.PutUint64(b[l2:], flagCompressed|1<<40); return b }, readErr: true},
		{name: "compressed cluster garbage", mutate: func(b []byte) []byte { be.PutUint64(b[l2:], flagCompressed|5<<16); return b }, readErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "bad.qcow2")
			if err := os.WriteFile(p, tt.mutate(goodImage(t)), 0o644); err != nil {
				t.Fatal(err)
			}
			for _, ro := range []bool{true, false} {
				im, err := Open(p, Options{ReadOnly: ro})
				if tt.want != nil {
					if !errors.Is(err, tt.want) {
						t.Fatalf("open (read-only %v): %v, want %v", ro, err, tt.want)
					}
					continue
				}
				if err != nil {
					t.Fatalf("open (read-only %v): %v", ro, err)
				}
				_, rerr := im.ReadAt(context.Background(), make([]byte, 4096), 0)
				if tt.readErr && !errors.Is(rerr, ErrCorrupt) {
					t.Errorf("read (read-only %v): %v, want ErrCorrupt", ro, rerr)
				}
				if !ro {
					if _, werr := im.WriteAt(context.Background(), make([]byte, 512), 512); werr == nil {
						t.Errorf("write through a corrupt L2 table succeeded")
					}
				}
				im.Close()
			}
		})
	}
}

// TestFeatureBitsForWriting: images that open read-only but not
// read-write.
func TestFeatureBitsForWriting(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(b []byte) []byte
		want   error
	}{
		{name: "dirty", mutate: func(b []byte) []byte { b[79] |= incDirty; return b }, want: ErrUnsupported},
		{name: "marked corrupt", mutate: func(b []byte) []byte { b[79] |= incCorrupt; return b }, want: ErrCorrupt},
		{name: "internal snapshot", mutate: func(b []byte) []byte { be.PutUint32(b[60:], 1); be.PutUint64(b[64:], 5<<16); return b }, want: ErrUnsupported},
		{name: "8-bit refcounts", mutate: func(b []byte) []byte { be.PutUint32(b[96:], 3); return b }, want: ErrUnsupported},
		{name: "version 2", mutate: func(b []byte) []byte { be.PutUint32(b[4:], 2); return b }, want: ErrUnsupported},
		// A refcount table whose entries all name empty refcount blocks
		// must not make a read-write open read each of them: the scan for
		// where allocation may start is bounded, and an image that would
		// need more is refused for writing.
		{name: "refcount table of empty blocks", mutate: func(b []byte) []byte {
			const empty = 6 << 16 // a zero cluster appended to the file
			for i := 1; i < 1<<16/8; i++ {
				be.PutUint64(b[1<<16+i*8:], empty)
			}
			return append(b, make([]byte, 1<<16)...)
		}, want: ErrCorrupt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.mutate(goodImage(t))
			p := filepath.Join(t.TempDir(), "x.qcow2")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			im, err := Open(p, Options{ReadOnly: true})
			if err != nil {
				t.Fatalf("read-only open: %v", err)
			}
			sameBytes(t, "read", readAll(t, im)[:4096], fill(1, 4096))
			im.Close()
			if _, err := Open(p, Options{}); !errors.Is(err, tt.want) {
				t.Fatalf("read-write open: %v, want %v", err, tt.want)
			}
		})
	}
}

func TestAutoclearClearedOnWrite(t *testing.T) {
	b := goodImage(t)
	b[95] = 1 // bitmaps extension bit
	p := filepath.Join(t.TempDir(), "x.qcow2")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	im, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	got, _ := os.ReadFile(p)
	if be.Uint64(got[88:]) != 0 {
		t.Fatalf("autoclear bits %#x after a read-write open, want 0", be.Uint64(got[88:]))
	}
}

// A read-write open that fails (here on a missing backing file) leaves
// the image as it was: its autoclear bits are cleared only once it is
// open.
func TestFailedOpenLeavesAutoclear(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	im, err := Create(base, 1<<20, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	p := filepath.Join(dir, "top.qcow2")
	if im, err = Create(p, 0, CreateOptions{BackingFile: "base.qcow2"}); err != nil {
		t.Fatal(err)
	}
	im.Close()
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[95] = 1 // bitmaps extension bit
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p, Options{}); !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("open with the backing file gone: %v, want not-exist", err)
	}
	after, _ := os.ReadFile(p)
	if !bytes.Equal(after, b) {
		t.Fatal("a failed read-write open changed the image")
	}
}

func TestOutOfRangeIO(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.qcow2")
	im, err := Create(p, 1<<20, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	tests := []struct {
		name string
		off  int64
		n    int
	}{
		{name: "negative", off: -1, n: 1},
		{name: "past end", off: 1 << 20, n: 1},
		{name: "straddles end", off: 1<<20 - 100, n: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := im.ReadAt(context.Background(), make([]byte, tt.n), tt.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("read: %v, want ErrOutOfRange", err)
			}
			if _, err := im.WriteAt(context.Background(), make([]byte, tt.n), tt.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("write: %v, want ErrOutOfRange", err)
			}
			if err := im.WriteZeroes(context.Background(), tt.off, int64(tt.n), true); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("write zeroes: %v, want ErrOutOfRange", err)
			}
		})
	}
	im.Close() // a read-write open excludes read-only ones (image locking)
	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt(context.Background(), []byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write to read-only image: %v, want ErrReadOnly", err)
	}
}

// FuzzOpen opens arbitrary bytes as an image, read-only and then
// read-write, and does I/O on it. It must never panic or hang.
//
// The seeds are small (512-byte clusters): the fuzzer mutates and
// minimizes large inputs so slowly that a 384 KiB seed stalls it. Run it
// with a short -fuzzminimizetime (say 20x) for the same reason.
func FuzzOpen(f *testing.F) {
	p := filepath.Join(f.TempDir(), "small.qcow2")
	im, err := Create(p, 64<<10, CreateOptions{ClusterSize: 512})
	if err != nil {
		f.Fatal(err)
	}
	_, err = im.WriteAt(context.Background(), fill(1, 1500), 100)
	if err == nil {
		err = im.WriteZeroes(context.Background(), 4096, 4096, false)
	}
	if err == nil {
		err = im.Close()
	}
	if err != nil {
		f.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "f.qcow2")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		im, err := Open(p, Options{ReadOnly: true})
		if err != nil {
			return
		}
		size := im.Size()
		buf := make([]byte, 8192)
		for _, off := range []int64{0, size / 2, size - int64(len(buf))} {
			if off >= 0 && off+int64(len(buf)) <= size {
				im.ReadAt(context.Background(), buf, off)
			}
		}
		im.Close()
		im, err = Open(p, Options{})
		if err != nil {
			return
		}
		defer im.Close()
		for _, off := range []int64{0, size / 3} {
			if off+1000 <= size {
				im.WriteAt(context.Background(), buf[:1000], off)
				im.ReadAt(context.Background(), buf[:1000], off)
			}
		}
		if size >= 1<<16 {
			im.WriteZeroes(context.Background(), 0, 1<<16, true)
		}
	})
}

// A last data cluster that the file ends inside (as after a crash while
// extending) reads as its bytes followed by zeroes.
func TestDataClusterPastEndOfFile(t *testing.T) {
	b := goodImage(t)
	p := filepath.Join(t.TempDir(), "short.qcow2")
	if err := os.WriteFile(p, b[:5<<16+2048], 0o644); err != nil {
		t.Fatal(err)
	}
	im, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, 4096)
	if _, err := im.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(fill(1, 4096)[:2048], make([]byte, 2048)...)
	sameBytes(t, "short cluster", got, want)
}
