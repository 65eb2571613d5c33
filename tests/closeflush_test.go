package tests

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// failingSync is a loopback FUSE file system over a directory on which
// reads and writes go through but every fsync and fdatasync fails with
// EIO: a real file system whose cache cannot be written back, as a disk
// with a dying controller or a lost NFS server gives. (This kernel has no
// device-mapper for an "error" target; FUSE is the real mechanism here.)
type failingSync struct {
	*fs.LoopbackNode
}

func (n *failingSync) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	return syscall.EIO
}

// WrapChild makes every file under the root fail its syncs too.
func (n *failingSync) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	if l, ok := ops.(*fs.LoopbackNode); ok {
		return &failingSync{l}
	}
	return ops
}

// mountFailingSync mounts failingSync over a new directory and returns the
// mount point; it is unmounted when the test ends.
func mountFailingSync(t *testing.T) string {
	t.Helper()
	backing, mnt := t.TempDir(), t.TempDir()
	loop, err := fs.NewLoopbackRoot(backing)
	if err != nil {
		t.Fatal(err)
	}
	root := &failingSync{loop.(*fs.LoopbackNode)}
	srv, err := fs.Mount(mnt, root, &fs.Options{MountOptions: fuse.MountOptions{
		DirectMountStrict: true, FsName: "rayvmm-failing-sync", Name: "rayvmm",
	}})
	if err != nil {
		testenv.Need(t, "needs FUSE (/dev/fuse) to mount a file system whose fsync fails: "+err.Error())
		return ""
	}
	t.Cleanup(func() { srv.Unmount() })
	if err := srv.WaitMount(); err != nil {
		t.Fatal(err)
	}
	return mnt
}

// TestFinalFlushFailure: a disk whose final flush (fdatasync, when the VM
// closes) fails makes rayvmm boot exit non-zero with one line naming the
// disk; it used to exit 0, the error dropped by VM.Close.
func TestFinalFlushFailure(t *testing.T) {
	requireKVM(t)
	mnt := mountFailingSync(t)
	img := filepath.Join(mnt, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err == nil {
		t.Fatal("fsync on the failing file system succeeded; the test would prove nothing")
	}
	f.Close()
	// The guest does no I/O: the only flush is the one rayvmm makes when
	// the VM closes.
	r := run(t, nil, time.Minute, "boot", "--disk", "path="+img+",format=raw,id=data", "--cmdline", "rayguest.run=poweroff")
	if !strings.Contains(r.stdout, "rayguest: poweroff") {
		t.Fatalf("guest did not run:\nstdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	}
	if r.code == 0 {
		t.Fatalf("exit 0 although the disk's final flush failed\nstderr:\n%s", r.stderr)
	}
	msg := strings.TrimSpace(r.stderr)
	if strings.Count(msg, "\n") != 0 || !strings.HasPrefix(msg, "rayvmm: ") {
		t.Fatalf("want one line starting with \"rayvmm: \", got:\n%s", r.stderr)
	}
	for _, want := range []string{"disk data", img, "flush", "input/output error"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not mention %q", msg, want)
		}
	}
}
