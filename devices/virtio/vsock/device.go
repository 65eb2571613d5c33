// Package vsock is the virtio-vsock device (virtio 1.x §5.10) with
// Firecracker's hybrid vsock host side: guest AF_VSOCK stream sockets are
// carried over host Unix sockets.
//
//   - Host-initiated: a host program connects to the device's listening
//     socket (uds) and writes "CONNECT <port>\n"; when a guest program
//     listens on that port the host reads "OK <hostport>\n" (host ports are
//     allocated from 2^30 up) and then has a byte stream; when nothing
//     listens the host socket is closed.
//   - Guest-initiated: a guest connection to CID 2 port P is connected to
//     the Unix socket <uds>_<P>; when nothing listens there the guest gets
//     RST.
//
// The device offers stream sockets only, with credit-based flow control
// both ways: the host side buffers at most 64 KiB per connection (what it
// advertises as buf_alloc) and never sends the guest more than the guest's
// buf_alloc minus the bytes in flight, computed with saturating arithmetic
// so a guest that lies about its credit gets nothing it did not ask for.
// At most MaxConnections connections exist at once; a connection request or
// shutdown the guest does not answer within 2 s ends with RST.
//
// All I/O runs on one device goroutine per activation (an epoll loop over
// the queue notifications, the listener and the connections' host sockets,
// as Firecracker's muxer does), never on the vCPU thread that notifies.
// Everything a guest or host client gets wrong is dropped or answered with
// RST and counted (see Metrics); nothing stops the device.
//
// Lifecycle: the device has blk's shape, one worker per activation under
// a mutex: Activate starts it, Reset stops it and waits, so once Reset
// returns nothing touches guest memory and every connection is closed.
// net's second model (a receive goroutine that outlives activations) exists
// only because a TAP read blocks; here every host socket is non-blocking
// and polled by the worker, so nothing needs to outlive it.
package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Queue indices.
const (
	RxQueue    = 0
	TxQueue    = 1
	EventQueue = 2
)

// Defaults and limits.
const (
	DefaultQueueSize = 256
	// MaxConnections is the most connections (both directions, and
	// host connections still sending their CONNECT line) at once, as in
	// Firecracker.
	MaxConnections = 1023
	// BufSize is the host buffer per connection: the buf_alloc the device
	// advertises, so the most guest data it holds for a slow host reader.
	BufSize = 64 << 10
	// DefaultRequestTimeout bounds the wait for the guest's RESPONSE to a
	// host-initiated connection.
	DefaultRequestTimeout = 2 * time.Second
	// DefaultShutdownTimeout bounds a shutdown: the guest's RST after the
	// device's SHUTDOWN, or draining buffered data after the guest's.
	DefaultShutdownTimeout = 2 * time.Second
	// DefaultHandshakeTimeout bounds how long a host connection may take
	// to send its CONNECT line.
	DefaultHandshakeTimeout = 10 * time.Second
	// FirstHostPort is where host ports of host-initiated connections
	// start (Firecracker allocates from [2^30, 2^31)).
	FirstHostPort = 1 << 30
)

const cfgLen = 8 // struct virtio_vsock_config: le64 guest_cid

// Config describes a device.
type Config struct {
	// CID is the guest's context ID: 3 or more, below 2^32-1.
	CID uint32
	// Listener is the listening AF_UNIX stream socket host programs
	// connect to (a *net.UnixListener, or an *os.File handed over by the
	// control plane). The device keeps its own duplicate of the
	// descriptor; the caller still owns Listener and removes the file.
	Listener syscall.Conn
	// Path is the listener's path: a guest connection to host port P is
	// connected to Path_P.
	Path string
	// QueueSize is the maximum size of each queue (a power of two); 0
	// means DefaultQueueSize.
	QueueSize uint16
	// Timeouts; 0 means the defaults above.
	RequestTimeout, ShutdownTimeout, HandshakeTimeout time.Duration
	// Log receives rate-limited reports of what the guest and host
	// clients get wrong.
	Log *slog.Logger
}

// Device is a virtio-vsock device.
type Device struct {
	cfg     Config
	lfd     int      // the device's duplicate of the listener
	kick    *os.File // eventfd: Notify and Reset wake the worker
	log     *slog.Logger
	metrics Metrics

	mu     sync.Mutex // guards acked and the running worker
	acked  uint64
	w      *worker
	closed bool
}

var _ virtio.Device = (*Device)(nil)

