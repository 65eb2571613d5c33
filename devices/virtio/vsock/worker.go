package vsock

import (
	"container/heap"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Limits on what the worker queues for the guest and handles per round.
const (
	maxRstReplies = 256 // RSTs for packets that belong to no connection
	epollBatch    = 64
)

// worker is one activation's device goroutine: the muxer of Firecracker's
// design. It owns the queues, the connections and their host sockets, and
// an epoll set over the kick eventfd, the listener and every host socket
// (edge-triggered: readiness is remembered in conn.readable/writable
// until a read or write says EAGAIN).
type worker struct {
	d        *Device
	mem      *memory.Memory
	irq      virtio.Interrupt
	rxq, txq *queue.Queue
	cid      uint64
	epfd     int
	ep       *os.File  // epfd, parked on by the Go netpoller (see waitEvents)
	epDL     time.Time // ep's read deadline as last set
	kickFd   int
	stopping atomic.Bool
	done     chan struct{}
	broken   bool

	conns      map[connKey]*conn
	byFd       map[int32]any // *conn or *handshake
	handshakes int
	localPorts map[uint32]struct{}
	lastPort   uint32

	wait     []rxItem // connections and RST replies waiting for a receive buffer
	rsts     int      // RST replies in wait
	timers   timerHeap
	txMore   bool      // transmit chains left for the next round
	busy     bool      // the last round moved packets: poll before sleeping
	retryAcc time.Time // accept failed (EMFILE): try again then

	rxUsed, txUsed int
	now            time.Time
	descs          []queue.Descriptor
	tx             txPacket
	rx             rxBuffer
	events         [epollBatch]unix.EpollEvent
}

// rxItem is a connection with something to send, or an RST reply.
type rxItem struct {
	c   *conn
	rst connKey
}

// handshake is a host connection that has not sent its CONNECT line.
type handshake struct {
	fd       int
	deadline time.Time
	gone     bool
}

// newWorker makes a worker for one activation. It makes no system call:
// Activate runs on the vCPU thread whose MMIO write activated the device,
// under that thread's tighter sandbox filter, so the worker sets itself up
// on its own goroutine (open).
func newWorker(d *Device, mem *memory.Memory, irq virtio.Interrupt, rxq, txq *queue.Queue) (*worker, error) {
	w := &worker{
		d: d, mem: mem, irq: irq, rxq: rxq, txq: txq, cid: uint64(d.cfg.CID),
		done:       make(chan struct{}),
		conns:      map[connKey]*conn{},
		byFd:       map[int32]any{},
		localPorts: map[uint32]struct{}{},
		lastPort:   FirstHostPort - 1,
		epfd:       -1,
	}
	rc, err := d.kick.SyscallConn()
	if err != nil {
		return nil, err
	}
	rc.Control(func(fd uintptr) { w.kickFd = int(fd) })
	return w, nil
}

// open makes the worker's epoll instance and watches the kick eventfd
// and the listener with it.
func (w *worker) open() (err error) {
	if w.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("epoll: %w", err)
	}
	if err := unix.SetNonblock(w.epfd, true); err != nil {
		unix.Close(w.epfd)
		return fmt.Errorf("epoll: %w", err)
	}
	w.ep = os.NewFile(uintptr(w.epfd), "vsock-epoll")
	for _, r := range []struct {
		fd     int
		events uint32
	}{{w.kickFd, unix.EPOLLIN}, {w.d.lfd, unix.EPOLLIN | unix.EPOLLET}} {
		if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, r.fd, &unix.EpollEvent{Events: r.events, Fd: int32(r.fd)}); err != nil {
			w.ep.Close()
			return fmt.Errorf("epoll add: %w", err)
		}
	}
	return nil
}

// hostEvents is how every host socket is watched; EPOLLOUT is added only
// while guest data waits in the connection's buffer (watchOut), or every
// read by the host would wake the worker.
const hostEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET

