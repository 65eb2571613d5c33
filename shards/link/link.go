// Package link is the control channel between the control plane and the
// sharded-volume engine running in a VM process: a unix SOCK_SEQPACKET
// socketpair (one message per packet) carrying small JSON requests both
// ways and, with the answer to a dial, the connected and negotiated NBD
// socket as SCM_RIGHTS ancillary data.
//
// The VM process opens no connection itself: when its engine needs a
// replica (at start, for a rebuild, after a node came back at a new
// address) it asks over the link, and the control plane, which knows the
// nodes' addresses from etcd, connects, negotiates the export and passes
// the socket. The VM process's sandbox can then deny socket(AF_INET) and
// connect(2) altogether; a seccomp filter could not restrict connect to
// the right addresses anyway (it cannot read the sockaddr), and node
// addresses change when nodes move. Replica state changes go the other
// way: the engine reports a failed replica and waits for the control
// plane to have recorded it in etcd before the guest's write completes.
//
// The control plane treats every message from the VM process as hostile:
// sizes are bounded, fields checked, and requests are limited to the
// replicas of the volume the link was made for (the Guard).
//
// This package links no etcd.
package link

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// maxMessage bounds a packet; larger ones are a protocol error.
const maxMessage = 64 << 10

// Version is the link protocol's version. Both ends come from one build
// (rayvmm-vm, and rayvmmd or the daemon), and the VM process refuses a
// control plane that speaks another.
const Version = 1

// Operations.
const (
	opLayout   = "layout"   // VM -> control: the volume's layout, a page of shards from Shard on
	opDetach   = "detach"   // VM -> control: the engine is closed; Clean: its final flush worked
	opDial     = "dial"     // VM -> control: connect to a replica; reply carries the socket
	opFailed   = "failed"   // VM -> control: record a replica as failed
	opRebuilt  = "rebuilt"  // VM -> control: record a rebuilt replica as healthy
	opProgress = "progress" // VM -> control: rebuild progress (no reply)
	opRebuild  = "rebuild"  // control -> VM: rebuild a replica
	opDrop     = "drop"     // control -> VM: stop using a replica
	opReplicas = "replicas" // control -> VM: the replicas in service for a shard
	opFence    = "fence"    // control -> VM: refuse all further I/O
	opResync   = "resync"   // control -> VM: resync a shard after an unclean shutdown
)

// ErrProtocol is wrapped by errors about malformed messages.
var ErrProtocol = errors.New("link protocol violation")

// ErrClosed is returned once the link is closed.
var ErrClosed = errors.New("link closed")

// Pair makes a connected socketpair: one end for each side.
func Pair() (control, vm *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("link socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "link-control"), os.NewFile(uintptr(fds[1]), "link-vm"), nil
}

// handler answers a request; fd, if not nil, is sent with the reply
// and closed.
type handler func(ctx context.Context, m *message) (reply *message, fd *os.File)

// peer is one end: it sends requests and matches replies by id, and runs
// a handler for each request it receives.
type peer struct {
	conn   *net.UnixConn
	handle handler
	wmu    sync.Mutex

	mu      sync.Mutex
	next    uint64
	pending map[uint64]chan result
	err     error
	done    chan struct{}
	ctx     context.Context
	cancel  context.CancelFunc
}

type result struct {
	m  *message
	fd *os.File
}

func newPeer(f *os.File, h handler) (*peer, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("link: %w", err)
	}
	f.Close()
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("link: not a unix socket: %w", ErrProtocol)
	}
	p := &peer{conn: uc, handle: h, pending: map[uint64]chan result{}, done: make(chan struct{})}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	go p.read()
	return p, nil
}

func (p *peer) close(err error) {
	p.mu.Lock()
	if p.err == nil {
		p.err = err
	}
	pending := p.pending
	p.pending = map[uint64]chan result{}
	p.mu.Unlock()
	p.cancel()
	p.conn.Close()
	for _, ch := range pending {
		close(ch)
	}
}

// Close ends the link.
func (p *peer) Close() error {
	p.close(ErrClosed)
	<-p.done
	return nil
}

