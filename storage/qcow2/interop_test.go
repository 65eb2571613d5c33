package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// op is one step of a scripted workload applied both to an image and to a
// plain byte slice (the model).
type op struct {
	kind   string // "write", "zero", "zero-keep", "discard"
	off, n int64
	seed   uint64
}

func applyOps(t *testing.T, im *Image, model []byte, ops []op) {
	t.Helper()
	for _, o := range ops {
		var err error
		switch o.kind {
		case "write":
			d := fill(o.seed, int(o.n))
			_, err = im.WriteAt(context.Background(), d, o.off)
			copy(model[o.off:], d)
		case "zero":
			err = im.WriteZeroes(context.Background(), o.off, o.n, true)
			clear(model[o.off : o.off+o.n])
		case "zero-keep":
			err = im.WriteZeroes(context.Background(), o.off, o.n, false)
			clear(model[o.off : o.off+o.n])
		case "discard":
			err = im.Discard(context.Background(), o.off, o.n)
			clear(model[o.off : o.off+o.n])
		}
		if err != nil {
			t.Fatalf("%s %d+%d: %v", o.kind, o.off, o.n, err)
		}
	}
}

// randomOps makes a mixed workload of aligned and unaligned writes,
// zeroing and discards over a disk of size bytes.
func randomOps(seed uint64, size int64, count int) []op {
	r := rand.New(rand.NewPCG(seed, 1))
	var ops []op
	for i := range count {
		n := int64(1+r.IntN(64)) * 512
		if r.IntN(4) == 0 {
			n = int64(1 + r.IntN(200000))
		}
		n = min(n, size)
		off := r.Int64N(size - n + 1)
		if r.IntN(2) == 0 {
			off &^= 4095
		}
		k := "write"
		switch r.IntN(10) {
		case 0:
			k = "zero"
		case 1:
			k = "discard"
		case 2:
			k = "zero-keep"
		}
		ops = append(ops, op{kind: k, off: off, n: n, seed: seed*1000 + uint64(i)})
	}
	return ops
}

// TestWriteThenQemuReads writes images with rayvmm and has qemu-img check
// them and read them back.
func TestWriteThenQemuReads(t *testing.T) {
	needQemu(t)
	tests := []struct {
		name        string
		clusterSize int64
		size        int64
		ops         int
		smallCache  bool
	}{
		{name: "64k clusters", clusterSize: 64 << 10, size: 64 << 20, ops: 300},
		{name: "512 byte clusters grow the refcount table", clusterSize: 512, size: 24 << 20, ops: 400},
		{name: "4k clusters", clusterSize: 4096, size: 16<<20 + 3*512, ops: 300},
		{name: "2M clusters", clusterSize: 2 << 20, size: 40 << 20, ops: 60},
		{name: "L2 cache evictions", clusterSize: 4096, size: 48 << 20, ops: 300, smallCache: true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.smallCache {
				saved := l2CacheBytes
				l2CacheBytes = 0 // four tables for 24 tables' worth of disk
				defer func() { l2CacheBytes = saved }()
			}
			p := filepath.Join(t.TempDir(), "disk.qcow2")
			im, err := Create(p, tt.size, CreateOptions{ClusterSize: tt.clusterSize})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, tt.size)
			applyOps(t, im, model, randomOps(uint64(i+1), tt.size, tt.ops))
			sameBytes(t, "rayvmm read-back", readAll(t, im), model)
			if tt.clusterSize == 512 && im.h.rtOff == 512 {
				t.Fatalf("refcount table never moved; the growth path was not exercised")
			}
			if err := im.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			requireClean(t, p)
			sameBytes(t, "qemu-img convert", qemuRaw(t, p), model)

			// Reopen: everything persisted, and more writes stay clean.
			im, err = Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			sameBytes(t, "after reopen", readAll(t, im), model)
			applyOps(t, im, model, randomOps(uint64(i+100), tt.size, tt.ops/3))
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			requireClean(t, p)
			sameBytes(t, "qemu-img convert after reopen", qemuRaw(t, p), model)
		})
	}
}

