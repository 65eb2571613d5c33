package qcow2

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// The crash test runs this test binary again as a helper that writes to
// an image and reports each completed Flush on stdout, kills it with
// SIGKILL mid-write, then checks the image with qemu-img and verifies
// that every block the helper saw flushed is intact.

const (
	crashBlock   = 4096
	crashOpsPerG = 48
)

type crashOp struct {
	block   int64
	discard bool
}

// crashOps is the deterministic work of generation g of round r.
func crashOps(r, g uint64, blocks int64) []crashOp {
	rng := rand.New(rand.NewPCG(r, g))
	ops := make([]crashOp, crashOpsPerG)
	for i := range ops {
		ops[i] = crashOp{block: rng.Int64N(blocks), discard: rng.IntN(10) == 0}
	}
	return ops
}

func crashData(r, g uint64, b int64) []byte {
	return fill(r<<40|g<<20|uint64(b), crashBlock)
}

// helperCrash is the child process TestCrashConsistency kills: it writes
// generations of blocks for ever, printing "F g" once generation g is
// flushed.
func helperCrash() int {
	path := os.Getenv("RAYVMM_QCOW2_CRASH_IMAGE")
	round, _ := strconv.ParseUint(os.Getenv("RAYVMM_QCOW2_CRASH_ROUND"), 10, 64)
	im, err := Open(path, Options{})
	if err != nil {
		fmt.Println("E", err)
		return 1
	}
	blocks := im.Size() / crashBlock
	w := bufio.NewWriter(os.Stdout)
	for g := uint64(1); ; g++ {
		for _, o := range crashOps(round, g, blocks) {
			if o.discard {
				err = im.Discard(context.Background(), o.block*crashBlock, crashBlock)
			} else {
				_, err = im.WriteAt(context.Background(), crashData(round, g, o.block), o.block*crashBlock)
			}
			if err != nil {
				fmt.Println("E", err)
				return 1
			}
		}
		if err := im.Flush(context.Background()); err != nil {
			fmt.Println("E", err)
			return 1
		}
		fmt.Fprintf(w, "F %d\n", g)
		w.Flush()
	}
}

func TestMain(m *testing.M) {
	testenv.HelperMain(map[string]func() int{"crash": helperCrash})
	os.Exit(m.Run())
}

// helperWait bounds each wait for the helper: it turns a hang into a
// failure that names what was awaited; it measures nothing.
const helperWait = time.Minute

func TestCrashConsistency(t *testing.T) {
	needQemu(t)
	tests := []struct {
		name        string
		clusterSize int64
		size        int64
		backing     bool
	}{
		{name: "64k clusters", clusterSize: 64 << 10, size: 64 << 20},
		{name: "4k clusters", clusterSize: 4096, size: 32 << 20},
		{name: "512 byte clusters", clusterSize: 512, size: 12 << 20},
		{name: "4k clusters over a raw backing file", clusterSize: 4096, size: 16 << 20, backing: true},
	}
	for ti, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "crash.qcow2")
			opts := CreateOptions{ClusterSize: tt.clusterSize}
			state := make([]byte, tt.size)
			if tt.backing {
				base := filepath.Join(dir, "base.raw")
				copy(state, fill(99, int(tt.size)))
				if err := os.WriteFile(base, state, 0o644); err != nil {
					t.Fatal(err)
				}
				opts.BackingFile, opts.BackingFormat = "base.raw", "raw"
			}
			im, err := Create(p, tt.size, opts)
			if err != nil {
				t.Fatal(err)
			}
			im.Close()
			for round := uint64(1); round <= 2; round++ {
				r := uint64(ti)*10 + round
				state = crashRound(t, p, r, state)
			}
		})
	}
}

