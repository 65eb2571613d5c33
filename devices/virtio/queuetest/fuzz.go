package queuetest

import (
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// The guest-memory image fuzz targets share: byte 0 of an input picks the
// queue size (1 << (b % 6)), byte 1 turns on EVENT_IDX (bit 0) and
// indirect descriptors (bit 1), and the rest is guest memory from address
// 0: the descriptor table at 0, the avail ring at FuzzAvail, the used ring
// at FuzzUsed, buffers and indirect tables after, and nothing past FuzzMem.
const (
	FuzzAvail = 0x200
	FuzzUsed  = 0x280
	FuzzMem   = 0x1000
)

// FuzzQueue builds guest memory and an activated queue from a fuzz input
// laid out as above; ok is false for inputs too short to say anything.
// The layout is always valid, so an error from queue.New is a bug.
func FuzzQueue(data []byte) (mem *memory.Memory, q *queue.Queue, ok bool, err error) {
	if len(data) < 2 {
		return nil, nil, false, nil
	}
	size := uint16(1) << (data[0] % 6)
	mem = memory.FromBytes(0, make([]byte, FuzzMem))
	raw, _ := mem.Slice(0, FuzzMem)
	copy(raw, data[2:])
	q, err = queue.New(mem, 256, queue.Config{Size: size, Desc: 0, Avail: FuzzAvail, Used: FuzzUsed,
		EventIdx: data[1]&1 != 0, Indirect: data[1]&2 != 0})
	return mem, q, err == nil, err
}
