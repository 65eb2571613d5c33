package seccap

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// The filter program is assembled here, straight into the kernel's
// struct sock_filter, with the call numbers of sysnum. go-seccomp-bpf's own assembler (v1.6.0)
// cannot be used for argument conditions: a condition that fails leaves
// the argument it loaded in the accumulator, and the comparisons that
// follow take it for the system call number. mmap(..., PROT_READ|
// PROT_EXEC) then passes as fstat, whose number is 5, and ioctl(fd, 1)
// passes as write. The layout here never needs the number again once a
// call matched: every call appears once, and when none of its condition
// sets holds, the program returns the default action there and then.
//
//	ld  arch;  jeq AUDIT_ARCH_NATIVE, +1;  ret default
//	ld  nr;    jge X32_SYSCALL_BIT, +0, +1;  ret default
//	jeq nr_a, +0, +1;  ret allow                 (calls allowed with any arguments)
//	jeq nr_b, +0, end_b;  <sets>; ret default     (calls with conditions)
//	...
//	ret default
//
// A condition on a 64-bit argument compares both 32-bit halves (the upper
// one too: an ioctl request with junk above bit 31 is refused, not
// truncated). The kernel caches, per call number, the verdict of a
// program that does not look at arguments, so the calls without
// conditions cost nothing per call; the others run their block only.

// seccomp return actions (linux/seccomp.h).
const (
	retKillProcess = 0x80000000
	retTrap        = 0x00030000
	retLog         = 0x7ffc0000
	retAllow       = 0x7fff0000
)

// seccomp_data offsets: nr, arch, then the arguments at 16 + 8*i, the
// low word first (the architectures rayvmm runs on are little-endian).
const (
	offNr   = 0
	offArch = 4
)

func argLo(i int) uint32 { return uint32(16 + 8*i) }
func argHi(i int) uint32 { return uint32(16 + 8*i + 4) }

const x32SyscallBit = 0x40000000

// Classic BPF opcodes (linux/bpf_common.h).
const (
	ldAbsW = 0x20 // BPF_LD | BPF_W | BPF_ABS
	jeqK   = 0x15 // BPF_JMP | BPF_JEQ | BPF_K
	jgeK   = 0x35 // BPF_JMP | BPF_JGE | BPF_K
	jsetK  = 0x45 // BPF_JMP | BPF_JSET | BPF_K
	retK   = 0x06 // BPF_RET | BPF_K
)

// asm is a program under construction, with labels for forward jumps.
type asm struct {
	insts  []unix.SockFilter
	fixups []fixup
	labels []int // label -> instruction index; -1 until placed
}

type fixup struct {
	at          int
	tTrue, tFal int // labels; -1: the next instruction
}

func (a *asm) label() int  { a.labels = append(a.labels, -1); return len(a.labels) - 1 }
func (a *asm) place(l int) { a.labels[l] = len(a.insts) }
func (a *asm) emit(code uint16, k uint32) {
	a.insts = append(a.insts, unix.SockFilter{Code: code, K: k})
}
func (a *asm) ret(v uint32)    { a.emit(retK, v) }
func (a *asm) load(off uint32) { a.emit(ldAbsW, off) }

// jump emits a conditional jump to label t when the condition holds and
// to label f when it does not (-1: fall through).
func (a *asm) jump(code uint16, v uint32, t, f int) {
	a.fixups = append(a.fixups, fixup{at: len(a.insts), tTrue: t, tFal: f})
	a.emit(code, v)
}

func (a *asm) resolve() ([]unix.SockFilter, error) {
	skip := func(at, l int) (uint8, error) {
		if l < 0 {
			return 0, nil
		}
		d := a.labels[l] - at - 1
		if a.labels[l] < 0 || d < 0 || d > 255 {
			return 0, fmt.Errorf("filter: jump from %d to label %d out of range", at, l)
		}
		return uint8(d), nil
	}
	for _, f := range a.fixups {
		var err error
		if a.insts[f.at].Jt, err = skip(f.at, f.tTrue); err != nil {
			return nil, err
		}
		if a.insts[f.at].Jf, err = skip(f.at, f.tFal); err != nil {
			return nil, err
		}
	}
	if len(a.insts) > 4096 {
		return nil, fmt.Errorf("filter: %d instructions, the kernel takes 4096", len(a.insts))
	}
	return a.insts, nil
}

// assemble builds the filter for groups, in their order; a call named in
// several groups is merged into its first place. def is the action for
// everything else.
func assemble(groups []group, def uint32) ([]unix.SockFilter, error) {
	var order []string
	merged := map[string]*call{}
	for _, g := range groups {
		for _, c := range g.calls {
			m, ok := merged[c.name]
			if !ok {
				cp := call{name: c.name, when: append([][]cond(nil), c.when...)}
				merged[c.name], order = &cp, append(order, c.name)
				continue
			}
			if (len(m.when) == 0) != (len(c.when) == 0) {
				return nil, fmt.Errorf("filter: %s is allowed both with and without conditions", c.name)
			}
			m.when = append(m.when, c.when...)
		}
	}
	a := &asm{insts: make([]unix.SockFilter, 0, 512), labels: make([]int, 0, 256), fixups: make([]fixup, 0, 256)}
	a.load(offArch)
	nativeArch := a.label()
	a.jump(jeqK, auditArch, nativeArch, -1)
	a.ret(def)
	a.place(nativeArch)
	a.load(offNr)
	notX32 := a.label()
	a.jump(jgeK, x32SyscallBit, -1, notX32)
	a.ret(def)
	a.place(notX32)
	for _, name := range order {
		c := merged[name]
		nr, ok := sysnum[name]
		if !ok {
			return nil, fmt.Errorf("filter: no system call %q on %s", name, archName)
		}
		end := a.label()
		if len(c.when) == 0 {
			a.jump(jeqK, uint32(nr), -1, end)
			a.ret(retAllow)
			a.place(end)
			continue
		}
		a.jump(jeqK, uint32(nr), -1, end)
		for _, set := range c.when {
			next := a.label()
			for _, cd := range set {
				if err := a.cond(cd, next); err != nil {
					return nil, fmt.Errorf("filter: %s: %w", name, err)
				}
			}
			a.ret(retAllow)
			a.place(next)
		}
		a.ret(def) // the call matched, none of its condition sets did
		a.place(end)
	}
	a.ret(def)
	return a.resolve()
}

// cond emits a test of one condition that falls through when it holds
// and jumps to fail when it does not.
func (a *asm) cond(c cond, fail int) error {
	if c.arg < 0 || c.arg > 5 {
		return fmt.Errorf("argument %d", c.arg)
	}
	hi, lo := uint32(c.val>>32), uint32(c.val)
	switch c.op {
	case eq:
		a.load(argHi(c.arg))
		a.jump(jeqK, hi, -1, fail)
		a.load(argLo(c.arg))
		a.jump(jeqK, lo, -1, fail)
	case ne:
		pass := a.label()
		a.load(argHi(c.arg))
		a.jump(jeqK, hi, -1, pass)
		a.load(argLo(c.arg))
		a.jump(jeqK, lo, fail, -1)
		a.place(pass)
	case noBits:
		if hi != 0 {
			a.load(argHi(c.arg))
			a.jump(jsetK, hi, fail, -1)
		}
		a.load(argLo(c.arg))
		a.jump(jsetK, lo, fail, -1)
	default:
		return fmt.Errorf("operation %d", c.op)
	}
	return nil
}