// TestReadQemuWritten reads images that qemu-img and qemu-io wrote,
// including zero clusters, discards and compressed clusters.
func TestReadQemuWritten(t *testing.T) {
	needQemu(t, "qemu-io")
	tests := []struct {
		name   string
		create []string
		io     []string
	}{
		{name: "v3 patterns", create: []string{"-o", "cluster_size=65536"},
			io: []string{"write -P 0xab 0 64k", "write -P 0xcd 100k 3k", "write -P 0x11 1m 200k", "write -z 1050k 64k", "discard 1m 64k"}},
		{name: "v2 image", create: []string{"-o", "compat=0.10,cluster_size=4096"},
			io: []string{"write -P 0x5a 4k 12k", "write -P 0x01 9m 1k"}},
		{name: "compressed clusters", create: []string{"-o", "cluster_size=65536"},
			io: []string{"write -c -P 0x77 0 64k", "write -c -P 0x78 128k 64k", "write -P 0x79 130k 1k"}},
		{name: "preallocated metadata", create: []string{"-o", "preallocation=metadata,cluster_size=32768"},
			io: []string{"write -P 0x42 5k 40k"}},
		{name: "8-bit refcounts", create: []string{"-o", "refcount_bits=8"},
			io: []string{"write -P 0x42 5k 40k"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "q.qcow2")
			run(t, "qemu-img", append(append([]string{"create", "-q", "-f", "qcow2"}, tt.create...), p, "10M")...)
			for _, c := range tt.io {
				run(t, "qemu-io", "-f", "qcow2", "-c", c, p)
			}
			want := qemuRaw(t, p)
			im, err := Open(p, Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			sameBytes(t, "rayvmm read of qemu image", readAll(t, im), want)
		})
	}
}

// TestWriteQemuWritten writes into an image qemu wrote, then qemu checks
// and reads it.
func TestWriteQemuWritten(t *testing.T) {
	needQemu(t, "qemu-io")
	p := filepath.Join(t.TempDir(), "q.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "32M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", "-c", "write -z 1m 128k", "-c", "write -P 0x12 2m 4k", p)
	model := qemuRaw(t, p)
	im, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	applyOps(t, im, model, []op{
		{kind: "write", off: 4096, n: 4096, seed: 1},
		{kind: "write", off: 1<<20 + 512, n: 1000, seed: 2}, // into a zero cluster
		{kind: "write", off: 2<<20 + 8192, n: 70000, seed: 3},
		{kind: "discard", off: 0, n: 64 << 10},
	})
	applyOps(t, im, model, randomOps(7, 32<<20, 100))
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	requireClean(t, p)
	sameBytes(t, "qemu-img convert", qemuRaw(t, p), model)
	// qemu writes on top of ours, and reading stays consistent.
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xee 3m 8k", p)
	for i := 3 << 20; i < 3<<20+8192; i++ {
		model[i] = 0xee
	}
	im, err = Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	sameBytes(t, "after qemu wrote", readAll(t, im), model)
}

// TestBackingChain builds base <- mid <- top with a mix of qemu-img and
// rayvmm, writes through rayvmm and checks what qemu sees.
func TestBackingChain(t *testing.T) {
	needQemu(t, "qemu-io")
	for _, baseFmt := range []string{"raw", "qcow2"} {
		t.Run("base "+baseFmt, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base."+baseFmt)
			run(t, "qemu-img", "create", "-q", "-f", baseFmt, base, "8M")
			run(t, "qemu-io", "-f", baseFmt, "-c", "write -P 0x11 0 3m", "-c", "write -P 0x22 6m 1m", base)
			// mid made by qemu-img with a relative backing name.
			mid := filepath.Join(dir, "mid.qcow2")
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base."+baseFmt, "-F", baseFmt, mid, "10M")
			run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1m 64k", mid)
			// top made by rayvmm.
			top := filepath.Join(dir, "top.qcow2")
			im, err := Create(top, 0, CreateOptions{BackingFile: "mid.qcow2", ClusterSize: 4096})
			if err != nil {
				t.Fatal(err)
			}
			if im.Size() != 10<<20 {
				t.Fatalf("overlay size %d, want the backing file's 10M", im.Size())
			}
			model := qemuRaw(t, mid)
			sameBytes(t, "overlay before writes", readAll(t, im), model)
			// Partial writes into clusters only the backing has: the rest
			// of each cluster is copied from below.
			applyOps(t, im, model, []op{
				{kind: "write", off: 100, n: 200, seed: 1},
				{kind: "write", off: 1<<20 + 1000, n: 5000, seed: 2},
				{kind: "zero", off: 6 << 20, n: 8192},
				{kind: "write", off: 9<<20 + 10, n: 10, seed: 3}, // past the base's end
			})
			applyOps(t, im, model, randomOps(11, 10<<20, 80))
			sameBytes(t, "overlay read-back", readAll(t, im), model)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			requireClean(t, top)
			sameBytes(t, "qemu-img convert of the chain", qemuRaw(t, top), model)
			info := run(t, "qemu-img", "info", "--backing-chain", top)
			for _, f := range []string{"top.qcow2", "mid.qcow2", "base." + baseFmt} {
				if !strings.Contains(info, "image: "+filepath.Join(dir, f)) && !strings.Contains(info, "image: "+f) {
					t.Errorf("qemu-img info --backing-chain does not list %s:\n%s", f, info)
				}
			}
			// The lower layers are untouched.
			requireClean(t, mid)
		})
	}
}

