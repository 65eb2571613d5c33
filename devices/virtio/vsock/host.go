package vsock

import (
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// PortPath is the host socket a guest connection to port is connected to:
// uds + "_" + port in decimal (Firecracker's hybrid vsock).
func PortPath(uds string, port uint32) string {
	return uds + "_" + strconv.FormatUint(uint64(port), 10)
}

// dialPort connects a guest-initiated connection to PortPath(uds, port),
// non-blocking. This is the only path the device opens while the guest
// runs: a sandbox around the VM process must let it connect to Unix
// sockets named uds_* and nothing else. A listener whose backlog is full
// counts as not listening (the guest gets RST, never a blocked device).
func dialPort(uds string, port uint32) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	p := PortPath(uds, port)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: p}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("connect %s: %w", p, err)
	}
	return fd, nil
}
