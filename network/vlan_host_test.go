package network

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/network/nettest"
	"github.com/rayvmm/rayvmm/network/port"
	vmspec "github.com/rayvmm/rayvmm/spec"
)

// sink collects the frames arriving at a port.
type sink struct {
	p   port.Port
	c   chan []byte
	got [][]byte
}

func newSink(p port.Port) *sink {
	s := &sink{p: p, c: make(chan []byte, 256)}
	go func() {
		defer close(s.c)
		buf := make([]byte, 65536)
		for {
			n, err := p.Read(buf)
			if err != nil {
				return
			}
			s.c <- slices.Clone(buf[:n])
		}
	}()
	return s
}

// wait returns the first frame match accepts; earlier frames stay in got.
func (s *sink) wait(t *testing.T, what string, match func([]byte) bool) []byte {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case f, ok := <-s.c:
			if !ok {
				t.Fatalf("%s: port closed", what)
			}
			if match(f) {
				return f
			}
			s.got = append(s.got, f)
		case <-deadline:
			t.Fatalf("%s: frame never arrived", what)
		}
	}
}

// saw reports whether a frame match accepts arrived before the last wait.
func (s *sink) saw(match func([]byte) bool) bool {
	return slices.ContainsFunc(s.got, match)
}

func fromMAC(mac net.HardwareAddr) func([]byte) bool {
	return func(f []byte) bool { return len(f) >= 14 && bytes.Equal(f[6:12], mac) }
}

// tagged returns a match for frames from mac tagged with vlan.
func tagged(mac net.HardwareAddr, vlan uint16) func([]byte) bool {
	return func(f []byte) bool {
		v, err := port.VLANOf(f)
		return err == nil && v == vlan && fromMAC(mac)(f)
	}
}

func untagged(mac net.HardwareAddr) func([]byte) bool {
	return func(f []byte) bool {
		return fromMAC(mac)(f) && binary.BigEndian.Uint16(f[12:]) != 0x8100 // 802.1Q TPID
	}
}

// broadcast is an Ethernet broadcast frame from mac with a test ethertype.
func broadcast(mac net.HardwareAddr) []byte {
	f := make([]byte, 60)
	copy(f, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:], mac)
	binary.BigEndian.PutUint16(f[12:], 0x88b5) // IEEE local experimental
	copy(f[14:], "rayvmm vlan test")
	return f
}

func tag(t *testing.T, f []byte, vlan uint16) []byte {
	t.Helper()
	out := make([]byte, len(f)+4) // room for the 802.1Q tag
	n, err := port.Tag(out, f, vlan)
	if err != nil {
		t.Fatal(err)
	}
	return out[:n]
}