// New checks cfg and duplicates the listener.
func New(cfg Config) (*Device, error) {
	if cfg.CID < 3 || cfg.CID == ^uint32(0) {
		return nil, fmt.Errorf("virtio-vsock: guest CID %d: must be 3 or more and below %d", cfg.CID, ^uint32(0))
	}
	if cfg.Path == "" {
		return nil, errors.New("virtio-vsock: no socket path")
	}
	if cfg.Listener == nil {
		return nil, errors.New("virtio-vsock: no listening socket")
	}
	if cfg.QueueSize == 0 {
		cfg.QueueSize = DefaultQueueSize
	}
	if qs := cfg.QueueSize; qs < 2 || qs&(qs-1) != 0 || qs > queue.MaxSize {
		return nil, fmt.Errorf("virtio-vsock: queue size %d is not a power of two in [2, %d]", qs, queue.MaxSize)
	}
	for _, t := range []struct {
		d   *time.Duration
		def time.Duration
	}{{&cfg.RequestTimeout, DefaultRequestTimeout}, {&cfg.ShutdownTimeout, DefaultShutdownTimeout}, {&cfg.HandshakeTimeout, DefaultHandshakeTimeout}} {
		if *t.d <= 0 {
			*t.d = t.def
		}
	}
	lfd, err := dupListener(cfg.Listener)
	if err != nil {
		return nil, fmt.Errorf("virtio-vsock: %s: %w", cfg.Path, err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(lfd)
		return nil, fmt.Errorf("virtio-vsock: eventfd: %w", err)
	}
	return &Device{
		cfg: cfg, lfd: lfd,
		kick: os.NewFile(uintptr(efd), "vsock-kick"),
		log:  virtio.RateLimited(cfg.Log, time.Second, 10).With("device", "vsock", "cid", cfg.CID),
	}, nil
}

// dupListener duplicates a listening AF_UNIX stream socket's descriptor
// (close-on-exec, non-blocking) after checking that it is one.
func dupListener(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) {
		fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("dup listener: %w", derr)
	}
	for _, c := range []struct {
		opt, want int
		what      string
	}{{unix.SO_DOMAIN, unix.AF_UNIX, "a Unix socket"}, {unix.SO_TYPE, unix.SOCK_STREAM, "a stream socket"}, {unix.SO_ACCEPTCONN, 1, "listening"}} {
		v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, c.opt)
		if err == unix.ENOTSOCK || err == nil && v != c.want {
			err = fmt.Errorf("listener is not %s", c.what)
		}
		if err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("listener: %w", err)
		}
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("listener: %w", err)
	}
	return fd, nil
}

// Metrics returns the device's counters.
func (d *Device) Metrics() *Metrics { return &d.metrics }

// CID is the guest's context ID.
func (d *Device) CID() uint32 { return d.cfg.CID }

// Path is the host socket's path.
func (d *Device) Path() string { return d.cfg.Path }

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.TypeVsock }

// Features implements virtio.Device. No VIRTIO_VSOCK_F_STREAM: a driver
// that negotiates no socket-type feature gets stream sockets (§5.10.3),
// which is all the device has, and older drivers know no such bit.
func (d *Device) Features() uint64 {
	return virtio.FeatureVersion1 | virtio.FeatureRingEventIdx | virtio.FeatureRingIndirectDesc
}

// Ack implements virtio.Device.
func (d *Device) Ack(f uint64) {
	d.mu.Lock()
	d.acked = f & d.Features()
	d.mu.Unlock()
}

// QueueSizes implements virtio.Device: rx, tx, event.
func (d *Device) QueueSizes() []uint16 {
	return []uint16{d.cfg.QueueSize, d.cfg.QueueSize, d.cfg.QueueSize}
}

// ReadConfig implements virtio.Device: guest_cid.
func (d *Device) ReadConfig(off uint64, p []byte) {
	clear(p)
	var c [cfgLen]byte
	binary.LittleEndian.PutUint64(c[:], uint64(d.cfg.CID))
	if off < cfgLen {
		copy(p, c[off:])
	}
}

// WriteConfig implements virtio.Device: guest_cid is read-only.
func (d *Device) WriteConfig(off uint64, p []byte) { d.metrics.ConfigWrites.Add(1) }

// Activate implements virtio.Device: it starts the worker.
func (d *Device) Activate(mem *memory.Memory, irq virtio.Interrupt, qs []*queue.Queue) error {
	if len(qs) != 3 || qs[RxQueue] == nil || qs[TxQueue] == nil {
		return errors.New("virtio-vsock: activate: the driver must set up the rx and tx queues")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.closed:
		return errors.New("virtio-vsock: activate: device is closed")
	case d.w != nil:
		return errors.New("virtio-vsock: activate: already active")
	}
	w, err := newWorker(d, mem, irq, qs[RxQueue], qs[TxQueue])
	if err != nil {
		return fmt.Errorf("virtio-vsock: activate: %w", err)
	}
	d.w = w
	go w.run()
	return nil
}

// Notify implements virtio.Device: it wakes the worker. It never blocks
// (an eventfd write only fails once the counter is near 2^64).
func (d *Device) Notify(uint16) { d.wake() }

func (d *Device) wake() {
	rc, err := d.kick.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Write(func(fd uintptr) bool {
		var one = [8]byte{1}
		unix.Write(int(fd), one[:])
		return true
	})
}

// Reset implements virtio.Device: it stops the worker, which closes every
// connection, and forgets the negotiated features.
func (d *Device) Reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stop()
	d.acked = 0
}

func (d *Device) stop() {
	if d.w == nil {
		return
	}
	d.w.stopping.Store(true)
	d.wake()
	<-d.w.done
	d.w = nil
}

// Close stops the device for good and closes its descriptors (not the
// caller's listener).
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stop()
	if d.closed {
		return nil
	}
	d.closed = true
	return errors.Join(d.kick.Close(), unix.Close(d.lfd))
}
