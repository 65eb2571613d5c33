package network

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/network/nettest"
	vmspec "github.com/rayvmm/rayvmm/spec"
)

// TestNATMasquerades sends a UDP datagram from a NIC on a --nat network to
// a host in a second namespace behind the first; that host sees it come
// from the first namespace's address, not the NIC's.
func TestNATMasquerades(t *testing.T) {
	host, far := nettest.New(t), nettest.New(t)
	nettest.Veth(t, host, "up0", "198.51.100.1/24", far, "down0", "198.51.100.2/24")
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, host, dir, CreateOptions{Name: "nat", Subnet: "192.0.2.0/24", NAT: true})
	var conn net.PacketConn
	do(t, far, func() (err error) { conn, err = net.ListenPacket("udp4", "198.51.100.2:9999"); return err })
	defer conn.Close()
	spec, _ := vmspec.ParseNIC("network=nat")
	var nic *NIC
	do(t, host, func() (err error) { nic, err = Attach(ctx, dir, "natvm", 0, spec); return err })
	defer nic.Close()
	guestIP := net.ParseIP("192.0.2.10")
	if _, err := nic.Port().Write(nettest.ARPRequest(nic.MAC, guestIP, net.ParseIP("192.0.2.1"))); err != nil {
		t.Fatal(err)
	}
	gwMAC := net.HardwareAddr(readUntil(t, nic.Port(), isARPReplyTo(nic.MAC))[22:28])
	payload := []byte("through the NAT")
	if _, err := nic.Port().Write(nettest.UDP(gwMAC, nic.MAC, guestIP, net.ParseIP("198.51.100.2"), 5000, 9999, payload)); err != nil {
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

// TestAttachRestoresForwarding: after a reboot that restored the NAT table
// (a saved nftables ruleset) but not IPv4 forwarding, attaching to the NAT
// network turns forwarding on again, or the guests could not get out.
func TestAttachRestoresForwarding(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	createNet(t, ns, dir, CreateOptions{Name: "nat", Subnet: "192.0.2.0/24", NAT: true})
	forwarding := func() (v string) {
		do(t, ns, func() error {
			b, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
			v = strings.TrimSpace(string(b))
			return err
		})
		return v
	}
	if v := forwarding(); v != "1" {
		t.Fatalf("ip_forward after create = %s, want 1", v)
	}
	do(t, ns, func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("0\n"), 0) })
	spec, _ := vmspec.ParseNIC("network=nat")
	var nic *NIC
	do(t, ns, func() (err error) { nic, err = Attach(context.Background(), dir, "vm", 0, spec); return err })
	defer nic.Close()
	if v := forwarding(); v != "1" {
		t.Fatalf("ip_forward after attach = %s, want 1", v)
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
		spec, _ := vmspec.ParseNIC("network=ov")
		do(t, h, func() (err error) {
			if _, err := Create(ctx, dir, CreateOptions{Name: "ov", Subnet: "192.0.2.0/24", Isolated: true, Overlay: overlay}); err != nil {
				return err
			}
			nics[i], err = Attach(ctx, dir, "ovvm", i, spec)
			return err
		})
		defer nics[i].Close()
		if nics[i].MTU != 1450 {
			t.Fatalf("overlay NIC MTU %d, want 1450", nics[i].MTU)
		}
	}
	s1 := newSink(nics[1].Port())
	if _, err := nics[0].Port().Write(broadcast(nics[0].MAC)); err != nil {
		t.Fatal(err)
	}
	s1.wait(t, "host 1 -> host 2 over VXLAN", untagged(nics[0].MAC))
	// Unicast back, to the MAC host 2's bridge learned through the tunnel.
	s0 := newSink(nics[0].Port())
	f := broadcast(nics[1].MAC)
	copy(f, nics[0].MAC)
	if _, err := nics[1].Port().Write(f); err != nil {
		t.Fatal(err)
	}
	s0.wait(t, "host 2 -> host 1 unicast", untagged(nics[1].MAC))
}
