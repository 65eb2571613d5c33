package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"os"
	"testing"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/internal/seedcorpus"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the fuzz seed corpus in testdata/fuzz")

// Fuzz input: data[0] bit 0 read-only, bit 1 indirect, bit 2 negotiate
// VERSION_1 only; data[1] the number of descriptors (1 + data[1]%8); then
// that many raw descriptors of 14 bytes (addr u64, len u32, flags u16;
// only the WRITE flag is taken, the chain links are made by the driver);
// the rest is guest memory from fzData on.
const (
	fzMem      = 0x10000
	fzData     = 0x8000
	fzTable    = 0x7000 // indirect table
	fzDiskSize = 64 << 10
	fzDescLen  = 14
	fzRingsEnd = 0x2100 // queue of 16 at 0 and its first indirect table
)

type noIRQ struct{}

func (noIRQ) Trigger(virtio.InterruptKind, uint16) error { return nil }

func runRequest(t *testing.T, disk *fileDisk, data []byte) {
	if len(data) < 2 {
		return
	}
	readOnly, indirect, bare := data[0]&1 != 0, data[0]&2 != 0, data[0]&4 != 0
	n := 1 + int(data[1]%8)
	if len(data) < 2+n*fzDescLen {
		return
	}
	mem := memory.FromBytes(0, make([]byte, fzMem))
	raw, _ := mem.Slice(fzData, fzMem-fzData)
	copy(raw, data[2+n*fzDescLen:])
	drv, err := queuetest.New(mem, 0, 16)
	if err != nil {
		t.Fatal(err)
	}
	drv.EventIdx, drv.Indirect = true, true
	var writable uint64
	overlapsRings := false // a hostile request may overwrite the rings themselves
	bufs := make([]queuetest.Buf, n)
	for i := range n {
		b := data[2+i*fzDescLen:]
		bufs[i] = queuetest.Buf{
			Addr:  memory.GuestAddr(binary.LittleEndian.Uint64(b)),
			Len:   binary.LittleEndian.Uint32(b[8:]),
			Write: binary.LittleEndian.Uint16(b[12:])&queue.DescFWrite != 0,
		}
		if bufs[i].Write {
			writable += uint64(bufs[i].Len)
			if bufs[i].Addr < fzRingsEnd {
				overlapsRings = true
			}
		}
	}
	var head uint16
	if indirect {
		head, err = drv.AddIndirect(bufs...)
	} else {
		head, err = drv.Add(bufs...)
	}
	if err != nil {
		t.Fatal(err)
	}
	dev, err := New(Config{Disk: disk, ReadOnly: readOnly, Serial: "fuzz", QueueSize: 16})
	if err != nil {
		t.Fatal(err)
	}
	if bare {
		dev.Ack(virtio.FeatureVersion1)
	} else {
		dev.Ack(dev.Features())
	}
	q, err := queue.New(mem, 16, drv.Config())
	if err != nil {
		t.Fatal(err)
	}
	var before []byte
	if readOnly {
		before, _ = os.ReadFile(disk.f.Name())
	}
	w := dev.newWorker(context.Background(), mem, noIRQ{}, q)
	w.maxExec = 0 // one request: run on this goroutine
	err = w.drain()
	if overlapsRings {
		if err != nil && !errors.Is(err, queue.ErrAvailIndex) {
			t.Fatalf("drain: %v", err)
		}
		return // the rings are garbage now; only "no panic, no hang" holds
	}
	if err != nil {
		t.Fatalf("drain: %v", err)
	}
	id, used, ok, err := drv.Used()
	if err != nil || !ok || id != uint32(head) {
		t.Fatalf("request not completed: %d %v %v", id, ok, err)
	}
	if _, _, more, _ := drv.Used(); more {
		t.Fatal("two completions for one request")
	}
	if uint64(used) > writable {
		t.Fatalf("used length %d exceeds the %d writable bytes", used, writable)
	}
	if used > 0 {
		last := bufs[n-1]
		st, err := mem.Slice(last.Addr+memory.GuestAddr(last.Len-1), 1)
		if err != nil || st[0] > StatusUnsupp {
			t.Fatalf("used %d but status byte %v, %v", used, st, err)
		}
	}
	s := dev.Metrics().Snapshot()
	if done := s.ReadOps + s.WriteOps + s.FlushOps + s.DiscardOps + s.WriteZeroesOps + s.GetIDOps; done+s.ErrorsTotal != 1 {
		t.Fatalf("%d operations and %d errors for one request", done, s.ErrorsTotal)
	}
	if readOnly {
		if after, _ := os.ReadFile(disk.f.Name()); !bytes.Equal(before, after) {
			t.Fatal("read-only disk changed")
		}
	}
}

func FuzzBlkRequest(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s.Data)
	}
	disk, _ := newDiskFile(f, f.TempDir(), fzDiskSize)
	f.Fuzz(func(t *testing.T, data []byte) { runRequest(t, disk, data) })
}

type fzBuf struct {
	addr  uint64
	len   uint32
	write bool
}

