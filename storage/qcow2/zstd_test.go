package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// Hostile zstd cluster data, built by hand where an encoder would not
// make it: each is decoded into one cluster of zstdTestCluster bytes.
const zstdTestCluster = 4096

// zstdFrame builds a frame: fhd is the frame header descriptor, hdr the
// rest of the header (window descriptor, dictionary ID, content size),
// then the blocks (each already with its 3-byte header).
func zstdFrame(fhd byte, hdr []byte, blocks ...[]byte) []byte {
	b := append([]byte{0x28, 0xb5, 0x2f, 0xfd, fhd}, hdr...)
	for _, bl := range blocks {
		b = append(b, bl...)
	}
	return b
}

// zstdBlock is a block header (type 0 raw, 1 RLE, 2 compressed, 3
// reserved) followed by its content.
func zstdBlock(last bool, typ, size int, content []byte) []byte {
	h := uint32(typ)<<1 | uint32(size)<<3
	if last {
		h |= 1
	}
	return append([]byte{byte(h), byte(h >> 8), byte(h >> 16)}, content...)
}

// zstdEncode compresses p as one frame, as qemu does (content size in the
// header, no checksum unless asked).
func zstdEncode(p []byte, opts ...zstd.EOption) []byte {
	e, err := zstd.NewWriter(nil, append([]zstd.EOption{zstd.WithEncoderCRC(false)}, opts...)...)
	if err != nil {
		panic(err)
	}
	defer e.Close()
	return e.EncodeAll(p, nil)
}

func zstdCases() []struct {
	name string
	data []byte
	ok   bool
} {
	full := fill(9, zstdTestCluster)
	half := zstdTestCluster / 2
	one := zstdEncode(full)
	withCRC := zstdEncode(full, zstd.WithEncoderCRC(true))
	badCRC := bytes.Clone(withCRC)
	badCRC[len(badCRC)-1] ^= 0xff
	skippable := binary.LittleEndian.AppendUint32([]byte{0x50, 0x2a, 0x4d, 0x18}, 5)
	skippable = append(skippable, "hello"...)
	// A window of 2^27 declared, no content size: a raw block of a cluster.
	bigWindow := zstdFrame(0x00, []byte{17 << 3}, zstdBlock(true, 0, zstdTestCluster, full))
	// 2^28: past libzstd's default limit.
	hugeWindow := zstdFrame(0x00, []byte{18 << 3}, zstdBlock(true, 0, zstdTestCluster, full))
	// A bomb: no content size, a 128 MiB window, and RLE blocks of 128 KiB
	// each: 4 bytes of input per 128 KiB of output, 2 GiB in all.
	var bomb [][]byte
	for i := range 16384 {
		bomb = append(bomb, zstdBlock(i == 16383, 1, 128<<10, []byte{'A'}))
	}
	// Two raw blocks of a cluster each, in a frame that declares no size.
	twoClusters := zstdFrame(0x00, []byte{17 << 3}, zstdBlock(false, 0, zstdTestCluster, full), zstdBlock(true, 0, zstdTestCluster, full))
	return []struct {
		name string
		data []byte
		ok   bool
	}{
		{name: "one frame", data: one, ok: true},
		{name: "one frame then the next cluster's data", data: append(bytes.Clone(one), zstdEncode(fill(3, 999))...), ok: true},
		{name: "one frame then garbage", data: append(bytes.Clone(one), "garbage after the frame"...), ok: true},
		{name: "two frames of half a cluster", data: append(zstdEncode(full[:half]), zstdEncode(full[half:])...), ok: true},
		{name: "skippable frame first", data: append(bytes.Clone(skippable), one...), ok: true},
		{name: "checksum", data: withCRC, ok: true},
		{name: "big window declared", data: bigWindow, ok: true},
		{name: "bad checksum", data: badCRC},
		{name: "window past the limit", data: hugeWindow},
		{name: "content size past the cluster", data: zstdEncode(fill(9, 2*zstdTestCluster))},
		{name: "no content size, decodes past the cluster", data: twoClusters},
		{name: "bomb", data: zstdFrame(0x00, []byte{17 << 3}, bomb...)},
		{name: "half a cluster, then nothing", data: zstdEncode(full[:half])},
		{name: "half a cluster, then garbage", data: append(zstdEncode(full[:half]), "not a frame at all"...)},
		{name: "truncated frame", data: one[:len(one)/2]},
		{name: "truncated header", data: one[:5]},
		{name: "empty", data: nil},
		{name: "garbage", data: fill(4, 600)},
		{name: "zlib data", data: []byte{0x78, 0x9c, 0x63, 0x60, 0x00, 0x00}},
		{name: "reserved block type", data: zstdFrame(0x20, []byte{0}, zstdBlock(true, 3, 10, make([]byte, 10)))},
		{name: "raw block runs past the data", data: zstdFrame(0x00, []byte{17 << 3}, zstdBlock(true, 0, 100000, full))},
		{name: "dictionary frame", data: zstdFrame(0x01, []byte{17 << 3, 7}, zstdBlock(true, 0, zstdTestCluster, full))},
		{name: "skippable frame runs past the data", data: binary.LittleEndian.AppendUint32([]byte{0x50, 0x2a, 0x4d, 0x18}, 1<<31)},
	}
}