// watchOut turns EPOLLOUT on c's socket on or off.
func (w *worker) watchOut(c *conn, on bool) {
	if c.outWatched == on || c.fd < 0 {
		return
	}
	ev := uint32(hostEvents)
	if on {
		ev |= unix.EPOLLOUT
	}
	if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_MOD, c.fd, &unix.EpollEvent{Events: ev, Fd: int32(c.fd)}); err != nil {
		w.d.metrics.LoopErrors.Add(1)
		w.kill(c) // without EPOLLOUT its buffer might never drain
		return
	}
	c.outWatched = on
}

func (w *worker) run() {
	defer close(w.done)
	if err := w.open(); err != nil {
		// The device stays silent until the driver resets it.
		w.d.metrics.LoopErrors.Add(1)
		w.d.log.Warn("virtio-vsock: cannot start", "err", err)
		return
	}
	defer w.closeAll()
	w.now = time.Now()
	w.accept()
	w.service()
	for !w.stopping.Load() {
		n, err := w.waitEvents()
		if err != nil {
			w.d.metrics.LoopErrors.Add(1)
			w.d.log.Warn("virtio-vsock: epoll_wait failed", "err", err)
			time.Sleep(10 * time.Millisecond) // do not spin on an error that persists
		}
		w.now = time.Now()
		for i := range max(n, 0) {
			w.dispatch(&w.events[i])
		}
		w.service()
	}
}

func (w *worker) epollNow() (int, error) {
	n, err := unix.EpollWait(w.epfd, w.events[:], 0)
	if err == unix.EINTR {
		return 0, nil
	}
	return n, err
}

// pollWindow is how long the worker keeps watching the rings and sockets
// after a round that moved packets before it sleeps (blk and QEMU's
// iothreads poll the same way): a driver that sends again soon, the common
// case under load, is served without a notification, and the worker
// without a wake-up through the Go netpoller, which runs only when a P is
// idle.
const pollWindow = 50 * time.Microsecond

// poll watches for work for up to pollWindow after a busy round. ok is
// true when work arrived; n epoll events are then in w.events.
func (w *worker) poll() (n int, ok bool) {
	if !w.busy || w.broken {
		return 0, false
	}
	w.busy = false
	end := time.Now().Add(pollWindow)
	for !w.stopping.Load() {
		if n, err := w.txq.Pending(); err != nil || n > 0 {
			return 0, true // an error surfaces on the next Pop
		}
		if len(w.wait) > 0 {
			if n, err := w.rxq.Pending(); err != nil || n > 0 {
				return 0, true
			}
		}
		if n, err := w.epollNow(); n > 0 || err != nil {
			return max(n, 0), true
		}
		if time.Now().After(end) {
			return 0, false
		}
		runtime.Gosched()
	}
	return 0, false
}

// deadline is when the worker must run again without an event: the next
// timer, or at once when transmit chains are left over; zero for never.
func (w *worker) deadline() (t time.Time, now bool) {
	if w.broken {
		return time.Time{}, false
	}
	if w.txMore {
		return time.Time{}, true
	}
	if w.timers.Len() > 0 {
		t = w.timers[0].when
	}
	if !w.retryAcc.IsZero() && (t.IsZero() || w.retryAcc.Before(t)) {
		t = w.retryAcc
	}
	return t, false
}

