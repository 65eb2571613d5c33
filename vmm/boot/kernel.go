package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/rayvmm/rayvmm/vmm/memory"
)

// ErrBadKernel is the category of every error about a kernel image.
var ErrBadKernel = errors.New("bad kernel image")

func badKernel(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadKernel}, args...)...)
}

// Format is a kernel image format.
type Format string

// Formats Load understands.
const (
	FormatELF     Format = "elf"
	FormatBzImage Format = "bzImage"
)

// Kernel is what loading a kernel image produced.
type Kernel struct {
	Format Format
	// Entry is the 64-bit entry point (boot_params in RSI).
	Entry uint64
	// PVHEntry is the 32-bit PVH entry from an ELF note, 0 if none.
	PVHEntry uint64
	// Start and End bound the loaded image, bss included.
	Start, End uint64
	// CmdlineMax is the longest command line (without NUL) it accepts.
	CmdlineMax int
	// InitrdMax is the highest address an initrd byte may occupy.
	InitrdMax uint64
	// Setup is the bzImage setup header (zero page bytes 0x1f1 on), or nil.
	Setup []byte
}

// DetectFormat names the format of a kernel image, or errors.
func DetectFormat(img []byte) (Format, error) {
	switch {
	case len(img) >= 4 && bytes.Equal(img[:4], []byte("\x7fELF")):
		return FormatELF, nil
	case len(img) >= 0x206 && binary.LittleEndian.Uint16(img[0x1fe:]) == 0xaa55 && bytes.Equal(img[0x202:0x206], []byte("HdrS")):
		return FormatBzImage, nil
	}
	return "", badKernel("neither an ELF kernel nor a bzImage (no ELF magic, no HdrS setup header)")
}

// Load copies a kernel image into guest memory and reports where it went.
func Load(m *memory.Memory, img []byte) (*Kernel, error) {
	f, err := DetectFormat(img)
	if err != nil {
		return nil, err
	}
	if f == FormatELF {
		return loadELF(m, img)
	}
	return loadBzImage(m, img)
}

// checkDest makes sure [addr, addr+n) is RAM at or above 1 MiB, so a kernel
// cannot overwrite the zero page, page tables or MP table.
func checkDest(m *memory.Memory, what string, addr, n uint64) error {
	end := addr + n
	if end < addr {
		return badKernel("%s at %#x (+%#x) wraps around", what, addr, n)
	}
	if addr < HighMemStart {
		return badKernel("%s at %#x is below 1 MiB", what, addr)
	}
	if n == 0 {
		return nil
	}
	if _, err := m.Slice(memory.GuestAddr(addr), n); err != nil {
		return fmt.Errorf("%s at %#x (+%#x) does not fit in guest memory (%d MiB): %w", what, addr, n, m.Size()>>20, err)
	}
	return nil
}

const (
	elfHeaderSize = 64
	elfPhdrSize   = 56
	ptLoad        = 1
	ptNote        = 4
	xenNotePVH    = 18 // XEN_ELFNOTE_PHYS32_ENTRY
	defaultCmdMax = 2047
	defaultInitrd = 0x37ffffff // boot protocol default for initrd_addr_max
)

func loadELF(m *memory.Memory, img []byte) (*Kernel, error) {
	if len(img) < elfHeaderSize {
		return nil, badKernel("truncated ELF: %d bytes, the ELF header alone is %d", len(img), elfHeaderSize)
	}
	le := binary.LittleEndian
	switch {
	case img[4] != 2:
		return nil, badKernel("ELF class %d is not ELF64", img[4])
	case img[5] != 1:
		return nil, badKernel("ELF data encoding %d is not little-endian", img[5])
	case le.Uint16(img[18:]) != 62:
		return nil, badKernel("ELF machine %d is not x86-64", le.Uint16(img[18:]))
	case le.Uint16(img[16:]) != 2:
		return nil, badKernel("ELF type %d is not an executable", le.Uint16(img[16:]))
	}
	k := &Kernel{Format: FormatELF, Entry: le.Uint64(img[24:]), CmdlineMax: defaultCmdMax, InitrdMax: defaultInitrd, Start: ^uint64(0)}
	phoff, phentsize, phnum := le.Uint64(img[32:]), uint64(le.Uint16(img[54:])), uint64(le.Uint16(img[56:]))
	if phentsize != elfPhdrSize {
		return nil, badKernel("ELF program header size %d, want %d", phentsize, elfPhdrSize)
	}
	if phnum == 0 {
		return nil, badKernel("ELF has no program headers")
	}
	if phoff > uint64(len(img)) || phnum*elfPhdrSize > uint64(len(img))-phoff {
		return nil, badKernel("truncated ELF: %d program headers at offset %#x run past the end of the %d-byte file", phnum, phoff, len(img))
	}
	entryOK := false
	loads := 0
	for i := uint64(0); i < phnum; i++ {
		ph := img[phoff+i*elfPhdrSize:][:elfPhdrSize]
		typ := le.Uint32(ph[0:])
		off, paddr, filesz, memsz := le.Uint64(ph[8:]), le.Uint64(ph[24:]), le.Uint64(ph[32:]), le.Uint64(ph[40:])
		if off > uint64(len(img)) || filesz > uint64(len(img))-off {
			return nil, badKernel("truncated ELF: segment %d (offset %#x, %d bytes) runs past the end of the %d-byte file", i, off, filesz, len(img))
		}
		switch typ {
		case ptNote:
			if e, ok := pvhEntry(img[off : off+filesz]); ok {
				k.PVHEntry = e
			}
		case ptLoad:
			if memsz < filesz {
				return nil, badKernel("ELF segment %d: memory size %#x < file size %#x", i, memsz, filesz)
			}
			if err := checkDest(m, fmt.Sprintf("ELF segment %d", i), paddr, memsz); err != nil {
				return nil, err
			}
			if err := m.Write(memory.GuestAddr(paddr), img[off:off+filesz]); err != nil {
				return nil, err
			}
			if err := m.Zero(memory.GuestAddr(paddr+filesz), memsz-filesz); err != nil {
				return nil, err
			}
			if k.Entry >= paddr && k.Entry < paddr+memsz {
				entryOK = true
			}
			k.Start = min(k.Start, paddr)
			k.End = max(k.End, paddr+memsz)
			loads++
		}
	}
	if loads == 0 {
		return nil, badKernel("ELF has no loadable segments")
	}
	if !entryOK {
		return nil, badKernel("ELF entry point %#x is outside every loaded segment", k.Entry)
	}
	return k, nil
}

