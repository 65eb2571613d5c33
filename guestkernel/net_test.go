package guestkernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// Network tests run in network namespaces they create, with addresses from
// 192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24 only. Two set-ups:
//
//   - a TAP in the namespace (real frames through the host kernel's stack:
//     ping, UDP sockets);
//   - QEMU's UDP socket netdev, with this test as the other end of the wire,
//     for what the host kernel cannot do here (802.1Q tags) and for exact
//     frame-level checks.

const guestMAC = "52:54:00:72:67:02"

var nsCount atomic.Int32

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newNetns creates a network namespace with lo up, removed at cleanup.
func newNetns(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t) // network namespaces, TAP devices
	testenv.RequireTool(t, "ip")
	name := fmt.Sprintf("rayguest-test-%d-%d", os.Getpid(), nsCount.Add(1))
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// inNetns runs fn on an OS thread inside the namespace; sockets fn opens
// stay in it. The thread is never unlocked, so it exits with the goroutine
// and never returns to the pool in the wrong namespace.
func inNetns(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := netns.GetFromName(name)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", name, err)
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func virtioGuest(cmdline string, extra ...string) guest {
	return guest{machine: "microvm,acpi=off", cmdline: cmdline,
		extra: append([]string{"-global", "virtio-mmio.force-legacy=false"}, extra...)}
}

// tapNetns: namespace with TAP rgtap0 = 192.0.2.1/24 and 198.51.100.1 on lo
// (reachable from the guest through the gateway 192.0.2.1).
func tapNetns(t *testing.T) (string, []string) {
	ns := newNetns(t)
	run(t, "ip", "-n", ns, "tuntap", "add", "dev", "rgtap0", "mode", "tap")
	run(t, "ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "rgtap0")
	run(t, "ip", "-n", ns, "link", "set", "rgtap0", "up")
	run(t, "ip", "-n", ns, "addr", "add", "198.51.100.1/32", "dev", "lo")
	return ns, []string{"-netdev", "tap,id=n0,ifname=rgtap0,script=no,downscript=no",
		"-device", "virtio-net-device,netdev=n0,mac=" + guestMAC}
}

func TestNetServeTAP(t *testing.T) {
	ns, nic := tapNetns(t)
	v := startQEMU(t, virtioGuest("rayguest.run=serve rayguest.ip=192.0.2.2/24", nic...), ns)
	v.waitLine(t, `rayguest: serving 192\.0\.2\.2/24`)

	t.Run("ping from the host", func(t *testing.T) {
		testenv.RequireTool(t, "ping")
		out := run(t, "ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "10", "192.0.2.2")
		if !strings.Contains(out, " 3 received") {
			t.Fatalf("want 3 replies:\n%s", out)
		}
		out = run(t, "ip", "netns", "exec", ns, "ping", "-c", "2", "-i", "0.2", "-s", "1400", "-W", "10", "192.0.2.2")
		if !strings.Contains(out, " 2 received") {
			t.Fatalf("want 2 replies to 1400-byte pings:\n%s", out)
		}
	})

	tests := []struct {
		name string
		size int
	}{{"empty", 0}, {"one byte", 1}, {"odd", 333}, {"largest unfragmented", 1472}}
	var conn *net.UDPConn
	if err := inNetns(ns, func() (err error) {
		conn, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 7})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, tt := range tests {
		t.Run("udp echo "+tt.name, func(t *testing.T) {
			msg := make([]byte, tt.size)
			for i := range msg {
				msg[i] = byte(i*7 + tt.size)
			}
			if _, err := conn.Write(msg); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 2048)
			conn.SetReadDeadline(time.Now().Add(30 * time.Second)) // hang guard
			n, err := conn.Read(buf)
			if err != nil {
				t.Fatalf("no echo: %v", err)
			}
			if !bytes.Equal(buf[:n], msg) {
				t.Fatalf("echo differs: sent %d bytes, got %d", len(msg), n)
			}
		})
	}
}

func TestNetPingTAP(t *testing.T) {
	ns, nic := tapNetns(t)
	v := startQEMU(t, virtioGuest("rayguest.run=ping:192.0.2.1+192.0.2.77+198.51.100.1,count=2 "+
		"rayguest.ip=192.0.2.2/24 rayguest.gw=192.0.2.1", nic...), ns)
	for _, want := range []string{
		`rayguest: ping 192\.0\.2\.1 ok rtt_us=\d+`, `rayguest: ping 192\.0\.2\.1 ok rtt_us=\d+`,
		`rayguest: ping 192\.0\.2\.77 FAIL`, `rayguest: ping 192\.0\.2\.77 FAIL`,
		`rayguest: ping 198\.51\.100\.1 ok rtt_us=\d+`, `rayguest: ping 198\.51\.100\.1 ok rtt_us=\d+`,
	} {
		if l := v.waitLine(t, `rayguest: ping .*`); !regexpMatch(want, l) {
			t.Fatalf("got %q, want %s; output:\n%s", l, want, v.output())
		}
	}
}

func TestNetConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		g    guest
		want string
	}{
		{"bad address", virtioGuest("rayguest.run=serve rayguest.ip=192.0.2.300/24"),
			`rayguest: bad rayguest\.ip=192\.0\.2\.300/24`},
		{"missing prefix", virtioGuest("rayguest.run=serve rayguest.ip=192.0.2.2"),
			`rayguest: bad rayguest\.ip=192\.0\.2\.2`},
		{"bad vlan", virtioGuest("rayguest.run=serve rayguest.ip=192.0.2.2/24@4095"),
			`rayguest: bad rayguest\.ip=192\.0\.2\.2/24@4095`},
		{"bad global vlan", virtioGuest("rayguest.run=serve rayguest.ip=192.0.2.2/24 rayguest.vlan=x"),
			`rayguest: bad rayguest\.vlan=x`},
		{"no addresses", virtioGuest("rayguest.run=serve"), `rayguest: net no addresses \(rayguest\.ip=\)`},
		{"no nic", virtioGuest("rayguest.run=serve rayguest.ip=192.0.2.2/24"),
			`rayguest: net FAIL no virtio-net device`},
		{"bad ping spec", virtioGuest("rayguest.run=ping:192.0.2.1,cnt=2 rayguest.ip=192.0.2.2/24"),
			`rayguest: bad ping spec 192\.0\.2\.1,cnt=2`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			expectLines(t, bootQEMU(t, tt.g), tt.want)
		})
	}
}

