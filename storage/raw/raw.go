// Package raw is the raw-file disk backend: the guest's bytes at the same
// offsets in a (sparse) host file or block device. Its methods are safe
// for concurrent use (pread and pwrite); they ignore their contexts, as a
// local file's I/O cannot be interrupted.
//
// Discard punches holes (FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE) so that
// discarded space goes back to the host file system, and Flush is
// fdatasync.
package raw

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// ErrReadOnly is returned by writes to a disk opened read-only.
var ErrReadOnly = errors.New("disk is read-only")

// ErrOutOfRange is returned for I/O that is not wholly inside the disk.
var ErrOutOfRange = errors.New("offset out of range")

// File is a raw disk image.
type File struct {
	f        *os.File
	size     int64
	readOnly bool
	blockDev bool
}

// Create makes a new sparse raw image of size bytes at path. It refuses to
// overwrite an existing file.
func Create(path string, size int64) (*File, error) {
	if size <= 0 {
		return nil, fmt.Errorf("create raw image %s: size %d must be positive", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create raw image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create raw image %s: %w", path, err)
	}
	return &File{f: f, size: size}, nil
}

// ErrNotFile is returned for a path that is neither a regular file nor a
// block device.
var ErrNotFile = errors.New("not a regular file or block device")

// OpenFile opens an image file (flag is os.O_RDONLY or os.O_RDWR) and
// returns it with its mode. It refuses anything but a regular file or a
// block device, and never blocks: a read-only open of a FIFO would wait
// for a writer for ever.
func OpenFile(path string, flag int) (*os.File, os.FileInfo, error) {
	f, err := os.OpenFile(path, flag|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() && st.Mode().Type() != os.ModeDevice {
		err = fmt.Errorf("%s: %w", path, ErrNotFile)
	}
	if err == nil {
		err = unix.SetNonblock(int(f.Fd()), false)
	}
	if err == nil {
		err = lockImage(f, path, flag)
	}
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, st, nil
}

// ErrInUse is returned when another open of an image (in this process or
// another, rayvmm's or QEMU's) uses it in a way that conflicts.
var ErrInUse = errors.New("image is in use")

// Image locking follows QEMU's protocol (block/file-posix.c), so rayvmm,
// QEMU, qemu-img and qemu-io respect each other: an open holds a shared
// open-file-description lock on byte 100+P for each permission P it uses,
// and on byte 200+P for each permission it does not let others use; before
// that it checks that no other open holds 200+P for a permission it wants,
// or 100+P for one it denies. Locks go with the file descriptor, also when
// the process is killed.
const (
	lockPermBase   = 100
	lockSharedBase = 200

	permConsistentRead = 0
	permWrite          = 1
	permWriteUnchanged = 2
	permResize         = 3
)

var permNames = [...]string{"consistent read", "write", "write unchanged", "resize"}

// lockImage locks an image for a read-write open (a VM's writable disk:
// read, write, and let no one else write or resize it) or a read-only one
// (a read-only disk or a backing file: read, and let no one write or
// resize it underneath).
func lockImage(f *os.File, path string, flag int) error {
	want := []int{permConsistentRead}
	if flag&(os.O_WRONLY|os.O_RDWR) != 0 {
		want = append(want, permWrite, permWriteUnchanged)
	}
	deny := []int{permWrite, permResize}
	fd := f.Fd()
	held := func(off int) (bool, error) {
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: int64(off), Len: 1}
		if err := unix.FcntlFlock(fd, unix.F_OFD_GETLK, &lk); err != nil {
			return false, err
		}
		return lk.Type != unix.F_UNLCK, nil
	}
	for _, p := range want {
		if h, err := held(lockSharedBase + p); err != nil {
			return fmt.Errorf("%s: lock: %w", path, err)
		} else if h {
			return fmt.Errorf("%s: %w: another user does not allow %s", path, ErrInUse, permNames[p])
		}
	}
	for _, p := range deny {
		if h, err := held(lockPermBase + p); err != nil {
			return fmt.Errorf("%s: lock: %w", path, err)
		} else if h {
			return fmt.Errorf("%s: %w: another user holds %s access", path, ErrInUse, permNames[p])
		}
	}
	take := func(off int) error {
		lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: io.SeekStart, Start: int64(off), Len: 1}
		return unix.FcntlFlock(fd, unix.F_OFD_SETLK, &lk)
	}
	for _, p := range want {
		if err := take(lockPermBase + p); err != nil {
			return fmt.Errorf("%s: lock: %w", path, err)
		}
	}
	for _, p := range deny {
		if err := take(lockSharedBase + p); err != nil {
			return fmt.Errorf("%s: lock: %w", path, err)
		}
	}
	return nil
}