// pvhEntry finds XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment.
func pvhEntry(notes []byte) (uint64, bool) {
	le := binary.LittleEndian
	align4 := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for len(notes) >= 12 {
		namesz, descsz, typ := uint64(le.Uint32(notes)), uint64(le.Uint32(notes[4:])), le.Uint32(notes[8:])
		n := 12 + align4(namesz)
		if namesz > uint64(len(notes)) || descsz > uint64(len(notes)) || n+align4(descsz) > uint64(len(notes)) {
			return 0, false
		}
		name, desc := notes[12:12+namesz], notes[n:n+descsz]
		if typ == xenNotePVH && bytes.Equal(bytes.TrimRight(name, "\x00"), []byte("Xen")) {
			switch len(desc) {
			case 4:
				return uint64(le.Uint32(desc)), true
			case 8:
				return le.Uint64(desc), true
			}
		}
		notes = notes[n+align4(descsz):]
	}
	return 0, false
}

// SetupHeader is the part of a bzImage's setup header rayvmm uses.
type SetupHeader struct {
	SetupSects     int
	Version        uint16
	LoadFlags      uint8
	InitrdAddrMax  uint32
	KernelAlign    uint32
	Relocatable    bool
	CmdlineSize    uint32
	XLoadFlags     uint16
	PrefAddress    uint64
	InitSize       uint32
	PayloadOffset  uint32
	PayloadLength  uint32
	HeaderEnd      int // offset one past the header (0x202 + jump byte)
	ProtectedStart int // file offset of the protected-mode kernel
}

// ParseSetupHeader decodes and checks a bzImage setup header.
func ParseSetupHeader(img []byte) (*SetupHeader, error) {
	le := binary.LittleEndian
	if len(img) < 0x268 {
		return nil, badKernel("truncated bzImage: %d bytes is shorter than its setup header", len(img))
	}
	if le.Uint16(img[0x1fe:]) != 0xaa55 || !bytes.Equal(img[0x202:0x206], []byte("HdrS")) {
		return nil, badKernel("no bzImage setup header (boot flag or HdrS missing)")
	}
	h := &SetupHeader{
		SetupSects:    int(img[0x1f1]),
		Version:       le.Uint16(img[0x206:]),
		LoadFlags:     img[0x211],
		InitrdAddrMax: le.Uint32(img[0x22c:]),
		KernelAlign:   le.Uint32(img[0x230:]),
		Relocatable:   img[0x234] != 0,
		CmdlineSize:   le.Uint32(img[0x238:]),
		XLoadFlags:    le.Uint16(img[0x236:]),
		PayloadOffset: le.Uint32(img[0x248:]),
		PayloadLength: le.Uint32(img[0x24c:]),
		PrefAddress:   le.Uint64(img[0x258:]),
		InitSize:      le.Uint32(img[0x260:]),
		HeaderEnd:     0x202 + int(img[0x201]),
	}
	if h.SetupSects == 0 {
		h.SetupSects = 4
	}
	if h.Version < 0x20c {
		return nil, badKernel("bzImage boot protocol %d.%02d is too old: the 64-bit entry needs 2.12", h.Version>>8, h.Version&0xff)
	}
	if h.XLoadFlags&1 == 0 {
		return nil, badKernel("bzImage has no 64-bit entry point (XLF_KERNEL_64 unset)")
	}
	if h.LoadFlags&1 == 0 {
		return nil, badKernel("bzImage is not a high-loading (bzImage) kernel")
	}
	h.ProtectedStart = (h.SetupSects + 1) * 512
	if h.ProtectedStart >= len(img) {
		return nil, badKernel("truncated bzImage: protected-mode kernel at offset %#x is past the end of the %d-byte file", h.ProtectedStart, len(img))
	}
	if h.HeaderEnd > h.ProtectedStart {
		return nil, badKernel("bzImage setup header runs to %#x, past the setup code", h.HeaderEnd)
	}
	if h.CmdlineSize == 0 {
		h.CmdlineSize = 255
	}
	return h, nil
}

func loadBzImage(m *memory.Memory, img []byte) (*Kernel, error) {
	h, err := ParseSetupHeader(img)
	if err != nil {
		return nil, err
	}
	pm := img[h.ProtectedStart:]
	need := uint64(len(pm))
	if uint64(h.InitSize) > need {
		need = uint64(h.InitSize)
	}
	if err := checkDest(m, "bzImage kernel (init_size)", KernelLoad, need); err != nil {
		return nil, err
	}
	if err := m.Write(KernelLoad, pm); err != nil {
		return nil, err
	}
	setup := append([]byte(nil), img[0x1f1:h.HeaderEnd]...)
	return &Kernel{
		Format:     FormatBzImage,
		Entry:      KernelLoad + 0x200,
		Start:      KernelLoad,
		End:        KernelLoad + need,
		CmdlineMax: int(h.CmdlineSize),
		InitrdMax:  uint64(h.InitrdAddrMax),
		Setup:      setup,
	}, nil
}
