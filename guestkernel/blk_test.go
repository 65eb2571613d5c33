package guestkernel

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"
)

// The block pattern and checksum, as README.md defines them, computed here
// independently of the guest's C code.

func splitmix64(x uint64) uint64 {
	z := x + 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// patternBlock returns block b of the pattern for seed.
func patternBlock(seed, b uint64) []byte {
	p := make([]byte, 4096)
	for i := uint64(0); i < 512; i++ {
		binary.LittleEndian.PutUint64(p[8*i:], splitmix64(seed*0x100000000+b)+i*0x9e3779b97f4a7c15)
	}
	return p
}

// blockSum folds the first n 4 KiB blocks of data into the checksum.
func blockSum(data []byte, n int) string {
	h := uint64(0xcbf29ce484222325)
	for off := 0; off < n*4096; off += 8 {
		h = (h ^ binary.LittleEndian.Uint64(data[off:])) * 0x100000001b3
	}
	return fmt.Sprintf("%016x", h)
}

type disk struct {
	size     int64
	readOnly bool
	fill     string // "", "random", or "pattern:SEED"
}

// blkGuest creates the disk images and a guest with one virtio-blk-device
// per disk. QEMU microvm lists virtio-mmio devices on the command line only
// with ACPI off, and its virtio-mmio is legacy unless told otherwise.
func blkGuest(t *testing.T, cmdline string, disks []disk) (guest, []string) {
	t.Helper()
	g := guest{machine: "microvm,acpi=off", cmdline: cmdline,
		extra: []string{"-global", "virtio-mmio.force-legacy=false"}}
	var paths []string
	for i, d := range disks {
		p := filepath.Join(t.TempDir(), fmt.Sprintf("d%d.img", i))
		data := make([]byte, d.size)
		switch {
		case d.fill == "random":
			rand.Read(data)
		case len(d.fill) > 8 && d.fill[:8] == "pattern:":
			var seed uint64
			fmt.Sscan(d.fill[8:], &seed)
			for b := int64(0); b*4096 < d.size; b++ {
				copy(data[b*4096:], patternBlock(seed, uint64(b)))
			}
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		ro := ""
		if d.readOnly {
			ro = ",readonly=on"
		}
		g.extra = append(g.extra,
			"-drive", fmt.Sprintf("id=d%d,file=%s,format=raw,if=none%s", i, p, ro),
			"-device", fmt.Sprintf("virtio-blk-device,drive=d%d", i))
		paths = append(paths, p)
	}
	return g, paths
}

func TestBlk(t *testing.T) {
	type result struct {
		line    string // expected output line, with %s for the sum
		written uint64 // pattern seed written to the first blocks, 0 = untouched
		blocks  int
	}
	tests := []struct {
		name    string
		cmdline string
		disks   []disk
		want    []result
	}{
		{name: "blktest two disks", cmdline: "rayguest.run=blktest",
			disks: []disk{{size: 1 << 20}, {size: 64 << 10, fill: "random"}},
			want: []result{{"rayguest: blk vda ok sectors=2048 sum=%s", 1, 16},
				{"rayguest: blk vdb ok sectors=128 sum=%s", 1, 16}}},
		{name: "blocks clamp to capacity", cmdline: "rayguest.run=blktest rayguest.blocks=100",
			disks: []disk{{size: 12 << 10}},
			want:  []result{{"rayguest: blk vda ok sectors=24 sum=%s", 1, 3}}},
		{name: "seed and blocks", cmdline: "rayguest.run=blktest rayguest.seed=42 rayguest.blocks=5",
			disks: []disk{{size: 1 << 20, fill: "random"}},
			want:  []result{{"rayguest: blk vda ok sectors=2048 sum=%s", 42, 5}}},
		{name: "read-only disk is only read", cmdline: "rayguest.run=blktest",
			disks: []disk{{size: 1 << 20, readOnly: true, fill: "random"}},
			want:  []result{{"rayguest: blk vda ok sectors=2048 sum=%s", 0, 16}}},
		{name: "blksum reads", cmdline: "rayguest.run=blksum rayguest.blocks=7",
			disks: []disk{{size: 1 << 20, fill: "random"}},
			want:  []result{{"rayguest: blk vda ok sectors=2048 sum=%s", 0, 7}}},
		{name: "blkwrite on read-only disk fails", cmdline: "rayguest.run=blkwrite",
			disks: []disk{{size: 1 << 20, readOnly: true, fill: "random"}, {size: 1 << 20}},
			want: []result{{"rayguest: blk vda write status=1", 0, 0},
				{"rayguest: blk vdb write status=0", 1, 16}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, paths := blkGuest(t, tt.cmdline, tt.disks)
			before := make([][]byte, len(paths))
			for i, p := range paths {
				before[i], _ = os.ReadFile(p)
			}
			lines := bootQEMU(t, g)
			var want []string
			for i, r := range tt.want {
				after, err := os.ReadFile(paths[i])
				if err != nil {
					t.Fatal(err)
				}
				expect := append([]byte(nil), before[i]...)
				for b := 0; r.written != 0 && b < r.blocks; b++ {
					copy(expect[b*4096:], patternBlock(r.written, uint64(b)))
				}
				if !bytes.Equal(after, expect) {
					t.Errorf("vd%c: disk contents differ from what the guest should have written", 'a'+i)
				}
				line := r.line
				if bytes.Contains([]byte(line), []byte("%s")) {
					line = fmt.Sprintf(line, blockSum(after, r.blocks))
				}
				want = append(want, regexp.QuoteMeta(line))
			}
			expectLines(t, lines, want...)
			rejectLines(t, lines, "rayguest: blk .* FAIL.*")
		})
	}
}

func TestBlkNoDisks(t *testing.T) {
	lines := bootQEMU(t, guest{cmdline: "rayguest.run=blktest"})
	expectLines(t, lines, "rayguest: blk no disks")
}