func regexpMatch(pattern, s string) bool {
	ok, _ := regexp.MatchString("^"+pattern+"$", s)
	return ok
}

// ---- the wire: QEMU's socket netdev with this test at the other end ----

type wire struct {
	conn *net.UDPConn
	qemu *net.UDPAddr
}

// newWire opens the test's end of the wire inside the namespace and returns
// the QEMU arguments for the guest's end.
func newWire(t *testing.T, ns string) (*wire, []string) {
	w := &wire{qemu: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 10001}}
	if err := inNetns(ns, func() (err error) {
		w.conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 10000})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.conn.Close() })
	return w, []string{"-netdev", "socket,id=n0,udp=127.0.0.1:10000,localaddr=127.0.0.1:10001",
		"-device", "virtio-net-device,netdev=n0,mac=" + guestMAC}
}

func (w *wire) send(t *testing.T, f eth) {
	t.Helper()
	if err := w.write(f); err != nil {
		t.Fatal(err)
	}
}

func (w *wire) write(f eth) error {
	_, err := w.conn.WriteToUDP(f.marshal(), w.qemu)
	return err
}

// recv returns the next frame from the guest; deadline guards against a
// hang (it is not a performance bound).
func (w *wire) recv(deadline time.Duration) (eth, error) {
	buf := make([]byte, 4096)
	w.conn.SetReadDeadline(time.Now().Add(deadline))
	n, _, err := w.conn.ReadFromUDP(buf)
	if err != nil {
		return eth{}, err
	}
	return parseEth(buf[:n])
}

