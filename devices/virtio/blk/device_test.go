package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/mmio"
	"github.com/rayvmm/rayvmm/devices/virtio/queue"
	"github.com/rayvmm/rayvmm/devices/virtio/queuetest"
	"github.com/rayvmm/rayvmm/ratelimit"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

func rd(a memory.GuestAddr, n uint32) queuetest.Buf { return queuetest.Buf{Addr: a, Len: n} }
func wr(a memory.GuestAddr, n uint32) queuetest.Buf {
	return queuetest.Buf{Addr: a, Len: n, Write: true}
}

const noStatus = -1

// blkCase is one request: build returns the chain and where its status
// byte is; check (optional) looks at guest memory and the file afterwards.
type blkCase struct {
	name       string
	o          opts
	indirect   bool
	build      func(h *harness) (bufs []queuetest.Buf, status memory.GuestAddr)
	wantStatus int // StatusOK/IOErr/Unsupp, or noStatus: completed with used length 0
	wantUsed   uint32
	wantErr    ErrorKind // counted error kind; -1 for none
	fileSame   bool      // the backing file must be unchanged
	check      func(t *testing.T, h *harness, before []byte)
}

func TestRequests(t *testing.T) {
	const capacity = 1 << 20 / SectorSize
	writeData := func(h *harness, n int, fill byte) memory.GuestAddr {
		a := h.alloc(uint64(n))
		if err := h.mem.Write(a, bytes.Repeat([]byte{fill}, n)); err != nil {
			t.Fatal(err)
		}
		return a
	}
	var dataAt, gapAt memory.GuestAddr // set by build, read by check
	rangeBuf := func(h *harness, ranges ...[3]uint64) memory.GuestAddr {
		a := h.alloc(uint64(16 * len(ranges)))
		for i, r := range ranges {
			var b [16]byte
			binary.LittleEndian.PutUint64(b[0:], r[0])
			binary.LittleEndian.PutUint32(b[8:], uint32(r[1]))
			binary.LittleEndian.PutUint32(b[12:], uint32(r[2]))
			if err := h.mem.Write(a+memory.GuestAddr(16*i), b[:]); err != nil {
				t.Fatal(err)
			}
		}
		return a
	}
	fileAt := func(t *testing.T, h *harness, off, n int) []byte { return h.fileBytes()[off : off+n] }

	tests := []blkCase{
		{
			name: "read one sector",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				dataAt = h.alloc(512)
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 3), 16), wr(dataAt, 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 513, wantErr: -1, fileSame: true,
			check: func(t *testing.T, h *harness, before []byte) {
				if !bytes.Equal(h.guestBytes(dataAt, 512), before[3*512:4*512]) {
					t.Fatal("guest buffer does not hold sector 3")
				}
			},
		},
		{
			name: "read 8 sectors in 3 indirect segments", indirect: true,
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				dataAt = h.alloc(4096)
				gapAt = h.alloc(4096) // non-contiguous middle piece
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, capacity-8), 16), wr(dataAt, 1024), wr(gapAt, 2048), wr(dataAt+1024, 1024), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 4097, wantErr: -1, fileSame: true,
			check: func(t *testing.T, h *harness, before []byte) {
				last := before[(capacity-8)*512:]
				got := append(append(h.guestBytes(dataAt, 1024), h.guestBytes(gapAt, 2048)...), h.guestBytes(dataAt+1024, 1024)...)
				if !bytes.Equal(got, last) {
					t.Fatal("the three segments do not hold the last 8 sectors in order")
				}
			},
		},
		{
			name: "read with data and status in one descriptor",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				dataAt = h.alloc(513)
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 16), wr(dataAt, 513)}, dataAt + 512
			},
			wantStatus: int(StatusOK), wantUsed: 513, wantErr: -1, fileSame: true,
			check: func(t *testing.T, h *harness, before []byte) {
				if !bytes.Equal(h.guestBytes(dataAt, 512), before[:512]) {
					t.Fatal("guest buffer does not hold sector 0")
				}
			},
		},
		{
			name: "write two sectors",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, 100), 16), rd(writeData(h, 1024, 0xab), 1024), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 1, wantErr: -1,
			check: func(t *testing.T, h *harness, before []byte) {
				got := h.fileBytes()
				if !bytes.Equal(got[100*512:102*512], bytes.Repeat([]byte{0xab}, 1024)) {
					t.Fatal("sectors 100-101 not written")
				}
				if !bytes.Equal(got[:100*512], before[:100*512]) || !bytes.Equal(got[102*512:], before[102*512:]) {
					t.Fatal("bytes outside sectors 100-101 changed")
				}
			},
		},
		{
			name: "write 3 sectors from 3 descriptors, the first two contiguous", indirect: true,
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				a, b, c := writeData(h, 512, 0xa1), writeData(h, 1024, 0xb2), writeData(h, 1024, 0xc3) // b follows a: one merged piece
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, 200), 16), rd(a, 512), rd(b, 512), rd(c, 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 1, wantErr: -1,
			check: func(t *testing.T, h *harness, before []byte) {
				got := h.fileBytes()
				want := append(append(bytes.Repeat([]byte{0xa1}, 512), bytes.Repeat([]byte{0xb2}, 512)...), bytes.Repeat([]byte{0xc3}, 512)...)
				if !bytes.Equal(got[200*512:203*512], want) {
					t.Fatal("sectors 200-202 do not hold the three buffers in order")
				}
				if !bytes.Equal(got[:200*512], before[:200*512]) || !bytes.Equal(got[203*512:], before[203*512:]) {
					t.Fatal("bytes outside sectors 200-202 changed")
				}
			},
		},
		{
			name: "write with header and data in one descriptor",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				a := writeData(h, 16+512, 0xcd)
				var hdr [16]byte
				binary.LittleEndian.PutUint32(hdr[0:], TypeOut)
				binary.LittleEndian.PutUint64(hdr[8:], 7)
				_ = h.mem.Write(a, hdr[:])
				s := h.status()
				return []queuetest.Buf{rd(a, 16+512), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 1, wantErr: -1,
			check: func(t *testing.T, h *harness, _ []byte) {
				if !bytes.Equal(fileAt(t, h, 7*512, 512), bytes.Repeat([]byte{0xcd}, 512)) {
					t.Fatal("sector 7 not written")
				}
			},
		},
		{
			name: "flush",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeFlush, 0), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 1, wantErr: -1, fileSame: true,
		},
		{
			name: "get id",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				dataAt = h.alloc(20)
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeGetID, 0), 16), wr(dataAt, 20), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 21, wantErr: -1, fileSame: true,
			check: func(t *testing.T, h *harness, _ []byte) {
				want := append([]byte(testSerial), make([]byte, 20-len(testSerial))...)
				if got := h.guestBytes(dataAt, 20); !bytes.Equal(got, want) {
					t.Fatalf("id %q, want %q", got, want)
				}
			},
		},
		{
			name: "get id into a short buffer",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				dataAt = h.alloc(8)
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeGetID, 0), 16), wr(dataAt, 8), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 9, wantErr: -1, fileSame: true,
		},
		{
			name: "discard",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeDiscard, 0), 16), rd(rangeBuf(h, [3]uint64{16, 8, 0}, [3]uint64{40, 8, 0}), 32), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 1, wantErr: -1,
			check: func(t *testing.T, h *harness, before []byte) {
				got := h.fileBytes()
				zero := make([]byte, 8*512)
				if !bytes.Equal(got[16*512:24*512], zero) || !bytes.Equal(got[40*512:48*512], zero) {
					t.Fatal("discarded ranges do not read as zeroes")
				}
				if !bytes.Equal(got[24*512:40*512], before[24*512:40*512]) {
					t.Fatal("bytes between the ranges changed")
				}
			},
		},
		{
			name: "write zeroes with unmap",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeWriteZeroes, 0), 16), rd(rangeBuf(h, [3]uint64{64, 3, 1}), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 1, wantErr: -1,
			check: func(t *testing.T, h *harness, _ []byte) {
				if !bytes.Equal(fileAt(t, h, 64*512, 3*512), make([]byte, 3*512)) {
					t.Fatal("range not zeroed")
				}
			},
		},
		{
			name: "discard with unmap flag is unsupported",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeDiscard, 0), 16), rd(rangeBuf(h, [3]uint64{16, 8, 1}), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusUnsupp), wantUsed: 1, wantErr: ErrUnsupported, fileSame: true,
		},
		{
			name: "discard with unknown flags is unsupported",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeWriteZeroes, 0), 16), rd(rangeBuf(h, [3]uint64{16, 8, 4}), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusUnsupp), wantUsed: 1, wantErr: ErrUnsupported, fileSame: true,
		},
		{
			name: "discard on a disk that cannot", o: opts{plain: true},
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeDiscard, 0), 16), rd(rangeBuf(h, [3]uint64{16, 8, 0}), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusUnsupp), wantUsed: 1, wantErr: ErrUnsupported, fileSame: true,
		},
		{
			name: "discard range past the end",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeDiscard, 0), 16), rd(rangeBuf(h, [3]uint64{capacity - 4, 8, 0}), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrOutOfRange, fileSame: true,
		},
		{
			name: "discard with too many ranges",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				rs := make([][3]uint64, MaxRanges+1)
				for i := range rs {
					rs[i] = [3]uint64{uint64(i), 1, 0}
				}
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeDiscard, 0), 16), rd(rangeBuf(h, rs...), uint32(16*len(rs))), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrMalformed, fileSame: true,
		},
		{
			name: "unknown request type",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(42, 0), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusUnsupp), wantUsed: 1, wantErr: ErrUnsupported, fileSame: true,
		},
		// Hostile and malformed requests.
		{
			name: "short chain: header only, no status",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 16)}, 0
			},
			wantStatus: noStatus, wantErr: ErrMalformed, fileSame: true,
		},
		{
			name: "short header",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 8), wr(h.alloc(512), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrMalformed, fileSame: true,
		},
		{
			name: "read into a device-readable buffer",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				dataAt = writeData(h, 512, 0x11)
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 16), rd(dataAt, 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrMalformed, fileSame: true,
			check: func(t *testing.T, h *harness, _ []byte) {
				if !bytes.Equal(h.guestBytes(dataAt, 512), bytes.Repeat([]byte{0x11}, 512)) {
					t.Fatal("device wrote a device-readable buffer")
				}
			},
		},
		{
			name: "write from a device-writable buffer",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, 0), 16), wr(writeData(h, 512, 0x22), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrMalformed, fileSame: true,
		},
		{
			name: "readable descriptor after a writable one",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 512), rd(h.alloc(512), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrMalformed, fileSame: true,
		},
		{
			name: "status not device-writable",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				return []queuetest.Buf{rd(h.header(TypeOut, 0), 16), rd(writeData(h, 512, 1), 512), rd(h.status(), 1)}, 0
			},
			wantStatus: noStatus, wantErr: ErrMalformed, fileSame: true,
		},
		{
			name: "sector at the end",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, capacity), 16), wr(h.alloc(512), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrOutOfRange, fileSame: true,
		},
		{
			name: "write straddling the end",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, capacity-1), 16), rd(writeData(h, 1024, 3), 1024), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrOutOfRange, fileSame: true,
		},
		{
			name: "sector overflow 2^64-1",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, ^uint64(0)), 16), rd(writeData(h, 512, 3), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrOutOfRange, fileSame: true,
		},
		{
			name: "sector times 512 overflows",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 1<<55+1), 16), wr(h.alloc(512), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrOutOfRange, fileSame: true,
		},
		{
			name: "data not a multiple of 512",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, 0), 16), rd(writeData(h, 100, 3), 100), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrMalformed, fileSame: true,
		},
		{
			name: "data outside guest memory",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, 0), 16), rd(64<<30, 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrGuestMemory, fileSame: true,
		},
		{
			name: "data straddling the end of guest memory",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 16), wr(8<<20-512, 1024), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrGuestMemory, fileSame: true,
		},
		{
			name: "4 GiB data length",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 0xffffffff-16-1), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrGuestMemory, fileSame: true,
		},
		{
			name: "lengths overflowing 32 bits",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 0xffffffff), wr(s, 1)}, s
			},
			wantStatus: noStatus, wantErr: ErrInvalidChain, fileSame: true,
		},
		{
			name: "status byte outside guest memory",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				return []queuetest.Buf{rd(h.header(TypeOut, 0), 16), rd(writeData(h, 512, 9), 512), wr(1<<40, 1)}, 0
			},
			wantStatus: noStatus, wantErr: ErrGuestMemory, fileSame: true,
		},
		{
			name: "header outside guest memory",
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(1<<40, 16), rd(writeData(h, 512, 9), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrGuestMemory, fileSame: true,
		},
		{
			name: "too many segments", indirect: true,
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				// Header and the first segment share a descriptor; 14 more
				// segments make 15 > seg_max (14 on a queue of 16).
				first := writeData(h, 16+512, 5)
				var hdr [16]byte
				binary.LittleEndian.PutUint32(hdr[0:], TypeOut)
				_ = h.mem.Write(first, hdr[:])
				bufs := []queuetest.Buf{rd(first, 16+512)}
				for range 14 {
					bufs = append(bufs, rd(writeData(h, 1024, 5), 512))
				}
				s := h.status()
				return append(bufs, wr(s, 1)), s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrMalformed, fileSame: true,
		},
		// Read-only disk.
		{
			name: "read-only: write refused", o: opts{readOnly: true},
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeOut, 0), 16), rd(writeData(h, 4096, 0xee), 4096), wr(s, 1)}, s
			},
			wantStatus: int(StatusIOErr), wantUsed: 1, wantErr: ErrReadOnly, fileSame: true,
		},
		{
			name: "read-only: discard not offered", o: opts{readOnly: true},
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeDiscard, 0), 16), rd(rangeBuf(h, [3]uint64{0, 8, 0}), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusUnsupp), wantUsed: 1, wantErr: ErrUnsupported, fileSame: true,
		},
		{
			name: "read-only: read works", o: opts{readOnly: true},
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeIn, 1), 16), wr(h.alloc(512), 512), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 513, wantErr: -1, fileSame: true,
		},
		{
			name: "read-only: flush works", o: opts{readOnly: true},
			build: func(h *harness) ([]queuetest.Buf, memory.GuestAddr) {
				s := h.status()
				return []queuetest.Buf{rd(h.header(TypeFlush, 0), 16), wr(s, 1)}, s
			},
			wantStatus: int(StatusOK), wantUsed: 1, wantErr: -1, fileSame: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.o)
			before := h.fileBytes()
			bufs, st := tc.build(h)
			_, used := h.submit(tc.indirect, bufs...)
			snap := h.dev.Metrics().Snapshot()
			if tc.wantStatus == noStatus {
				if used != 0 || snap.NoStatus != 1 {
					t.Fatalf("used %d, no_status %d: want a completion of length 0", used, snap.NoStatus)
				}
			} else {
				if got := h.byteAt(st); int(got) != tc.wantStatus {
					t.Fatalf("status %d, want %d (metrics %+v)", got, tc.wantStatus, snap.Errors)
				}
				if used != tc.wantUsed {
					t.Fatalf("used length %d, want %d", used, tc.wantUsed)
				}
			}
			if tc.wantErr >= 0 {
				if snap.Errors[tc.wantErr.String()] != 1 || snap.ErrorsTotal != 1 {
					t.Fatalf("errors %v, want one %s", snap.Errors, tc.wantErr)
				}
			} else if snap.ErrorsTotal != 0 {
				t.Fatalf("errors %v, want none", snap.Errors)
			}
			if tc.fileSame && !bytes.Equal(h.fileBytes(), before) {
				t.Fatal("the backing file changed")
			}
			if tc.check != nil {
				tc.check(t, h, before)
			}
			// The device is still healthy: a plain read completes.
			s := h.status()
			if _, used := h.submit(false, rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 512), wr(s, 1)); used != 513 || h.byteAt(s) != StatusOK {
				t.Fatalf("follow-up read: used %d status %d", used, h.byteAt(s))
			}
		})
	}
}