// input builds a fuzz input; mem is placed at fzData.
func input(flags byte, bufs []fzBuf, mem []byte) []byte {
	b := []byte{flags, byte(len(bufs) - 1)}
	for _, x := range bufs {
		var d [fzDescLen]byte
		binary.LittleEndian.PutUint64(d[0:], x.addr)
		binary.LittleEndian.PutUint32(d[8:], x.len)
		if x.write {
			binary.LittleEndian.PutUint16(d[12:], queue.DescFWrite)
		}
		b = append(b, d[:]...)
	}
	return append(b, mem...)
}

// hdrMem is guest memory at fzData starting with a request header, then
// payload.
func hdrMem(typ uint32, sector uint64, payload ...byte) []byte {
	m := make([]byte, 16, 16+len(payload))
	binary.LittleEndian.PutUint32(m[0:], typ)
	binary.LittleEndian.PutUint64(m[8:], sector)
	return append(m, payload...)
}

func rangeBytes(sector uint64, n, flags uint32) []byte {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], sector)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint32(b[12:], flags)
	return b[:]
}

func requestSeeds() []seedcorpus.Seed {
	const d = fzData
	hdr := fzBuf{d, 16, false}
	status := fzBuf{d + 0x1000, 1, true}
	data := func(n uint32, w bool) fzBuf { return fzBuf{d + 0x100, n, w} }
	payload := bytes.Repeat([]byte{0x5a}, 512)
	return []seedcorpus.Seed{
		{Name: "read", Data: input(0, []fzBuf{hdr, data(512, true), status}, hdrMem(TypeIn, 1))},
		{Name: "read-indirect", Data: input(2, []fzBuf{hdr, data(1024, true), status}, hdrMem(TypeIn, 126))},
		{Name: "write", Data: input(0, []fzBuf{hdr, data(512, false), status}, hdrMem(TypeOut, 2, make([]byte, 0xf0)...))},
		{Name: "write-one-descriptor", Data: input(0, []fzBuf{{d, 16 + 512, false}, status}, hdrMem(TypeOut, 3, payload...))},
		{Name: "write-read-only", Data: input(1, []fzBuf{hdr, data(512, false), status}, hdrMem(TypeOut, 2))},
		{Name: "flush", Data: input(0, []fzBuf{hdr, status}, hdrMem(TypeFlush, 0))},
		{Name: "get-id", Data: input(0, []fzBuf{hdr, data(20, true), status}, hdrMem(TypeGetID, 0))},
		{Name: "discard", Data: input(0, []fzBuf{{d, 32, false}, status}, hdrMem(TypeDiscard, 0, rangeBytes(8, 8, 0)...))},
		{Name: "write-zeroes", Data: input(0, []fzBuf{{d, 48, false}, status}, hdrMem(TypeWriteZeroes, 0, append(rangeBytes(8, 8, 1), rangeBytes(32, 1, 0)...)...))},
		{Name: "discard-not-negotiated", Data: input(4, []fzBuf{{d, 32, false}, status}, hdrMem(TypeDiscard, 0, rangeBytes(8, 8, 0)...))},
		{Name: "unknown-type", Data: input(0, []fzBuf{hdr, status}, hdrMem(99, 0))},
		{Name: "short-chain", Data: input(0, []fzBuf{hdr}, hdrMem(TypeIn, 0))},
		{Name: "short-header", Data: input(0, []fzBuf{{d, 8, false}, status}, hdrMem(TypeIn, 0))},
		{Name: "wrong-direction", Data: input(0, []fzBuf{hdr, data(512, false), status}, hdrMem(TypeIn, 0))},
		{Name: "sector-past-end", Data: input(0, []fzBuf{hdr, data(512, true), status}, hdrMem(TypeIn, fzDiskSize/512))},
		{Name: "sector-overflow", Data: input(0, []fzBuf{hdr, data(512, false), status}, hdrMem(TypeOut, 1<<55+1))},
		{Name: "addr-outside-memory", Data: input(0, []fzBuf{hdr, {1 << 40, 512, true}, status}, hdrMem(TypeIn, 0))},
		{Name: "len-4GiB", Data: input(0, []fzBuf{hdr, {d + 0x100, 0xffffffff - 17, true}, status}, hdrMem(TypeIn, 0))},
		{Name: "status-outside-memory", Data: input(0, []fzBuf{hdr, {fzMem, 1, true}}, hdrMem(TypeFlush, 0))},
		{Name: "status-addr-wraps", Data: input(0, []fzBuf{hdr, {^uint64(0), 2, true}}, hdrMem(TypeFlush, 0))},
		{Name: "too-many-ranges", Data: input(0, []fzBuf{{d, 16 + 16*33, false}, status}, hdrMem(TypeDiscard, 0, bytes.Repeat(rangeBytes(0, 1, 0), 33)...))},
	}
}

// TestSeedCorpus keeps testdata/fuzz/FuzzBlkRequest in step with requestSeeds
// (go test runs the files; -update-seeds rewrites them).
func TestSeedCorpus(t *testing.T) {
	seedcorpus.Check(t, "FuzzBlkRequest", requestSeeds(), *updateSeeds)
}
