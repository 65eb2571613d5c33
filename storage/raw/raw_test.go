package raw

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

func allocated(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

func TestRawFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d.raw")
	d, err := Create(p, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if a := allocated(t, p); a != 0 {
		t.Fatalf("new image allocates %d bytes, want a sparse file", a)
	}
	if _, err := Create(p, 1<<20); !errors.Is(err, os.ErrExist) {
		t.Fatalf("create over an existing file: %v, want ErrExist", err)
	}
	data := bytes.Repeat([]byte{7}, 1<<20)
	if _, err := d.WriteAt(context.Background(), data, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	before := allocated(t, p)
	if err := d.Discard(context.Background(), 4<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if after := allocated(t, p); after >= before {
		t.Fatalf("discard freed nothing: %d -> %d allocated bytes", before, after)
	}
	got := make([]byte, 1<<20)
	if _, err := d.ReadAt(context.Background(), got, 4<<20); err != nil || !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatalf("discarded range does not read as zeroes (%v)", err)
	}
	if _, err := d.WriteAt(context.Background(), data[:8192], 0); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(context.Background(), 4096, 100, false); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Repeat([]byte{7}, 4096), make([]byte, 100)...)
	want = append(want, bytes.Repeat([]byte{7}, 8192-4196)...)
	if _, err := d.ReadAt(context.Background(), got[:8192], 0); err != nil || !bytes.Equal(got[:8192], want) {
		t.Fatalf("write zeroes: wrong content (%v)", err)
	}
	tests := []struct {
		name string
		off  int64
		n    int
	}{
		{name: "negative", off: -1, n: 1},
		{name: "past end", off: 16 << 20, n: 1},
		{name: "straddles end", off: 16<<20 - 1, n: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := d.ReadAt(context.Background(), make([]byte, tt.n), tt.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("read: %v", err)
			}
			if _, err := d.WriteAt(context.Background(), make([]byte, tt.n), tt.off); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("write: %v", err)
			}
			if err := d.Discard(context.Background(), tt.off, int64(tt.n)); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("discard: %v", err)
			}
		})
	}
	ro, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt(context.Background(), []byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write to read-only: %v", err)
	}
	if err := ro.Discard(context.Background(), 0, 512); !errors.Is(err, ErrReadOnly) {
		t.Errorf("discard on read-only: %v", err)
	}
	if ro.Size() != 16<<20 {
		t.Errorf("size %d", ro.Size())
	}
}

func TestImageLocking(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	d, err := Create(p, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	open := func(ro bool) (*File, error) { return Open(p, ro) }
	rw, err := open(false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := open(false); !errors.Is(err, ErrInUse) {
		t.Fatalf("second read-write open: %v, want ErrInUse", err)
	}
	if _, err := open(true); !errors.Is(err, ErrInUse) {
		t.Fatalf("read-only open of an image open for writing: %v, want ErrInUse", err)
	}
	rw.Close()
	r1, err := open(true)
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Close()
	r2, err := open(true)
	if err != nil {
		t.Fatalf("two readers: %v", err)
	}
	defer r2.Close()
	if _, err := open(false); !errors.Is(err, ErrInUse) {
		t.Fatalf("writer over readers (a backing file in use): %v, want ErrInUse", err)
	}
}

// TestImageLockingWithQEMU checks the protocol against QEMU's tools:
// qemu-img and qemu-io refuse an image rayvmm writes and qemu-io cannot
// write one it reads (qemu-img still reads it), and rayvmm refuses to write
// an image qemu-nbd exports.
func TestImageLockingWithQEMU(t *testing.T) {
	testenv.RequireTool(t, "qemu-img", "qemu-io", "qemu-nbd")
	dir := t.TempDir()
	p := filepath.Join(dir, "disk.img")
	d, err := Create(p, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	qemu := func(args ...string) error { return exec.Command(args[0], args[1:]...).Run() }
	convert := func() error {
		return qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", p, filepath.Join(dir, "copy"))
	}
	write := func() error { return qemu("qemu-io", "-f", "raw", "-c", "write 0 512", p) }

	rw, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if convert() == nil {
		t.Error("qemu-img convert read an image rayvmm is writing")
	}
	if write() == nil {
		t.Error("qemu-io wrote an image rayvmm is writing")
	}
	rw.Close()
	ro, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := convert(); err != nil {
		t.Errorf("qemu-img convert of an image rayvmm only reads: %v", err)
	}
	if write() == nil {
		t.Error("qemu-io wrote an image rayvmm is reading")
	}
	ro.Close()
	if err := write(); err != nil {
		t.Errorf("qemu-io after rayvmm closed the image: %v", err)
	}

	startQemuNBD(t, dir, p)
	if f, err := Open(p, false); !errors.Is(err, ErrInUse) {
		if err == nil {
			f.Close()
		}
		t.Fatalf("rayvmm opened for writing an image qemu-nbd exports: %v", err)
	}
}

// startQemuNBD runs qemu-nbd exporting image and returns once it has the
// image open (and locked): qemu-nbd writes its pid file after it opened and
// exported the image, while its socket appears before it opens anything.
// The test's cleanup stops it.
func startQemuNBD(t *testing.T, dir, image string) {
	t.Helper()
	pidFile := filepath.Join(dir, "qemu-nbd.pid")
	nbd := exec.Command("qemu-nbd", "-f", "raw", "--socket", filepath.Join(dir, "nbd.sock"), "--pid-file", pidFile, image)
	var stderr bytes.Buffer
	nbd.Stderr = &stderr
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- nbd.Wait() }()
	t.Cleanup(func() {
		nbd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(time.Minute):
			t.Errorf("qemu-nbd (pid %d) still running a minute after SIGKILL", nbd.Process.Pid)
		}
	})
	want := strconv.Itoa(nbd.Process.Pid)
	deadline := time.After(time.Minute)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if b, err := os.ReadFile(pidFile); err == nil && strings.TrimSpace(string(b)) == want {
			return
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("qemu-nbd exited (%v) before it wrote its pid file: %s", err, stderr.String())
		case <-deadline:
			nbd.Process.Kill()
			exited <- <-exited // stderr is complete once it has exited
			t.Fatalf("qemu-nbd wrote no pid file %s within a minute (it writes it once the image is open): %s", pidFile, stderr.String())
		case <-tick.C:
		}
	}
}