// TestChainHostility: chains the queue itself rejects are completed with
// length 0 (or dropped when the head is out of range) and counted; the
// device carries on.
func TestChainHostility(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(h *harness) uint16 // returns the published head
		wantUse bool                    // a used element comes back
	}{
		{"descriptor loop", func(h *harness) uint16 {
			_ = h.drv.SetDesc(3, h.header(TypeIn, 0), 16, queue.DescFNext, 4)
			_ = h.drv.SetDesc(4, h.alloc(512), 512, queue.DescFNext|queue.DescFWrite, 3)
			return 3
		}, true},
		{"next index past the ring", func(h *harness) uint16 {
			_ = h.drv.SetDesc(3, h.header(TypeIn, 0), 16, queue.DescFNext, 200)
			return 3
		}, true},
		{"head index past the ring", func(h *harness) uint16 { return 999 }, false},
		{"nested indirect", func(h *harness) uint16 {
			tbl := h.alloc(32)
			_ = h.mem.PutUint64(tbl, uint64(tbl))
			_ = h.mem.PutUint32(tbl+8, 32)
			_ = h.mem.PutUint16(tbl+12, queue.DescFIndirect)
			_ = h.drv.SetDesc(3, tbl, 32, queue.DescFIndirect, 0)
			return 3
		}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, opts{})
			head := tc.setup(h)
			if err := h.drv.Publish(head); err != nil {
				t.Fatal(err)
			}
			h.kick()
			// A valid request behind it must complete.
			s := h.status()
			good, err := h.drv.Add(rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 512), wr(s, 1))
			if err != nil {
				t.Fatal(err)
			}
			h.kick()
			id, n := h.wait()
			if tc.wantUse {
				if id != uint32(head) || n != 0 {
					t.Fatalf("bad chain completed as %d/%d, want %d/0", id, n, head)
				}
				id, n = h.wait()
			}
			if id != uint32(good) || n != 513 || h.byteAt(s) != StatusOK {
				t.Fatalf("good request completed as %d/%d status %d", id, n, h.byteAt(s))
			}
			if e := h.dev.Metrics().Snapshot().Errors[ErrInvalidChain.String()]; e != 1 {
				t.Fatalf("invalid_chain = %d, want 1", e)
			}
		})
	}
}