var (
	testMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	gwMAC   = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	bcast   = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

func ip4(s string) net.IP { return net.ParseIP(s).To4() }

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

type eth struct {
	dst, src net.HardwareAddr
	vlan     int // 0 = untagged
	typ      uint16
	payload  []byte
}

func (e eth) marshal() []byte {
	b := append(append([]byte{}, e.dst...), e.src...)
	if e.vlan != 0 {
		b = binary.BigEndian.AppendUint16(b, 0x8100)
		b = binary.BigEndian.AppendUint16(b, uint16(e.vlan))
	}
	b = binary.BigEndian.AppendUint16(b, e.typ)
	return append(b, e.payload...)
}

func parseEth(b []byte) (eth, error) {
	if len(b) < 14 {
		return eth{}, errors.New("short frame")
	}
	e := eth{dst: net.HardwareAddr(b[0:6]), src: net.HardwareAddr(b[6:12]), typ: binary.BigEndian.Uint16(b[12:])}
	b = b[14:]
	if e.typ == 0x8100 {
		if len(b) < 4 {
			return eth{}, errors.New("short 802.1Q frame")
		}
		e.vlan = int(binary.BigEndian.Uint16(b) & 0xfff)
		e.typ = binary.BigEndian.Uint16(b[2:])
		b = b[4:]
	}
	e.payload = b
	return e, nil
}

func arpPacket(op uint16, sha net.HardwareAddr, spa net.IP, tha net.HardwareAddr, tpa net.IP) []byte {
	b := []byte{0, 1, 8, 0, 6, 4}
	b = binary.BigEndian.AppendUint16(b, op)
	b = append(append(append(append(b, sha...), spa.To4()...), tha...), tpa.To4()...)
	return b
}

func checksum(parts ...[]byte) uint16 {
	var sum uint32
	var all []byte
	for _, p := range parts {
		all = append(all, p...)
	}
	for i := 0; i+1 < len(all); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(all[i:]))
	}
	if len(all)%2 == 1 {
		sum += uint32(all[len(all)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// ipv4Packet builds an IPv4 packet; flags are the 3 flag bits + offset.
func ipv4Packet(src, dst net.IP, proto byte, flags uint16, payload []byte) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(payload)))
	binary.BigEndian.PutUint16(h[6:], flags)
	h[8] = 64
	h[9] = proto
	copy(h[12:], src.To4())
	copy(h[16:], dst.To4())
	binary.BigEndian.PutUint16(h[10:], checksum(h))
	return append(h, payload...)
}

type ipv4 struct {
	src, dst net.IP
	proto    byte
	payload  []byte
}

func parseIPv4(b []byte) (ipv4, error) {
	if len(b) < 20 || b[0] != 0x45 {
		return ipv4{}, errors.New("not a plain IPv4 header")
	}
	if checksum(b[:20]) != 0 {
		return ipv4{}, errors.New("bad IPv4 header checksum")
	}
	tot := int(binary.BigEndian.Uint16(b[2:]))
	if tot < 20 || tot > len(b) {
		return ipv4{}, errors.New("bad IPv4 total length")
	}
	return ipv4{src: net.IP(b[12:16]), dst: net.IP(b[16:20]), proto: b[9], payload: b[20:tot]}, nil
}

func icmpEcho(typ byte, id, seq uint16, data []byte) []byte {
	b := []byte{typ, 0, 0, 0}
	b = binary.BigEndian.AppendUint16(b, id)
	b = binary.BigEndian.AppendUint16(b, seq)
	b = append(b, data...)
	binary.BigEndian.PutUint16(b[2:], checksum(b))
	return b
}

func pseudo(src, dst net.IP, n int) []byte {
	p := append(append([]byte{}, src.To4()...), dst.To4()...)
	p = append(p, 0, 17)
	return binary.BigEndian.AppendUint16(p, uint16(n))
}

// udpPacket builds a UDP datagram; csum "good", "none" (0) or "bad".
func udpPacket(src, dst net.IP, sport, dport uint16, data []byte, csum string) []byte {
	b := binary.BigEndian.AppendUint16(nil, sport)
	b = binary.BigEndian.AppendUint16(b, dport)
	b = binary.BigEndian.AppendUint16(b, uint16(8+len(data)))
	b = append(b, 0, 0)
	b = append(b, data...)
	switch csum {
	case "good":
		binary.BigEndian.PutUint16(b[6:], checksum(pseudo(src, dst, len(b)), b))
	case "bad":
		binary.BigEndian.PutUint16(b[6:], checksum(pseudo(src, dst, len(b)), b)^0x5555)
	}
	return b
}

