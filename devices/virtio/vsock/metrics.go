package vsock

import (
	"reflect"
	"sync/atomic"
)

// Metrics are the device's counters, updated atomically by the device
// goroutine and readable at any time through Snapshot. Everything under
// "bad" is something a guest (or a host client) can cause; none of it
// stops the device.
type Metrics struct {
	RxPackets, RxBytes atomic.Uint64 // packets and data bytes delivered to the guest
	TxPackets, TxBytes atomic.Uint64 // packets from the guest, data bytes written to host sockets

	HostConnects      atomic.Uint64 // host-initiated connections accepted on the listener
	HostConnectsOK    atomic.Uint64 // ... that the guest accepted (OK sent)
	HandshakeErrors   atomic.Uint64 // bad CONNECT lines, early closes
	HandshakeTimeouts atomic.Uint64 // no CONNECT line in time
	GuestConnects     atomic.Uint64 // guest REQUESTs to the host
	GuestRefused      atomic.Uint64 // ... nothing listening at <uds>_<port>: RST
	ConnLimit         atomic.Uint64 // connections refused at the connection limit
	ConnsAdded        atomic.Uint64
	ConnsRemoved      atomic.Uint64
	RequestTimeouts   atomic.Uint64 // the guest did not answer a REQUEST in time: RST
	ShutdownTimeouts  atomic.Uint64 // a shutdown did not finish in time: RST

	BadChain       atomic.Uint64 // malformed chains (wrong direction, outside guest memory, loops)
	BadHeader      atomic.Uint64 // a transmit chain shorter than its header or its len
	BadType        atomic.Uint64 // type other than STREAM: RST
	BadCID         atomic.Uint64 // src_cid not the guest's or dst_cid not the host's: dropped
	BadOp          atomic.Uint64 // unknown op, or an op the connection's state does not allow
	Unroutable     atomic.Uint64 // packets for no connection: RST
	CreditOverflow atomic.Uint64 // guest data past the credit the device gave: RST
	RstDropped     atomic.Uint64 // RST replies dropped because too many were queued

	HostReadErrors  atomic.Uint64
	HostWriteErrors atomic.Uint64 // host socket gone while the guest still sent: RST
	Interrupts      atomic.Uint64
	InterruptErrors atomic.Uint64
	QueueErrors     atomic.Uint64 // rings so broken the device needs a reset
	LoopErrors      atomic.Uint64 // epoll or accept failures
	ConfigWrites    atomic.Uint64 // ignored writes to the read-only config space
}

// Snapshot is a copy of Metrics for JSON.
type Snapshot struct {
	RxPackets         uint64 `json:"rx_packets"`
	RxBytes           uint64 `json:"rx_bytes"`
	TxPackets         uint64 `json:"tx_packets"`
	TxBytes           uint64 `json:"tx_bytes"`
	HostConnects      uint64 `json:"host_connects"`
	HostConnectsOK    uint64 `json:"host_connects_ok"`
	HandshakeErrors   uint64 `json:"handshake_errors"`
	HandshakeTimeouts uint64 `json:"handshake_timeouts"`
	GuestConnects     uint64 `json:"guest_connects"`
	GuestRefused      uint64 `json:"guest_refused"`
	ConnLimit         uint64 `json:"conn_limit"`
	ConnsAdded        uint64 `json:"conns_added"`
	ConnsRemoved      uint64 `json:"conns_removed"`
	RequestTimeouts   uint64 `json:"request_timeouts"`
	ShutdownTimeouts  uint64 `json:"shutdown_timeouts"`
	BadChain          uint64 `json:"bad_chain"`
	BadHeader         uint64 `json:"bad_header"`
	BadType           uint64 `json:"bad_type"`
	BadCID            uint64 `json:"bad_cid"`
	BadOp             uint64 `json:"bad_op"`
	Unroutable        uint64 `json:"unroutable"`
	CreditOverflow    uint64 `json:"credit_overflow"`
	RstDropped        uint64 `json:"rst_dropped"`
	HostReadErrors    uint64 `json:"host_read_errors"`
	HostWriteErrors   uint64 `json:"host_write_errors"`
	Interrupts        uint64 `json:"interrupts"`
	InterruptErrors   uint64 `json:"interrupt_errors"`
	QueueErrors       uint64 `json:"queue_errors"`
	LoopErrors        uint64 `json:"loop_errors"`
	ConfigWrites      uint64 `json:"config_writes"`
}

// Snapshot copies the counters: every atomic field of Metrics to the
// Snapshot field of the same name (a test checks that the two match).
func (m *Metrics) Snapshot() Snapshot {
	var s Snapshot
	mv, sv := reflect.ValueOf(m).Elem(), reflect.ValueOf(&s).Elem()
	for i := range mv.NumField() {
		c := mv.Field(i).Addr().Interface().(*atomic.Uint64)
		sv.FieldByName(mv.Type().Field(i).Name).SetUint(c.Load())
	}
	return s
}
