package link

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/rayvmm/rayvmm/shards/engine"
	"github.com/rayvmm/rayvmm/shards/nbd"
)

// message is one packet. Unused fields are left out.
type message struct {
	ID      uint64           `json:"id"`
	Reply   bool             `json:"reply,omitempty"`
	Op      string           `json:"op,omitempty"`
	Shard   int              `json:"shard,omitempty"`
	Replica *engine.Replica  `json:"replica,omitempty"`
	Node    string           `json:"node,omitempty"`
	Reason  string           `json:"reason,omitempty"`
	Copied  int64            `json:"copied,omitempty"`
	Info    *nbd.Info        `json:"info,omitempty"`
	State   *engine.Shard    `json:"state,omitempty"`
	List    []engine.Replica `json:"replicas,omitempty"`
	Err     string           `json:"err,omitempty"`
	// Layout replies: a page of the shards (Layout.Shards), how many
	// there are, whether the engine must resync, the protocol version.
	Layout  *engine.Layout `json:"layout,omitempty"`
	Total   int            `json:"total,omitempty"`
	Resync  bool           `json:"resync,omitempty"`
	Version int            `json:"version,omitempty"`
	Clean   bool           `json:"clean,omitempty"` // detach
}

func errReply(err error) *message { return &message{Err: err.Error()} }

// VM is the VM process's end of the link. It is the engine's Dialer and
// Reporter, and carries out the control plane's commands on the engine
// given to Serve.
type VM struct {
	p       *peer
	vol     atomic.Pointer[engine.Volume]
	closing atomic.Bool
}

// NewVM starts the VM process's end on f (its half of Pair).
func NewVM(f *os.File) (*VM, error) {
	v := &VM{}
	p, err := newPeer(f, v.handle)
	if err != nil {
		return nil, err
	}
	v.p = p
	return v, nil
}

// Serve makes vol the engine the control plane's commands act on.
func (v *VM) Serve(vol *engine.Volume) { v.vol.Store(vol) }

// Close ends the link.
func (v *VM) Close() error {
	v.closing.Store(true)
	return v.p.Close()
}

// Dial implements engine.Dialer: the control plane connects and
// negotiates, and passes the socket.
func (v *VM) Dial(ctx context.Context, shard int, r engine.Replica) (*nbd.Client, error) {
	m, fd, err := v.p.call(ctx, &message{Op: opDial, Shard: shard, Replica: &r})
	if err != nil {
		return nil, fmt.Errorf("dial shard %d on %s through the control plane: %w", shard, r.Node, err)
	}
	if fd == nil || m.Info == nil {
		if fd != nil {
			fd.Close()
		}
		return nil, fmt.Errorf("dial shard %d on %s: reply without a socket: %w", shard, r.Node, ErrProtocol)
	}
	return nbd.NewClient(fileConn{fd}, *m.Info), nil
}

// fileConn is a received socket as a net.Conn for the NBD client: read,
// written and closed as an os.File (through the Go poller, deadlines
// work), not net.FileConn, whose getsockopt, getpeername and setsockopt
// the VM process's sandbox refuses. TCP_NODELAY is the dialler's.
type fileConn struct{ *os.File }

// fileAddr stands in for the addresses, which the engine never asks for.
type fileAddr string

func (a fileAddr) Network() string { return "fd" }
func (a fileAddr) String() string  { return string(a) }

func (c fileConn) LocalAddr() net.Addr  { return fileAddr(c.Name()) }
func (c fileConn) RemoteAddr() net.Addr { return fileAddr(c.Name()) }

// FD is the link's descriptor number in this process, the one it
// receives sockets on: the VM process's sandbox allows recvmsg on it
// alone (seccap.Config.RecvFDSockets).
func (v *VM) FD() int {
	fd := -1
	if rc, err := v.p.conn.SyscallConn(); err == nil {
		rc.Control(func(d uintptr) { fd = int(d) })
	}
	return fd
}

