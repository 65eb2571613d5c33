package vmproc

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/spec"
)

// TestSendReceive hands a handoff and descriptors over a socket pair as
// Hand and Receive do: the JSON arrives whole, the descriptors land from
// FirstResourceFD on in the order they were added, and what was written
// after the handoff (the go) is kept.
func TestSendReceive(t *testing.T) {
	for _, n := range []int{0, 1, 5} {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		conn := os.NewFile(uintptr(fds[0]), "conn")
		defer conn.Close()
		var fs Files
		var want []uint64
		for i := 0; i < n; i++ {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			defer w.Close()
			if fd := fs.Add(r); fd != FirstResourceFD+i {
				t.Fatalf("Add = %d, want %d", fd, FirstResourceFD+i)
			}
			want = append(want, inode(t, int(r.Fd())))
		}
		// Long enough to take more than one read.
		h := &Handoff{Version: Version, Spec: &spec.VM{Name: string(bytes.Repeat([]byte("x"), 10000))}}
		if err := send(conn, h, &fs); err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte{GoByte})
		payload, rest, err := receive(socket(t, fds[1]))
		if err != nil {
			t.Fatal(err)
		}
		var got Handoff
		if err := json.Unmarshal(payload, &got); err != nil || got.Spec.Name != h.Spec.Name {
			t.Fatalf("handoff: %v (name of %d bytes, want %d)", err, len(got.Spec.Name), len(h.Spec.Name))
		}
		if len(rest) > 1 || (len(rest) == 1 && rest[0] != GoByte) {
			t.Fatalf("read past the handoff: %q", rest)
		}
		for i, ino := range want {
			fd := FirstResourceFD + i
			if got := inode(t, fd); got != ino {
				t.Errorf("descriptor %d: inode %d, want %d", fd, got, ino)
			}
			unix.Close(fd)
		}
	}
}

// TestReceiveNotNeeded: a socket closed before any handoff is
// ErrNotNeeded; one closed in the middle of it is an error.
func TestReceiveNotNeeded(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fds[0])
	if _, _, err := receive(socket(t, fds[1])); !errors.Is(err, ErrNotNeeded) {
		t.Fatalf("receive = %v, want ErrNotNeeded", err)
	}

	if fds, err = unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	unix.Write(fds[0], []byte{100, 0, 0, 0, '{'})
	unix.Close(fds[0])
	if _, _, err := receive(socket(t, fds[1])); err == nil || errors.Is(err, ErrNotNeeded) {
		t.Fatalf("receive of a cut handoff = %v", err)
	}
}

// socket makes fd a non-blocking *os.File, as Receive does, closed when
// the test ends.
func socket(t *testing.T, fd int) *os.File {
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "socket")
	t.Cleanup(func() { f.Close() })
	return f
}

func inode(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatalf("descriptor %d: %v", fd, err)
	}
	return st.Ino
}
