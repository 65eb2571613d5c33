package net

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Fuzz image layout, as in the queue package's FuzzQueueWalk: data[0] picks
// the queue size (1 << data[0]%6); data[1] bit 0 EVENT_IDX, bit 1
// INDIRECT_DESC, bit 2 walk the chains as receive chains (else transmit);
// the rest is guest memory from address 0 with the descriptor table at 0,
// the avail ring at queuetest.FuzzAvail, the used ring at queuetest.FuzzUsed, and nothing past
// queuetest.FuzzMem.

// chains runs every chain of a guest-made image through the device's
// transmit gather or receive scatter.
func chains(t *testing.T, data []byte) {
	mem, q, ok, err := queuetest.FuzzQueue(data)
	if err != nil {
		t.Fatalf("valid layout rejected: %v", err)
	}
	if !ok {
		return
	}
	size := q.Size()
	d := &Device{mtu: 1500}
	a := &activation{mem: mem, rxq: q, txq: q}
	rx := data[1]&4 != 0
	frame := make([]byte, HeaderLen+60)
	for i := range frame {
		frame[i] = byte(i)
	}
	buf := make([]byte, HeaderLen+maxFrameLen(d.mtu))
	for range 2*int(size) + 2 {
		c, ok, err := q.Pop()
		if err != nil || !ok {
			return
		}
		if rx {
			err = d.scatter(a, &c, frame)
		} else {
			var f []byte
			f, err = d.gather(a, &c, buf)
			if err == nil && (len(f) < ethHeaderLen || len(f) > maxFrameLen(d.mtu)) {
				t.Fatalf("gather accepted a %d-byte frame", len(f))
			}
		}
		switch {
		case err == nil, errors.Is(err, queue.ErrInvalidChain), errors.Is(err, memory.ErrOutOfRange),
			errors.Is(err, errSmallBuffer), errors.Is(err, errReadOnly), errors.Is(err, errWriteOnly),
			errors.Is(err, errTooBig), errors.Is(err, errRunt), errors.Is(err, errShortHdr), errors.Is(err, errOffload):
		default:
			t.Fatalf("unexpected error kind: %v", err)
		}
		_ = q.AddUsed(c.Head(), 0)
	}
}

// FuzzNetChain feeds guest-made rings and descriptor chains to the
// virtio-net transmit and receive paths: no panic, no hang, only the
// known error kinds.
func FuzzNetChain(f *testing.F) {
	seed := func(flags byte, descs [][3]uint64, heads ...uint16) []byte {
		b := make([]byte, 2+queuetest.FuzzMem)
		b[0], b[1] = 3, flags // 8 descriptors
		m := b[2:]
		for i, d := range descs {
			binary.LittleEndian.PutUint64(m[16*i:], d[0])
			binary.LittleEndian.PutUint32(m[16*i+8:], uint32(d[1]))
			binary.LittleEndian.PutUint16(m[16*i+12:], uint16(d[2]))
			binary.LittleEndian.PutUint16(m[16*i+14:], uint16(i+1))
		}
		for i, h := range heads {
			binary.LittleEndian.PutUint16(m[queuetest.FuzzAvail+4+2*i:], h)
		}
		binary.LittleEndian.PutUint16(m[queuetest.FuzzAvail+2:], uint16(len(heads)))
		return b
	}
	const next, write = uint64(queue.DescFNext), uint64(queue.DescFWrite)
	f.Add(seed(0, [][3]uint64{{0x400, 12 + 60, 0}}, 0))
	f.Add(seed(4, [][3]uint64{{0x400, 2048, write}}, 0))
	f.Add(seed(4, [][3]uint64{{0x400, 10, write | next}, {0x800, 100, write}}, 0))
	f.Add(seed(4, [][3]uint64{{0x400, 10, write}}, 0))
	f.Add(seed(0, [][3]uint64{{0x400, 12, next}, {0xfff0, 60, 0}}, 0))
	f.Add(seed(2, [][3]uint64{{0x400, 32, uint64(queue.DescFIndirect)}}, 0))
	f.Fuzz(func(t *testing.T, data []byte) { chains(t, data) })
}