// TestZstdHostile: qemu's zstd semantics for what it accepts, and for
// everything else ErrCorrupt with no panic and no allocation beyond a
// cluster and a block, whatever the data claims.
func TestZstdHostile(t *testing.T) {
	im := &Image{cs: zstdTestCluster}
	want := fill(9, zstdTestCluster)
	dst := make([]byte, zstdTestCluster)
	if err := im.unzstd(dst, zstdEncode(want)); err != nil { // makes the decoder
		t.Fatal(err)
	}
	for _, tt := range zstdCases() {
		t.Run(tt.name, func(t *testing.T) {
			clear(dst)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := im.unzstd(dst, tt.data)
			runtime.ReadMemStats(&after)
			if tt.ok {
				if err != nil {
					t.Fatalf("unzstd: %v", err)
				}
				if !bytes.Equal(dst, want) {
					t.Fatal("decoded cluster differs")
				}
			} else if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("unzstd = %v, want ErrCorrupt", err)
			}
			// One 128 KiB block may be decoded before the limit stops it.
			if n := after.TotalAlloc - before.TotalAlloc; n > 512<<10 {
				t.Fatalf("decoding allocated %d bytes", n)
			}
		})
	}
}

// TestZstdDecoderLazy: opening and reading an image with no zstd cluster
// makes no zstd decoder.
func TestZstdDecoderLazy(t *testing.T) {
	p := filepath.Join(t.TempDir(), "z.qcow2")
	im, err := Create(p, 1<<20, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(context.Background(), fill(1, 8192), 0); err != nil {
		t.Fatal(err)
	}
	readAll(t, im)
	if im.zstd != nil {
		t.Fatal("zstd decoder made for an image without zstd clusters")
	}
	im.Close()
}

// TestZstdClusterInImage: a zstd image qemu-io wrote, with one cluster's
// L2 entry pointed at hostile data appended to the file: reads of that
// cluster fail with ErrCorrupt, so does a write into it, and every other
// cluster still reads and takes writes.
func TestZstdClusterInImage(t *testing.T) {
	needQemu(t, "qemu-io")
	for _, tt := range zstdCases() {
		if tt.ok || len(tt.data) > 16*512 { // what one descriptor can cover
			continue
		}
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "z.qcow2")
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,compression_type=zstd", p, "1M")
			run(t, "qemu-io", "-f", "qcow2", "-c", "write -c -P 0x41 0 12k", p)
			want := qemuRaw(t, p)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			// The L2 entry of guest cluster 1: compressed, 4 bits of
			// sector count above a 58-bit host offset (4 KiB clusters).
			l2 := be.Uint64(b[be.Uint64(b[40:]):]) & offsetMask
			if e := be.Uint64(b[l2+8:]); e&flagCompressed == 0 {
				t.Fatalf("fixture: guest cluster 1 is not compressed (%#x)", e)
			}
			host := uint64(len(b)+511) &^ 511
			sectors := max(1, (uint64(len(tt.data))+511)/512)
			be.PutUint64(b[l2+8:], flagCompressed|(sectors-1)<<58|host)
			b = append(b, make([]byte, host-uint64(len(b)))...)
			b = append(b, tt.data...)
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			im, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			buf := make([]byte, 4096)
			if _, err := im.ReadAt(context.Background(), buf, 4096); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("read of the hostile cluster: %v, want ErrCorrupt", err)
			}
			if _, err := im.WriteAt(context.Background(), buf[:512], 4096+512); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("write into the hostile cluster: %v, want ErrCorrupt", err)
			}
			for _, off := range []int64{0, 8192} {
				if _, err := im.ReadAt(context.Background(), buf, off); err != nil || !bytes.Equal(buf, want[off:off+4096]) {
					t.Fatalf("read of a good cluster at %d: %v", off, err)
				}
			}
			if _, err := im.WriteAt(context.Background(), fill(2, 512), 8192); err != nil {
				t.Fatalf("write into a good compressed cluster: %v", err)
			}
		})
	}
}

// FuzzZstdCluster: any bytes as zstd cluster data decode to exactly one
// cluster or fail with ErrCorrupt; never a panic. The seeds are the
// table's hostile and good cases.
func FuzzZstdCluster(f *testing.F) {
	for _, tt := range zstdCases() {
		if len(tt.data) < 64<<10 {
			f.Add(tt.data)
		}
	}
	im := &Image{cs: zstdTestCluster}
	dst := make([]byte, zstdTestCluster)
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := im.unzstd(dst, data); err != nil && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("unzstd: %v, not ErrCorrupt", err)
		}
	})
}
