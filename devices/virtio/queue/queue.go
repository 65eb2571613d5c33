// Package queue is the device side of a virtio 1.x split virtqueue over
// guest memory (virtio 1.x §2.7).
//
// A Queue knows only *memory.Memory: every descriptor, ring entry and
// buffer address comes from a hostile guest and goes through the
// bounds-checked accessors of vmm/memory. Ring indices and event fields,
// the values the guest writes concurrently, are read and written only
// through memory's atomic accessors (LoadUint16/StoreUint16) with
// memory.Fence between publishing and reading the other side's index.
//
// Descriptor chains are walked with a TTL of the table size, so a looping
// chain ends with ErrInvalidChain instead of hanging the device. A Queue is
// used by one goroutine (the device's) at a time.
package queue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Flags of a descriptor, the avail ring and the used ring.
const (
	DescFNext         uint16 = 1 // VIRTQ_DESC_F_NEXT
	DescFWrite        uint16 = 2 // VIRTQ_DESC_F_WRITE: device-writable
	DescFIndirect     uint16 = 4 // VIRTQ_DESC_F_INDIRECT
	AvailFNoInterrupt uint16 = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
	UsedFNoNotify     uint16 = 1 // VIRTQ_USED_F_NO_NOTIFY
)

// MaxSize is the largest split queue the spec allows.
const MaxSize = 32768

// Sizes of the ring structures (virtio 1.x §2.7).
const (
	descSize      = 16
	usedElemSize  = 8
	ringHeaderLen = 4 // flags + idx
)

// Error categories; returned errors wrap one of them.
var (
	// ErrInvalidQueue: the driver configured a queue that cannot work
	// (size, alignment, rings outside guest memory).
	ErrInvalidQueue = errors.New("invalid virtqueue configuration")
	// ErrInvalidChain: a descriptor chain is malformed (index out of
	// range, loop, nested or misused indirect table, length overflow).
	ErrInvalidChain = errors.New("invalid descriptor chain")
	// ErrAvailIndex: the driver's avail index is more than a queue size
	// ahead of the device, or a ring cannot be read. The queue cannot be
	// trusted until the driver resets the device.
	ErrAvailIndex = errors.New("invalid avail ring index")
)

// Config is what the driver sets up for one queue.
type Config struct {
	Size     uint16           // number of descriptors, a power of two
	Desc     memory.GuestAddr // descriptor table, 16-byte aligned
	Avail    memory.GuestAddr // avail (driver) ring, 2-byte aligned
	Used     memory.GuestAddr // used (device) ring, 4-byte aligned
	EventIdx bool             // VIRTIO_F_RING_EVENT_IDX negotiated
	Indirect bool             // VIRTIO_F_RING_INDIRECT_DESC negotiated
}

// Queue is the device side of one split virtqueue.
//
// Its methods fall on two sides that touch disjoint state: the avail side
// (Pending, Pop, Unpop, DisableNotification, EnableNotification and
// walking chains) and the used side (AddUsed, NeedsNotification). One
// goroutine may work each side at once (a device that pops on one
// goroutine and completes on others); calls on one side must be
// serialized by the caller.
type Queue struct {
	mem                *memory.Memory
	size               uint16
	desc, avail, used  memory.GuestAddr
	eventIdx, indirect bool

	nextAvail     uint16 // next avail ring slot the device reads
	nextUsed      uint16 // next used ring slot the device writes
	signalledUsed uint16 // nextUsed when the driver was last interrupted
	signalled     bool   // signalledUsed is valid
}

