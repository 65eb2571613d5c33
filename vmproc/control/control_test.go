package control

import (
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/guestkernel"
)

// TestSealedMemfd: the built-in kernel's memfd holds the ELF and refuses
// any change.
func TestSealedMemfd(t *testing.T) {
	f, err := SealedMemfd("rayguest", guestkernel.ELF)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<30))
	if err != nil || string(b) != string(guestkernel.ELF) {
		t.Fatalf("memfd holds %d bytes, %v", len(b), err)
	}
	if _, err := f.WriteAt([]byte{0}, 0); err == nil {
		t.Fatal("a sealed memfd took a write")
	}
	if err := f.Truncate(0); err == nil {
		t.Fatal("a sealed memfd was truncated")
	}
}

// BenchmarkSealedMemfd is what handing the built-in kernel to the VM
// process through a memfd costs the control plane at each boot (the
// alternative, embedding it in rayvmm-vm too, costs nothing at run time but
// 50 KB of binary and a second copy to keep in step).
func BenchmarkSealedMemfd(b *testing.B) {
	for b.Loop() {
		f, err := SealedMemfd("rayguest", guestkernel.ELF)
		if err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

// TestListenSocket: the API and vsock sockets are 0600; a stale one is
// reclaimed, a live one refused and left alone, anything else refused;
// the first owner's remove leaves a successor's socket alone; nothing is
// left behind.
func TestListenSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "v.sock")
	empty := func(dir string) {
		t.Helper()
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			t.Fatalf("left behind: %v", ents)
		}
	}

	l, remove, err := ListenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket file: %v, %v", fi, err)
	}
	if c, err := net.Dial("unix", path); err != nil {
		t.Fatalf("connect to the new socket: %v", err)
	} else {
		c.Close()
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("left behind: %v", ents)
	}

	// A live socket is refused and left alone.
	if _, _, err := ListenSocket(path); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("second listen on a live socket: %v", err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the live socket was removed: %v", err)
	}

	// Closed without removing the file, as after kill -9: reclaimed.
	l.Close()
	l2, remove2, err := ListenSocket(path)
	if err != nil {
		t.Fatalf("reclaiming a stale socket: %v", err)
	}
	// The first owner's remove must not delete its successor's socket.
	if err := remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the old owner removed the new socket: %v", err)
	}
	if err := remove2(); err != nil {
		t.Fatal(err)
	}
	if err := remove2(); err != nil {
		t.Fatalf("a second remove: %v", err)
	}
	l2.Close()
	empty(dir)

	// Anything but a socket is refused.
	if err := os.WriteFile(path, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ListenSocket(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "data" {
		t.Fatal("the regular file was touched")
	}
	os.Remove(path)

	// A path at the length limit: no room for the private directory's
	// detour, so it is bound in place, still 0600.
	deep := filepath.Join(dir, strings.Repeat("d", 101-len(dir)-1))
	if err := os.Mkdir(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(deep, "v") // 103 bytes; the detour would need at least 108
	l3, remove3, err := ListenSocket(long)
	if err != nil {
		t.Fatalf("listen at the length limit: %v", err)
	}
	if fi, err := os.Lstat(long); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket at the length limit: %v, %v", fi, err)
	}
	remove3()
	l3.Close()
	empty(deep)
	os.Remove(deep)

	// A directory that does not exist: an error, nothing made.
	if _, _, err := ListenSocket(filepath.Join(dir, "nope", "v.sock")); err == nil {
		t.Fatal("listen in a missing directory succeeded")
	}
	empty(dir)
}
