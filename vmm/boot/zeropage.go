package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Offsets in struct boot_params (Documentation/arch/x86/zero-page.rst).
const (
	zpExtRamdiskImage = 0x0c0
	zpExtRamdiskSize  = 0x0c4
	zpExtCmdLinePtr   = 0x0c8
	zpE820Entries     = 0x1e8
	zpSetupHeader     = 0x1f1
	zpBootFlag        = 0x1fe
	zpHeader          = 0x202
	zpVersion         = 0x206
	zpTypeOfLoader    = 0x210
	zpLoadFlags       = 0x211
	zpRamdiskImage    = 0x218
	zpRamdiskSize     = 0x21c
	zpCmdLinePtr      = 0x228
	zpKernelAlignment = 0x230
	zpCmdlineSize     = 0x238
	zpE820Table       = 0x2d0
	zpE820Max         = 128
	zeroPageSize      = 4096
)

// Initrd is where an initial ramdisk was placed.
type Initrd struct{ Addr, Size uint64 }

// PlaceInitrd copies an initrd to the highest page-aligned address that is
// above the kernel, in RAM below the MMIO hole, and below the kernel's
// initrd_addr_max.
func PlaceInitrd(m *memory.Memory, k *Kernel, data []byte) (Initrd, error) {
	size := uint64(len(data))
	if size == 0 {
		return Initrd{}, nil
	}
	top := uint64(m.Regions()[0].End())
	if top > MMIOHoleStart {
		top = MMIOHoleStart
	}
	if k.InitrdMax+1 < top {
		top = k.InitrdMax + 1
	}
	low := (k.End + 4095) &^ 4095
	if size > top || (top-size)&^4095 < low {
		return Initrd{}, fmt.Errorf("initrd of %d bytes does not fit in guest memory: %d bytes free between the kernel's end (%#x) and %#x; raise --memory", size, subOrZero(top, low), low, top)
	}
	addr := (top - size) &^ 4095
	if err := m.Write(memory.GuestAddr(addr), data); err != nil {
		return Initrd{}, err
	}
	return Initrd{Addr: addr, Size: size}, nil
}

func subOrZero(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

// CheckCmdline checks a command line against the kernel's limit.
func CheckCmdline(k *Kernel, cmdline string) error {
	if len(cmdline) > k.CmdlineMax {
		return fmt.Errorf("kernel command line is %d bytes; this kernel accepts at most %d", len(cmdline), k.CmdlineMax)
	}
	for i := 0; i < len(cmdline); i++ {
		if cmdline[i] == 0 {
			return fmt.Errorf("kernel command line contains a NUL byte at offset %d", i)
		}
	}
	return nil
}

// WriteZeroPage writes the command line and boot_params: the bzImage setup
// header (or a minimal one for ELF kernels), the command line pointer, the
// initrd and the e820 map.
func WriteZeroPage(m *memory.Memory, k *Kernel, cmdline string, rd Initrd, e820 []E820Entry) error {
	if err := CheckCmdline(k, cmdline); err != nil {
		return err
	}
	if len(e820) > zpE820Max {
		return fmt.Errorf("e820 map has %d entries, the zero page holds %d", len(e820), zpE820Max)
	}
	cl := append([]byte(cmdline), 0)
	if err := m.Write(CmdlineAddr, cl); err != nil {
		return fmt.Errorf("write command line: %w", err)
	}
	zp := make([]byte, zeroPageSize)
	le := binary.LittleEndian
	if k.Setup != nil {
		copy(zp[zpSetupHeader:], k.Setup)
	} else {
		le.PutUint16(zp[zpBootFlag:], 0xaa55)
		copy(zp[zpHeader:], "HdrS")
		le.PutUint16(zp[zpVersion:], 0x020f)
		le.PutUint32(zp[zpKernelAlignment:], 0x01000000)
	}
	zp[zpTypeOfLoader] = 0xff
	zp[zpLoadFlags] |= 0x01 // LOADED_HIGH
	le.PutUint32(zp[zpCmdLinePtr:], CmdlineAddr)
	le.PutUint32(zp[zpExtCmdLinePtr:], 0)
	le.PutUint32(zp[zpCmdlineSize:], uint32(k.CmdlineMax))
	le.PutUint32(zp[zpRamdiskImage:], uint32(rd.Addr))
	le.PutUint32(zp[zpRamdiskSize:], uint32(rd.Size))
	le.PutUint32(zp[zpExtRamdiskImage:], uint32(rd.Addr>>32))
	le.PutUint32(zp[zpExtRamdiskSize:], uint32(rd.Size>>32))
	zp[zpE820Entries] = uint8(len(e820))
	for i, e := range e820 {
		o := zpE820Table + 20*i
		le.PutUint64(zp[o:], e.Addr)
		le.PutUint64(zp[o+8:], e.Size)
		le.PutUint32(zp[o+16:], e.Type)
	}
	return m.Write(ZeroPageAddr, zp)
}