// Failed implements engine.Reporter.
func (v *VM) Failed(ctx context.Context, shard int, node, reason string) (engine.Shard, error) {
	return v.shardCall(ctx, &message{Op: opFailed, Shard: shard, Node: node, Reason: reason})
}

// Rebuilt implements engine.Reporter.
func (v *VM) Rebuilt(ctx context.Context, shard int, node string) (engine.Shard, error) {
	return v.shardCall(ctx, &message{Op: opRebuilt, Shard: shard, Node: node})
}

func (v *VM) shardCall(ctx context.Context, m *message) (engine.Shard, error) {
	r, fd, err := v.p.call(ctx, m)
	if fd != nil {
		fd.Close()
	}
	if err != nil {
		return engine.Shard{}, err
	}
	if r.State == nil {
		return engine.Shard{}, fmt.Errorf("%s reply without the shard: %w", m.Op, ErrProtocol)
	}
	return *r.State, nil
}

// Progress implements engine.Reporter.
func (v *VM) Progress(shard int, node string, copied int64) {
	v.p.notify(&message{Op: opProgress, Shard: shard, Node: node, Copied: copied})
}

func (v *VM) handle(ctx context.Context, m *message) (*message, *os.File) {
	vol := v.vol.Load()
	if vol == nil {
		return errReply(errors.New("the engine is not running yet")), nil
	}
	switch m.Op {
	case opRebuild:
		if m.Replica == nil {
			return errReply(ErrProtocol), nil
		}
		if err := vol.Rebuild(ctx, m.Shard, *m.Replica); err != nil {
			return errReply(err), nil
		}
		return &message{}, nil
	case opDrop:
		if err := vol.Drop(m.Shard, m.Node); err != nil {
			return errReply(err), nil
		}
		return &message{}, nil
	case opReplicas:
		if m.Shard < 0 || m.Shard >= len(vol.Layout().Shards) {
			return errReply(engine.ErrLayout), nil
		}
		return &message{List: vol.Replicas(m.Shard)}, nil
	case opFence:
		vol.Fence(errors.New(m.Reason))
		return &message{}, nil
	case opResync:
		if err := vol.Resync(ctx, m.Shard); err != nil {
			return errReply(err), nil
		}
		return &message{}, nil
	}
	return errReply(fmt.Errorf("unknown operation %q: %w", m.Op, ErrProtocol)), nil
}

// layout asks the control plane for the volume's layout, page by page.
func (v *VM) layout(ctx context.Context) (engine.Layout, bool, error) {
	var l engine.Layout
	for {
		m, fd, err := v.p.call(ctx, &message{Op: opLayout, Shard: len(l.Shards)})
		if fd != nil {
			fd.Close()
		}
		if err != nil {
			return l, false, fmt.Errorf("layout from the control plane: %w", err)
		}
		switch {
		case m.Version != Version:
			return l, false, fmt.Errorf("the control plane speaks link version %d, this VM process %d (rayvmm-vm and rayvmmd are from different builds): %w", m.Version, Version, ErrProtocol)
		case m.Layout == nil || m.Total < 0 || len(m.Layout.Shards) > m.Total-len(l.Shards) || (len(m.Layout.Shards) == 0 && len(l.Shards) < m.Total):
			return l, false, fmt.Errorf("layout reply at shard %d of %d: %w", len(l.Shards), m.Total, ErrProtocol)
		}
		page := m.Layout.Shards
		m.Layout.Shards = append(l.Shards, page...)
		l = *m.Layout
		if len(l.Shards) == m.Total {
			return l, m.Resync, nil
		}
	}
}

// ErrControlGone fences the engine of a VM process whose control plane
// (the sharded volume's agent) went away: nobody keeps the volume's
// ownership lease any more, so another process may take the volume
// after the lease expires, and writing on could give two writers.
var ErrControlGone = errors.New("the sharded volume's agent is gone; its ownership cannot be kept")