func TestBrokenAvailIndex(t *testing.T) {
	h := newHarness(t, opts{})
	if err := h.drv.SetAvailIdx(1000); err != nil {
		t.Fatal(err)
	}
	h.dev.Notify(0)
	select {
	case <-h.irq.reset:
	case <-time.After(10 * time.Second):
		t.Fatal("device did not ask for a reset")
	}
	if n := h.dev.Metrics().Snapshot().Errors[ErrQueue.String()]; n != 1 {
		t.Fatalf("queue errors = %d", n)
	}
	h.dev.Reset() // returns: the worker stopped
}

// blockingLimiter never grants tokens: requests wait until the device is
// reset.
type blockingLimiter struct{ entered chan struct{} }

func (l *blockingLimiter) Wait(ctx context.Context, n uint64) (time.Duration, error) {
	start := time.Now()
	close(l.entered)
	<-ctx.Done()
	return time.Since(start), ctx.Err()
}

// TestThrottledDeviceDoesNotBlockCaller: while the device waits for
// tokens, Notify (the vCPU's path) returns, and Reset cancels the wait.
func TestThrottledDeviceDoesNotBlockCaller(t *testing.T) {
	lim := &blockingLimiter{entered: make(chan struct{})}
	h := newHarness(t, opts{limit: lim})
	s := h.status()
	if _, err := h.drv.Add(rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 512), wr(s, 1)); err != nil {
		t.Fatal(err)
	}
	h.dev.Notify(0)
	<-lim.entered
	for range 100 {
		h.dev.Notify(0) // must not block although the device is stuck
	}
	done := make(chan struct{})
	go func() { h.dev.Reset(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Reset blocked on a throttled request")
	}
	if _, _, ok, _ := h.drv.Used(); ok || h.byteAt(s) != 0xff {
		t.Fatal("a request completed without tokens")
	}
	if h.dev.Metrics().Snapshot().ThrottledSeconds <= 0 {
		t.Fatal("throttled time not counted")
	}
}