// waitEvents waits for epoll events or the deadline. The goroutine parks in
// the Go netpoller (the epoll fd is itself pollable) rather than blocking
// its thread in epoll_wait: a goroutine in a blocking syscall keeps its P
// until sysmon takes it back, which on a small GOMAXPROCS leaves the
// goroutines this worker just woke (the driver's, a host writer's) waiting
// for a P.
func (w *worker) waitEvents() (int, error) {
	dl, now := w.deadline()
	if now {
		return w.epollNow()
	}
	if n, ok := w.poll(); ok {
		return n, nil
	}
	if !w.broken {
		more, err := w.txq.EnableNotification()
		if err != nil {
			w.fail(err)
		} else if more {
			return w.epollNow()
		}
	}
	if !dl.Equal(w.epDL) {
		if err := w.ep.SetReadDeadline(dl); err != nil {
			return 0, err
		}
		w.epDL = dl
	}
	rc, err := w.ep.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var werr error
	err = rc.Read(func(fd uintptr) bool {
		n, werr = unix.EpollWait(int(fd), w.events[:], 0)
		if werr == unix.EINTR {
			n, werr = 0, nil
		}
		return n > 0 || werr != nil
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return n, werr
}

// dispatch records one epoll event.
func (w *worker) dispatch(ev *unix.EpollEvent) {
	switch fd := int(ev.Fd); {
	case fd == w.kickFd:
		var b [8]byte
		unix.Read(fd, b[:]) // reset the counter; the rings are looked at every round
	case w.broken: // idle until reset; host connections wait in the backlog
	case fd == w.d.lfd:
		w.accept()
	default:
		switch o := w.byFd[ev.Fd].(type) {
		case *handshake:
			w.handshake(o)
		case *conn:
			if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
				o.readable = true
			}
			if ev.Events&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
				o.hostHup = true
			}
			if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
				o.writable = true
				w.flush(o)
			}
			w.schedule(o)
		}
	}
}

// service does one round of device work after the events were recorded.
func (w *worker) service() {
	if w.broken {
		return
	}
	w.expire()
	if !w.retryAcc.IsZero() && !w.now.Before(w.retryAcc) {
		w.retryAcc = time.Time{}
		w.accept()
	}
	if err := w.processTx(); err != nil {
		w.fail(err)
		return
	}
	if err := w.fillRx(); err != nil {
		w.fail(err)
		return
	}
	if err := w.signal(); err != nil {
		w.fail(err)
	}
}

// fail marks the rings broken: every connection is closed and the device
// idles until the driver resets it.
func (w *worker) fail(err error) {
	w.broken = true
	w.d.metrics.QueueErrors.Add(1)
	w.d.log.Warn("virtio-vsock: queue broken; device needs reset", "err", err)
	w.closeAll()
	if r, ok := w.irq.(virtio.NeedsResetter); ok {
		r.NeedsReset()
	}
}

// closeAll closes every host socket (ending the worker, or on a broken
// ring) and, when the worker ends, the epoll set.
func (w *worker) closeAll() {
	for _, c := range w.conns {
		w.remove(c)
	}
	for fd, o := range w.byFd {
		if h, ok := o.(*handshake); ok {
			w.dropHandshake(h)
		} else {
			delete(w.byFd, fd)
		}
	}
	w.wait, w.rsts = nil, 0
	w.timers = nil
	if !w.broken || w.stopping.Load() {
		w.ep.Close()
		w.epfd = -1
	}
}

// --- timers ---

type timer struct {
	when time.Time
	c    *conn
	h    *handshake
}

// timerHeap orders deadlines; entries whose connection is gone or whose
// deadline changed are skipped when they come due.
type timerHeap []timer

func (t timerHeap) Len() int           { return len(t) }
func (t timerHeap) Less(i, j int) bool { return t[i].when.Before(t[j].when) }
func (t timerHeap) Swap(i, j int)      { t[i], t[j] = t[j], t[i] }
func (t *timerHeap) Push(x any)        { *t = append(*t, x.(timer)) }
func (t *timerHeap) Pop() any {
	old := *t
	x := old[len(old)-1]
	*t = old[:len(old)-1]
	return x
}

func (w *worker) arm(c *conn, d time.Duration) {
	c.expiry = w.now.Add(d)
	heap.Push(&w.timers, timer{when: c.expiry, c: c})
}

// expire ends what timed out: handshakes, unanswered requests, shutdowns.
func (w *worker) expire() {
	m := &w.d.metrics
	for w.timers.Len() > 0 && !w.now.Before(w.timers[0].when) {
		t := heap.Pop(&w.timers).(timer)
		switch {
		case t.h != nil && !t.h.gone:
			m.HandshakeTimeouts.Add(1)
			w.d.log.Warn("virtio-vsock: host connection sent no CONNECT line in time; closed")
			w.dropHandshake(t.h)
		case t.c != nil && !t.c.gone && t.c.expiry.Equal(t.when) && t.c.state != stClosing:
			if t.c.state == stLocalInit {
				m.RequestTimeouts.Add(1)
			} else {
				m.ShutdownTimeouts.Add(1)
			}
			w.d.log.Warn("virtio-vsock: guest did not answer in time; reset", "state", t.c.state.String(),
				"host_port", t.c.key.local, "guest_port", t.c.key.peer)
			w.kill(t.c)
		}
	}
}