// New validates cfg against guest memory and the device's maximum queue
// size and returns a queue starting at index 0.
func New(mem *memory.Memory, maxSize uint16, cfg Config) (*Queue, error) {
	n := uint64(cfg.Size)
	switch {
	case n == 0 || n&(n-1) != 0:
		return nil, fmt.Errorf("%w: size %d is not a power of two", ErrInvalidQueue, n)
	case n > uint64(maxSize) || n > MaxSize:
		return nil, fmt.Errorf("%w: size %d exceeds the maximum %d", ErrInvalidQueue, n, maxSize)
	case cfg.Desc%16 != 0:
		return nil, fmt.Errorf("%w: descriptor table %#x is not 16-byte aligned", ErrInvalidQueue, uint64(cfg.Desc))
	case cfg.Avail%2 != 0:
		return nil, fmt.Errorf("%w: avail ring %#x is not 2-byte aligned", ErrInvalidQueue, uint64(cfg.Avail))
	case cfg.Used%4 != 0:
		return nil, fmt.Errorf("%w: used ring %#x is not 4-byte aligned", ErrInvalidQueue, uint64(cfg.Used))
	}
	for _, r := range []struct {
		what string
		addr memory.GuestAddr
		len  uint64
	}{
		{"descriptor table", cfg.Desc, descSize * n},
		{"avail ring", cfg.Avail, ringHeaderLen + 2*n + 2},
		{"used ring", cfg.Used, ringHeaderLen + usedElemSize*n + 2},
	} {
		if _, err := mem.Slice(r.addr, r.len); err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrInvalidQueue, r.what, err)
		}
	}
	return &Queue{
		mem: mem, size: cfg.Size,
		desc: cfg.Desc, avail: cfg.Avail, used: cfg.Used,
		eventIdx: cfg.EventIdx, indirect: cfg.Indirect,
	}, nil
}

// Size is the number of descriptors.
func (q *Queue) Size() uint16 { return q.size }

// Mem is the guest memory the queue lives in.
func (q *Queue) Mem() *memory.Memory { return q.mem }

// NextAvail is the free-running index of the next avail entry to pop.
func (q *Queue) NextAvail() uint16 { return q.nextAvail }

// NextUsed is the free-running index of the next used entry to write.
func (q *Queue) NextUsed() uint16 { return q.nextUsed }

// Field addresses; all inside the ranges New validated.
func (q *Queue) availIdxAddr() memory.GuestAddr { return q.avail + 2 }
func (q *Queue) availRingAddr(i uint16) memory.GuestAddr {
	return q.avail + ringHeaderLen + 2*memory.GuestAddr(i%q.size)
}
func (q *Queue) usedEventAddr() memory.GuestAddr {
	return q.availRingAddr(0) + 2*memory.GuestAddr(q.size)
}
func (q *Queue) usedIdxAddr() memory.GuestAddr { return q.used + 2 }
func (q *Queue) usedElemAddr(i uint16) memory.GuestAddr {
	return q.used + ringHeaderLen + usedElemSize*memory.GuestAddr(i%q.size)
}
func (q *Queue) availEventAddr() memory.GuestAddr {
	return q.used + ringHeaderLen + usedElemSize*memory.GuestAddr(q.size)
}

// Pending is how many chains the driver has made available that the
// device has not popped yet. It fails with ErrAvailIndex if the driver's
// index is more than a queue size ahead.
func (q *Queue) Pending() (uint16, error) {
	idx, err := q.mem.LoadUint16(q.availIdxAddr())
	if err != nil {
		return 0, fmt.Errorf("%w: read avail idx: %w", ErrAvailIndex, err)
	}
	n := idx - q.nextAvail
	if n > q.size {
		return 0, fmt.Errorf("%w: avail idx %d is %d entries ahead of %d on a queue of %d",
			ErrAvailIndex, idx, n, q.nextAvail, q.size)
	}
	return n, nil
}

// Pop takes the next available descriptor chain. ok is false when the
// avail ring is empty. An error means the ring itself is broken
// (ErrAvailIndex). A chain whose head or descriptors are malformed is
// still returned: walking it reports ErrInvalidChain, and the device
// completes it (AddUsed with its head) if the head is in range.
func (q *Queue) Pop() (c Chain, ok bool, err error) {
	n, err := q.Pending()
	if err != nil || n == 0 {
		return Chain{}, false, err
	}
	head, err := q.mem.LoadUint16(q.availRingAddr(q.nextAvail))
	if err != nil {
		return Chain{}, false, fmt.Errorf("%w: read avail ring: %w", ErrAvailIndex, err)
	}
	q.nextAvail++
	c = Chain{q: q, head: head, table: q.desc, tableLen: uint32(q.size), next: head, more: true, ttl: uint32(q.size)}
	if head >= q.size {
		c.err = fmt.Errorf("%w: head index %d out of range (queue size %d)", ErrInvalidChain, head, q.size)
	}
	return c, true, nil
}