func TestVLANSegments(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	nics := map[string]*NIC{}
	for i, s := range []struct{ name, spec string }{
		{"a10", "network=lan,vlan=10"},
		{"b10", "network=lan,vlan=10"},
		{"c20", "network=lan,vlan=20"},
		{"trunk", "network=lan,trunk=10:20"},
		{"plain", "network=lan"},
	} {
		spec, err := vmspec.ParseNIC(s.spec)
		if err != nil {
			t.Fatal(err)
		}
		do(t, ns, func() (err error) { nics[s.name], err = Attach(ctx, dir, "vlantest", i, spec); return err })
		defer nics[s.name].Close()
	}
	sinks := map[string]*sink{}
	for name, n := range nics {
		sinks[name] = newSink(n.Port())
	}
	mac := func(name string) net.HardwareAddr { return nics[name].MAC }

	// VLAN 10: a10 reaches b10 (untagged) and the trunk (tagged 10).
	if _, err := nics["a10"].Port().Write(broadcast(mac("a10"))); err != nil {
		t.Fatal(err)
	}
	sinks["b10"].wait(t, "a10 -> b10", untagged(mac("a10")))
	sinks["trunk"].wait(t, "a10 -> trunk", tagged(mac("a10"), 10))
	// The trunk's frame tagged 20 reaches c20, untagged, and not b10.
	if _, err := nics["trunk"].Port().Write(tag(t, broadcast(mac("trunk")), 20)); err != nil {
		t.Fatal(err)
	}
	sinks["c20"].wait(t, "trunk -> c20", untagged(mac("trunk")))
	// Its frame tagged 10 reaches b10: a marker after which b10 must not
	// have seen the VLAN 20 frame.
	if _, err := nics["trunk"].Port().Write(tag(t, broadcast(mac("trunk")), 10)); err != nil {
		t.Fatal(err)
	}
	sinks["b10"].wait(t, "trunk -> b10", untagged(mac("trunk")))
	if sinks["b10"].saw(fromMAC(mac("trunk"))) {
		t.Fatal("b10 on VLAN 10 received the trunk's VLAN 20 frame")
	}
	// c20 sends to the trunk (tagged 20); by then it must not have seen a10.
	if _, err := nics["c20"].Port().Write(broadcast(mac("c20"))); err != nil {
		t.Fatal(err)
	}
	sinks["trunk"].wait(t, "c20 -> trunk", tagged(mac("c20"), 20))
	if sinks["c20"].saw(fromMAC(mac("a10"))) || sinks["c20"].saw(fromMAC(mac("b10"))) {
		t.Fatal("c20 on VLAN 20 received a VLAN 10 frame")
	}
	// The untagged port is on none of the VLANs: the host answers its ARP,
	// and it saw no VLAN frame before that.
	if _, err := nics["plain"].Port().Write(nettest.ARPRequest(mac("plain"), net.ParseIP("192.0.2.10"), net.ParseIP("192.0.2.1"))); err != nil {
		t.Fatal(err)
	}
	sinks["plain"].wait(t, "host ARP reply -> plain", isARPReplyTo(mac("plain")))
	for _, other := range []string{"a10", "b10", "c20", "trunk"} {
		if sinks["plain"].saw(fromMAC(mac(other))) {
			t.Fatalf("untagged port received a frame from %s", other)
		}
	}
	// The trunk drops and counts what it cannot deliver.
	tr := nics["trunk"].Port().(*port.Trunk)
	if _, err := tr.Write(broadcast(mac("trunk"))); !errors.Is(err, port.ErrUntagged) {
		t.Fatalf("trunk write of untagged frame = %v, want port.ErrUntagged", err)
	}
	if _, err := tr.Write(tag(t, broadcast(mac("trunk")), 30)); !errors.Is(err, port.ErrUnknownVLAN) {
		t.Fatalf("trunk write for VLAN 30 = %v, want port.ErrUnknownVLAN", err)
	}
	if _, err := tr.Write([]byte{1, 2, 3}); !errors.Is(err, port.ErrShortFrame) {
		t.Fatalf("trunk write of 3 bytes = %v, want port.ErrShortFrame", err)
	}
	if s := tr.Stats().Snapshot(); s.Untagged != 2 || s.UnknownVLAN != 1 {
		t.Fatalf("trunk drops %+v; want 2 untagged, 1 unknown VLAN", s)
	}

	var st *Status
	do(t, ns, func() (err error) { st, err = Inspect(dir, "lan"); return err })
	var got []string
	for _, b := range st.Bridges {
		got = append(got, fmt.Sprintf("%s/%d/%d", b.Name, b.VLAN, len(b.Ports)))
	}
	if want := []string{"rv-lan/0/1", "rv-lan.10/10/3", "rv-lan.20/20/2"}; !slices.Equal(got, want) {
		t.Fatalf("bridges/vlan/ports = %v, want %v", got, want)
	}
	for _, n := range nics {
		n.Close()
	}
	do(t, ns, func() error { return Remove(ctx, dir, "lan") })
	if l := links(t, ns); slices.ContainsFunc(l, func(s string) bool { return strings.HasPrefix(s, "rv") }) {
		t.Fatalf("links left after rm: %v", l)
	}
}

func TestAttachRefused(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	do(t, ns, func() error {
		for _, o := range []CreateOptions{
			{Name: "long-name-12", Subnet: "192.0.2.0/24"},
			{Name: "ov", Subnet: "198.51.100.0/24", Overlay: "vxlan:5,remote=203.0.113.2,local=203.0.113.1"},
		} {
			if _, err := Create(ctx, dir, o); err != nil {
				return err
			}
		}
		return nil
	})
	tests := []struct {
		name, spec, wantErr string
	}{
		{name: "unknown network", spec: "network=nosuch", wantErr: `network "nosuch": no such network`},
		{name: "vlan bridge name too long", spec: "network=long-name-12,vlan=4094", wantErr: `"rv-long-name-12.4094" is 20 bytes`},
		{name: "trunk bridge name too long", spec: "network=long-name-12,trunk=1:4094", wantErr: "longer than Linux's limit"},
		{name: "vlan on overlay", spec: "network=ov,vlan=10", wantErr: "VLAN ports are not supported"},
	}
	before := links(t, ns)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec, err := vmspec.ParseNIC(tt.spec)
			if err != nil {
				t.Fatal(err)
			}
			err = ns.Do(func() error { _, err := Attach(ctx, dir, "vm", 0, spec); return err })
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Attach = %v, want %q", err, tt.wantErr)
			}
			if after := links(t, ns); !slices.Equal(after, before) {
				t.Fatalf("links changed: %v -> %v", before, after)
			}
		})
	}
}