// --- host connections ---

// accept takes every waiting host connection; each must first send its
// CONNECT line.
func (w *worker) accept() {
	m := &w.d.metrics
	for {
		fd, _, err := unix.Accept4(w.d.lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR || err == unix.ECONNABORTED:
			continue
		case err != nil:
			m.LoopErrors.Add(1)
			w.d.log.Warn("virtio-vsock: accept failed", "err", err)
			w.retryAcc = w.now.Add(100 * time.Millisecond) // EMFILE and the like: edge-triggered, so come back
			return
		}
		m.HostConnects.Add(1)
		if len(w.conns)+w.handshakes >= MaxConnections {
			m.ConnLimit.Add(1)
			w.d.log.Warn("virtio-vsock: connection limit reached; host connection refused", "limit", MaxConnections)
			unix.Close(fd)
			continue
		}
		if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: hostEvents, Fd: int32(fd)}); err != nil {
			m.LoopErrors.Add(1)
			unix.Close(fd)
			continue
		}
		h := &handshake{fd: fd, deadline: w.now.Add(w.d.cfg.HandshakeTimeout)}
		w.byFd[int32(fd)] = h
		w.handshakes++
		heap.Push(&w.timers, timer{when: h.deadline, h: h})
		w.handshake(h)
	}
}

// handshake reads a host connection's CONNECT line, if it is all there,
// and turns the connection into a host-initiated vsock connection.
func (w *worker) handshake(h *handshake) {
	if h.gone {
		return
	}
	port, done, err := readConnect(h.fd)
	if !done {
		return
	}
	m := &w.d.metrics
	if err != nil {
		m.HandshakeErrors.Add(1)
		w.d.log.Warn("virtio-vsock: host connection closed", "err", err)
		w.dropHandshake(h)
		return
	}
	h.gone = true
	w.handshakes--
	local := w.allocPort()
	c := &conn{
		key: connKey{local: local, peer: port}, fd: h.fd, state: stLocalInit, hostInit: true,
		readable: true, writable: true, needRequest: true,
	}
	w.add(c)
	w.arm(c, w.d.cfg.RequestTimeout)
	w.schedule(c)
}

func (w *worker) dropHandshake(h *handshake) {
	if h.gone {
		return
	}
	h.gone = true
	w.handshakes--
	delete(w.byFd, int32(h.fd))
	unix.Close(h.fd)
}

// allocPort picks the next free host port in [2^30, 2^31), round-robin.
func (w *worker) allocPort() uint32 {
	for {
		w.lastPort++
		if w.lastPort < FirstHostPort || w.lastPort >= 1<<31 {
			w.lastPort = FirstHostPort
		}
		if _, used := w.localPorts[w.lastPort]; !used {
			w.localPorts[w.lastPort] = struct{}{}
			return w.lastPort
		}
	}
}

func (w *worker) add(c *conn) {
	w.conns[c.key] = c
	w.byFd[int32(c.fd)] = c
	w.d.metrics.ConnsAdded.Add(1)
}

// remove forgets a connection and closes its host socket.
func (w *worker) remove(c *conn) {
	if c.gone {
		return
	}
	c.gone = true
	w.closeHost(c)
	delete(w.conns, c.key)
	if c.hostInit {
		delete(w.localPorts, c.key.local)
	}
	w.d.metrics.ConnsRemoved.Add(1)
}

func (w *worker) closeHost(c *conn) {
	if c.fd < 0 {
		return
	}
	delete(w.byFd, int32(c.fd))
	unix.Close(c.fd)
	c.fd = -1
	c.buf, c.off = nil, 0
}