func TestThrottledRequestsComplete(t *testing.T) {
	// 1 op per 5 ms, no burst beyond the bucket of 1.
	lim, err := ratelimit.New(ratelimit.Config{Ops: ratelimit.BucketConfig{Size: 1, RefillTimeMs: 5}})
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, opts{limit: lim})
	for range 5 {
		s := h.status()
		if _, used := h.submit(false, rd(h.header(TypeIn, 0), 16), wr(h.alloc(512), 512), wr(s, 1)); used != 513 {
			t.Fatalf("used %d", used)
		}
	}
	snap := h.dev.Metrics().Snapshot()
	if snap.ReadOps != 5 || snap.ThrottledSeconds <= 0 {
		t.Fatalf("read_ops %d throttled %v: want 5 reads that waited", snap.ReadOps, snap.ThrottledSeconds)
	}
}

func TestConfigAndFeatures(t *testing.T) {
	tests := []struct {
		name    string
		o       opts
		want    []uint64
		notWant []uint64
	}{
		{"read-write", opts{}, []uint64{FeatureFlush, FeatureSegMax, FeatureBlkSize, FeatureDiscard, FeatureWriteZeroes,
			virtio.FeatureVersion1, virtio.FeatureRingEventIdx, virtio.FeatureRingIndirectDesc}, []uint64{FeatureRO}},
		{"read-only", opts{readOnly: true}, []uint64{FeatureRO, FeatureFlush}, []uint64{FeatureDiscard, FeatureWriteZeroes}},
		{"no discard in backend", opts{plain: true}, []uint64{FeatureFlush}, []uint64{FeatureDiscard, FeatureWriteZeroes, FeatureRO}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.o)
			f := h.dev.Features()
			for _, b := range tc.want {
				if f&b == 0 {
					t.Errorf("feature %#x not offered", b)
				}
			}
			for _, b := range tc.notWant {
				if f&b != 0 {
					t.Errorf("feature %#x offered", b)
				}
			}
			var c [configLen]byte
			h.dev.ReadConfig(0, c[:])
			if got := binary.LittleEndian.Uint64(c[cfgCapacity:]); got != 2048 {
				t.Errorf("capacity %d, want 2048", got)
			}
			if got := binary.LittleEndian.Uint32(c[cfgSegMax:]); got != 14 {
				t.Errorf("seg_max %d, want 14", got)
			}
			if got := binary.LittleEndian.Uint32(c[cfgBlkSize:]); got != 512 {
				t.Errorf("blk_size %d, want 512", got)
			}
			var b [2]byte // any width, any offset
			h.dev.ReadConfig(1, b[:])
			if b != [2]byte{c[1], c[2]} {
				t.Errorf("2-byte read at 1 = %v", b)
			}
		})
	}
}

