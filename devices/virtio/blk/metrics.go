package blk

import (
	"sync/atomic"
	"time"
)

// ErrorKind classifies a request the device refused or failed.
type ErrorKind int

// Error kinds, each counted separately.
const (
	ErrInvalidChain ErrorKind = iota // descriptor chain unwalkable (loop, bad index, bad indirect)
	ErrMalformed                     // short chain, wrong direction, bad lengths, too many segments
	ErrOutOfRange                    // sector past the end of the disk or overflowing
	ErrGuestMemory                   // a buffer outside guest memory
	ErrReadOnly                      // a write to a read-only disk
	ErrUnsupported                   // unknown request type, feature not negotiated, unknown flags
	ErrIO                            // the backend failed
	ErrQueue                         // the avail ring is broken; the device needs a reset
	numErrorKinds
)

var errorKindNames = [numErrorKinds]string{
	"invalid_chain", "malformed", "out_of_range", "guest_memory", "read_only", "unsupported", "io", "queue",
}

func (k ErrorKind) String() string {
	if k >= 0 && k < numErrorKinds {
		return errorKindNames[k]
	}
	return "unknown"
}

// latencyBounds are the upper bounds of the latency histogram, from a
// request being popped to its completion being published.
var latencyBounds = [...]time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second,
}

// Metrics are a disk's counters. All fields are updated atomically by the
// device goroutine and may be read at any time through Snapshot.
type Metrics struct {
	readOps, writeOps, flushOps, discardOps, writeZeroesOps, getIDOps atomic.Uint64
	readBytes, writeBytes                                             atomic.Uint64
	noStatus                                                          atomic.Uint64
	errors                                                            [numErrorKinds]atomic.Uint64
	throttledNanos                                                    atomic.Uint64
	latency                                                           [len(latencyBounds) + 1]atomic.Uint64
	latencySumNanos                                                   atomic.Uint64
}

func (m *Metrics) countError(k ErrorKind) { m.errors[k].Add(1) }

func (m *Metrics) observe(d time.Duration) {
	i := 0
	for i < len(latencyBounds) && d > latencyBounds[i] {
		i++
	}
	m.latency[i].Add(1)
	m.latencySumNanos.Add(uint64(d))
}

// Bucket is one cumulative histogram bucket, Prometheus style: Count
// requests took at most LeSeconds. The +Inf bucket is Latency.Count.
type Bucket struct {
	LeSeconds float64 `json:"le_seconds"`
	Count     uint64  `json:"count"`
}

// Latency is a cumulative latency histogram.
type Latency struct {
	Buckets    []Bucket `json:"buckets"`
	Count      uint64   `json:"count"`
	SumSeconds float64  `json:"sum_seconds"`
}

// Snapshot is a point-in-time copy of a disk's metrics, ready for JSON and
// for a Prometheus exporter.
type Snapshot struct {
	ReadOps        uint64            `json:"read_ops"`
	WriteOps       uint64            `json:"write_ops"`
	FlushOps       uint64            `json:"flush_ops"`
	DiscardOps     uint64            `json:"discard_ops"`
	WriteZeroesOps uint64            `json:"write_zeroes_ops"`
	GetIDOps       uint64            `json:"get_id_ops"`
	ReadBytes      uint64            `json:"read_bytes"`
	WriteBytes     uint64            `json:"write_bytes"`
	Errors         map[string]uint64 `json:"errors"`
	ErrorsTotal    uint64            `json:"errors_total"`
	// NoStatus counts chains returned with used length 0 because no
	// status byte could be written.
	NoStatus         uint64  `json:"no_status"`
	ThrottledSeconds float64 `json:"throttled_seconds"`
	Latency          Latency `json:"latency"`
}

// Snapshot copies the counters.
func (m *Metrics) Snapshot() Snapshot {
	s := Snapshot{
		ReadOps: m.readOps.Load(), WriteOps: m.writeOps.Load(), FlushOps: m.flushOps.Load(),
		DiscardOps: m.discardOps.Load(), WriteZeroesOps: m.writeZeroesOps.Load(), GetIDOps: m.getIDOps.Load(),
		ReadBytes: m.readBytes.Load(), WriteBytes: m.writeBytes.Load(),
		Errors:           make(map[string]uint64, numErrorKinds),
		NoStatus:         m.noStatus.Load(),
		ThrottledSeconds: time.Duration(m.throttledNanos.Load()).Seconds(),
	}
	for k := range numErrorKinds {
		n := m.errors[k].Load()
		s.Errors[k.String()] = n
		s.ErrorsTotal += n
	}
	var cum uint64
	for i := range m.latency {
		cum += m.latency[i].Load()
		if i < len(latencyBounds) {
			s.Latency.Buckets = append(s.Latency.Buckets, Bucket{LeSeconds: latencyBounds[i].Seconds(), Count: cum})
		}
	}
	s.Latency.Count = cum
	s.Latency.SumSeconds = time.Duration(m.latencySumNanos.Load()).Seconds()
	return s
}
