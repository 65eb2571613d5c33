package tests

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/network"
	"github.com/rayvmm/rayvmm/network/nettest"
)

// Guest networking end to end: rayvmm boots rayguest with --net NICs in
// network namespaces the tests make, and the guests, the host kernel and
// the tests talk over real TAPs, bridges, nftables NAT and VXLAN. Only
// 192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24 are used.

// guestWait bounds how long a guest may take to boot and answer under the
// instruction emulator; it catches a lost guest, it measures nothing.
const guestWait = 3 * time.Minute

// host is one network namespace with its own rayvmm state directory.
type host struct {
	ns    *nettest.NS
	state string
}

func newHost(t *testing.T) *host {
	t.Helper()
	requireKVM(t)
	return &host{ns: nettest.New(t), state: t.TempDir()}
}

// rayvmm runs rayvmm in the namespace to completion.
func (h *host) rayvmm(t *testing.T, args ...string) result {
	t.Helper()
	return runCommand(t, nil, guestWait, func(ctx context.Context) *exec.Cmd { return h.command(ctx, args...) })
}

func (h *host) command(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"netns", "exec", h.ns.Name, rayvmm, "--state-dir", h.state}, args...)
	return exec.CommandContext(ctx, "ip", full...)
}

// must runs rayvmm and fails the test unless it succeeds.
func (h *host) must(t *testing.T, args ...string) string {
	t.Helper()
	r := h.rayvmm(t, args...)
	if r.code != 0 {
		t.Fatalf("rayvmm %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// start boots rayguest named name with the given NICs and command line.
// ip netns exec execs rayvmm, so the process is rayvmm itself.
func (h *host) start(t *testing.T, name, cmdline string, nets ...string) *proc {
	t.Helper()
	args := []string{"boot", "--name", name, "--cmdline", cmdline}
	for _, n := range nets {
		args = append(args, "--net", n)
	}
	return startProc(t, h.command(context.Background(), args...))
}

// serve boots a guest answering ping and UDP echo on addrs.
func (h *host) serve(t *testing.T, name, ips string, nets ...string) *proc {
	t.Helper()
	g := h.start(t, name, "rayguest.ip="+ips+" rayguest.run=serve", nets...)
	g.out.waitFor(t, "rayguest: serving", guestWait)
	return g
}

// ping boots a guest that pings targets and powers off; it returns the
// verdict per target: "ok" or "FAIL" for each of its count pings.
func (h *host) ping(t *testing.T, name, ips, targets string, count int, net string, extra ...string) map[string][]string {
	t.Helper()
	cmdline := fmt.Sprintf("rayguest.ip=%s rayguest.run=ping:%s,count=%d %s", ips, targets, count, strings.Join(extra, " "))
	g := h.start(t, name, cmdline, net)
	g.exited(t, "its pings", guestWait)
	got := map[string][]string{}
	for _, m := range regexp.MustCompile(`rayguest: ping (\S+) (ok|FAIL)`).FindAllStringSubmatch(g.out.String(), -1) {
		got[m[1]] = append(got[m[1]], m[2])
	}
	return got
}

func allOK(t *testing.T, got map[string][]string, target string, n int) {
	t.Helper()
	if v := got[target]; len(v) != n || slices.Contains(v, "FAIL") {
		t.Fatalf("pings of %s: %v, want %d ok", target, v, n)
	}
}

func allFail(t *testing.T, got map[string][]string, target string) {
	t.Helper()
	if v := got[target]; len(v) == 0 || slices.Contains(v, "ok") {
		t.Fatalf("pings of %s: %v, want only FAIL", target, v)
	}
}

// links lists the interface names in the namespace.
func (h *host) links(t *testing.T) []string {
	t.Helper()
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(h.ns.MustRun(t, "ip", "-o", "link")), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	slices.Sort(names)
	return names
}

// taps lists rayvmm's TAPs in the namespace.
func (h *host) taps(t *testing.T) []string {
	return slices.DeleteFunc(h.links(t), func(s string) bool { return !strings.HasPrefix(s, "rvt") })
}

// 1. From the namespace holding the bridge, ping a serving guest and get a
// UDP datagram to port 7 back unchanged. Also the normal-exit half of 6.
func TestNetBridged(t *testing.T) {
	requireTool(t, "ping")
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	g := h.serve(t, "web", "192.0.2.2/24", "network=lan")
	if out, err := h.ns.Run("ping", "-c", "3", "-W", "10", "192.0.2.2"); err != nil || !strings.Contains(out, "3 received") {
		t.Fatalf("ping -c 3 192.0.2.2: %v\n%s", err, out)
	}
	payload := []byte("rayvmm UDP echo \x00\xff through a TAP")
	var reply []byte
	if err := h.ns.Do(func() error {
		c, err := net.Dial("udp4", "192.0.2.2:7")
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(guestWait))
		if _, err := c.Write(payload); err != nil {
			return err
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		reply = buf[:n]
		return err
	}); err != nil {
		t.Fatalf("UDP echo: %v", err)
	}
	if !bytes.Equal(reply, payload) {
		t.Fatalf("UDP echo came back as %q, want %q", reply, payload)
	}
	if len(h.taps(t)) != 1 {
		t.Fatalf("TAPs while the guest runs: %v", h.taps(t))
	}
	g.cmd.Process.Signal(syscall.SIGTERM)
	if err := g.exited(t, "SIGTERM", guestWait); err != nil {
		t.Fatalf("rayvmm after SIGTERM: %v\n%s", err, g.out.String())
	}
	if taps := h.taps(t); len(taps) != 0 {
		t.Fatalf("TAPs left after rayvmm exited: %v", taps)
	}
}

// 2. Guests on one network reach each other, and the bridge learned their
// MACs (generated, stable per VM name).
func TestNetTwoGuests(t *testing.T) {
	requireTool(t, "bridge")
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	h.serve(t, "alpha", "192.0.2.2/24", "network=lan")
	h.serve(t, "beta", "192.0.2.3/24", "network=lan")
	got := h.ping(t, "gamma", "192.0.2.4/24", "192.0.2.2+192.0.2.3", 3, "network=lan")
	allOK(t, got, "192.0.2.2", 3)
	allOK(t, got, "192.0.2.3", 3)
	fdb := h.ns.MustRun(t, "bridge", "fdb", "show", "br", "rv-lan")
	for _, vm := range []string{"alpha", "beta"} {
		if mac := network.GenerateMAC(vm, 0).String(); !strings.Contains(fdb, mac) {
			t.Fatalf("bridge fdb lacks %s's MAC %s:\n%s", vm, mac, fdb)
		}
	}
}

// 3. VLAN 10 guests reach each other, a VLAN 20 guest cannot reach them, and
// a trunk guest with two tagged addresses reaches one guest on each.
func TestNetVLANs(t *testing.T) {
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	h.serve(t, "a10", "198.51.100.10/24", "network=lan,vlan=10")
	h.serve(t, "c20", "198.51.100.20/24,203.0.113.20/24", "network=lan,vlan=20")
	got := h.ping(t, "b10", "198.51.100.11/24", "198.51.100.10+198.51.100.20", 2, "network=lan,vlan=10")
	allOK(t, got, "198.51.100.10", 2)
	allFail(t, got, "198.51.100.20")
	got = h.ping(t, "trunk", "198.51.100.31/24@10,203.0.113.31/24@20", "198.51.100.10+203.0.113.20", 2, "network=lan,trunk=10:20")
	allOK(t, got, "198.51.100.10", 2)
	allOK(t, got, "203.0.113.20", 2)
	links := h.links(t)
	for _, br := range []string{"rv-lan", "rv-lan.10", "rv-lan.20"} {
		if !slices.Contains(links, br) {
			t.Fatalf("bridge %s missing: %v", br, links)
		}
	}
}

// 4. A guest on a --nat network reaches a host in a second namespace, which
// sees the packets come from the NAT address, not the guest's.
func TestNetNAT(t *testing.T) {
	requireTool(t, "nft")
	h, far := newHost(t), newHost(t)
	nettest.Veth(t, h.ns, "up0", "198.51.100.1/24", far.ns, "down0", "198.51.100.2/24")
	h.must(t, "net", "create", "out", "--subnet", "192.0.2.0/24", "--nat")
	far.ns.MustRun(t, "nft", "add table ip seen; add chain ip seen in { type filter hook input priority 0; }; "+
		"add rule ip seen in ip protocol icmp ip saddr 198.51.100.1 counter; "+
		"add rule ip seen in ip protocol icmp ip saddr 192.0.2.0/24 counter")
	got := h.ping(t, "natvm", "192.0.2.2/24", "198.51.100.2", 3, "network=out", "rayguest.gw=192.0.2.1")
	allOK(t, got, "198.51.100.2", 3)
	rules := far.ns.MustRun(t, "nft", "list", "table", "ip", "seen")
	if !regexp.MustCompile(`saddr 198\.51\.100\.1 counter packets [1-9]`).MatchString(rules) ||
		!strings.Contains(rules, "saddr 192.0.2.0/24 counter packets 0 ") {
		t.Fatalf("far host's counters (want packets from 198.51.100.1 only):\n%s", rules)
	}
}

// 5. Two hosts joined by a veth, each with the network's bridge and a VXLAN
// device of the same ID: a guest on one pings a guest on the other.
func TestNetOverlay(t *testing.T) {
	h1, h2 := newHost(t), newHost(t)
	nettest.Veth(t, h1.ns, "ul0", "203.0.113.1/24", h2.ns, "ul0", "203.0.113.2/24")
	h1.must(t, "net", "create", "ov", "--subnet", "192.0.2.0/24", "--isolated", "--overlay", "vxlan:42,remote=203.0.113.2,local=203.0.113.1")
	h2.must(t, "net", "create", "ov", "--subnet", "192.0.2.0/24", "--isolated", "--overlay", "vxlan:42,remote=203.0.113.1,local=203.0.113.2")
	h1.serve(t, "left", "192.0.2.2/24", "network=ov")
	allOK(t, h2.ping(t, "right", "192.0.2.3/24", "192.0.2.2", 3, "network=ov"), "192.0.2.2", 3)
}

// 6. No TAP survives rayvmm, also after kill -9; net rm is refused while a
// VM is attached and then removes the bridges and the NAT rule.
func TestNetCleanup(t *testing.T) {
	requireTool(t, "nft")
	h := newHost(t)
	before := h.links(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24", "--nat")
	g := h.serve(t, "victim", "198.51.100.2/24@10,203.0.113.2/24@20", "network=lan,trunk=10:20")
	if taps := h.taps(t); len(taps) != 2 {
		t.Fatalf("trunk TAPs: %v, want 2", taps)
	}
	if r := h.rayvmm(t, "net", "rm", "lan"); r.code == 0 || !strings.Contains(r.stderr, "in use") {
		t.Fatalf("net rm while attached: exit %d, %s", r.code, r.stderr)
	}
	g.cmd.Process.Signal(syscall.SIGKILL)
	g.exited(t, "SIGKILL", guestWait)
	if taps := h.taps(t); len(taps) != 0 {
		t.Fatalf("TAPs left after kill -9: %v", taps)
	}
	// The guest must really have run on the network (its ping of the
	// host answered), or "no TAP left" would hold for a boot that failed.
	allOK(t, h.ping(t, "brief", "192.0.2.3/24", "192.0.2.1", 1, "network=lan"), "192.0.2.1", 1)
	if taps := h.taps(t); len(taps) != 0 {
		t.Fatalf("TAPs left after a normal exit: %v", taps)
	}
	h.must(t, "net", "rm", "lan")
	if after := h.links(t); !slices.Equal(after, before) {
		t.Fatalf("links after net rm: %v, want %v", after, before)
	}
	if rules, _ := h.ns.Run("nft", "list", "ruleset"); strings.Contains(rules, "rayvmm") {
		t.Fatalf("NAT rule left after net rm:\n%s", rules)
	}
	if out := h.must(t, "net", "list"); strings.Contains(out, "lan") {
		t.Fatalf("net list after rm:\n%s", out)
	}
}

// 8. Bad --net specs and network options: a clear one-line error, a
// non-zero exit, and nothing left behind.
func TestNetBadInput(t *testing.T) {
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	h.must(t, "net", "create", "twelve-chars", "--subnet", "198.51.100.0/24")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"invalid MAC", []string{"boot", "--net", "network=lan,mac=02:00:00:00:00"}, "not a MAC address"},
		{"multicast MAC", []string{"boot", "--net", "network=lan,mac=01:00:00:00:00:01"}, "multicast"},
		{"vlan 0", []string{"boot", "--net", "network=lan,vlan=0"}, "VLAN 0 out of range 1..4094"},
		{"vlan 4095", []string{"boot", "--net", "network=lan,vlan=4095"}, "nets[0].vlan: VLAN 4095 out of range 1..4094"},
		{"unknown network", []string{"boot", "--net", "network=nosuch"}, `network "nosuch": no such network`},
		{"second NIC bad", []string{"boot", "--net", "network=lan", "--net", "network=nosuch"}, "no such network"},
		{"VLAN bridge name too long", []string{"boot", "--net", "network=twelve-chars,vlan=4094"}, `"rv-twelve-chars.4094" is 20 bytes`},
		{"overlapping subnet", []string{"net", "create", "lan2", "--subnet", "192.0.2.128/25"}, `overlaps 192.0.2.0/24 of network "lan"`},
		{"name too long", []string{"net", "create", "thirteen-char", "--subnet", "203.0.113.0/24"}, "at most 12 characters"},
		{"bad subnet", []string{"net", "create", "x", "--subnet", "192.0.2.0/33"}, "not an IPv4 CIDR"},
		{"rm unknown", []string{"net", "rm", "nosuch"}, "no such network"},
	}
	before := h.links(t)
	records, _ := filepath.Glob(filepath.Join(h.state, "networks", "*"))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := h.rayvmm(t, tt.args...)
			if r.code == 0 || !strings.Contains(r.stderr, tt.want) {
				t.Fatalf("rayvmm %s: exit %d, stderr %q; want an error containing %q", strings.Join(tt.args, " "), r.code, r.stderr, tt.want)
			}
			if lines := strings.Count(strings.TrimSpace(r.stderr), "\n"); lines != 0 || !strings.HasPrefix(r.stderr, "rayvmm: ") {
				t.Fatalf("want one error line, got:\n%s", r.stderr)
			}
			if after := h.links(t); !slices.Equal(after, before) {
				t.Fatalf("links changed: %v -> %v", before, after)
			}
			if now, _ := filepath.Glob(filepath.Join(h.state, "networks", "*")); !slices.Equal(now, records) {
				t.Fatalf("state changed: %v -> %v", records, now)
			}
		})
	}
}