// TestAttachFailsHalfway: a trunk whose second TAP cannot be made (its
// name is taken by a veth) leaves nothing behind: not the first TAP, not
// the VLAN bridges this attach created, not the hold on the network.
func TestAttachFailsHalfway(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	before := links(t, ns)
	next := tapPrefix + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(int(tapSeq.Load()+1))
	ns.MustRun(t, "ip", "link", "add", next, "type", "veth", "peer", "name", "squat1")
	spec, _ := vmspec.ParseNIC("network=lan,trunk=10:20")
	err := ns.Do(func() error { _, err := Attach(ctx, dir, "vm", 0, spec); return err })
	if err == nil || !strings.Contains(err.Error(), "is a veth, not a TAP") {
		t.Fatalf("Attach = %v, want the taken name refused", err)
	}
	ns.MustRun(t, "ip", "link", "del", next)
	if after := links(t, ns); !slices.Equal(after, before) {
		t.Fatalf("links changed: %v -> %v", before, after)
	}
	do(t, ns, func() error { return Remove(ctx, dir, "lan") })
}

// TestAttachRefusesInvalidSpec: a spec.NIC built in code rather than by
// spec.ParseNIC gets the same checks, before anything is made. (A VLAN
// bridge "rv-lan.5000" would be one "net rm" does not know to delete.)
func TestAttachRefusesInvalidSpec(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	tests := []struct {
		name    string
		spec    vmspec.NIC
		wantErr string
	}{
		{name: "vlan 5000", spec: vmspec.NIC{Network: "lan", VLAN: 5000}, wantErr: "out of range 1..4094"},
		{name: "trunk vlan 0", spec: vmspec.NIC{Network: "lan", Trunk: []int{0, 10}}, wantErr: "out of range 1..4094"},
		{name: "trunk vlan twice", spec: vmspec.NIC{Network: "lan", Trunk: []int{10, 10}}, wantErr: "listed twice"},
		{name: "vlan and trunk", spec: vmspec.NIC{Network: "lan", VLAN: 10, Trunk: []int{20}}, wantErr: "exclusive"},
		{name: "neither", spec: vmspec.NIC{}, wantErr: "needs network or tap"},
		{name: "both", spec: vmspec.NIC{Network: "lan", Tap: "tap0"}, wantErr: "not both"},
		{name: "bad network name", spec: vmspec.NIC{Network: "../lan"}, wantErr: "network name"},
		{name: "vlan on tap", spec: vmspec.NIC{Tap: "tap0", VLAN: 10}, wantErr: "need network"},
		{name: "multicast mac", spec: vmspec.NIC{Network: "lan", MAC: "01:00:00:00:00:01"}, wantErr: "multicast"},
	}
	before := links(t, ns)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var nic *NIC
			err := ns.Do(func() (err error) { nic, err = Attach(context.Background(), dir, "vm", 0, tt.spec); return err })
			if err == nil {
				nic.Close()
			}
			if !errors.Is(err, vmspec.ErrInvalid) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Attach(%+v) = %v, want spec.ErrInvalid containing %q", tt.spec, err, tt.wantErr)
			}
			if after := links(t, ns); !slices.Equal(after, before) {
				t.Fatalf("links changed: %v -> %v", before, after)
			}
		})
	}
}

// TestKillReleases kills a process that attached a NIC with SIGKILL: its
// TAP disappears and the network can be removed.
func TestKillReleases(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	h := startHelper(t, ns, "attach", dir)
	line := h.Line(t, `the "attached TAP" line`, helperWait)
	tap, ok := strings.CutPrefix(line, "attached ")
	if !ok {
		t.Fatalf("helper: %q, want \"attached TAP\"", line)
	}
	if !slices.Contains(links(t, ns), tap) {
		t.Fatalf("helper's TAP %q not in %v", tap, links(t, ns))
	}
	if err := ns.Do(func() error { return Remove(ctx, dir, "lan") }); !errors.Is(err, ErrInUse) {
		t.Fatalf("Remove while the helper runs = %v, want ErrInUse", err)
	}
	h.Kill(t, helperWait)
	if l := links(t, ns); slices.Contains(l, tap) {
		t.Fatalf("TAP %s survived SIGKILL: %v", tap, l)
	}
	do(t, ns, func() error { return Remove(ctx, dir, "lan") })
}

