package network

import (
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/network/nettest"
)

// udpFrame is an Ethernet/IPv4/UDP frame (UDP checksum 0: none).
func udpFrame(dstMAC, srcMAC net.HardwareAddr, src, dst net.IP, sport, dport uint16, payload []byte) []byte {
	f := make([]byte, 14+20+8+len(payload))
	copy(f, dstMAC)
	copy(f[6:], srcMAC)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:34]
	ip[0], ip[8], ip[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	copy(ip[12:], src.To4())
	copy(ip[16:], dst.To4())
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := f[34:]
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	copy(udp[8:], payload)
	return f
}

// TestNATMasquerades sends a UDP datagram from a NIC on a --nat network to
// a host in a second namespace behind the first; that host sees it come
// from the first namespace's address, not the NIC's.
func TestNATMasquerades(t *testing.T) {
	host, far := nettest.New(t), nettest.New(t)
	nettest.Veth(t, host, "up0", "198.51.100.1/24", far, "down0", "198.51.100.2/24")
	dir := t.TempDir()
	ctx := context.Background()
	do(t, host, func() error {
		_, err := Create(ctx, dir, CreateOptions{Name: "nat", Subnet: "192.0.2.0/24", NAT: true})
		return err
	})
	var conn net.PacketConn
	do(t, far, func() (err error) { conn, err = net.ListenPacket("udp4", "198.51.100.2:9999"); return err })
	defer conn.Close()
	spec, _ := ParseNICSpec("network=nat")
	var nic *NIC
	do(t, host, func() (err error) { nic, err = Attach(ctx, dir, "natvm", spec); return err })
	defer nic.Close()
	guestIP := net.ParseIP("192.0.2.10")
	if _, err := nic.Port.Write(arpRequest(nic.MAC, guestIP, net.ParseIP("192.0.2.1"))); err != nil {
		t.Fatal(err)
	}
	gwMAC := net.HardwareAddr(readUntil(t, nic.Port, isARPReplyTo(nic.MAC))[22:28])
	payload := []byte("through the NAT")
	if _, err := nic.Port.Write(udpFrame(gwMAC, nic.MAC, guestIP, net.ParseIP("198.51.100.2"), 5000, 9999, payload)); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 100)
	n, from, err := conn.ReadFrom(buf)
	if err != nil {
		t.Fatalf("far host got nothing: %v", err)
	}
	if string(buf[:n]) != string(payload) {
		t.Fatalf("far host got %q", buf[:n])
	}
	if ip := from.(*net.UDPAddr).IP.String(); ip != "198.51.100.1" {
		t.Fatalf("far host saw the datagram from %s, want the NAT address 198.51.100.1", ip)
	}
}

// TestOverlay joins two "hosts" (namespaces linked by a veth) with a VXLAN
// overlay: a frame from a NIC on one reaches a NIC on the other.
func TestOverlay(t *testing.T) {
	h1, h2 := nettest.New(t), nettest.New(t)
	nettest.Veth(t, h1, "ul0", "203.0.113.1/24", h2, "ul0", "203.0.113.2/24")
	ctx := context.Background()
	var nics [2]*NIC
	for i, h := range []*nettest.NS{h1, h2} {
		dir := t.TempDir()
		overlay := "vxlan:42,remote=203.0.113.2,local=203.0.113.1"
		if i == 1 {
			overlay = "vxlan:42,remote=203.0.113.1,local=203.0.113.2"
		}
		spec, _ := ParseNICSpec("network=ov")
		spec.Index = i
		do(t, h, func() (err error) {
			if _, err := Create(ctx, dir, CreateOptions{Name: "ov", Subnet: "192.0.2.0/24", Isolated: true, Overlay: overlay}); err != nil {
				return err
			}
			nics[i], err = Attach(ctx, dir, "ovvm", spec)
			return err
		})
		defer nics[i].Close()
		if nics[i].MTU != 1450 {
			t.Fatalf("overlay NIC MTU %d, want 1450", nics[i].MTU)
		}
	}
	s1 := newSink(nics[1].Port)
	if _, err := nics[0].Port.Write(broadcast(nics[0].MAC)); err != nil {
		t.Fatal(err)
	}
	s1.wait(t, "host 1 -> host 2 over VXLAN", untagged(nics[0].MAC))
	// Unicast back, to the MAC host 2's bridge learned through the tunnel.
	s0 := newSink(nics[0].Port)
	f := broadcast(nics[1].MAC)
	copy(f, nics[0].MAC)
	if _, err := nics[1].Port.Write(f); err != nil {
		t.Fatal(err)
	}
	s0.wait(t, "host 2 -> host 1 unicast", untagged(nics[1].MAC))
}