// kill closes the host socket now and sends the guest RST; the connection
// is removed once the RST is out.
func (w *worker) kill(c *conn) {
	if c.state == stClosing || c.gone {
		return
	}
	c.state = stClosing
	w.closeHost(c)
	w.schedule(c)
}

// schedule puts c on the wait list if it has something to send.
func (w *worker) schedule(c *conn) {
	if !c.queued && !c.gone && c.next(true) != OpInvalid {
		c.queued = true
		w.wait = append(w.wait, rxItem{c: c})
	}
}

// rstReply queues an RST for a packet that belongs to no connection.
func (w *worker) rstReply(k connKey) {
	if w.rsts >= maxRstReplies {
		w.d.metrics.RstDropped.Add(1)
		return
	}
	w.rsts++
	w.wait = append(w.wait, rxItem{rst: k})
}

// guestConnect handles a guest REQUEST to the host: connect to
// <uds>_<port>, or RST.
func (w *worker) guestConnect(h *Header) {
	m := &w.d.metrics
	m.GuestConnects.Add(1)
	key := connKey{local: h.DstPort, peer: h.SrcPort}
	if len(w.conns)+w.handshakes >= MaxConnections {
		m.ConnLimit.Add(1)
		w.rstReply(key)
		return
	}
	fd, err := dialPort(w.d.cfg.Path, h.DstPort)
	if err != nil {
		m.GuestRefused.Add(1)
		w.d.log.Debug("virtio-vsock: guest connection refused", "port", h.DstPort, "err", err)
		w.rstReply(key)
		return
	}
	if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: hostEvents, Fd: int32(fd)}); err != nil {
		m.LoopErrors.Add(1)
		unix.Close(fd)
		w.rstReply(key)
		return
	}
	c := &conn{key: key, fd: fd, state: stPeerInit, readable: true, writable: true,
		peerBufAlloc: h.BufAlloc, peerFwdCnt: h.FwdCnt}
	w.add(c)
	w.schedule(c)
}

// --- transmit: guest to host ---

// txRound bounds the chains one round takes from the transmit queue, so a
// guest that keeps it full cannot starve receive work.
func (w *worker) txRound() int { return 2 * int(w.txq.Size()) }

// processTx handles the driver's transmit chains, completing each. It
// leaves notifications off: the worker polls the ring for a while and
// turns them on only before it sleeps (waitEvents).
func (w *worker) processTx() error {
	w.txMore = false
	if err := w.txq.DisableNotification(); err != nil {
		return err
	}
	for budget := w.txRound(); ; budget-- {
		if budget == 0 {
			w.txMore = true
			return nil
		}
		c, ok, err := w.txq.Pop()
		if err != nil || !ok {
			return err
		}
		w.busy = true
		w.transmit(&c)
		if c.Head() < w.txq.Size() {
			if err := w.txq.AddUsed(c.Head(), 0); err != nil {
				return err
			}
			w.txUsed++
		}
	}
}

// transmit parses one guest packet and routes it.
func (w *worker) transmit(ch *queue.Chain) {
	m := &w.d.metrics
	descs, err := ch.Collect(w.descs[:0])
	w.descs = descs[:0]
	if err != nil {
		m.BadChain.Add(1)
		w.d.log.Warn("virtio-vsock: bad transmit chain", "err", err)
		return
	}
	p := &w.tx
	if err := parseTx(w.mem, descs, p); err != nil {
		switch {
		case errors.Is(err, errLenPast), errors.Is(err, errTooBig):
			m.BadHeader.Add(1)
			w.d.log.Warn("virtio-vsock: bad packet; connection reset", "err", err, "len", p.hdr.Len)
			w.reject(&p.hdr)
		case errors.Is(err, errShortChain):
			m.BadHeader.Add(1)
			w.d.log.Warn("virtio-vsock: bad packet dropped", "err", err)
		default: // wrong direction, outside guest memory
			m.BadChain.Add(1)
			w.d.log.Warn("virtio-vsock: bad transmit chain", "err", err)
		}
		return
	}
	h := &p.hdr
	m.TxPackets.Add(1)
	if h.DstCID != HostCID || h.SrcCID != w.cid {
		m.BadCID.Add(1)
		w.d.log.Warn("virtio-vsock: packet with a wrong CID dropped", "src_cid", h.SrcCID, "dst_cid", h.DstCID)
		return
	}
	if h.Type != TypeStream {
		m.BadType.Add(1)
		w.d.log.Warn("virtio-vsock: packet of an unsupported socket type; reset", "type", h.Type)
		w.reject(h)
		return
	}
	key := connKey{local: h.DstPort, peer: h.SrcPort}
	c := w.conns[key]
	if c == nil {
		switch h.Op {
		case OpRequest:
			w.guestConnect(h)
		case OpRst: // never answer an RST with one
		default:
			m.Unroutable.Add(1)
			w.rstReply(key)
		}
		return
	}
	w.deliver(c, p)
	w.schedule(c)
}

