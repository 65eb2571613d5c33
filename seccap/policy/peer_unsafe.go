package policy

import (
	"encoding/binary"
	"unsafe"

	"golang.org/x/sys/unix"
)

// peerGroups is SO_PEERGROUPS: the peer's supplementary groups at connect
// time (x/sys has no wrapper for it).
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]byte, 64*4)
	for {
		n := uint32(len(buf))
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		if e == unix.ERANGE && int(n) > len(buf) && n <= 65536*4 {
			buf = make([]byte, n)
			continue
		}
		if e != 0 {
			return nil, e
		}
		gs := make([]uint32, n/4)
		for i := range gs {
			gs[i] = binary.NativeEndian.Uint32(buf[4*i:])
		}
		return gs, nil
	}
}