func ipFrame(vlan int, dstMAC net.HardwareAddr, src, dst string, proto byte, flags uint16, payload []byte) eth {
	return eth{dst: dstMAC, src: testMAC, vlan: vlan, typ: 0x0800,
		payload: ipv4Packet(ip4(src), ip4(dst), proto, flags, payload)}
}

func arpRequest(vlan int, spa, tpa string) eth {
	return eth{dst: bcast, src: testMAC, vlan: vlan, typ: 0x0806,
		payload: arpPacket(1, testMAC, ip4(spa), make(net.HardwareAddr, 6), ip4(tpa))}
}

func checkARPReply(vlan int, spa, tpa string) func(eth) error {
	return func(f eth) error {
		want := arpPacket(2, mustMAC(guestMAC), ip4(spa), testMAC, ip4(tpa))
		switch {
		case f.vlan != vlan || f.typ != 0x0806:
			return fmt.Errorf("got type %#x on VLAN %d, want ARP on VLAN %d", f.typ, f.vlan, vlan)
		case !bytes.Equal(f.dst, testMAC) || f.src.String() != guestMAC:
			return fmt.Errorf("ARP reply %s -> %s", f.src, f.dst)
		case len(f.payload) < 28 || !bytes.Equal(f.payload[:28], want):
			return fmt.Errorf("ARP reply % x, want % x", f.payload, want)
		}
		return nil
	}
}

func checkIP(vlan int, src, dst string, proto byte, check func([]byte) error) func(eth) error {
	return func(f eth) error {
		if f.vlan != vlan || f.typ != 0x0800 || !bytes.Equal(f.dst, testMAC) {
			return fmt.Errorf("got type %#x on VLAN %d to %s, want IPv4 on VLAN %d to %s", f.typ, f.vlan, f.dst, vlan, testMAC)
		}
		p, err := parseIPv4(f.payload)
		if err != nil {
			return err
		}
		if !p.src.Equal(ip4(src)) || !p.dst.Equal(ip4(dst)) || p.proto != proto {
			return fmt.Errorf("IPv4 %s -> %s proto %d, want %s -> %s proto %d", p.src, p.dst, p.proto, src, dst, proto)
		}
		return check(p.payload)
	}
}

func checkEchoReply(id, seq uint16, data []byte) func([]byte) error {
	return func(b []byte) error {
		if want := icmpEcho(0, id, seq, data); !bytes.Equal(b, want) {
			return fmt.Errorf("ICMP % x, want % x", b, want)
		}
		return nil
	}
}

func checkUDPEcho(src, dst string, sport, dport uint16, data []byte) func([]byte) error {
	return func(b []byte) error {
		if want := udpPacket(ip4(src), ip4(dst), sport, dport, data, "good"); !bytes.Equal(b, want) {
			return fmt.Errorf("UDP % x, want % x", b, want)
		}
		return nil
	}
}