// crashRound runs the helper on the image, kills it, checks the image
// against before (its content when the round started) and returns the
// content it found.
func crashRound(t *testing.T, path string, round uint64, before []byte) []byte {
	t.Helper()
	h := testenv.StartHelper(t, "crash", testenv.HelperOptions{
		Env: []string{"RAYVMM_QCOW2_CRASH_IMAGE=" + path, fmt.Sprintf("RAYVMM_QCOW2_CRASH_ROUND=%d", round)},
	})
	rng := rand.New(rand.NewPCG(round, 7))
	target := uint64(3 + rng.IntN(6))
	var flushed uint64
	for flushed < target {
		line := h.Line(t, fmt.Sprintf("generation %d's \"F %d\" line", flushed+1, flushed+1), helperWait)
		if strings.HasPrefix(line, "E ") {
			t.Fatalf("helper: %s", line)
		}
		g, err := strconv.ParseUint(strings.TrimPrefix(line, "F "), 10, 64)
		if err != nil {
			t.Fatalf("helper: %q, want \"F generation\"", line)
		}
		flushed = g
	}
	// Not a wait for anything: where the kill lands is what varies.
	time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
	rest, werr := h.Kill(t, helperWait)
	if ee, ok := werr.(*exec.ExitError); !ok || ee.ExitCode() != -1 {
		t.Fatalf("helper exited before it was killed: %v %q\n%s", werr, rest, h.Stderr())
	}
	// Generations flushed between the target and the kill.
	for _, line := range rest {
		if g, err := strconv.ParseUint(strings.TrimPrefix(line, "F "), 10, 64); err == nil {
			flushed = g
		}
	}
	t.Logf("round %d: killed after generation %d flushed", round, flushed)

	if r := qemuCheck(t, path); r.Corruptions != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check after kill -9: %+v (leaks are allowed, nothing else)", r)
	} else {
		t.Logf("qemu-img check: %d leaked clusters", r.Leaks)
	}
	im, err := Open(path, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := readAll(t, im)
	im.Close()
	sameBytes(t, "qemu-img convert vs rayvmm", qemuRaw(t, path), got)

	// What each block held at the last flush, and what the generations in
	// flight after it may have put there.
	blocks := int64(len(before)) / crashBlock
	want := bytes.Clone(before)
	allowed := map[int64][][]byte{}
	for g := uint64(1); g <= flushed+1; g++ {
		for _, o := range crashOps(round, g, blocks) {
			d := make([]byte, crashBlock)
			if !o.discard {
				d = crashData(round, g, o.block)
			}
			if g <= flushed {
				copy(want[o.block*crashBlock:], d)
			} else {
				allowed[o.block] = append(allowed[o.block], d)
			}
		}
	}
	// A write still in flight at the kill may be torn: with clusters
	// smaller than a block, one WriteAt is several cluster writes. So each
	// 512-byte sector must hold its flushed content or the content of a
	// write that was in flight, like a disk that writes sectors atomically.
	const sector = 512
	for b := range blocks {
		have := got[b*crashBlock : (b+1)*crashBlock]
		if bytes.Equal(have, want[b*crashBlock:(b+1)*crashBlock]) {
			continue
		}
		for s := 0; s < crashBlock; s += sector {
			h := have[s : s+sector]
			ok := bytes.Equal(h, want[b*crashBlock+int64(s):][:sector])
			for _, a := range allowed[b] {
				ok = ok || bytes.Equal(h, a[s:s+sector])
			}
			if !ok {
				t.Fatalf("block %d sector %d lost its flushed content after kill -9 (generation %d flushed)", b, s/sector, flushed)
			}
		}
	}
	// The image stays writable after the crash.
	im, err = Open(path, Options{})
	if err != nil {
		t.Fatalf("reopen for writing after the crash: %v", err)
	}
	im.Close()
	requireNoCorruption(t, path)
	return got
}

func requireNoCorruption(t *testing.T, path string) {
	t.Helper()
	if r := qemuCheck(t, path); r.Corruptions != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %+v", r)
	}
}