func TestBackingErrors(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a.qcow2")
	b := filepath.Join(dir, "b.qcow2")
	im, err := Create(b, 1<<20, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	im, err = Create(a, 0, CreateOptions{BackingFile: "b.qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	// Point b at a: a loop.
	setBacking(t, b, "a.qcow2", "qcow2")
	if _, err := Open(a, Options{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "loops") {
		t.Fatalf("open of a looping chain: %v, want a loop error", err)
	}
	// A missing backing file.
	setBacking(t, b, "gone.qcow2", "qcow2")
	if _, err := Open(a, Options{ReadOnly: true}); err == nil || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("open with a missing backing file: %v, want not-exist", err)
	}
	// A chain deeper than the limit.
	prev := "b.qcow2"
	im, err = Create(b+"x", 1<<20, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	prev = "b.qcow2x"
	for i := range MaxBackingDepth + 1 {
		name := fmt.Sprintf("l%d.qcow2", i)
		im, err := Create(filepath.Join(dir, name), 0, CreateOptions{BackingFile: prev, BackingFormat: "qcow2"})
		if err != nil {
			if i == MaxBackingDepth && strings.Contains(err.Error(), "deeper") {
				return
			}
			t.Fatalf("layer %d: %v", i, err)
		}
		im.Close()
		prev = name
	}
	if _, err := Open(filepath.Join(dir, prev), Options{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "deeper") {
		t.Fatalf("open of a %d-deep chain: %v, want a depth error", MaxBackingDepth+2, err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		if n := u.Unwrap(); n != nil {
			err = n
			continue
		}
		return err
	}
}

// TestWriteQemuOverlay writes into an overlay that qemu-img created with
// -b base.qcow2 -F qcow2, as a guest booted on it would.
func TestWriteQemuOverlay(t *testing.T) {
	needQemu(t, "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 5m", "-c", "write -P 0x62 9m 2m", base)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	model := qemuRaw(t, base)
	im, err := Open(top, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if im.BackingFile() != "base.qcow2" || im.BackingFormat() != "qcow2" {
		t.Fatalf("backing %q (%q)", im.BackingFile(), im.BackingFormat())
	}
	applyOps(t, im, model, randomOps(21, 16<<20, 200))
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	requireClean(t, top)
	requireClean(t, base)
	sameBytes(t, "qemu-img convert of the overlay", qemuRaw(t, top), model)
}

// TestConcurrentIO has several goroutines write and read disjoint
// regions of one image at once (as virtio-blk queues may), then checks
// the result with qemu. Run with -race.
func TestConcurrentIO(t *testing.T) {
	needQemu(t)
	p := filepath.Join(t.TempDir(), "c.qcow2")
	const size, workers = 32 << 20, 4
	im, err := Create(p, size, CreateOptions{ClusterSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	errs := make(chan error, workers)
	for w := range workers {
		go func() {
			r := rand.New(rand.NewPCG(uint64(w), 3))
			region := int64(size / workers)
			for i := range 300 {
				n := int64(1+r.IntN(16)) * 512
				off := int64(w)*region + r.Int64N(region-n)
				d := fill(uint64(w*1000+i), int(n))
				if _, err := im.WriteAt(context.Background(), d, off); err != nil {
					errs <- err
					return
				}
				copy(model[off:], d) // disjoint regions: no race on model
				got := make([]byte, n)
				if _, err := im.ReadAt(context.Background(), got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, d) {
					errs <- fmt.Errorf("worker %d: read at %d does not return what it just wrote", w, off)
					return
				}
				if i%50 == 0 {
					if err := im.WriteZeroes(context.Background(), off&^4095, 4096, true); err != nil {
						errs <- err
						return
					}
					clear(model[off&^4095 : off&^4095+4096])
				}
			}
			errs <- nil
		}()
	}
	checkConcurrent(t, im, p, model, errs, workers)
}

// checkConcurrent waits for the workers' results, then checks that the
// image at path holds model, read here and converted by qemu-img, and
// that qemu-img check finds it clean.
func checkConcurrent(t *testing.T, im *Image, path string, model []byte, errs chan error, workers int) {
	t.Helper()
	for range workers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	sameBytes(t, "after concurrent I/O", readAll(t, im), model)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	requireClean(t, path)
	sameBytes(t, "qemu-img convert", qemuRaw(t, path), model)
}

// TestConcurrentSharedClusters: the virtio-blk device runs many requests
// at once, and a guest's requests share clusters: here workers write
// interleaved sectors of the same 64 KiB clusters of an overlay at once
// (so clusters are allocated, copied up from the backing file and written
// in place concurrently), read back their own sectors while the others
// write, and zero whole clusters now and then. The image must hold every
// write and stay clean for qemu-img check. Run with -race.
func TestConcurrentSharedClusters(t *testing.T) {
	needQemu(t, "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	const size, workers, cs = 4 << 20, 4, 64 << 10
	run(t, "qemu-img", "create", "-q", "-f", "raw", base, "4M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4m", base)
	top := filepath.Join(dir, "top.qcow2")
	im, err := Create(top, 0, CreateOptions{BackingFile: "base.raw", BackingFormat: "raw", ClusterSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	model := bytes.Repeat([]byte{0x5a}, size)
	// Workers write their own sectors at once (each changes only its own
	// sectors of model); zeroing a whole cluster changes every worker's,
	// so it excludes the others.
	var zmu sync.RWMutex
	errs := make(chan error, workers)
	for w := range workers {
		go func() {
			r := rand.New(rand.NewPCG(uint64(w), 9))
			for i := range 400 {
				// Sector k belongs to worker k%workers.
				sector := int64(r.IntN(size/512/workers)*workers + w)
				off := sector * 512
				d := fill(uint64(w*10000+i), 512)
				zmu.RLock()
				_, err := im.WriteAt(context.Background(), d, off)
				copy(model[off:], d)
				got := make([]byte, 512)
				if err == nil {
					_, err = im.ReadAt(context.Background(), got, off)
				}
				zmu.RUnlock()
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, d) {
					errs <- fmt.Errorf("worker %d: sector %d does not read back what was written", w, sector)
					return
				}
				if i%97 == 0 {
					c := off &^ (cs - 1)
					zmu.Lock()
					err := im.WriteZeroes(context.Background(), c, cs, i%2 == 0)
					clear(model[c : c+cs])
					zmu.Unlock()
					if err != nil {
						errs <- err
						return
					}
				}
			}
			errs <- nil
		}()
	}
	checkConcurrent(t, im, top, model, errs, workers)
}

// TestWriteCompressed writes into, zeroes and discards clusters that qemu
// wrote compressed (as a cloud image is shipped), with each compression
// type qemu has: each becomes a cluster of its own or a zero cluster, the
// compressed data's references are dropped, qemu-img check stays clean and
// qemu-img compare finds the image equal to what was written.
func TestWriteCompressed(t *testing.T) {
	needQemu(t, "qemu-io")
	for _, compression := range []string{"zlib", "zstd"} {
		t.Run(compression, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.qcow2")
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,compression_type="+compression, p, "4M")
			for i := range 8 {
				run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -c -P %#x %dk 64k", 0x40+i, 64*i), p)
			}
			model := qemuRaw(t, p)
			im, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if got := compressionName(im.h.compressionType); got != compression {
				t.Fatalf("image's compression type %s, want %s", got, compression)
			}
			applyOps(t, im, model, []op{
				{kind: "write", off: 100, n: 1000, seed: 1},          // part of a compressed cluster
				{kind: "write", off: 64 << 10, n: 64 << 10, seed: 2}, // all of one
				{kind: "write", off: 190 << 10, n: 4096, seed: 3},    // straddles two
				{kind: "zero", off: 256 << 10, n: 64 << 10},
				{kind: "zero-keep", off: 320 << 10, n: 64 << 10},
				{kind: "discard", off: 384 << 10, n: 64 << 10},
				{kind: "zero", off: 448<<10 + 512, n: 512}, // part of one
			})
			sameBytes(t, "rayvmm read-back", readAll(t, im), model)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			requireClean(t, p)
			sameBytes(t, "qemu-img convert", qemuRaw(t, p), model)
			want := filepath.Join(t.TempDir(), "want.raw")
			if err := os.WriteFile(want, model, 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", p, want)
		})
	}
}
