package report

import (
	"encoding/binary"
	"errors"
	"path/filepath"
	"testing"

	"github.com/elastic/go-seccomp-bpf/arch"
)

func TestKilledError(t *testing.T) {
	rec := func(nr, arch uint32) []byte {
		b := make([]byte, recordSize)
		binary.LittleEndian.PutUint32(b, nr)
		binary.LittleEndian.PutUint32(b[4:], arch)
		return b
	}
	for _, tt := range []struct {
		name string
		rec  []byte
		want string
	}{
		{"x86_64", rec(59, 0xc000003e), "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)"},
		{"i386 (int 0x80)", rec(11, 0x40000003), "VM process killed by the sandbox (SIGSYS): syscall 11 (execve)"},
		{"unknown arch", rec(59, 0x1234), "VM process killed by the sandbox (SIGSYS): syscall 59 (arch 0x1234)"},
		{"no report", nil, "VM process killed by the sandbox (SIGSYS): the refused system call was not reported; the kernel log has it (dmesg | grep type=1326)"},
		{"short report", []byte{1, 2, 3}, "VM process killed by the sandbox (SIGSYS): the refused system call was not reported; the kernel log has it (dmesg | grep type=1326)"},
	} {
		err := killedError(tt.rec)
		if err.Error() != tt.want || !errors.Is(err, ErrKilled) {
			t.Errorf("%s: %v", tt.name, err)
		}
	}
}

// TestNames: the name tables agree with go-seccomp-bpf's.
func TestNames(t *testing.T) {
	for _, a := range []*arch.Info{arch.X86_64, arch.I386} {
		for nr, name := range a.SyscallNumbers {
			if got := SyscallName(uint32(a.ID), nr); got != name {
				t.Errorf("%s syscall %d: %q, go-seccomp-bpf says %q", a.Name, nr, got, name)
			}
		}
		if got := SyscallName(uint32(a.ID), 100000); got != "" {
			t.Errorf("%s syscall 100000: %q", a.Name, got)
		}
	}
}

// TestFile: a report file is read back by a later reader that has no wait
// status (ReadFile), and a new report file forgets an earlier run's record.
func TestFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.sandbox")
	p, err := NewFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if k := ReadFile(path); k != nil {
		t.Fatalf("empty report file read as %v", k)
	}
	rec := make([]byte, recordSize)
	binary.LittleEndian.PutUint32(rec, 59)
	binary.LittleEndian.PutUint32(rec[4:], 0xc000003e)
	if _, err := p.Writer().Write(rec); err != nil { // as the handler does
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	const want = "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)"
	if k := ReadFile(path); k == nil || k.Error() != want {
		t.Fatalf("ReadFile = %v, want %q", k, want)
	}
	if k := ReadFile(path + ".missing"); k != nil {
		t.Fatalf("missing report file read as %v", k)
	}
	p, err = NewFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if k := ReadFile(path); k != nil {
		t.Fatalf("a new report file kept the earlier record: %v", k)
	}
}