// reject answers a packet that cannot be handled with RST: its connection
// (if any) is reset.
func (w *worker) reject(h *Header) {
	if h.Op == OpRst {
		return
	}
	key := connKey{local: h.DstPort, peer: h.SrcPort}
	if c := w.conns[key]; c != nil {
		w.kill(c)
		return
	}
	w.rstReply(key)
}

// deliver applies a guest packet to its connection.
func (w *worker) deliver(c *conn, p *txPacket) {
	m := &w.d.metrics
	h := &p.hdr
	c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
	c.creditRequested = false
	if c.state == stClosing {
		if h.Op == OpRst {
			w.remove(c) // both sides reset: nothing left to send
		}
		return
	}
	switch h.Op {
	case OpRst:
		w.remove(c)
	case OpRW:
		if c.state != stEstablished || c.guestNoSend {
			w.badOp(c, h)
			w.kill(c)
			return
		}
		if h.Len > 0 {
			w.writeHost(c, p.data, h.Len)
		}
	case OpResponse:
		if c.state != stLocalInit {
			w.badOp(c, h)
			return
		}
		c.state, c.expiry = stEstablished, time.Time{}
		msg := "OK " + strconv.FormatUint(uint64(c.key.local), 10) + "\n"
		if n, err := unix.Write(c.fd, []byte(msg)); err != nil || n != len(msg) {
			m.HostWriteErrors.Add(1)
			w.kill(c)
			return
		}
		m.HostConnectsOK.Add(1)
	case OpShutdown:
		if c.state != stEstablished {
			w.badOp(c, h)
			return
		}
		c.guestNoRecv = c.guestNoRecv || h.Flags&ShutdownRcv != 0
		c.guestNoSend = c.guestNoSend || h.Flags&ShutdownSend != 0
		if c.sentShutdown == ShutdownRcv|ShutdownSend {
			w.end(c) // the host is gone too: finish with RST
			return
		}
		w.checkClose(c)
	case OpCreditUpdate:
	case OpCreditRequest:
		c.needCreditReply = true
	default: // a second REQUEST, unknown ops
		w.badOp(c, h)
	}
}

func (w *worker) badOp(c *conn, h *Header) {
	w.d.metrics.BadOp.Add(1)
	w.d.log.Warn("virtio-vsock: packet not valid for the connection; dropped", "op", h.Op.String(),
		"state", c.state.String(), "host_port", c.key.local, "guest_port", c.key.peer)
}

// end finishes a connection both sides are done with: RST to the guest
// (as Firecracker and Linux do after a full shutdown), host socket closed.
func (w *worker) end(c *conn) {
	if c.state == stClosing {
		return
	}
	c.state = stClosing
	w.closeHost(c)
}

// checkClose acts on the guest's shutdown once the buffered data is out:
// no more sending shuts the host socket for writing (the host reads EOF);
// both directions closed ends the connection. With data still buffered the
// shutdown timer runs, so a host that never reads cannot keep it.
func (w *worker) checkClose(c *conn) {
	if c.state != stEstablished || c.fd < 0 {
		return
	}
	if c.pending() > 0 {
		if (c.guestNoSend || c.guestNoRecv) && c.expiry.IsZero() {
			w.arm(c, w.d.cfg.ShutdownTimeout)
		}
		return
	}
	if c.guestNoRecv && c.guestNoSend {
		w.end(c)
		return
	}
	if c.guestNoSend && !c.shutWr {
		c.shutWr = true
		unix.Shutdown(c.fd, unix.SHUT_WR)
	}
}