// Disk is a sharded volume's engine in the VM process, as a storage.Disk
// (with Discard and WriteZeroes): see OpenDisk.
type Disk struct {
	*engine.Volume
	vm *VM
}

// OpenDisk is the VM process's side of a sharded disk: it starts its end
// of the link on f, asks the control plane at the other end for the
// volume's layout and opens the engine on it (cfg's Layout, Resync,
// Dialer and Reporter are filled in), with the link as Dialer and
// Reporter. If the link breaks before Close (the agent was killed), the
// engine is fenced: every later request fails with an I/O error at once.
func OpenDisk(ctx context.Context, f *os.File, cfg engine.Config) (*Disk, error) {
	vm, err := NewVM(f)
	if err != nil {
		return nil, err
	}
	return vm.Open(ctx, cfg)
}

// Open is OpenDisk on a link already started (NewVM), whose descriptor
// the sandbox had to know first (FD). On error the link is closed.
func (vm *VM) Open(ctx context.Context, cfg engine.Config) (*Disk, error) {
	var err error
	if cfg.Layout, cfg.Resync, err = vm.layout(ctx); err != nil {
		vm.Close()
		return nil, err
	}
	cfg.Dialer, cfg.Reporter = vm, vm
	vol, err := engine.Open(ctx, cfg)
	if err != nil {
		vm.Close()
		return nil, err
	}
	vm.Serve(vol)
	go func() {
		<-vm.p.done
		if !vm.closing.Load() {
			if cfg.Log != nil {
				cfg.Log.Error("sharded volume: the link to its agent broke; refusing further I/O", "err", vm.p.failure())
			}
			vol.Fence(ErrControlGone)
		}
	}()
	return &Disk{Volume: vol, vm: vm}, nil
}

// Close closes the engine after a last flush and tells the control plane
// whether the detach was clean (every write durable on the replicas):
// then the next attach needs no resync. It ends the link.
func (d *Disk) Close() error {
	ferr := d.Volume.Flush(context.Background())
	d.Volume.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d.vm.closing.Store(true)
	_, fd, err := d.vm.p.call(ctx, &message{Op: opDetach, Clean: ferr == nil})
	if fd != nil {
		fd.Close()
	}
	d.vm.Close()
	if err != nil && ferr == nil && !errors.Is(err, ErrClosed) {
		return fmt.Errorf("sharded volume: detach: %w", err)
	}
	return nil // a failed flush was the caller's Flush's error already
}

// Session is the volume a control end serves: the layout the VM
// process's engine opens (and whether it must resync), and what to do
// when the engine detaches.
type Session interface {
	Layout() (l engine.Layout, resync bool)
	Detached(clean bool)
}

// maxPage bounds the shards of one layout reply, well under maxMessage.
const maxPage = 32 << 10

// DialFunc connects to a replica and negotiates its export.
type DialFunc func(ctx context.Context, shard int, r engine.Replica) (net.Conn, nbd.Info, error)

// Guard checks that the VM process may touch replica node of shard (the
// control plane answers only for the volume the link was made for).
type Guard func(shard int, node, export string) error

// Control is the control plane's end of the link: it answers the VM
// process's dials and reports, and sends it commands (it implements the
// data-path side of shards.Attachment).
type Control struct {
	p     *peer
	dial  DialFunc
	rep   engine.Reporter
	guard Guard
	sess  Session
}

// NewControl starts the control plane's end on f, for the volume sess.
func NewControl(f *os.File, dial DialFunc, rep engine.Reporter, guard Guard, sess Session) (*Control, error) {
	c := &Control{dial: dial, rep: rep, guard: guard, sess: sess}
	p, err := newPeer(f, c.handle)
	if err != nil {
		return nil, err
	}
	c.p = p
	return c, nil
}

// Close ends the link.
func (c *Control) Close() error { return c.p.Close() }

// Done is closed when the link has ended (the VM process exited).
func (c *Control) Done() <-chan struct{} { return c.p.done }

