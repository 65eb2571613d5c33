package tests

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// textDisk is a raw disk image of size bytes that compresses well: lines
// of text in most blocks, zero blocks now and then.
func textDisk(t *testing.T, size int) (string, []byte) {
	t.Helper()
	b := make([]byte, size)
	for blk := 0; blk*4096 < size; blk++ {
		if blk%7 == 3 {
			continue
		}
		p := b[blk*4096 : (blk+1)*4096]
		for i := 0; i < len(p); {
			i += copy(p[i:], fmt.Sprintf("block %d: the quick brown fox %d\n", blk, i))
		}
	}
	p := filepath.Join(t.TempDir(), "src.raw")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

// zstdImage compresses src with qemu-img into a zstd qcow2 image.
func zstdImage(t *testing.T, src string, cluster int) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "z.qcow2")
	qemuImg(t, "convert", "-c", "-O", "qcow2", "-o", fmt.Sprintf("compression_type=zstd,cluster_size=%d", cluster), src, img)
	if info := qemuImg(t, "info", img); !strings.Contains(info, "compression type: zstd") {
		t.Fatalf("qemu-img made no zstd image:\n%s", info)
	}
	return img
}

// TestBlkZstd: a guest reads an image whose clusters qemu-img compressed
// with zstd and sums the same as it sums the raw source; a guest writes
// into such an image (partial writes into compressed clusters copy them
// out) and qemu-img finds it clean and equal to what was written.
func TestBlkZstd(t *testing.T) {
	requireKVM(t)
	src, raw := textDisk(t, 1<<20)
	const blocks = 48
	img := zstdImage(t, src, 4096)
	sumRaw := blkSums(t, bootOK(t, t.TempDir(), "--disk", "path="+src+",format=raw,readonly",
		"--cmdline", fmt.Sprintf("rayguest.run=blksum rayguest.blocks=%d", blocks)))["vda"]
	sumZstd := blkSums(t, bootOK(t, t.TempDir(), "--disk", "path="+img+",readonly",
		"--cmdline", fmt.Sprintf("rayguest.run=blksum rayguest.blocks=%d", blocks)))["vda"]
	if want := guestSum(raw[:blocks*4096]); sumRaw != want || sumZstd != want {
		t.Fatalf("blksum: raw source %q, zstd image %q; want %s for both", sumRaw, sumZstd, want)
	}

	// 64 KiB clusters: the guest's 4 KiB writes land inside compressed
	// clusters, which must be decompressed and copied out.
	img = zstdImage(t, src, 65536)
	const written = 20
	out := bootOK(t, t.TempDir(), "--disk", "path="+img, "--cmdline", fmt.Sprintf("rayguest.run=blktest rayguest.seed=11 rayguest.blocks=%d", written))
	if s := blkSums(t, out)["vda"]; s != guestSum(expectImage(written*4096, 11, written)) {
		t.Fatalf("blktest on the zstd image: sum %q\n%s", s, out)
	}
	qemuCheckClean(t, img)
	if out := qemuImg(t, "check", img); !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check after guest writes:\n%s", out)
	}
	want := bytes.Clone(raw)
	copy(want, expectImage(written*4096, 11, written))
	wantPath := filepath.Join(t.TempDir(), "want.raw")
	if err := os.WriteFile(wantPath, want, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "compare", "-f", "qcow2", "-F", "raw", img, wantPath)
}

// TestBlkZstdHostile: a zstd image with one cluster whose compressed data
// is a bomb gives the guest an I/O error status for that block (counted
// as a backend error in the metrics), not a crash; rayvmm exits cleanly.
func TestBlkZstdHostile(t *testing.T) {
	requireKVM(t)
	src, _ := textDisk(t, 256<<10)
	img := zstdImage(t, src, 4096)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// Point guest cluster 2's L2 entry at a bomb appended to the file: a
	// frame with no content size whose RLE blocks decode to 2 GiB.
	be := binary.BigEndian
	l2 := be.Uint64(b[be.Uint64(b[40:]):]) & 0x00fffffffffffe00
	if be.Uint64(b[l2+16:])>>62&1 == 0 {
		t.Fatal("fixture: cluster 2 is not compressed")
	}
	bomb := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 17 << 3}
	for i := range 2000 {
		h := uint32(1<<1 | (128<<10)<<3)
		if i == 1999 {
			h |= 1
		}
		bomb = append(bomb, byte(h), byte(h>>8), byte(h>>16), 'A')
	}
	host := uint64(len(b)+511) &^ 511
	be.PutUint64(b[l2+16:], 1<<62|15<<58|host)
	b = append(b, make([]byte, host-uint64(len(b)))...)
	b = append(b, bomb...)
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	metrics := filepath.Join(t.TempDir(), "m.json")
	r := run(t, nil, 3*time.Minute, "--state-dir", t.TempDir(), "boot", "--disk", "path="+img+",readonly", "--metrics-file", metrics, "--cmdline", "rayguest.run=blksum rayguest.blocks=8")
	if r.code != 0 || !strings.Contains(r.stdout, "rayguest: blk vda FAIL block 2 read status 1") {
		t.Fatalf("boot: exit %d, want 0 and the guest's read of block 2 failing with status 1\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	var m struct {
		Disks []struct {
			Metrics struct {
				Errors map[string]uint64 `json:"errors"`
			} `json:"metrics"`
		} `json:"disks"`
	}
	mb, err := os.ReadFile(metrics)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(mb, &m); err != nil || len(m.Disks) != 1 {
		t.Fatalf("metrics file: %v\n%s", err, mb)
	}
	if n := m.Disks[0].Metrics.Errors["io"]; n == 0 {
		t.Fatalf("metrics count no I/O error: %s", mb)
	}
	if _, err := exec.LookPath("qemu-img"); err == nil {
		// qemu agrees that the cluster is unreadable.
		if out, err := exec.Command("qemu-img", "convert", "-O", "raw", img, filepath.Join(t.TempDir(), "x")).CombinedOutput(); err == nil {
			t.Fatalf("qemu-img converted the hostile image:\n%s", out)
		}
	}
}