func (p *peer) send(m *message, fd *os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > maxMessage {
		return fmt.Errorf("link: message of %d bytes", len(b))
	}
	var oob []byte
	if fd != nil {
		oob = unix.UnixRights(int(fd.Fd()))
	}
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if oob == nil {
		// write(2), one packet on SOCK_SEQPACKET: the sandboxed VM
		// process, which never passes descriptors, has no sendmsg.
		_, err = p.conn.Write(b)
	} else {
		_, _, err = p.conn.WriteMsgUnix(b, oob, nil)
	}
	if err != nil {
		return fmt.Errorf("link: send: %w", err)
	}
	return nil
}

// call sends a request and waits for its reply.
func (p *peer) call(ctx context.Context, m *message) (*message, *os.File, error) {
	ch := make(chan result, 1)
	p.mu.Lock()
	if p.err != nil {
		err := p.err
		p.mu.Unlock()
		return nil, nil, err
	}
	p.next++
	m.ID = p.next
	p.pending[m.ID] = ch
	p.mu.Unlock()
	if err := p.send(m, nil); err != nil {
		p.close(err)
		return nil, nil, err
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return nil, nil, p.failure()
		}
		if r.m.Err != "" {
			if r.fd != nil {
				r.fd.Close()
			}
			return nil, nil, errors.New(r.m.Err)
		}
		return r.m, r.fd, nil
	case <-ctx.Done():
		p.mu.Lock()
		delete(p.pending, m.ID)
		p.mu.Unlock()
		return nil, nil, ctx.Err()
	}
}

func (p *peer) failure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err == nil {
		return ErrClosed
	}
	return p.err
}

// notify sends a request that has no reply.
func (p *peer) notify(m *message) error { return p.send(m, nil) }

func (p *peer) read() {
	defer close(p.done)
	b := make([]byte, maxMessage+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		n, oobn, flags, _, err := p.conn.ReadMsgUnix(b, oob)
		if err != nil {
			p.close(fmt.Errorf("link: %w", err))
			return
		}
		m, fd, err := parse(b[:n], oob[:oobn], flags)
		if err != nil {
			p.close(err)
			return
		}
		if n == 0 {
			p.close(ErrClosed) // the other end closed (SOCK_SEQPACKET EOF)
			return
		}
		if m.Reply {
			p.mu.Lock()
			ch := p.pending[m.ID]
			delete(p.pending, m.ID)
			p.mu.Unlock()
			if ch == nil {
				if fd != nil {
					fd.Close() // the caller gave up waiting
				}
				continue
			}
			ch <- result{m, fd}
			continue
		}
		if fd != nil {
			fd.Close() // requests never carry sockets
		}
		go func() {
			reply, rfd := p.handle(p.ctx, m)
			if reply == nil {
				return
			}
			reply.ID, reply.Reply = m.ID, true
			err := p.send(reply, rfd)
			if rfd != nil {
				rfd.Close()
			}
			if err != nil {
				p.close(err)
			}
		}()
	}
}

// parse checks one packet: its size, its JSON, and at most one file
// descriptor of ancillary data.
func parse(b, oob []byte, flags int) (*message, *os.File, error) {
	var fds []int
	if len(oob) > 0 {
		cms, err := unix.ParseSocketControlMessage(oob)
		if err != nil {
			return nil, nil, fmt.Errorf("link: control message: %w", ErrProtocol)
		}
		for _, cm := range cms {
			r, err := unix.ParseUnixRights(&cm)
			if err == nil {
				fds = append(fds, r...)
			}
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || len(b) > maxMessage {
		closeAll()
		return nil, nil, fmt.Errorf("link: truncated or oversized message: %w", ErrProtocol)
	}
	if len(fds) > 1 {
		closeAll()
		return nil, nil, fmt.Errorf("link: %d file descriptors in one message: %w", len(fds), ErrProtocol)
	}
	var fd *os.File
	if len(fds) == 1 {
		// The sender's descriptor was made blocking by its os.File.Fd;
		// a non-blocking one is an os.File the Go poller serves.
		if err := unix.SetNonblock(fds[0], true); err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("link: received descriptor: %w", err)
		}
		fd = os.NewFile(uintptr(fds[0]), "link-fd")
	}
	if len(b) == 0 {
		return &message{}, fd, nil
	}
	m := &message{}
	if err := json.Unmarshal(b, m); err != nil {
		if fd != nil {
			fd.Close()
		}
		return nil, nil, fmt.Errorf("link: %v: %w", err, ErrProtocol)
	}
	return m, fd, nil
}