// writeHost sends guest data to the host socket, buffering what the socket
// does not take. The guest may have at most BufSize bytes buffered (the
// credit the device gives); more is a protocol violation and resets the
// connection, so a lying guest cannot make the host buffer without bound.
func (w *worker) writeHost(c *conn, data [][]byte, n uint32) {
	m := &w.d.metrics
	if uint64(c.pending())+uint64(n) > BufSize {
		m.CreditOverflow.Add(1)
		w.d.log.Warn("virtio-vsock: guest sent past its credit; connection reset", "buffered", c.pending(), "len", n,
			"host_port", c.key.local, "guest_port", c.key.peer)
		w.kill(c)
		return
	}
	c.fromGuest += n
	if c.pending() == 0 && c.writable {
		k, err := unix.Writev(c.fd, data)
		switch {
		case err == unix.EAGAIN:
			k, c.writable = 0, false
		case err != nil:
			w.hostWriteFailed(c, err)
			return
		}
		c.fwdCnt += uint32(k)
		m.TxBytes.Add(uint64(k))
		if uint32(k) < n {
			c.writable = false
		}
		for len(data) > 0 && k >= len(data[0]) {
			k -= len(data[0])
			data = data[1:]
		}
		if len(data) > 0 {
			data[0] = data[0][k:]
		}
	}
	if len(data) == 0 {
		return
	}
	if c.buf == nil {
		c.buf = make([]byte, 0, BufSize)
	}
	if c.off > 0 {
		c.buf = c.buf[:copy(c.buf, c.buf[c.off:])]
		c.off = 0
	}
	for _, b := range data {
		c.buf = append(c.buf, b...)
	}
	w.watchOut(c, true)
}

// flush writes buffered guest data once the host socket takes it.
func (w *worker) flush(c *conn) {
	for c.pending() > 0 && c.writable && c.fd >= 0 {
		k, err := unix.Write(c.fd, c.buf[c.off:])
		if err == unix.EAGAIN {
			c.writable = false
			break
		}
		if err != nil {
			w.hostWriteFailed(c, err)
			return
		}
		c.off += k
		c.fwdCnt += uint32(k)
		w.d.metrics.TxBytes.Add(uint64(k))
	}
	if c.pending() == 0 {
		c.buf, c.off = c.buf[:0], 0
		w.watchOut(c, false)
		w.checkClose(c)
	}
}

func (w *worker) hostWriteFailed(c *conn, err error) {
	w.d.metrics.HostWriteErrors.Add(1)
	w.d.log.Debug("virtio-vsock: host socket write failed; connection reset", "err", err,
		"host_port", c.key.local, "guest_port", c.key.peer)
	w.kill(c)
}

// --- receive: host to guest ---

// fillRx fills the driver's receive buffers with what connections have to
// say, round-robin.
func (w *worker) fillRx() error {
	for len(w.wait) > 0 {
		ch, ok, err := w.rxq.Pop()
		if err != nil {
			return err
		}
		if !ok {
			more, err := w.rxq.EnableNotification()
			if err != nil || !more {
				return err
			}
			continue
		}
		descs, err := ch.Collect(w.descs[:0])
		w.descs = descs[:0]
		if err == nil {
			err = parseRx(w.mem, descs, &w.rx)
		}
		if err != nil {
			w.d.metrics.BadChain.Add(1)
			w.d.log.Warn("virtio-vsock: bad receive chain", "err", err)
			if ch.Head() < w.rxq.Size() {
				if err := w.rxq.AddUsed(ch.Head(), 0); err != nil {
					return err
				}
				w.rxUsed++
			}
			continue
		}
		n, ok := w.fillOne(&w.rx)
		if !ok {
			w.rxq.Unpop() // nothing fits this buffer now
			break
		}
		if err := w.rxq.AddUsed(ch.Head(), n); err != nil {
			return err
		}
		w.rxUsed++
		w.busy = true
	}
	if len(w.wait) == 0 {
		return w.rxq.DisableNotification() // no kicks needed until something is waiting
	}
	return nil
}