// helperWait bounds each wait for a helper process: it turns a hang into
// a failure that names what was awaited; it measures nothing.
const helperWait = time.Minute

// startHelper starts this test binary inside ns as the helper name (see
// TestMain), working on the state directory dir.
func startHelper(t *testing.T, ns *nettest.NS, name, dir string) *testenv.HelperProc {
	t.Helper()
	return testenv.StartHelper(t, name, testenv.HelperOptions{
		Env:    []string{"RAYVMM_NETWORK_HELPER_DIR=" + dir},
		Prefix: []string{"ip", "netns", "exec", ns.Name},
	})
}

// helperAttach is the process TestKillReleases kills: it attaches a NIC,
// says so, and holds it.
func helperAttach() int {
	spec, _ := vmspec.ParseNIC("network=lan")
	nic, err := Attach(context.Background(), os.Getenv("RAYVMM_NETWORK_HELPER_DIR"), "killme", 0, spec)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	fmt.Println("attached", nic.TAPs[0].Name())
	testenv.Hold()
	return 0
}

// helperCreate is the process TestKilledCreate kills while it creates a
// network.
func helperCreate() int {
	fmt.Println("ready")
	if _, err := Create(context.Background(), os.Getenv("RAYVMM_NETWORK_HELPER_DIR"), CreateOptions{Name: "lan", Subnet: "192.0.2.0/24", NAT: true}); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	fmt.Println("created")
	return 0
}

func TestMain(m *testing.M) {
	testenv.HelperMain(map[string]func() int{"attach": helperAttach, "create": helperCreate})
	os.Exit(m.Run())
}

// TestKilledCreate kills "net create" at moments spread over its run: a
// bridge or NAT table is never left without the record that lets "net rm"
// remove it, and after the user creates and removes the network no state
// file is left.
func TestKilledCreate(t *testing.T) {
	nettest.RequireTool(t, "nft")
	ns := nettest.New(t)
	ctx := context.Background()
	var created, partial int
	for i := range 40 {
		dir := t.TempDir()
		h := startHelper(t, ns, "create", dir)
		if line := h.Line(t, `the "ready" line`, helperWait); line != "ready" {
			t.Fatalf("helper: %q, want \"ready\"", line)
		}
		// Not a wait for anything: where the kill lands is what varies.
		time.Sleep(time.Duration(i) * 150 * time.Microsecond)
		rest, _ := h.Kill(t, helperWait)
		record := slices.Contains(recorded(t, dir), "lan")
		bridge := slices.Contains(links(t, ns), "rv-lan")
		_, tableErr := ns.Run("nft", "list", "table", "ip", "rayvmm-lan")
		table := tableErr == nil
		if !record && (bridge || table) {
			t.Fatalf("killed after %d µs: bridge %v, NAT table %v, and no record to remove them by", i*150, bridge, table)
		}
		switch {
		case !record: // the user runs the command again
			createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24", NAT: true})
		case slices.Equal(rest, []string{"created"}):
			created++
		default:
			partial++
		}
		do(t, ns, func() error { return Remove(ctx, dir, "lan") })
		_, tableErr = ns.Run("nft", "list", "table", "ip", "rayvmm-lan")
		if slices.Contains(links(t, ns), "rv-lan") || tableErr == nil {
			t.Fatalf("killed after %d µs: net rm left the bridge or the NAT table", i*150)
		}
		ents, _ := os.ReadDir(filepath.Join(dir, "networks"))
		if len(ents) != 1 || ents[0].Name() != lockName {
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			t.Fatalf("killed after %d µs, then create and rm: state files %v, want only %s", i*150, names, lockName)
		}
	}
	t.Logf("%d creates finished, %d killed with a record, the rest killed before it", created, partial)
}

