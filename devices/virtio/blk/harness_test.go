package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/vmm/memory"
	"golang.org/x/sys/unix"
)

// fileDisk is a minimal storage.Disk over a host file, with hole punching
// for Discard and WriteZeroes (storage/raw had not landed when these tests
// were written).
type fileDisk struct {
	f    *os.File
	size int64
}

func (d *fileDisk) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	return d.f.ReadAt(p, off)
}
func (d *fileDisk) WriteAt(_ context.Context, p []byte, off int64) (int, error) {
	return d.f.WriteAt(p, off)
}
func (d *fileDisk) Flush(context.Context) error { return unix.Fdatasync(int(d.f.Fd())) }
func (d *fileDisk) Size() int64                 { return d.size }
func (d *fileDisk) Close() error                { return d.f.Close() }
func (d *fileDisk) Discard(_ context.Context, off, n int64) error {
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (d *fileDisk) WriteZeroes(ctx context.Context, off, n int64, unmap bool) error {
	return d.Discard(ctx, off, n)
}

// plainDisk hides the optional capabilities of a fileDisk.
type plainDisk struct{ d *fileDisk }

func (p plainDisk) ReadAt(ctx context.Context, b []byte, off int64) (int, error) {
	return p.d.ReadAt(ctx, b, off)
}
func (p plainDisk) WriteAt(ctx context.Context, b []byte, off int64) (int, error) {
	return p.d.WriteAt(ctx, b, off)
}
func (p plainDisk) Flush(ctx context.Context) error { return p.d.Flush(ctx) }
func (p plainDisk) Size() int64                     { return p.d.size }
func (p plainDisk) Close() error                    { return p.d.Close() }

// newDiskFile creates a file of size bytes with a recognisable pattern.
func newDiskFile(t testing.TB, dir string, size int) (*fileDisk, string) {
	t.Helper()
	path := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(path, pattern(size), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileDisk{f: f, size: int64(size)}, path
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>9)
	}
	return b
}

// chanIRQ is an Interrupt that wakes a waiting driver.
type chanIRQ struct{ c chan struct{} }

func (i *chanIRQ) Trigger(virtio.InterruptKind, uint16) error {
	select {
	case i.c <- struct{}{}:
	default:
	}
	return nil
}

// needsResetIRQ also records DEVICE_NEEDS_RESET.
type needsResetIRQ struct {
	chanIRQ
	reset chan struct{}
}

func (i *needsResetIRQ) NeedsReset() { close(i.reset) }

type harness struct {
	t    testing.TB
	dev  *Device
	drv  *queuetest.Driver
	mem  *memory.Memory
	irq  *needsResetIRQ
	disk *fileDisk
	path string
}

type opts struct {
	readOnly  bool
	plain     bool // disk without Discard/WriteZeroes
	diskSize  int
	queueSize uint16
	limit     Limiter
	features  uint64 // acked; 0 means everything offered
	// wrap, if set, puts a disk of the test's between the device and the
	// file.
	wrap        func(*fileDisk) storage.Disk
	maxInFlight int
}

const testSerial = "rayvmm-test-serial"

func newHarness(t testing.TB, o opts) *harness {
	t.Helper()
	if o.diskSize == 0 {
		o.diskSize = 1 << 20
	}
	if o.queueSize == 0 {
		o.queueSize = 16
	}
	fd, path := newDiskFile(t, t.TempDir(), o.diskSize)
	mem, err := memory.New(memory.Range{Base: 0, Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	drv, err := queuetest.New(mem, 0x1000, o.queueSize)
	if err != nil {
		t.Fatal(err)
	}
	drv.EventIdx, drv.Indirect = true, true
	cfg := Config{Disk: fd, ReadOnly: o.readOnly, Serial: testSerial, QueueSize: o.queueSize, RateLimit: o.limit, MaxInFlight: o.maxInFlight}
	if o.plain {
		cfg.Disk = plainDisk{fd}
	}
	if o.wrap != nil {
		cfg.Disk = o.wrap(fd)
	}
	dev, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	if o.features == 0 {
		o.features = dev.Features()
	}
	dev.Ack(o.features)
	q, err := queue.New(mem, o.queueSize, drv.Config())
	if err != nil {
		t.Fatal(err)
	}
	irq := &needsResetIRQ{chanIRQ{make(chan struct{}, 1)}, make(chan struct{})}
	if err := dev.Activate(mem, irq, []*queue.Queue{q}); err != nil {
		t.Fatal(err)
	}
	return &harness{t: t, dev: dev, drv: drv, mem: mem, irq: irq, disk: fd, path: path}
}

func (h *harness) alloc(n uint64) memory.GuestAddr {
	h.t.Helper()
	a, err := h.drv.Alloc(n)
	if err != nil {
		h.t.Fatal(err)
	}
	return a
}

// header writes a request header into fresh guest memory.
func (h *harness) header(typ uint32, sector uint64) memory.GuestAddr {
	var b [16]byte
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint64(b[8:], sector)
	a := h.alloc(16)
	if err := h.mem.Write(a, b[:]); err != nil {
		h.t.Fatal(err)
	}
	return a
}

// status allocates a status byte preset to 0xff.
func (h *harness) status() memory.GuestAddr {
	a := h.alloc(1)
	if err := h.mem.Write(a, []byte{0xff}); err != nil {
		h.t.Fatal(err)
	}
	return a
}

// kick notifies the device if the driver's view says it must.
func (h *harness) kick() {
	if need, err := h.drv.NeedsKick(); err != nil {
		h.t.Fatal(err)
	} else if need {
		h.dev.Notify(0)
	}
}

// wait returns the next used element, waiting for the device's interrupt.
func (h *harness) wait() (id, n uint32) {
	h.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		id, n, ok, err := h.drv.Used()
		if err != nil {
			h.t.Fatal(err)
		}
		if ok {
			return id, n
		}
		select {
		case <-h.irq.c:
		case <-deadline:
			h.t.Fatal("the device did not complete the request")
		}
	}
}

// submit adds bufs as one chain (indirect if asked), kicks and waits.
func (h *harness) submit(indirect bool, bufs ...queuetest.Buf) (head uint16, used uint32) {
	h.t.Helper()
	var err error
	if indirect {
		head, err = h.drv.AddIndirect(bufs...)
	} else {
		head, err = h.drv.Add(bufs...)
	}
	if err != nil {
		h.t.Fatal(err)
	}
	h.kick()
	id, n := h.wait()
	if id != uint32(head) {
		h.t.Fatalf("completed head %d, want %d", id, head)
	}
	return head, n
}

func (h *harness) byteAt(a memory.GuestAddr) byte {
	b, err := h.mem.Slice(a, 1)
	if err != nil {
		h.t.Fatal(err)
	}
	return b[0]
}

func (h *harness) fileBytes() []byte {
	b, err := os.ReadFile(h.path)
	if err != nil {
		h.t.Fatal(err)
	}
	return b
}

func (h *harness) guestBytes(a memory.GuestAddr, n uint64) []byte {
	b, err := h.mem.Slice(a, n)
	if err != nil {
		h.t.Fatal(err)
	}
	return bytes.Clone(b)
}

// countIRQ is an mmio.IRQ that counts and wakes a waiter.
type countIRQ struct {
	n atomic.Int64
	c chan struct{}
}

func (i *countIRQ) Raise() error {
	i.n.Add(1)
	select {
	case i.c <- struct{}{}:
	default:
	}
	return nil
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