// Unpop gives back the chain returned by the last Pop, so that the next
// Pop returns it again (a device that popped a chain it cannot use yet).
func (q *Queue) Unpop() { q.nextAvail-- }

// AddUsed returns the chain with the given head to the driver, with n
// bytes written to its device-writable buffers, and publishes the used
// index. The element is written before the index, with a fence between.
func (q *Queue) AddUsed(head uint16, n uint32) error {
	if head >= q.size {
		return fmt.Errorf("%w: cannot return head %d on a queue of %d", ErrInvalidChain, head, q.size)
	}
	e := q.usedElemAddr(q.nextUsed)
	if err := q.mem.PutUint32(e, uint32(head)); err != nil {
		return fmt.Errorf("write used element: %w", err)
	}
	if err := q.mem.PutUint32(e+4, n); err != nil {
		return fmt.Errorf("write used element: %w", err)
	}
	q.nextUsed++
	memory.Fence()
	if err := q.mem.StoreUint16(q.usedIdxAddr(), q.nextUsed); err != nil {
		return fmt.Errorf("publish used idx: %w", err)
	}
	return nil
}

// NeedsNotification reports whether the driver wants an interrupt for the
// used entries added since the last time it returned true. With EVENT_IDX
// it uses the driver's used_event and the wrap-safe comparison of virtio
// 1.x §2.7.10 (vring_need_event); without it, the avail ring's
// NO_INTERRUPT flag.
func (q *Queue) NeedsNotification() (bool, error) {
	memory.Fence() // the used idx store must be visible before we read the driver's event
	if !q.eventIdx {
		f, err := q.mem.LoadUint16(q.avail)
		if err != nil {
			return true, fmt.Errorf("read avail flags: %w", err)
		}
		return f&AvailFNoInterrupt == 0, nil
	}
	ev, err := q.mem.LoadUint16(q.usedEventAddr())
	if err != nil {
		return true, fmt.Errorf("read used_event: %w", err)
	}
	old, valid := q.signalledUsed, q.signalled
	q.signalledUsed, q.signalled = q.nextUsed, true
	if !valid {
		return true, nil
	}
	return NeedEvent(ev, q.nextUsed, old), nil
}

// NeedEvent is vring_need_event: whether moving an index from old to new
// crossed event, computed modulo 2^16.
func NeedEvent(event, new, old uint16) bool {
	return new-event-1 < new-old
}

// DisableNotification asks the driver not to notify the device while it
// is draining the queue. With EVENT_IDX this is implicit: avail_event is
// left behind, so the driver's index moves past it without a notification.
func (q *Queue) DisableNotification() error {
	if q.eventIdx {
		return nil
	}
	return q.mem.StoreUint16(q.used, UsedFNoNotify)
}

// EnableNotification asks the driver to notify on the next available
// chain, then reports whether chains arrived in the meantime: if more is
// true the device must drain the queue again instead of waiting, or that
// chain would wait for a notification that never comes.
func (q *Queue) EnableNotification() (more bool, err error) {
	if q.eventIdx {
		err = q.mem.StoreUint16(q.availEventAddr(), q.nextAvail)
	} else {
		err = q.mem.StoreUint16(q.used, 0)
	}
	if err != nil {
		return false, fmt.Errorf("enable notification: %w", err)
	}
	memory.Fence() // publish avail_event before re-reading the driver's index
	n, err := q.Pending()
	return n > 0, err
}

// Descriptor is one buffer of a chain, copied out of guest memory. Addr
// and Len are unchecked guest values: access the buffer only through
// memory's bounds-checked accessors.
type Descriptor struct {
	Addr  memory.GuestAddr
	Len   uint32
	Flags uint16
}

// Writable reports whether the device may write the buffer.
func (d Descriptor) Writable() bool { return d.Flags&DescFWrite != 0 }