// fillOne writes the first waiting packet that fits into r, and returns
// the bytes written.
func (w *worker) fillOne(r *rxBuffer) (uint32, bool) {
	for tries := len(w.wait); tries > 0 && len(w.wait) > 0; tries-- {
		it := w.wait[0]
		w.wait[0] = rxItem{}
		w.wait = w.wait[1:]
		if it.c == nil {
			w.rsts--
			h := Header{SrcCID: HostCID, DstCID: w.cid, SrcPort: it.rst.local, DstPort: it.rst.peer,
				Type: TypeStream, Op: OpRst}
			r.writeHeader(&h)
			w.d.metrics.RxPackets.Add(1)
			return HeaderLen, true
		}
		c := it.c
		c.queued = false
		n, ok := w.produce(c, r)
		w.schedule(c) // more to say: back of the line
		if ok {
			return n, true
		}
	}
	return 0, false
}

// produce writes c's next packet into r.
func (w *worker) produce(c *conn, r *rxBuffer) (uint32, bool) {
	m := &w.d.metrics
	h := Header{SrcCID: HostCID, DstCID: w.cid, SrcPort: c.key.local, DstPort: c.key.peer,
		Type: TypeStream, BufAlloc: BufSize}
	for !c.gone {
		h.Op = c.next(r.space > 0)
		switch h.Op {
		case OpInvalid:
			return 0, false
		case OpRst:
			w.remove(c)
		case OpResponse:
			c.state = stEstablished
		case OpRequest:
			c.needRequest = false
		case OpShutdown:
			h.Flags = c.wantShutdown()
			c.sentShutdown = h.Flags
			if h.Flags == ShutdownRcv|ShutdownSend {
				w.arm(c, w.d.cfg.ShutdownTimeout) // the guest answers with RST, or gets one
			}
		case OpRW:
			k, err := unix.Readv(c.fd, r.limit(min(r.space, uint64(c.peerCredit()))))
			switch {
			case err == unix.EAGAIN || err == unix.EINTR:
				c.readable = false
				continue
			case err != nil:
				m.HostReadErrors.Add(1)
				w.kill(c)
				continue
			case k == 0:
				c.hostEOF = true
				c.hostHup = c.hostHup || peerClosed(c.fd)
				continue
			}
			h.Len = uint32(k)
			c.toGuest += h.Len
			m.RxBytes.Add(uint64(k))
		case OpCreditRequest:
			c.creditRequested = true
		case OpCreditUpdate:
			c.needCreditReply = false
		}
		h.FwdCnt = c.fwdCnt
		c.lastFwdSent = c.fwdCnt
		r.writeHeader(&h)
		m.RxPackets.Add(1)
		return HeaderLen + h.Len, true
	}
	return 0, false
}

// peerClosed reports whether the host closed a socket both ways (POLLHUP on
// a Unix stream socket) rather than only shutting it for writing.
func peerClosed(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	n, err := unix.Poll(p, 0)
	return err == nil && n > 0 && p[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
}

// signal interrupts the driver for the used entries added this round, if
// it wants that.
func (w *worker) signal() error {
	for _, q := range []struct {
		q    *queue.Queue
		n    *int
		slot uint16
	}{{w.rxq, &w.rxUsed, RxQueue}, {w.txq, &w.txUsed, TxQueue}} {
		if *q.n == 0 {
			continue
		}
		*q.n = 0
		need, err := q.q.NeedsNotification()
		if err != nil {
			return err
		}
		if need {
			w.d.metrics.Interrupts.Add(1)
			if err := w.irq.Trigger(virtio.InterruptUsedRing, q.slot); err != nil {
				w.d.metrics.InterruptErrors.Add(1)
			}
		}
	}
	return nil
}