func (c *Control) handle(ctx context.Context, m *message) (*message, *os.File) {
	switch m.Op {
	case opLayout:
		l, resync := c.sess.Layout()
		if m.Shard < 0 || m.Shard > len(l.Shards) {
			return errReply(fmt.Errorf("layout from shard %d of %d: %w", m.Shard, len(l.Shards), ErrProtocol)), nil
		}
		end, size := m.Shard, 0
		for end < len(l.Shards) {
			b, err := json.Marshal(&l.Shards[end])
			if err != nil || (end > m.Shard && size+len(b) > maxPage) {
				break
			}
			size += len(b)
			end++
		}
		total := len(l.Shards)
		l.Shards = l.Shards[m.Shard:end]
		return &message{Layout: &l, Total: total, Resync: resync, Version: Version}, nil
	case opDetach:
		c.sess.Detached(m.Clean)
		return &message{}, nil
	case opDial:
		if m.Replica == nil {
			return errReply(fmt.Errorf("dial without a replica: %w", ErrProtocol)), nil
		}
		if err := c.guard(m.Shard, m.Replica.Node, m.Replica.Export); err != nil {
			return errReply(err), nil
		}
		conn, info, err := c.dial(ctx, m.Shard, *m.Replica)
		if err != nil {
			return errReply(err), nil
		}
		defer conn.Close()
		fc, ok := conn.(interface{ File() (*os.File, error) })
		if !ok {
			return errReply(errors.New("the connection has no file descriptor")), nil
		}
		f, err := fc.File()
		if err != nil {
			return errReply(err), nil
		}
		return &message{Info: &info}, f
	case opFailed, opRebuilt:
		if err := c.guard(m.Shard, m.Node, ""); err != nil {
			return errReply(err), nil
		}
		var s engine.Shard
		var err error
		if m.Op == opFailed {
			s, err = c.rep.Failed(ctx, m.Shard, m.Node, truncate(m.Reason, 300))
		} else {
			s, err = c.rep.Rebuilt(ctx, m.Shard, m.Node)
		}
		if err != nil {
			return errReply(err), nil
		}
		return &message{State: &s}, nil
	case opProgress:
		if c.guard(m.Shard, m.Node, "") == nil && m.Copied >= 0 {
			c.rep.Progress(m.Shard, m.Node, m.Copied)
		}
		return nil, nil
	}
	return errReply(fmt.Errorf("unknown operation %q: %w", m.Op, ErrProtocol)), nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// Rebuild asks the VM process's engine to rebuild a replica and waits.
func (c *Control) Rebuild(ctx context.Context, shard int, r engine.Replica) error {
	_, err := c.command(ctx, &message{Op: opRebuild, Shard: shard, Replica: &r})
	return err
}

// Drop asks the engine to stop using a replica.
func (c *Control) Drop(shard int, node string) error {
	_, err := c.command(context.Background(), &message{Op: opDrop, Shard: shard, Node: node})
	return err
}

// Replicas asks the engine which replicas of shard are in service; nil
// if it cannot be asked.
func (c *Control) Replicas(shard int) []engine.Replica {
	m, err := c.command(context.Background(), &message{Op: opReplicas, Shard: shard})
	if err != nil {
		return nil
	}
	return m.List
}

// Resync asks the engine to resync a shard and waits.
func (c *Control) Resync(ctx context.Context, shard int) error {
	_, err := c.command(ctx, &message{Op: opResync, Shard: shard})
	return err
}

// Fence makes the engine refuse all further I/O.
func (c *Control) Fence(err error) {
	c.command(context.Background(), &message{Op: opFence, Reason: err.Error()})
}

func (c *Control) command(ctx context.Context, m *message) (*message, error) {
	r, fd, err := c.p.call(ctx, m)
	if fd != nil {
		fd.Close() // the VM process never sends sockets
	}
	return r, err
}
