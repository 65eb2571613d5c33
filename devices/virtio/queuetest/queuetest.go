// Package queuetest is a driver-side mock of a split virtqueue: it lays
// out the rings and buffers in a memory.Memory, adds descriptor chains
// (direct and indirect) the way a guest driver does, and reads the used
// ring, so devices can be tested and benchmarked without KVM. Raw setters
// let tests write hostile rings (loops, bad indices, bad addresses).
//
// A Driver is used from one goroutine; the device runs on its own and the
// two share only guest memory, through the same atomic index accessors a
// real guest and device use.
package queuetest

import (
	"errors"
	"fmt"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Buf is one buffer of a chain to add.
type Buf struct {
	Addr  memory.GuestAddr
	Len   uint32
	Write bool // device-writable
}

// Driver is the driver side of one queue.
type Driver struct {
	Mem                           *memory.Memory
	Size                          uint16
	DescAddr, AvailAddr, UsedAddr memory.GuestAddr
	// EventIdx and Indirect are the ring features the driver uses; set
	// them before the device activates the queue (they go into Config).
	EventIdx, Indirect bool

	free      []uint16            // free descriptor indices
	chains    map[uint16][]uint16 // head -> descriptors to free on completion
	tables    map[uint16]tableBuf // head -> its indirect table, reused
	availIdx  uint16
	kickedAt  uint16
	lastUsed  uint16
	heap, end memory.GuestAddr
}

type tableBuf struct {
	addr memory.GuestAddr
	n    int
}

// ErrFull: no free descriptors or no buffer space left.
var ErrFull = errors.New("queuetest: queue or heap full")

// New lays out a queue of size descriptors at base (page aligned) and uses
// the rest of the guest memory region holding base as the buffer heap.
func New(mem *memory.Memory, base memory.GuestAddr, size uint16) (*Driver, error) {
	var reg *memory.Region
	for _, r := range mem.Regions() {
		if base >= r.Base && base < r.End() {
			reg = r
		}
	}
	if reg == nil || base%4096 != 0 {
		return nil, fmt.Errorf("queuetest: base %#x is not a page in guest memory", uint64(base))
	}
	n := memory.GuestAddr(size)
	d := &Driver{
		Mem: mem, Size: size,
		DescAddr:  base,
		AvailAddr: base + 16*n,
		chains:    map[uint16][]uint16{},
		tables:    map[uint16]tableBuf{},
	}
	d.UsedAddr = alignUp(d.AvailAddr+6+2*n, 4096)
	d.heap = alignUp(d.UsedAddr+6+8*n, 4096)
	d.end = reg.End()
	if d.heap > d.end {
		return nil, fmt.Errorf("queuetest: queue of %d does not fit at %#x", size, uint64(base))
	}
	if err := mem.Zero(base, uint64(d.heap-base)); err != nil {
		return nil, err
	}
	for i := range size {
		d.free = append(d.free, size-1-i)
	}
	return d, nil
}

func alignUp(a, n memory.GuestAddr) memory.GuestAddr { return (a + n - 1) / n * n }

// Config is the queue configuration a driver would write to the transport.
func (d *Driver) Config() queue.Config {
	return queue.Config{Size: d.Size, Desc: d.DescAddr, Avail: d.AvailAddr, Used: d.UsedAddr,
		EventIdx: d.EventIdx, Indirect: d.Indirect}
}

// Alloc reserves n bytes (16-byte aligned) of guest memory for buffers.
func (d *Driver) Alloc(n uint64) (memory.GuestAddr, error) {
	a := alignUp(d.heap, 16)
	if uint64(d.end-a) < n {
		return 0, fmt.Errorf("%w: cannot allocate %d bytes", ErrFull, n)
	}
	d.heap = a + memory.GuestAddr(n)
	return a, nil
}

// Free is the number of free descriptors.
func (d *Driver) Free() int { return len(d.free) }

// SetDesc writes descriptor i raw, with any values.
func (d *Driver) SetDesc(i uint16, addr memory.GuestAddr, n uint32, flags, next uint16) error {
	return writeDesc(d.Mem, d.DescAddr+16*memory.GuestAddr(i), addr, n, flags, next)
}

func writeDesc(mem *memory.Memory, at, addr memory.GuestAddr, n uint32, flags, next uint16) error {
	var b [16]byte
	putLE(b[0:8], uint64(addr))
	putLE(b[8:12], uint64(n))
	putLE(b[12:14], uint64(flags))
	putLE(b[14:16], uint64(next))
	return mem.Write(at, b[:])
}

func putLE(b []byte, v uint64) {
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
}

// Publish puts head in the next avail slot and advances the avail index,
// as a driver does after writing a chain. head is not checked.
func (d *Driver) Publish(head uint16) error {
	slot := d.AvailAddr + 4 + 2*memory.GuestAddr(d.availIdx%d.Size)
	if err := d.Mem.StoreUint16(slot, head); err != nil {
		return err
	}
	d.availIdx++
	memory.Fence()
	return d.Mem.StoreUint16(d.AvailAddr+2, d.availIdx)
}

// SetAvailIdx overwrites the avail index raw.
func (d *Driver) SetAvailIdx(v uint16) error {
	d.availIdx = v
	return d.Mem.StoreUint16(d.AvailAddr+2, v)
}

// SetAvailFlags writes the avail ring flags (AvailFNoInterrupt).
func (d *Driver) SetAvailFlags(v uint16) error { return d.Mem.StoreUint16(d.AvailAddr, v) }

// SetUsedEvent writes used_event: with EVENT_IDX, interrupt the driver
// when the used index passes v.
func (d *Driver) SetUsedEvent(v uint16) error {
	return d.Mem.StoreUint16(d.AvailAddr+4+2*memory.GuestAddr(d.Size), v)
}

// AvailEvent reads the device's avail_event.
func (d *Driver) AvailEvent() (uint16, error) {
	return d.Mem.LoadUint16(d.UsedAddr + 4 + 8*memory.GuestAddr(d.Size))
}

// UsedFlags reads the device's used ring flags (UsedFNoNotify).
func (d *Driver) UsedFlags() (uint16, error) { return d.Mem.LoadUint16(d.UsedAddr) }

func (d *Driver) take(n int) ([]uint16, error) {
	if n == 0 || n > len(d.free) {
		return nil, fmt.Errorf("%w: need %d descriptors, %d free", ErrFull, n, len(d.free))
	}
	ids := append([]uint16(nil), d.free[len(d.free)-n:]...)
	d.free = d.free[:len(d.free)-n]
	return ids, nil
}

// writeChain writes bufs into the descriptor table at table, buffer i in
// entry ids[i], linked in order.
func (d *Driver) writeChain(table memory.GuestAddr, ids []uint16, bufs []Buf) error {
	for i, b := range bufs {
		var flags, next uint16
		if b.Write {
			flags |= queue.DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= queue.DescFNext
			next = ids[i+1]
		}
		if err := writeDesc(d.Mem, table+16*memory.GuestAddr(ids[i]), b.Addr, b.Len, flags, next); err != nil {
			return err
		}
	}
	return nil
}

// Add writes bufs as a chain of direct descriptors and publishes it.
func (d *Driver) Add(bufs ...Buf) (head uint16, err error) {
	ids, err := d.take(len(bufs))
	if err != nil {
		return 0, err
	}
	if err := d.writeChain(d.DescAddr, ids, bufs); err != nil {
		return 0, err
	}
	d.chains[ids[0]] = ids
	return ids[0], d.Publish(ids[0])
}

// AddIndirect writes bufs into an indirect table (reused per head) and
// publishes a chain of one indirect descriptor pointing at it.
func (d *Driver) AddIndirect(bufs ...Buf) (head uint16, err error) {
	if len(bufs) == 0 {
		return 0, errors.New("queuetest: empty indirect chain")
	}
	ids, err := d.take(1)
	if err != nil {
		return 0, err
	}
	h := ids[0]
	t := d.tables[h]
	if t.n < len(bufs) {
		a, err := d.Alloc(16 * uint64(len(bufs)))
		if err != nil {
			d.free = append(d.free, h)
			return 0, err
		}
		t = tableBuf{a, len(bufs)}
		d.tables[h] = t
	}
	idx := make([]uint16, len(bufs))
	for i := range idx {
		idx[i] = uint16(i)
	}
	if err := d.writeChain(t.addr, idx, bufs); err != nil {
		return 0, err
	}
	if err := d.SetDesc(h, t.addr, uint32(16*len(bufs)), queue.DescFIndirect, 0); err != nil {
		return 0, err
	}
	d.chains[h] = ids
	return h, d.Publish(h)
}

// NeedsKick reports whether the device asked to be notified of the chains
// published since the last call (avail_event with EVENT_IDX, the used
// ring's NO_NOTIFY flag without).
func (d *Driver) NeedsKick() (bool, error) {
	memory.Fence()
	old, cur := d.kickedAt, d.availIdx
	d.kickedAt = cur
	if d.EventIdx {
		ev, err := d.AvailEvent()
		return queue.NeedEvent(ev, cur, old), err
	}
	f, err := d.UsedFlags()
	return f&queue.UsedFNoNotify == 0, err
}

// Used pops the next used element, if the device published one, and frees
// the chain's descriptors. With EVENT_IDX it then asks for an interrupt on
// the next completion, as Linux's virtqueue_enable_cb does.
func (d *Driver) Used() (id, n uint32, ok bool, err error) {
	idx, err := d.Mem.LoadUint16(d.UsedAddr + 2)
	if err != nil || idx == d.lastUsed {
		return 0, 0, false, err
	}
	e := d.UsedAddr + 4 + 8*memory.GuestAddr(d.lastUsed%d.Size)
	if id, err = d.Mem.Uint32(e); err != nil {
		return 0, 0, false, err
	}
	if n, err = d.Mem.Uint32(e + 4); err != nil {
		return 0, 0, false, err
	}
	d.lastUsed++
	if ids, known := d.chains[uint16(id)]; known && id < uint32(d.Size) {
		d.free = append(d.free, ids...)
		delete(d.chains, uint16(id))
	}
	if d.EventIdx {
		err = d.SetUsedEvent(d.lastUsed)
	}
	return id, n, true, err
}

// LastUsed is the free-running index of the next used element Used reads.
func (d *Driver) LastUsed() uint16 { return d.lastUsed }

// UsedIdx reads the device's used index.
func (d *Driver) UsedIdx() (uint16, error) { return d.Mem.LoadUint16(d.UsedAddr + 2) }