// Chain walks one descriptor chain, following NEXT links and at most one
// indirect table, with a TTL that stops loops.
type Chain struct {
	q          *Queue
	head       uint16
	table      memory.GuestAddr // current descriptor table
	tableLen   uint32           // entries in the current table
	next       uint16           // index of the next descriptor in table
	more       bool             // a descriptor follows
	indirect   bool             // walking an indirect table
	ttl        uint32           // descriptors left before the walk gives up
	total      uint64           // sum of buffer lengths so far
	err        error
	descriptor [descSize]byte
}

// Head is the index of the chain's first descriptor, the id the device
// returns with AddUsed.
func (c *Chain) Head() uint16 { return c.head }

// Err is the reason the walk stopped early, wrapping ErrInvalidChain, or
// nil if it ended normally.
func (c *Chain) Err() error { return c.err }

func (c *Chain) fail(format string, args ...any) (Descriptor, bool) {
	c.err = fmt.Errorf("%w: head %d: %s", ErrInvalidChain, c.head, fmt.Sprintf(format, args...))
	c.more = false
	return Descriptor{}, false
}

// Next returns the chain's next buffer descriptor; ok is false at the end
// of the chain or on an error (see Err). Indirect descriptors are followed,
// never returned.
func (c *Chain) Next() (d Descriptor, ok bool) {
	for {
		if c.err != nil || !c.more {
			return Descriptor{}, false
		}
		if c.ttl == 0 {
			return c.fail("more than %d descriptors (a loop?)", c.tableLen)
		}
		c.ttl--
		if uint32(c.next) >= c.tableLen {
			return c.fail("descriptor index %d out of range (table of %d)", c.next, c.tableLen)
		}
		at := c.table + memory.GuestAddr(c.next)*descSize
		if err := c.q.mem.Read(at, c.descriptor[:]); err != nil {
			return c.fail("read descriptor %d: %v", c.next, err)
		}
		b := c.descriptor[:]
		d = Descriptor{
			Addr:  memory.GuestAddr(binary.LittleEndian.Uint64(b[0:8])),
			Len:   binary.LittleEndian.Uint32(b[8:12]),
			Flags: binary.LittleEndian.Uint16(b[12:14]),
		}
		next := binary.LittleEndian.Uint16(b[14:16])
		if d.Flags&DescFIndirect != 0 {
			switch {
			case c.indirect:
				return c.fail("nested indirect table")
			case !c.q.indirect:
				return c.fail("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
			case d.Flags&DescFNext != 0:
				return c.fail("indirect descriptor with NEXT")
			case d.Len == 0 || d.Len%descSize != 0:
				return c.fail("indirect table length %d is not a positive multiple of %d", d.Len, descSize)
			case d.Len/descSize > uint32(c.q.size):
				return c.fail("indirect table of %d entries is longer than the queue (%d)", d.Len/descSize, c.q.size)
			}
			if _, err := c.q.mem.Slice(d.Addr, uint64(d.Len)); err != nil {
				return c.fail("indirect table: %v", err)
			}
			c.table, c.tableLen, c.next = d.Addr, d.Len/descSize, 0
			c.ttl, c.indirect = c.tableLen, true
			continue
		}
		if uint64(d.Addr)+uint64(d.Len) < uint64(d.Addr) {
			return c.fail("buffer %#x+%#x wraps", uint64(d.Addr), d.Len)
		}
		c.total += uint64(d.Len)
		if c.total > math.MaxUint32 {
			return c.fail("total length %d overflows 32 bits", c.total)
		}
		if d.Flags&DescFNext != 0 {
			c.next = next
		} else {
			c.more = false
		}
		return d, true
	}
}

// Collect appends the rest of the chain to dst. The error, if any, wraps
// ErrInvalidChain; dst then holds the descriptors before the fault.
func (c *Chain) Collect(dst []Descriptor) ([]Descriptor, error) {
	for {
		d, ok := c.Next()
		if !ok {
			return dst, c.err
		}
		dst = append(dst, d)
	}
}
