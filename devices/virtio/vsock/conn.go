package vsock

import "time"

// connKey names a connection: the host-side port and the guest's port.
type connKey struct{ local, peer uint32 }

// connState is where a connection is in its life.
type connState uint8

const (
	// stLocalInit: host-initiated; REQUEST sent (or due) to the guest,
	// waiting for its RESPONSE.
	stLocalInit connState = iota
	// stPeerInit: guest-initiated; the host socket is connected and the
	// RESPONSE is due.
	stPeerInit
	// stEstablished: data flows (subject to the shutdown flags).
	stEstablished
	// stClosing: the host socket is closed and an RST to the guest is
	// due; the connection is removed once it is sent.
	stClosing
)

var stateNames = [...]string{"local-init", "peer-init", "established", "closing"}

func (s connState) String() string { return stateNames[s] }

// conn is one connection: its state, its host socket and its flow
// control. Only the worker touches it.
//
// Counters are free-running uint32s, as on the wire:
//
//	toGuest      data bytes sent to the guest
//	peerFwdCnt   ... of which the guest says it has consumed
//	peerBufAlloc the guest's buffer for this connection
//	fromGuest    data bytes received from the guest
//	fwdCnt       ... of which were written to the host socket
//	lastFwdSent  fwdCnt as last told to the guest
//
// The guest may have fromGuest-fwdCnt <= BufSize bytes with the device
// (the rest of buf), and the device sends at most
// peerBufAlloc - (toGuest-peerFwdCnt) more, saturating at 0.
type conn struct {
	key      connKey
	fd       int // host socket, -1 once closed
	state    connState
	hostInit bool

	readable, writable bool // edge-triggered readiness of fd
	outWatched         bool // EPOLLOUT is on (guest data waits in buf)
	hostEOF            bool // a read returned 0: the host sends nothing more
	hostHup            bool // the host closed both ways
	shutWr             bool // the host socket is shut for writing (the guest sends nothing more)
	guestNoRecv        bool // guest SHUTDOWN flags, ORed over packets
	guestNoSend        bool

	sentShutdown    uint32 // SHUTDOWN flags already sent to the guest
	needRequest     bool
	needCreditReply bool // the guest sent CREDIT_REQUEST
	creditRequested bool // CREDIT_REQUEST sent; no new one until the guest speaks

	peerBufAlloc, peerFwdCnt, toGuest uint32
	fromGuest, fwdCnt, lastFwdSent    uint32

	buf    []byte // guest data the host socket has not taken yet: buf[off:]
	off    int
	expiry time.Time // when an unanswered request or a shutdown gives up; zero: none
	queued bool      // in the worker's rx wait list
	gone   bool      // removed from the worker
}

// pending is the guest data buffered for the host socket.
func (c *conn) pending() int { return len(c.buf) - c.off }

// peerCredit is how much more data the guest can take: its buf_alloc less
// the bytes in flight, 0 when it claims more in flight than its buffer
// holds (a lying fwd_cnt cannot buy credit).
func (c *conn) peerCredit() uint32 {
	inFlight := c.toGuest - c.peerFwdCnt
	if inFlight >= c.peerBufAlloc {
		return 0
	}
	return c.peerBufAlloc - inFlight
}

// creditUpdateDue reports whether the guest should hear about buffer the
// device freed: the free space it last heard of is below half, and there
// is more now.
func (c *conn) creditUpdateDue() bool {
	if c.fwdCnt == c.lastFwdSent {
		return false
	}
	seen := c.fromGuest - c.lastFwdSent // what the guest thinks is buffered
	return seen > BufSize/2
}

// canSendData reports whether host data may flow to the guest.
func (c *conn) canSendData() bool {
	return c.state == stEstablished && !c.guestNoRecv && !c.hostEOF && c.fd >= 0
}

// wantShutdown is the SHUTDOWN flags the guest should have: SEND once the
// host's stream ended, RECEIVE too once the host closed both ways.
func (c *conn) wantShutdown() uint32 {
	if c.state != stEstablished || !c.hostEOF {
		return 0
	}
	f := ShutdownSend
	if c.hostHup {
		f |= ShutdownRcv
	}
	return f
}

// next is the packet the connection wants to send the guest now, in
// priority order, or OpInvalid for none. dataSpace says whether the
// receive buffer at hand can carry data.
func (c *conn) next(dataSpace bool) Op {
	switch {
	case c.state == stClosing:
		return OpRst
	case c.state == stPeerInit:
		return OpResponse
	case c.state == stLocalInit:
		if c.needRequest {
			return OpRequest
		}
		return OpInvalid
	case c.wantShutdown() != c.sentShutdown:
		return OpShutdown
	case c.canSendData() && c.readable && c.peerCredit() > 0 && dataSpace:
		return OpRW
	case c.canSendData() && c.readable && c.peerCredit() == 0 && !c.creditRequested:
		return OpCreditRequest
	case c.needCreditReply || c.creditUpdateDue():
		return OpCreditUpdate
	}
	return OpInvalid
}
