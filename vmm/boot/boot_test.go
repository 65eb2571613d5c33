package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

func newMem(t testing.TB, size uint64) *memory.Memory {
	t.Helper()
	m, err := memory.New(RAMRanges(size)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// elfImage builds a minimal ELF64 executable with one PT_LOAD segment.
func elfImage(paddr, entry uint64, code []byte, memsz uint64) []byte {
	le := binary.LittleEndian
	h := make([]byte, 64+56)
	copy(h, "\x7fELF\x02\x01\x01")
	le.PutUint16(h[16:], 2)
	le.PutUint16(h[18:], 62)
	le.PutUint32(h[20:], 1)
	le.PutUint64(h[24:], entry)
	le.PutUint64(h[32:], 64)
	le.PutUint16(h[52:], 64)
	le.PutUint16(h[54:], 56)
	le.PutUint16(h[56:], 1)
	ph := h[64:]
	le.PutUint32(ph[0:], ptLoad)
	le.PutUint64(ph[8:], uint64(len(h)))
	le.PutUint64(ph[16:], paddr)
	le.PutUint64(ph[24:], paddr)
	le.PutUint64(ph[32:], uint64(len(code)))
	le.PutUint64(ph[40:], memsz)
	return append(h, code...)
}

func TestLoadELF(t *testing.T) {
	m := newMem(t, 16<<20)
	code := []byte{0xf4, 0xeb, 0xfd}
	k, err := Load(m, elfImage(0x200000, 0x200000, code, 0x3000))
	if err != nil {
		t.Fatal(err)
	}
	if k.Format != FormatELF || k.Entry != 0x200000 || k.End != 0x203000 {
		t.Fatalf("kernel %+v", k)
	}
	got := make([]byte, 3)
	m.Read(0x200000, got)
	if !bytes.Equal(got, code) {
		t.Fatalf("loaded %x", got)
	}
}

func TestLoadRejects(t *testing.T) {
	m := newMem(t, 16<<20)
	good := elfImage(0x200000, 0x200000, []byte{0xf4}, 0x1000)
	mut := func(f func(b []byte)) []byte {
		b := append([]byte(nil), good...)
		f(b)
		return b
	}
	le := binary.LittleEndian
	tests := []struct {
		name string
		img  []byte
		want string
	}{
		{"empty", nil, "neither an ELF"},
		{"text", []byte("hello"), "neither an ELF"},
		{"truncated header", good[:40], "truncated ELF"},
		{"truncated phdrs", good[:80], "truncated ELF"},
		{"32-bit", mut(func(b []byte) { b[4] = 1 }), "not ELF64"},
		{"arm64", mut(func(b []byte) { le.PutUint16(b[18:], 183) }), "not x86-64"},
		{"shared object", mut(func(b []byte) { le.PutUint16(b[16:], 3) }), "not an executable"},
		{"segment past file", mut(func(b []byte) { le.PutUint64(b[64+32:], 1<<20) }), "runs past the end"},
		{"offset overflow", mut(func(b []byte) { le.PutUint64(b[64+8:], ^uint64(0)) }), "runs past the end"},
		{"below 1 MiB", mut(func(b []byte) { le.PutUint64(b[64+24:], 0x7000); le.PutUint64(b[24:], 0x7000) }), "below 1 MiB"},
		{"beyond RAM", mut(func(b []byte) { le.PutUint64(b[64+24:], 1<<30) }), "does not fit"},
		{"wrapping", mut(func(b []byte) { le.PutUint64(b[64+24:], ^uint64(0)-10) }), "wraps"},
		{"memsz < filesz", mut(func(b []byte) { le.PutUint64(b[64+40:], 0) }), "memory size"},
		{"entry outside", mut(func(b []byte) { le.PutUint64(b[24:], 0x900000) }), "entry point"},
		{"phnum huge", mut(func(b []byte) { le.PutUint16(b[56:], 0xffff) }), "truncated ELF"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(m, tc.img)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestE820(t *testing.T) {
	m := E820(256 << 20)
	want := []E820Entry{{0, 0x9fc00, E820RAM}, {0x9fc00, 0x60400, E820Reserved}, {0x100000, 255 << 20, E820RAM}}
	if len(m) != len(want) {
		t.Fatalf("%v", m)
	}
	for i := range m {
		if m[i] != want[i] {
			t.Fatalf("entry %d = %+v, want %+v", i, m[i], want[i])
		}
	}
	big := E820(4 << 30)
	if last := big[len(big)-1]; last.Addr != 1<<32 || last.Size != 1<<30 {
		t.Fatalf("above 4 GiB: %+v", last)
	}
	if UsableRAM(big) != 4<<30-0x60400 {
		t.Fatalf("usable %d", UsableRAM(big))
	}
}

func TestMPTable(t *testing.T) {
	for _, n := range []int{1, 2, 32, MaxCPUs} {
		m := newMem(t, 8<<20)
		if err := WriteMPTable(m, n); err != nil {
			t.Fatal(err)
		}
		fp, _ := m.Slice(EBDAStart, 16)
		if string(fp[:4]) != "_MP_" || mpChecksum(fp) != 0 {
			t.Fatalf("%d cpus: bad floating pointer % x", n, fp)
		}
		at := binary.LittleEndian.Uint32(fp[4:])
		hdr, _ := m.Slice(memory.GuestAddr(at), mpHeaderSize)
		l := binary.LittleEndian.Uint16(hdr[4:])
		tab, _ := m.Slice(memory.GuestAddr(at), uint64(l))
		if string(tab[:4]) != "PCMP" || mpChecksum(tab) != 0 {
			t.Fatalf("%d cpus: bad config table", n)
		}
		procs := 0
		for off := mpHeaderSize; off < len(tab); {
			switch tab[off] {
			case 0:
				if int(tab[off+1]) != procs {
					t.Fatalf("cpu %d has APIC id %d", procs, tab[off+1])
				}
				procs++
				off += mpProcSize
			default:
				off += mpEntrySize
			}
		}
		if procs != n {
			t.Fatalf("table lists %d cpus, want %d", procs, n)
		}
	}
	if _, err := BuildMPTable(0); err == nil {
		t.Fatal("0 cpus accepted")
	}
	if _, err := BuildMPTable(MaxCPUs + 1); err == nil {
		t.Fatal("too many cpus accepted")
	}
}

func TestZeroPageAndInitrd(t *testing.T) {
	m := newMem(t, 32<<20)
	k, err := Load(m, elfImage(0x100000, 0x100000, []byte{0xf4}, 0x1000))
	if err != nil {
		t.Fatal(err)
	}
	rd, err := PlaceInitrd(m, k, bytes.Repeat([]byte{0xaa}, 10000))
	if err != nil {
		t.Fatal(err)
	}
	if rd.Addr%4096 != 0 || rd.Addr+rd.Size > 32<<20 || rd.Addr < k.End {
		t.Fatalf("initrd at %#x", rd.Addr)
	}
	if err := WriteZeroPage(m, k, "console=ttyS0", rd, E820(32<<20)); err != nil {
		t.Fatal(err)
	}
	zp, _ := m.Slice(ZeroPageAddr, 4096)
	le := binary.LittleEndian
	if le.Uint32(zp[zpCmdLinePtr:]) != CmdlineAddr || zp[zpE820Entries] != 3 || le.Uint32(zp[zpRamdiskImage:]) != uint32(rd.Addr) {
		t.Fatal("zero page fields")
	}
	cl, _ := m.Slice(CmdlineAddr, 14)
	if string(cl) != "console=ttyS0\x00" {
		t.Fatalf("cmdline %q", cl)
	}
	if _, err := PlaceInitrd(m, k, make([]byte, 40<<20)); err == nil {
		t.Fatal("oversized initrd placed")
	}
	if err := WriteZeroPage(m, k, strings.Repeat("a", 2048), rd, E820(32<<20)); err == nil {
		t.Fatal("over-long command line accepted")
	}
}

// TestDebianBzImage parses the setup header of Debian's stock bzImage
// (fetched by `make linux-kernel`) and loads it.
func TestDebianBzImage(t *testing.T) {
	bz := testenv.DebianBzImage(t)
	img, err := os.ReadFile(bz)
	if err != nil {
		t.Fatal(err)
	}
	h, err := ParseSetupHeader(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: protocol %d.%02d, setup_sects %d, cmdline_size %d, initrd_addr_max %#x, init_size %#x, xloadflags %#x",
		filepath.Base(bz), h.Version>>8, h.Version&0xff, h.SetupSects, h.CmdlineSize, h.InitrdAddrMax, h.InitSize, h.XLoadFlags)
	if h.Version < 0x20c || h.XLoadFlags&1 == 0 || !h.Relocatable || h.CmdlineSize != 2047 || h.InitrdAddrMax != 0x7fffffff {
		t.Fatalf("unexpected header %+v", h)
	}
	if f, _ := DetectFormat(img); f != FormatBzImage {
		t.Fatalf("detected as %q", f)
	}
	small := newMem(t, 32<<20)
	if _, err := Load(small, img); err == nil || !strings.Contains(err.Error(), "init_size") {
		t.Fatalf("a kernel needing %d MiB loaded into 32 MiB: %v", h.InitSize>>20, err)
	}
	m := newMem(t, 256<<20)
	k, err := Load(m, img)
	if err != nil {
		t.Fatal(err)
	}
	if k.Entry != KernelLoad+0x200 || k.CmdlineMax != 2047 || k.InitrdMax != 0x7fffffff {
		t.Fatalf("kernel %+v", k)
	}
	pm := img[h.ProtectedStart:]
	got, _ := m.Slice(KernelLoad, uint64(len(pm)))
	if !bytes.Equal(got, pm) {
		t.Fatal("protected-mode kernel not at 1 MiB")
	}
	if err := WriteZeroPage(m, k, "console=ttyS0", Initrd{}, E820(256<<20)); err != nil {
		t.Fatal(err)
	}
	zp, _ := m.Slice(ZeroPageAddr+zpSetupHeader, uint64(len(k.Setup)))
	if zp[zpHeader-zpSetupHeader] != 'H' || binary.LittleEndian.Uint16(zp[zpVersion-zpSetupHeader:]) != h.Version {
		t.Fatal("setup header not copied into the zero page")
	}
	// Truncations of the real image are refused, not loaded.
	for _, n := range []int{0x100, 0x300, h.ProtectedStart} {
		if _, err := Load(m, img[:n]); err == nil || !errors.Is(err, ErrBadKernel) {
			t.Errorf("bzImage truncated to %d bytes: %v", n, err)
		}
	}
}

// FuzzLoad feeds arbitrary images to the loaders: errors are fine, panics
// and writes outside guest RAM are not.
func FuzzLoad(f *testing.F) {
	f.Add(elfImage(0x100000, 0x100000, []byte{0xf4}, 0x1000))
	f.Add([]byte("\x7fELF\x02\x01\x01"))
	bz := make([]byte, 0x1000)
	binary.LittleEndian.PutUint16(bz[0x1fe:], 0xaa55)
	copy(bz[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(bz[0x206:], 0x20f)
	bz[0x211] = 1
	binary.LittleEndian.PutUint16(bz[0x236:], 1)
	bz[0x1f1] = 2
	f.Add(bz)
	m, err := memory.New(RAMRanges(8 << 20)...)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		k, err := Load(m, img)
		if err != nil {
			return
		}
		if k.Start < HighMemStart || k.End > 8<<20 || k.Entry == 0 {
			t.Fatalf("loaded kernel outside RAM: %+v", k)
		}
	})
}
