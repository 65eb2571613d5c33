package vsock

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// MaxHandshake is the longest "CONNECT <port>\n" line a host-initiated
// connection may send, newline included; 32 bytes with no newline is
// garbage (Firecracker reads at most 32 bytes).
const MaxHandshake = 32

// ErrHandshake is the category of a connect line the device refuses.
var ErrHandshake = errors.New("bad vsock handshake")

// ParseConnect parses the line a host-initiated connection starts with, as
// Firecracker's hybrid vsock does: whitespace-separated words, the first
// "connect" in any letter case, the second the guest port in decimal (an
// unsigned 32-bit number; Rust's u32 parser also takes a leading '+');
// further words are ignored. line is what came before the newline.
func ParseConnect(line []byte) (uint32, error) {
	f := bytes.Fields(line)
	if len(f) < 2 || !strings.EqualFold(string(f[0]), "connect") {
		return 0, fmt.Errorf("%w: %q is not CONNECT <port>", ErrHandshake, line)
	}
	num := f[1]
	if len(num) > 1 && num[0] == '+' {
		num = num[1:]
	}
	for _, c := range num {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%w: port %q is not a decimal number", ErrHandshake, f[1])
		}
	}
	p, err := strconv.ParseUint(string(num), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: port %q: not a 32-bit number", ErrHandshake, f[1])
	}
	return uint32(p), nil
}

// errHandshakeEOF: the host closed before sending a whole line.
var errHandshakeEOF = fmt.Errorf("%w: connection closed before the CONNECT line", ErrHandshake)

// readConnect reads the connect line from a non-blocking host socket
// without consuming anything after its newline (the host may send data
// right behind it): it peeks at what has arrived, and once a newline is
// there it reads exactly the line. done is false while the line is still
// incomplete.
func readConnect(fd int) (port uint32, done bool, err error) {
	var buf [MaxHandshake]byte
	n, _, err := unix.Recvfrom(fd, buf[:], unix.MSG_PEEK)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return 0, false, nil
	case err != nil:
		return 0, true, fmt.Errorf("%w: read: %w", ErrHandshake, err)
	case n == 0:
		return 0, true, errHandshakeEOF
	}
	i := bytes.IndexByte(buf[:n], '\n')
	if i < 0 {
		if n == MaxHandshake {
			return 0, true, fmt.Errorf("%w: no newline in the first %d bytes", ErrHandshake, MaxHandshake)
		}
		if hostShutWrite(fd) { // the rest of the line can never come
			return 0, true, errHandshakeEOF
		}
		return 0, false, nil
	}
	if _, err := unix.Read(fd, buf[:i+1]); err != nil { // peeked bytes are there: this cannot block
		return 0, true, fmt.Errorf("%w: read: %w", ErrHandshake, err)
	}
	port, err = ParseConnect(buf[:i])
	return port, true, err
}

// hostShutWrite reports whether the host shut its socket for writing (or
// closed it): what has arrived is all there will be.
func hostShutWrite(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	n, err := unix.Poll(p, 0)
	return err == nil && n > 0 && p[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0
}
