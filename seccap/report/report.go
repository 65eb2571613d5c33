// Package report is the control plane's side of the VM process sandbox's
// report (see package seccap): in strict mode the VM process's SIGSYS
// handler writes the refused call's number and audit architecture into a
// pipe before the process dies of SIGSYS, and Pipe.Explain turns that
// into the one line the control plane prints and the record the audit log
// keeps:
//
//	rayvmm: VM process killed by the sandbox (SIGSYS): syscall 59 (execve)
//
// It is a package of its own so that the VM process does not link the
// system call name tables (names.go).
package report

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Pipe carries strict mode's report of a refused call from the VM process
// to the control plane: a pipe (NewPipe), or a file (NewFile). The
// control plane makes one per VM process, hands Writer over (its
// descriptor number there is seccap.Config.ReportFD), calls Launched once
// the process runs, and Explain once it has exited.
type Pipe struct {
	r, w *os.File
}

// NewPipe makes the pipe.
func NewPipe() (*Pipe, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("sandbox report pipe: %w", err)
	}
	// The handler must never block on a full pipe (it cannot: a record is
	// 8 bytes), nor may the VM process read it.
	if err := unix.SetNonblock(int(w.Fd()), true); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("sandbox report pipe: %w", err)
	}
	return &Pipe{r: r, w: w}, nil
}

// NewFile makes the report a file at path (created, or truncated, with
// mode 0600) instead of a pipe, for a VM process that may outlive its
// control plane: a later one, such as a pods daemon that re-adopted the
// VM process and so has no wait status, reads it with ReadFile. The
// handler's write to a regular file cannot block either.
func NewFile(path string) (*Pipe, error) {
	w, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("sandbox report file: %w", err)
	}
	r, err := os.Open(path)
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("sandbox report file: %w", err)
	}
	return &Pipe{r: r, w: w}, nil
}

// ReadFile reads the report file at path (see NewFile) of a VM process
// that is gone, for a control plane that has no wait status for it: a
// *KilledError naming the refused call when the sandbox's handler wrote
// its record (the handler writes it only on its way to death by SIGSYS),
// else nil.
func ReadFile(path string) *KilledError {
	b, err := os.ReadFile(path)
	if err != nil || len(b) < recordSize {
		return nil
	}
	return killedError(b[:recordSize])
}

// Writer is the end to hand to the VM process.
func (p *Pipe) Writer() *os.File { return p.w }

// Launched closes the control plane's copy of the write end, so that the
// VM process holds the only one.
func (p *Pipe) Launched() error {
	if p.w == nil {
		return nil
	}
	err := p.w.Close()
	p.w = nil
	return err
}

// Close closes both ends.
func (p *Pipe) Close() error {
	p.Launched()
	return p.r.Close()
}

// recordSize is what the VM process's SIGSYS handler writes
// (seccap/sigsys_amd64.s): the call's number and audit architecture, as
// little-endian uint32s.
const recordSize = 8

// Explain tells whether the sandbox killed an exited VM process: nil
// unless st is death by SIGSYS, else a *KilledError naming the refused
// call when the handler reported it.
func (p *Pipe) Explain(st *os.ProcessState) error {
	ws, ok := st.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != unix.SIGSYS {
		return nil
	}
	var rec []byte
	if p != nil {
		rec = p.read()
	}
	return killedError(rec)
}

// read takes what the pipe holds without waiting: the handler wrote it
// before the process died.
func (p *Pipe) read() []byte {
	buf := make([]byte, 64)
	var n int
	rc, err := p.r.SyscallConn()
	if err != nil {
		return nil
	}
	rc.Read(func(fd uintptr) bool {
		n, _ = unix.Read(int(fd), buf)
		return true
	})
	if n < recordSize {
		return nil
	}
	return buf[:recordSize]
}

func killedError(rec []byte) *KilledError {
	e := &KilledError{Syscall: -1}
	if len(rec) == recordSize {
		e.Syscall = int(binary.LittleEndian.Uint32(rec))
		e.Arch = binary.LittleEndian.Uint32(rec[4:])
		e.Name = SyscallName(e.Arch, e.Syscall)
	}
	return e
}

// ErrKilled is the category of a VM process the sandbox killed.
var ErrKilled = errors.New("VM process killed by the sandbox (SIGSYS)")

// KilledError is a VM process the sandbox killed, for the control
// plane's one line and the audit log.
type KilledError struct {
	// Syscall is the refused call's number, -1 when it was not reported
	// (the VM process died before its handler wrote it, or strict mode
	// had no handler on this architecture).
	Syscall int
	// Arch is its audit architecture (AUDIT_ARCH_X86_64 = 0xc000003e).
	Arch uint32
	// Name is the call's name, "" when unknown.
	Name string
}

func (e *KilledError) Error() string {
	switch {
	case e.Syscall < 0:
		return ErrKilled.Error() + ": the refused system call was not reported; the kernel log has it (dmesg | grep type=1326)"
	case e.Name == "":
		return fmt.Sprintf("%v: syscall %d (arch %#x)", ErrKilled, e.Syscall, e.Arch)
	}
	return fmt.Sprintf("%v: syscall %d (%s)", ErrKilled, e.Syscall, e.Name)
}

// Is makes every KilledError match ErrKilled.
func (e *KilledError) Is(target error) bool { return target == ErrKilled }