func TestNetWire(t *testing.T) {
	payload := bytes.Repeat([]byte("rayguest "), 111)
	type exchange struct {
		name    string
		ignored []eth // must get no answer
		ask     eth   // must get the answer check accepts, as the next frame
		check   func(eth) error
	}
	guests := []struct {
		name      string
		cmdline   string
		serving   string
		exchanges []exchange
	}{
		{name: "trunk", cmdline: "rayguest.ip=192.0.2.2/24,198.51.100.2/24@10,203.0.113.2/24@20",
			serving: `rayguest: serving 192\.0\.2\.2/24,198\.51\.100\.2/24@10,203\.0\.113\.2/24@20`,
			exchanges: []exchange{
				{name: "ARP untagged",
					ask:   arpRequest(0, "192.0.2.1", "192.0.2.2"),
					check: checkARPReply(0, "192.0.2.2", "192.0.2.1")},
				{name: "ARP on VLAN 10 only",
					ignored: []eth{arpRequest(0, "198.51.100.1", "198.51.100.2"),
						arpRequest(20, "198.51.100.1", "198.51.100.2"),
						arpRequest(10, "192.0.2.1", "192.0.2.2"),
						arpRequest(10, "198.51.100.1", "198.51.100.3")},
					ask:   arpRequest(10, "198.51.100.1", "198.51.100.2"),
					check: checkARPReply(10, "198.51.100.2", "198.51.100.1")},
				{name: "ICMP echo on VLAN 20 only",
					ignored: []eth{ipFrame(0, mustMAC(guestMAC), "203.0.113.1", "203.0.113.2", 1, 0, icmpEcho(8, 1, 1, payload)),
						ipFrame(10, mustMAC(guestMAC), "203.0.113.1", "203.0.113.2", 1, 0, icmpEcho(8, 1, 2, payload))},
					ask:   ipFrame(20, mustMAC(guestMAC), "203.0.113.1", "203.0.113.2", 1, 0, icmpEcho(8, 0x1234, 7, payload)),
					check: checkIP(20, "203.0.113.2", "203.0.113.1", 1, checkEchoReply(0x1234, 7, payload))},
				{name: "frames for another MAC are ignored",
					ignored: []eth{ipFrame(0, gwMAC, "192.0.2.1", "192.0.2.2", 1, 0, icmpEcho(8, 1, 1, nil))},
					ask:     ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.2", 1, 0, icmpEcho(8, 2, 2, nil)),
					check:   checkIP(0, "192.0.2.2", "192.0.2.1", 1, checkEchoReply(2, 2, nil))},
				{name: "fragments and bad checksums are ignored",
					ignored: []eth{ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.2", 1, 0x2000, icmpEcho(8, 1, 1, nil)),
						ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.2", 1, 5, icmpEcho(8, 1, 1, nil)),
						func() eth {
							f := ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.2", 1, 0, icmpEcho(8, 1, 1, nil))
							f.payload[10] ^= 0xff
							return f
						}(),
						func() eth {
							m := icmpEcho(8, 1, 1, []byte("x"))
							m[2] ^= 1
							return ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.2", 1, 0, m)
						}(),
						ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.9", 1, 0, icmpEcho(8, 1, 1, nil))},
					ask:   ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.2", 1, 0, icmpEcho(8, 3, 3, []byte("ok"))),
					check: checkIP(0, "192.0.2.2", "192.0.2.1", 1, checkEchoReply(3, 3, []byte("ok")))},
				{name: "UDP echo on VLAN 10, port 7 only",
					ignored: []eth{ipFrame(10, mustMAC(guestMAC), "198.51.100.1", "198.51.100.2", 17, 0,
						udpPacket(ip4("198.51.100.1"), ip4("198.51.100.2"), 40000, 9, payload, "good")),
						ipFrame(10, mustMAC(guestMAC), "198.51.100.1", "198.51.100.2", 17, 0,
							udpPacket(ip4("198.51.100.1"), ip4("198.51.100.2"), 40000, 7, payload, "bad"))},
					ask: ipFrame(10, mustMAC(guestMAC), "198.51.100.1", "198.51.100.2", 17, 0,
						udpPacket(ip4("198.51.100.1"), ip4("198.51.100.2"), 40000, 7, payload, "good")),
					check: checkIP(10, "198.51.100.2", "198.51.100.1", 17,
						checkUDPEcho("198.51.100.2", "198.51.100.1", 7, 40000, payload))},
				{name: "UDP without checksum",
					ask: ipFrame(0, mustMAC(guestMAC), "192.0.2.1", "192.0.2.2", 17, 0,
						udpPacket(ip4("192.0.2.1"), ip4("192.0.2.2"), 5353, 7, []byte("odd"), "none")),
					check: checkIP(0, "192.0.2.2", "192.0.2.1", 17,
						checkUDPEcho("192.0.2.2", "192.0.2.1", 7, 5353, []byte("odd")))},
			}},
		{name: "whole NIC on a VLAN", cmdline: "rayguest.ip=192.0.2.2/24 rayguest.vlan=30",
			serving: `rayguest: serving 192\.0\.2\.2/24@30`,
			exchanges: []exchange{
				{name: "ARP tagged 30",
					ignored: []eth{arpRequest(0, "192.0.2.1", "192.0.2.2")},
					ask:     arpRequest(30, "192.0.2.1", "192.0.2.2"),
					check:   checkARPReply(30, "192.0.2.2", "192.0.2.1")},
			}},
	}
	for _, g := range guests {
		t.Run(g.name, func(t *testing.T) {
			ns := newNetns(t)
			w, nic := newWire(t, ns)
			v := startQEMU(t, virtioGuest("rayguest.run=serve "+g.cmdline, nic...), ns)
			v.waitLine(t, g.serving)
			for _, x := range g.exchanges {
				t.Run(x.name, func(t *testing.T) {
					for _, f := range x.ignored {
						w.send(t, f)
					}
					w.send(t, x.ask)
					f, err := w.recv(30 * time.Second)
					if err != nil {
						t.Fatalf("no answer: %v", err)
					}
					if err := x.check(f); err != nil {
						t.Fatal(err)
					}
				})
			}
		})
	}
}

// TestNetPingWire: the guest pings through a gateway on a tagged address;
// the test plays the gateway (answers ARP on VLAN 5 and the echo requests)
// and stays silent for one on-link host.
func TestNetPingWire(t *testing.T) {
	ns := newNetns(t)
	w, nic := newWire(t, ns)
	v := startQEMU(t, virtioGuest("rayguest.run=ping:203.0.113.9+192.0.2.50,count=2 "+
		"rayguest.ip=192.0.2.2/24@5 rayguest.gw=192.0.2.1", nic...), ns)
	var arpSilent int
	var problems []string
	gwDone := make(chan struct{})
	go func() {
		defer close(gwDone)
		for {
			f, err := w.recv(5 * time.Minute)
			if err != nil {
				return
			}
			if f.vlan != 5 {
				problems = append(problems, fmt.Sprintf("frame on VLAN %d", f.vlan))
				continue
			}
			switch f.typ {
			case 0x0806:
				tpa := net.IP(f.payload[24:28])
				switch {
				case tpa.Equal(ip4("192.0.2.1")):
					w.write(eth{dst: f.src, src: gwMAC, vlan: 5, typ: 0x0806,
						payload: arpPacket(2, gwMAC, ip4("192.0.2.1"), f.src, ip4("192.0.2.2"))})
				case tpa.Equal(ip4("192.0.2.50")):
					arpSilent++
				}
			case 0x0800:
				p, err := parseIPv4(f.payload)
				if err != nil || !bytes.Equal(f.dst, gwMAC) || checksum(p.payload) != 0 || p.payload[0] != 8 {
					problems = append(problems, fmt.Sprintf("bad echo request %v % x", err, f.payload))
					continue
				}
				reply := append([]byte{}, p.payload...)
				reply[0] = 0
				reply[2], reply[3] = 0, 0
				binary.BigEndian.PutUint16(reply[2:], checksum(reply))
				w.write(eth{dst: f.src, src: gwMAC, vlan: 5, typ: 0x0800,
					payload: ipv4Packet(p.dst, p.src, 1, 0, reply)})
			}
		}
	}()
	for _, want := range []string{
		`rayguest: ping 203\.0\.113\.9 ok rtt_us=\d+`, `rayguest: ping 203\.0\.113\.9 ok rtt_us=\d+`,
		`rayguest: ping 192\.0\.2\.50 FAIL`, `rayguest: ping 192\.0\.2\.50 FAIL`,
	} {
		if l := v.waitLine(t, `rayguest: ping .*`); !regexpMatch(want, l) {
			t.Fatalf("got %q, want %s; output:\n%s", l, want, v.output())
		}
	}
	<-v.done
	w.conn.Close()
	<-gwDone
	if len(problems) > 0 {
		t.Fatalf("guest sent: %s", strings.Join(problems, "; "))
	}
	if arpSilent < 4 {
		t.Fatalf("guest sent %d ARP requests for the silent host, want retries (>= 2 per echo)", arpSilent)
	}
}
