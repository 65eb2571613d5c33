package nettest

import (
	"encoding/binary"
	"net"
)

// Frame builders for tests that play a guest: whole Ethernet frames to
// write into a TAP or a device's transmit queue.

// Broadcast is the Ethernet broadcast address.
var Broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// ARPRequest is "who has target? tell from" sent from src.
func ARPRequest(src net.HardwareAddr, from, target net.IP) []byte {
	f := ethernet(Broadcast, src, 0x0806, 28)
	a := f[14:]
	copy(a, []byte{0, 1, 8, 0, 6, 4, 0, 1})
	copy(a[8:], src)
	copy(a[14:], from.To4())
	copy(a[24:], target.To4())
	return f
}

// IsARPReply reports whether f is an ARP reply sent to dst; the answer's
// MAC is f[22:28] and its IPv4 address f[28:32].
func IsARPReply(f []byte, dst net.HardwareAddr) bool {
	return len(f) >= 42 && string(f[:6]) == string(dst) && binary.BigEndian.Uint16(f[12:]) == 0x0806 && f[21] == 2
}

// UDP is an IPv4 UDP datagram (no UDP checksum) in an Ethernet frame.
func UDP(dst, src net.HardwareAddr, from, to net.IP, sport, dport uint16, payload []byte) []byte {
	f := ipv4(dst, src, from, to, 17, 8+len(payload))
	u := f[34:]
	binary.BigEndian.PutUint16(u[0:], sport)
	binary.BigEndian.PutUint16(u[2:], dport)
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	copy(u[8:], payload)
	return f
}

// ICMPEcho is an IPv4 ICMP echo request (sequence 1) in an Ethernet frame.
func ICMPEcho(dst, src net.HardwareAddr, from, to net.IP, id uint16, payload []byte) []byte {
	f := ipv4(dst, src, from, to, 1, 8+len(payload))
	icmp := f[34:]
	icmp[0] = 8
	binary.BigEndian.PutUint16(icmp[4:], id)
	binary.BigEndian.PutUint16(icmp[6:], 1)
	copy(icmp[8:], payload)
	binary.BigEndian.PutUint16(icmp[2:], Checksum(icmp))
	return f
}

// IsICMPEchoReply reports whether f is an IPv4 ICMP echo reply.
func IsICMPEchoReply(f []byte) bool {
	return len(f) >= 42 && binary.BigEndian.Uint16(f[12:]) == 0x0800 && f[23] == 1 && f[34] == 0
}

func ethernet(dst, src net.HardwareAddr, etherType uint16, payload int) []byte {
	f := make([]byte, 14+payload)
	copy(f, dst)
	copy(f[6:], src)
	binary.BigEndian.PutUint16(f[12:], etherType)
	return f
}

// ipv4 is an Ethernet frame with an IPv4 header (TTL 64) for a payload of
// n bytes, which the caller fills in at offset 34.
func ipv4(dst, src net.HardwareAddr, from, to net.IP, proto byte, n int) []byte {
	f := ethernet(dst, src, 0x0800, 20+n)
	ip := f[14:34]
	ip[0], ip[8], ip[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(ip[2:], uint16(20+n))
	copy(ip[12:], from.To4())
	copy(ip[16:], to.To4())
	binary.BigEndian.PutUint16(ip[10:], Checksum(ip))
	return f
}

// Checksum is the Internet checksum of b.
func Checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