func TestNewRejects(t *testing.T) {
	fd, _ := newDiskFile(t, t.TempDir(), 4096)
	tests := []struct {
		name string
		cfg  Config
	}{
		{"no disk", Config{}},
		{"long serial", Config{Disk: fd, Serial: "123456789012345678901"}},
		{"queue size not power of two", Config{Disk: fd, QueueSize: 100}},
		{"disk smaller than a sector", Config{Disk: &fileDisk{f: fd.f, size: 100}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cfg); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func TestMetricsSnapshot(t *testing.T) {
	h := newHarness(t, opts{})
	for i := range 3 {
		s := h.status()
		h.submit(false, rd(h.header(TypeIn, uint64(i)), 16), wr(h.alloc(4096), 4096), wr(s, 1))
	}
	s := h.status()
	h.submit(false, rd(h.header(TypeOut, 0), 16), rd(h.alloc(512), 512), wr(s, 1))
	s = h.status()
	h.submit(false, rd(h.header(TypeOut, capacityOf(h)), 16), rd(h.alloc(512), 512), wr(s, 1))
	snap := h.dev.Metrics().Snapshot()
	if snap.ReadOps != 3 || snap.ReadBytes != 3*4096 || snap.WriteOps != 1 || snap.WriteBytes != 512 {
		t.Fatalf("snapshot %+v", snap)
	}
	if snap.Latency.Count != 5 || snap.Latency.Buckets[len(snap.Latency.Buckets)-1].Count > 5 {
		t.Fatalf("latency %+v", snap.Latency)
	}
	if snap.Errors["out_of_range"] != 1 {
		t.Fatalf("errors %v", snap.Errors)
	}
	b, err := json.Marshal(snap)
	if err != nil {
		t.Fatal(err)
	}
	var back Snapshot
	if err := json.Unmarshal(b, &back); err != nil || back.ReadBytes != snap.ReadBytes {
		t.Fatalf("JSON round trip: %v %s", err, b)
	}
}

func capacityOf(h *harness) uint64 { return uint64(h.disk.size) / SectorSize }

// TestThroughTransport drives the device the way a guest does: virtio-mmio
// registers for negotiation and queue setup, then a read and a write.
func TestThroughTransport(t *testing.T) {
	fd, path := newDiskFile(t, t.TempDir(), 1<<20)
	dev, err := New(Config{Disk: fd, Serial: testSerial})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	mem := memory.FromBytes(0, make([]byte, 4<<20))
	irq := &countIRQ{c: make(chan struct{}, 1)}
	tr := mmio.New(dev, mem, irq, nil)
	reg := func(off uint64, v uint32) {
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], v)
		tr.Write(off, b[:])
	}
	get := func(off uint64) uint32 {
		var b [4]byte
		tr.Read(off, b[:])
		return binary.LittleEndian.Uint32(b[:])
	}
	drv, err := queuetest.New(mem, 0x10000, DefaultQueueSize)
	if err != nil {
		t.Fatal(err)
	}
	drv.EventIdx, drv.Indirect = true, true
	reg(mmio.RegStatus, 0)
	reg(mmio.RegStatus, 1)
	reg(mmio.RegStatus, 3)
	feats := uint64(0)
	for sel := range uint32(2) {
		reg(mmio.RegDeviceFeaturesSel, sel)
		feats |= uint64(get(mmio.RegDeviceFeatures)) << (32 * sel)
	}
	if feats&FeatureRO != 0 || feats&virtio.FeatureVersion1 == 0 {
		t.Fatalf("features %#x", feats)
	}
	for sel := range uint32(2) {
		reg(mmio.RegDriverFeaturesSel, sel)
		reg(mmio.RegDriverFeatures, uint32(feats>>(32*sel)))
	}
	reg(mmio.RegStatus, 0xb)
	if get(mmio.RegStatus) != 0xb {
		t.Fatal("FEATURES_OK refused")
	}
	var capBytes [8]byte
	tr.Read(mmio.RegConfig, capBytes[:])
	if binary.LittleEndian.Uint64(capBytes[:]) != 2048 {
		t.Fatalf("capacity %d", binary.LittleEndian.Uint64(capBytes[:]))
	}
	c := drv.Config()
	reg(mmio.RegQueueSel, 0)
	if get(mmio.RegQueueNumMax) != DefaultQueueSize {
		t.Fatal("queue num max")
	}
	reg(mmio.RegQueueNum, uint32(c.Size))
	reg(mmio.RegQueueDescLow, uint32(c.Desc))
	reg(mmio.RegQueueDriverLow, uint32(c.Avail))
	reg(mmio.RegQueueDeviceLow, uint32(c.Used))
	reg(mmio.RegQueueReady, 1)
	reg(mmio.RegStatus, 0xf)
	if get(mmio.RegStatus) != 0xf {
		t.Fatalf("status %#x after DRIVER_OK", get(mmio.RegStatus))
	}

	do := func(bufs ...queuetest.Buf) uint32 {
		if _, err := drv.Add(bufs...); err != nil {
			t.Fatal(err)
		}
		reg(mmio.RegQueueNotify, 0)
		for {
			if _, n, ok, _ := drv.Used(); ok {
				return n
			}
			select {
			case <-irq.c:
				if get(mmio.RegInterruptStatus)&1 == 0 {
					t.Fatal("interrupt without the used-ring bit")
				}
				reg(mmio.RegInterruptACK, 1)
			case <-time.After(10 * time.Second):
				t.Fatal("no completion")
			}
		}
	}
	hdr, _ := drv.Alloc(16)
	data, _ := drv.Alloc(512)
	st, _ := drv.Alloc(1)
	_ = mem.PutUint32(hdr, TypeOut)
	_ = mem.PutUint64(hdr+8, 9)
	_ = mem.Write(data, bytes.Repeat([]byte("rayvmm!!"), 64))
	if n := do(rd(hdr, 16), rd(data, 512), wr(st, 1)); n != 1 {
		t.Fatalf("write used %d", n)
	}
	_ = mem.PutUint32(hdr, TypeIn)
	_ = mem.Zero(data, 512)
	if n := do(rd(hdr, 16), wr(data, 512), wr(st, 1)); n != 513 {
		t.Fatalf("read used %d", n)
	}
	back, _ := mem.Slice(data, 512)
	if !bytes.Equal(back, bytes.Repeat([]byte("rayvmm!!"), 64)) {
		t.Fatal("read back differs from what was written")
	}
	fb := readFile(t, path)
	if !bytes.Equal(fb[9*512:10*512], back) {
		t.Fatal("file does not hold the write")
	}
	if irq.n.Load() == 0 {
		t.Fatal("no interrupt raised")
	}
	reg(mmio.RegStatus, 0) // reset stops the device goroutine
	if get(mmio.RegStatus) != 0 {
		t.Fatal("reset")
	}
}
