package qcow2

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// needQemu needs the qemu tools the interop tests compare against
// (Debian's qemu-utils).
func needQemu(t testing.TB, tools ...string) {
	t.Helper()
	testenv.RequireTool(t, append([]string{"qemu-img"}, tools...)...)
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// checkResult is the part of `qemu-img check --output=json` we look at.
type checkResult struct {
	Corruptions     int `json:"corruptions"`
	Leaks           int `json:"leaks"`
	CheckErrors     int `json:"check-errors"`
	CorruptionsFixd int `json:"corruptions-fixed"`
}

// qemuCheck runs qemu-img check and returns its verdict.
func qemuCheck(t testing.TB, path string) checkResult {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "--output=json", path)
	out, err := cmd.Output()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("qemu-img check %s: %v", path, err)
	}
	var r checkResult
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		human, _ := exec.Command("qemu-img", "check", path).CombinedOutput()
		t.Fatalf("qemu-img check %s: %v (exit %v)\n%s", path, jerr, err, human)
	}
	if r.Corruptions != 0 || r.CheckErrors != 0 {
		human, _ := exec.Command("qemu-img", "check", path).CombinedOutput()
		t.Logf("qemu-img check %s:\n%s", path, human)
	}
	return r
}

// requireClean fails unless qemu-img check finds no problem at all.
func requireClean(t testing.TB, path string) {
	t.Helper()
	if r := qemuCheck(t, path); r != (checkResult{}) {
		t.Fatalf("qemu-img check %s: %+v, want clean", path, r)
	}
}

// qemuRaw converts an image to raw with qemu-img and returns its bytes.
func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", "convert", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readAll reads a whole virtual disk.
func readAll(t testing.TB, im interface {
	ReadAt(context.Context, []byte, int64) (int, error)
	Size() int64
}) []byte {
	t.Helper()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(context.Background(), b, 0); err != nil {
		t.Fatalf("read whole disk: %v", err)
	}
	return b
}

// sameBytes fails with the first differing offset.
func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: first difference at byte %#x: got %#x, want %#x", what, i, got[i], want[i])
		}
	}
}

// fill returns n deterministic pseudo-random bytes.
func fill(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// setBacking rewrites an image's backing file name in place (the format
// extension, if any, is left as it is).
func setBacking(t testing.TB, path, name, _ string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	hdr := make([]byte, 20)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	off := be.Uint64(hdr[8:])
	if off == 0 {
		off = 2048
	}
	be.PutUint64(hdr[8:], off)
	be.PutUint32(hdr[16:], uint32(len(name)))
	if _, err := f.WriteAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(name), int64(off)); err != nil {
		t.Fatal(err)
	}
}
