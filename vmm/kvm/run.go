package kvm

import (
	"encoding/binary"
	"fmt"
)

// Exit reasons (KVM_EXIT_*) rayvmm handles.
const (
	ExitUnknown       = 0
	ExitException     = 1
	ExitIO            = 2
	ExitHypercall     = 3
	ExitDebug         = 4
	ExitHLT           = 5
	ExitMMIO          = 6
	ExitIRQWindowOpen = 7
	ExitShutdown      = 8
	ExitFailEntry     = 9
	ExitIntr          = 10
	ExitInternalError = 17
	ExitSystemEvent   = 24
)

// System event types (KVM_SYSTEM_EVENT_*).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// Internal error suberrors (KVM_INTERNAL_ERROR_*).
const (
	InternalErrorEmulation  = 1
	InternalErrorSimulEx    = 2
	InternalErrorDelivEv    = 3
	InternalErrorUnexpected = 4
)

// The kvm_run layout (include/uapi/linux/kvm.h). The area is read with
// explicit offsets rather than by overlaying a Go struct on shared memory.
const (
	runExitReason = 8
	runUnion      = 32
	runMinSize    = runUnion + 256
)

// ExitReason is the exit_reason of the last KVM_RUN.
func (c *VCPU) ExitReason() uint32 {
	return binary.LittleEndian.Uint32(c.run[runExitReason:])
}

// IOExit describes a KVM_EXIT_IO: Data aliases the kvm_run area; for IN
// the handler fills it, for OUT it holds what the guest wrote. Count is the
// repetition count of a rep ins/outs.
type IOExit struct {
	Out   bool
	Size  int
	Port  uint16
	Count int
	Data  []byte
}

// IO decodes a KVM_EXIT_IO.
func (c *VCPU) IO() (IOExit, error) {
	u := c.run[runUnion:]
	e := IOExit{
		Out:   u[0] == 1,
		Size:  int(u[1]),
		Port:  binary.LittleEndian.Uint16(u[2:]),
		Count: int(binary.LittleEndian.Uint32(u[4:])),
	}
	off := binary.LittleEndian.Uint64(u[8:])
	n := uint64(e.Size) * uint64(e.Count)
	if e.Size == 0 || e.Size > 4 || off > uint64(len(c.run)) || n > uint64(len(c.run))-off {
		return e, fmt.Errorf("vcpu %d: malformed KVM_EXIT_IO (size %d count %d offset %#x)", c.ID, e.Size, e.Count, off)
	}
	e.Data = c.run[off : off+n : off+n]
	return e, nil
}

// MMIOExit describes a KVM_EXIT_MMIO; Data aliases the kvm_run area.
type MMIOExit struct {
	Addr  uint64
	Write bool
	Data  []byte
}

// MMIO decodes a KVM_EXIT_MMIO.
func (c *VCPU) MMIO() (MMIOExit, error) {
	u := c.run[runUnion:]
	n := binary.LittleEndian.Uint32(u[16:])
	if n == 0 || n > 8 {
		return MMIOExit{}, fmt.Errorf("vcpu %d: malformed KVM_EXIT_MMIO (len %d)", c.ID, n)
	}
	return MMIOExit{
		Addr:  binary.LittleEndian.Uint64(u[0:]),
		Write: u[20] != 0,
		Data:  u[8 : 8+n : 8+n],
	}, nil
}

// InternalError decodes a KVM_EXIT_INTERNAL_ERROR: the suberror and, for an
// emulation failure that carries them, the instruction bytes KVM saw.
func (c *VCPU) InternalError() (suberror uint32, data []uint64, insn []byte) {
	u := c.run[runUnion:]
	suberror = binary.LittleEndian.Uint32(u[0:])
	nd := binary.LittleEndian.Uint32(u[4:])
	if nd > 16 {
		nd = 16
	}
	for i := uint32(0); i < nd; i++ {
		data = append(data, binary.LittleEndian.Uint64(u[8+8*i:]))
	}
	// struct kvm_emulation_failure: flags bit 0 says insn_size and
	// insn_bytes[15] follow the flags word.
	if suberror == InternalErrorEmulation && nd >= 3 && u[8]&1 != 0 {
		size := int(u[16])
		if size > 15 {
			size = 15
		}
		insn = append([]byte(nil), u[17:17+size]...)
	}
	return suberror, data, insn
}

// SystemEvent decodes a KVM_EXIT_SYSTEM_EVENT type.
func (c *VCPU) SystemEvent() uint32 {
	return binary.LittleEndian.Uint32(c.run[runUnion:])
}

// FailEntry decodes KVM_EXIT_FAIL_ENTRY's hardware reason.
func (c *VCPU) FailEntry() uint64 {
	return binary.LittleEndian.Uint64(c.run[runUnion:])
}