// TestConcurrentCreate races rayvmm processes' worth of creates on one state
// directory: the flock lets exactly one of each conflicting group win.
func TestConcurrentCreate(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	const n = 6
	var wg sync.WaitGroup
	errs := make([]error, 2*n)
	for i := range n {
		wg.Add(2)
		go func() { // same subnet, different names
			defer wg.Done()
			errs[i] = ns.Do(func() error {
				_, err := Create(context.Background(), dir, CreateOptions{Name: fmt.Sprintf("s%d", i), Subnet: "192.0.2.0/24"})
				return err
			})
		}()
		go func() { // same name, different subnets
			defer wg.Done()
			errs[n+i] = ns.Do(func() error {
				_, err := Create(context.Background(), dir, CreateOptions{Name: "same", Subnet: fmt.Sprintf("198.51.100.%d/30", 4*i), Isolated: true})
				return err
			})
		}()
	}
	wg.Wait()
	count := func(errs []error, want error) (ok, conflict int) {
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case errors.Is(err, want):
				conflict++
			default:
				t.Errorf("unexpected error: %v", err)
			}
		}
		return ok, conflict
	}
	if ok, c := count(errs[:n], ErrOverlap); ok != 1 || c != n-1 {
		t.Fatalf("same subnet: %d created, %d overlaps; want 1, %d", ok, c, n-1)
	}
	if ok, c := count(errs[n:], ErrExists); ok != 1 || c != n-1 {
		t.Fatalf("same name: %d created, %d exists; want 1, %d", ok, c, n-1)
	}
	var list []*Network
	do(t, ns, func() (err error) { list, err = List(dir); return err })
	if len(list) != 2 {
		t.Fatalf("List = %d networks, want 2", len(list))
	}
}

// TestConcurrentInspect: "net inspect" run by several processes at once
// (a monitor polling, say) never reports a VM attached when none is.
func TestConcurrentInspect(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	const workers, rounds = 8, 200
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = ns.Do(func() error {
				for range rounds {
					st, err := Inspect(dir, "lan")
					if err != nil {
						return err
					}
					if st.Attached {
						return errors.New("Inspect reports a VM attached, with none running")
					}
				}
				return nil
			})
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentAttachRecreates: VMs booting at once after a host reboot
// (bridge and NAT table gone) recreate the network once: one bridge, one
// masquerade rule, every NIC on the bridge.
func TestConcurrentAttachRecreates(t *testing.T) {
	nettest.RequireTool(t, "nft")
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24", NAT: true})
	spec, _ := vmspec.ParseNIC("network=lan")
	for round := range 5 {
		ns.MustRun(t, "ip", "link", "del", "rv-lan")
		ns.MustRun(t, "nft", "delete", "table", "ip", "rayvmm-lan")
		const workers = 6
		nics := make([]*NIC, workers)
		errs := make([]error, workers)
		var wg sync.WaitGroup
		for i := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = ns.Do(func() (err error) { nics[i], err = Attach(ctx, dir, fmt.Sprintf("vm%d", i), 0, spec); return err })
			}()
		}
		wg.Wait()
		var st *Status
		do(t, ns, func() (err error) { st, err = Inspect(dir, "lan"); return err })
		rules := strings.Count(ns.MustRun(t, "nft", "list", "table", "ip", "rayvmm-lan"), "masquerade")
		for _, n := range nics {
			if n != nil {
				n.Close()
			}
		}
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if rules != 1 {
			t.Fatalf("round %d: %d masquerade rules after concurrent attaches, want 1", round, rules)
		}
		if len(st.Bridges) != 1 || len(st.Bridges[0].Ports) != workers {
			t.Fatalf("round %d: bridges %+v, want rv-lan with %d ports", round, st.Bridges, workers)
		}
	}
}

// TestAttachAllUndoes: when the second NIC cannot be made, the first one's
// TAP is gone again.
func TestAttachAllUndoes(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	before := links(t, ns)
	specs := []vmspec.NIC{{Network: "lan"}, {Network: "nosuch"}}
	err := ns.Do(func() error { _, err := AttachAll(ctx, dir, "vm", specs); return err })
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "attach NIC 1") {
		t.Fatalf("AttachAll = %v, want NIC 1 not found", err)
	}
	if after := links(t, ns); !slices.Equal(after, before) {
		t.Fatalf("links changed: %v -> %v", before, after)
	}
	var nics []*NIC
	do(t, ns, func() (err error) { nics, err = AttachAll(ctx, dir, "vm", specs[:1]); return err })
	if len(nics) != 1 || !bytes.Equal(nics[0].MAC, GenerateMAC("vm", 0)) {
		t.Fatalf("AttachAll = %+v", nics)
	}
	CloseAll(nics)
}
