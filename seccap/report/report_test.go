package report

import (
	"encoding/binary"
	"errors"
	"testing"
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