// Open opens an existing raw image or block device.
func Open(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, _, err := OpenFile(path, flag)
	if err != nil {
		return nil, fmt.Errorf("open raw image: %w", err)
	}
	d, err := FromFile(f, readOnly)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open raw image %s: %w", path, err)
	}
	return d, nil
}

// FromFile makes a raw disk of an image file opened elsewhere (by
// OpenFile, possibly in another process that handed the descriptor over:
// its image locks belong to the open file description and come with it).
// It takes ownership of f and refuses anything but a regular file or a
// block device.
func FromFile(f *os.File, readOnly bool) (*File, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat: %w", err)
	}
	d := &File{f: f, size: st.Size(), readOnly: readOnly}
	switch {
	case st.Mode().IsRegular():
	case st.Mode().Type() == os.ModeDevice:
		d.blockDev = true
		if d.size, err = f.Seek(0, io.SeekEnd); err != nil {
			return nil, fmt.Errorf("size: %w", err)
		}
	default:
		return nil, fmt.Errorf("%s: %w", f.Name(), ErrNotFile)
	}
	return d, nil
}

// File is the image's descriptor, for handing it to another process (see
// Release). The disk still owns it.
func (d *File) File() *os.File { return d.f }

// Release closes the descriptor without syncing: for a disk whose
// descriptor was handed to another process that now writes the image.
func (d *File) Release() error { return d.f.Close() }

func (d *File) check(op string, off, n int64) error {
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("raw %s at %d+%d (disk size %d): %w", op, off, n, d.size, ErrOutOfRange)
	}
	return nil
}

// ReadAt reads len(p) bytes at off; reads past the end of the disk fail.
func (d *File) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	if err := d.check("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := d.f.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

// WriteAt writes len(p) bytes at off.
func (d *File) WriteAt(_ context.Context, p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, fmt.Errorf("raw write: %w", ErrReadOnly)
	}
	if err := d.check("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.f.WriteAt(p, off)
}

// Flush makes completed writes durable (fdatasync).
func (d *File) Flush(context.Context) error {
	if d.readOnly {
		return nil
	}
	if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
		return fmt.Errorf("raw flush: %w", err)
	}
	return nil
}

// Size is the virtual size in bytes.
func (d *File) Size() int64 { return d.size }

// ReadOnly reports whether the disk refuses writes.
func (d *File) ReadOnly() bool { return d.readOnly }

// Discard deallocates [off, off+n); later reads return zeroes.
func (d *File) Discard(ctx context.Context, off, n int64) error {
	return d.WriteZeroes(ctx, off, n, true)
}

// WriteZeroes zeroes [off, off+n). On a regular file both forms punch a
// hole (the range reads back as zeroes and frees host space); on a block
// device it uses FALLOC_FL_ZERO_RANGE, or writes zeroes where that is not
// supported.
func (d *File) WriteZeroes(_ context.Context, off, n int64, unmap bool) error {
	if d.readOnly {
		return fmt.Errorf("raw write zeroes: %w", ErrReadOnly)
	}
	if err := d.check("write zeroes", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if d.blockDev && !unmap {
		mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := unix.Fallocate(int(d.f.Fd()), mode, off, n)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("raw write zeroes at %d+%d: %w", off, n, err)
	}
	return writeZeroes(d.f, off, n)
}

// writeZeroes writes explicit zeroes, for file systems without hole
// punching.
func writeZeroes(w io.WriterAt, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := w.WriteAt(buf[:c], off); err != nil {
			return fmt.Errorf("raw write zeroes: %w", err)
		}
		off += c
		n -= c
	}
	return nil
}

// Close closes the file.
func (d *File) Close() error { return d.f.Close() }
