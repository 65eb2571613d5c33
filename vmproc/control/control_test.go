package control

import (
	"io"
	"os"
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

// TestListenAPI: the socket is 0600; a stale one is replaced, a live one
// refused, anything else refused.
func TestListenAPI(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/api.sock"
	l, err := ListenAPI(p)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket %v, %v", st, err)
	}
	if _, err := ListenAPI(p); err == nil {
		t.Fatal("a live socket was taken over")
	}
	l.Close() // SetUnlinkOnClose(false): the path stays, stale
	l2, err := ListenAPI(p)
	if err != nil {
		t.Fatalf("stale socket not reclaimed: %v", err)
	}
	l2.Close()
	os.Remove(p)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenAPI(p); err == nil {
		t.Fatal("a regular file was replaced by a socket")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("left behind: %v", ents)
	}
}
