package net

import "sync/atomic"

// Metrics are the device's counters. Everything under Drop is something a
// guest (or the network) can cause; none of it stops the device.
type Metrics struct {
	RxFrames, RxBytes atomic.Uint64 // delivered to the guest
	TxFrames, TxBytes atomic.Uint64 // sent to the port

	RxDropNoBuffer    atomic.Uint64 // a frame arrived with no receive buffer (after a reset)
	RxDropSmallBuffer atomic.Uint64 // the receive chain cannot hold the frame
	RxDropBadChain    atomic.Uint64 // malformed receive chain (bad address, read-only buffer, loop)
	RxDropTooBig      atomic.Uint64 // a frame from the port larger than the MTU allows
	RxDropInactive    atomic.Uint64 // a frame read while the driver was resetting
	RxPortErrors      atomic.Uint64 // Port.Read failures

	TxDropBadChain atomic.Uint64 // malformed transmit chain
	TxDropTooBig   atomic.Uint64 // a frame over the MTU
	TxDropRunt     atomic.Uint64 // shorter than the header or an Ethernet header
	TxDropOffload  atomic.Uint64 // header asks for checksum or segmentation offload
	TxPortErrors   atomic.Uint64 // Port.Write failures (a trunk's untagged frames, link down)

	RxThrottledNs, TxThrottledNs atomic.Uint64 // time spent waiting for the rate limiters

	Interrupts      atomic.Uint64
	InterruptErrors atomic.Uint64
	QueueErrors     atomic.Uint64 // rings so broken the device needs a reset
	ConfigWrites    atomic.Uint64 // ignored writes to the read-only config space
}

// Snapshot is a copy of Metrics for JSON (Prometheus, "rayvmm inspect").
type Snapshot struct {
	RxFrames          uint64 `json:"rx_frames"`
	RxBytes           uint64 `json:"rx_bytes"`
	TxFrames          uint64 `json:"tx_frames"`
	TxBytes           uint64 `json:"tx_bytes"`
	RxDropNoBuffer    uint64 `json:"rx_drop_no_buffer"`
	RxDropSmallBuffer uint64 `json:"rx_drop_small_buffer"`
	RxDropBadChain    uint64 `json:"rx_drop_bad_chain"`
	RxDropTooBig      uint64 `json:"rx_drop_too_big"`
	RxDropInactive    uint64 `json:"rx_drop_inactive"`
	RxPortErrors      uint64 `json:"rx_port_errors"`
	TxDropBadChain    uint64 `json:"tx_drop_bad_chain"`
	TxDropTooBig      uint64 `json:"tx_drop_too_big"`
	TxDropRunt        uint64 `json:"tx_drop_runt"`
	TxDropOffload     uint64 `json:"tx_drop_offload"`
	TxPortErrors      uint64 `json:"tx_port_errors"`
	RxThrottledNs     uint64 `json:"rx_throttled_ns"`
	TxThrottledNs     uint64 `json:"tx_throttled_ns"`
	Interrupts        uint64 `json:"interrupts"`
	InterruptErrors   uint64 `json:"interrupt_errors"`
	QueueErrors       uint64 `json:"queue_errors"`
	ConfigWrites      uint64 `json:"config_writes"`
}

// Snapshot copies the counters.
func (m *Metrics) Snapshot() Snapshot {
	return Snapshot{
		RxFrames: m.RxFrames.Load(), RxBytes: m.RxBytes.Load(),
		TxFrames: m.TxFrames.Load(), TxBytes: m.TxBytes.Load(),
		RxDropNoBuffer: m.RxDropNoBuffer.Load(), RxDropSmallBuffer: m.RxDropSmallBuffer.Load(),
		RxDropBadChain: m.RxDropBadChain.Load(), RxDropTooBig: m.RxDropTooBig.Load(),
		RxDropInactive: m.RxDropInactive.Load(), RxPortErrors: m.RxPortErrors.Load(),
		TxDropBadChain: m.TxDropBadChain.Load(), TxDropTooBig: m.TxDropTooBig.Load(),
		TxDropRunt: m.TxDropRunt.Load(), TxDropOffload: m.TxDropOffload.Load(),
		TxPortErrors:  m.TxPortErrors.Load(),
		RxThrottledNs: m.RxThrottledNs.Load(), TxThrottledNs: m.TxThrottledNs.Load(),
		Interrupts: m.Interrupts.Load(), InterruptErrors: m.InterruptErrors.Load(),
		QueueErrors: m.QueueErrors.Load(), ConfigWrites: m.ConfigWrites.Load(),
	}
}
