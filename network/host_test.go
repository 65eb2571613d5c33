package network

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/rayvmm/rayvmm/network/nettest"
	"github.com/rayvmm/rayvmm/network/port"
	vmspec "github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/state"
)

// These tests make real bridges, TAPs, VXLAN devices and nftables rules,
// each inside a network namespace of its own, and move real frames through
// them. They need root.

// do runs fn inside ns and fails the test on error.
func do(t *testing.T, ns *nettest.NS, fn func() error) {
	t.Helper()
	if err := ns.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// createNet creates a network inside ns and fails the test on error.
func createNet(t *testing.T, ns *nettest.NS, dir string, o CreateOptions) {
	t.Helper()
	do(t, ns, func() error { _, err := Create(context.Background(), dir, o); return err })
}

// links lists the interface names in ns.
func links(t *testing.T, ns *nettest.NS) []string {
	t.Helper()
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(ns.MustRun(t, "ip", "-o", "link")), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 {
			names = append(names, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	slices.Sort(names)
	return names
}

// recorded lists the names of the networks in the state store.
func recorded(t *testing.T, stateDir string) []string {
	t.Helper()
	nets, err := List(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range nets {
		names = append(names, n.Name)
	}
	return names
}

// editRecord changes network name's record in the state store behind
// rayvmm's back, as a damaged or hand-edited record would: straight in
// the bbolt file, past the checks rayvmm makes when it writes.
func editRecord(t *testing.T, stateDir, name string, edit func(*Network)) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(stateDir, state.DBName), 0o600, &bolt.Options{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("networks"))
		var n Network
		if err := json.Unmarshal(b.Get([]byte(name)), &n); err != nil {
			return err
		}
		edit(&n)
		raw, err := json.Marshal(&n)
		if err != nil {
			return err
		}
		return b.Put([]byte(name), raw)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestCreateInspectRemove(t *testing.T) {
	nettest.RequireTool(t, "nft")
	tests := []struct {
		name      string
		opts      CreateOptions
		wantLinks []string
		wantAddr  string // on the bridge, "" for none
		wantNAT   bool
	}{
		{name: "plain", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"}, wantLinks: []string{"rv-lan"}, wantAddr: "192.0.2.1/24"},
		{name: "isolated", opts: CreateOptions{Name: "iso", Subnet: "198.51.100.0/24", Isolated: true}, wantLinks: []string{"rv-iso"}},
		{name: "nat", opts: CreateOptions{Name: "out", Subnet: "203.0.113.0/25", NAT: true}, wantLinks: []string{"rv-out"}, wantAddr: "203.0.113.1/25", wantNAT: true},
		{name: "overlay", opts: CreateOptions{Name: "ov", Subnet: "192.0.2.0/24", Overlay: "vxlan:42,remote=203.0.113.2,local=203.0.113.1"}, wantLinks: []string{"rv-ov", "rvx-ov"}, wantAddr: "192.0.2.1/24"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := nettest.New(t)
			dir := t.TempDir()
			before := links(t, ns)
			do(t, ns, func() error { _, err := Create(context.Background(), dir, tt.opts); return err })
			got := links(t, ns)
			for _, l := range tt.wantLinks {
				if !slices.Contains(got, l) {
					t.Fatalf("links after create = %v, want %s", got, l)
				}
			}
			addrs := ns.MustRun(t, "ip", "-o", "-4", "addr", "show", "dev", BridgeName(tt.opts.Name))
			if tt.wantAddr != "" && !strings.Contains(addrs, "inet "+tt.wantAddr+" ") || tt.wantAddr == "" && strings.Contains(addrs, "inet ") {
				t.Fatalf("bridge addresses %q, want %q", addrs, tt.wantAddr)
			}
			if tt.opts.Overlay != "" {
				vx := ns.MustRun(t, "ip", "-d", "-o", "link", "show", "rvx-ov")
				for _, w := range []string{"master rv-ov", "vxlan id 42", "remote 203.0.113.2", "local 203.0.113.1", "dstport 4789"} {
					if !strings.Contains(vx, w) {
						t.Fatalf("VXLAN device %q lacks %q", vx, w)
					}
				}
			}
			nft, _ := ns.Run("nft", "list", "table", "ip", "rayvmm-"+tt.opts.Name)
			if hasRule := strings.Contains(nft, "ip saddr "+tt.opts.Subnet+" ip daddr != "+tt.opts.Subnet) && strings.Contains(nft, "masquerade"); hasRule != tt.wantNAT {
				t.Fatalf("nft table: %q; want masquerade rule: %v", nft, tt.wantNAT)
			}
			var st *Status
			do(t, ns, func() (err error) { st, err = Inspect(dir, tt.opts.Name); return err })
			if st.Attached || st.NATRule != tt.wantNAT || len(st.Bridges) != 1 || !st.Bridges[0].Up {
				t.Fatalf("Inspect = %+v", st)
			}
			var list []*Network
			do(t, ns, func() (err error) { list, err = List(dir); return err })
			if len(list) != 1 || list[0].Name != tt.opts.Name {
				t.Fatalf("List = %v", list)
			}
			do(t, ns, func() error { return Remove(context.Background(), dir, tt.opts.Name) })
			if after := links(t, ns); !slices.Equal(after, before) {
				t.Fatalf("links after rm = %v, want %v", after, before)
			}
			if out, _ := ns.Run("nft", "list", "ruleset"); strings.Contains(out, "rayvmm") {
				t.Fatalf("ruleset after rm still has rayvmm: %q", out)
			}
			if r := recorded(t, dir); len(r) != 0 {
				t.Fatalf("records after rm: %v", r)
			}
		})
	}
}

func TestCreateRefused(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	ns.MustRun(t, "ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1")
	ns.MustRun(t, "ip", "addr", "add", "198.51.100.1/24", "dev", "dum0")
	ns.MustRun(t, "ip", "link", "set", "dum0", "up")
	ns.MustRun(t, "ip", "link", "add", "rv-taken", "type", "veth", "peer", "name", "taken1")
	ns.MustRun(t, "ip", "link", "add", "rvx-vxtaken", "type", "vxlan", "id", "9", "dstport", "4789")
	ns.MustRun(t, "ip", "link", "add", "vx-same", "type", "vxlan", "id", "77", "dstport", "4789", "local", "203.0.113.1", "remote", "203.0.113.2")
	tests := []struct {
		name    string
		opts    CreateOptions
		wantErr error
		msg     string
	}{
		{name: "duplicate", opts: CreateOptions{Name: "lan", Subnet: "203.0.113.0/24"}, wantErr: ErrExists, msg: `network "lan"`},
		{name: "overlaps network", opts: CreateOptions{Name: "lan2", Subnet: "192.0.2.128/25"}, wantErr: ErrOverlap, msg: `192.0.2.0/24 of network "lan"`},
		{name: "overlaps route", opts: CreateOptions{Name: "wan", Subnet: "198.51.100.0/24"}, wantErr: ErrOverlap, msg: "host route 198.51.100.0/24 on dum0"},
		{name: "bridge name taken", opts: CreateOptions{Name: "taken", Subnet: "203.0.113.0/24"}, wantErr: ErrExists, msg: "rv-taken already exists"},
		{name: "name too long", opts: CreateOptions{Name: "abcdefghijklm", Subnet: "203.0.113.0/24"}, wantErr: ErrInvalidName, msg: "at most 12 characters"},
		{name: "VXLAN device name taken", opts: CreateOptions{Name: "vxtaken", Subnet: "203.0.113.0/24", Overlay: "vxlan:42,remote=203.0.113.2,local=203.0.113.1"}, wantErr: ErrExists, msg: "rvx-vxtaken already exists"},
		{name: "VNI in use (fails after the bridge is made)", opts: CreateOptions{Name: "vni", Subnet: "203.0.113.0/24", Overlay: "vxlan:77,remote=203.0.113.2,local=203.0.113.1"}, wantErr: os.ErrExist, msg: "create VXLAN device rvx-vni"},
		{name: "bad overlay", opts: CreateOptions{Name: "ov", Subnet: "203.0.113.0/24", Overlay: "vxlan:1"}, wantErr: ErrInvalid, msg: "required"},
	}
	before := links(t, ns)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ns.Do(func() error { _, err := Create(context.Background(), dir, tt.opts); return err })
			if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("Create error = %v, want %v containing %q", err, tt.wantErr, tt.msg)
			}
			if after := links(t, ns); !slices.Equal(after, before) {
				t.Fatalf("links changed: %v -> %v", before, after)
			}
			ents, _ := os.ReadDir(filepath.Join(dir, "networks"))
			var files []string
			for _, e := range ents {
				files = append(files, e.Name())
			}
			if want := []string{lockName}; !slices.Equal(files, want) {
				t.Fatalf("state files = %v, want %v", files, want)
			}
			if r := recorded(t, dir); !slices.Equal(r, []string{"lan"}) {
				t.Fatalf("networks recorded = %v, want [lan]", r)
			}
		})
	}
	t.Run("no state dir for bad input", func(t *testing.T) {
		fresh := filepath.Join(t.TempDir(), "state")
		if _, err := Create(context.Background(), fresh, CreateOptions{Name: "Bad!", Subnet: "192.0.2.0/24"}); err == nil {
			t.Fatal("bad name accepted")
		}
		if _, err := os.Stat(fresh); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("state dir made for a bad request: %v", err)
		}
	})
}

// readUntil reads frames from p until match accepts one, or fails after
// a generous deadline (a lost frame, not a slow one).
func readUntil(t *testing.T, p port.Port, match func([]byte) bool) []byte {
	t.Helper()
	type res struct {
		f   []byte
		err error
	}
	c := make(chan res, 1)
	go func() {
		buf := make([]byte, 65536)
		for {
			n, err := p.Read(buf)
			if err != nil {
				c <- res{err: err}
				return
			}
			if match(buf[:n]) {
				c <- res{f: slices.Clone(buf[:n])}
				return
			}
		}
	}()
	select {
	case r := <-c:
		if r.err != nil {
			t.Fatalf("read: %v", r.err)
		}
		return r.f
	case <-time.After(20 * time.Second):
		p.Close()
		t.Fatal("expected frame never arrived")
	}
	return nil
}

func isARPReplyTo(mac net.HardwareAddr) func([]byte) bool {
	return func(f []byte) bool { return nettest.IsARPReply(f, mac) }
}

func TestAttachTAP(t *testing.T) {
	nettest.RequireTool(t, "bridge")
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	spec, err := vmspec.ParseNIC("network=lan")
	if err != nil {
		t.Fatal(err)
	}
	var nic *NIC
	do(t, ns, func() (err error) { nic, err = Attach(ctx, dir, "vm1", 1, spec); return err })
	defer nic.Close()
	if !bytes.Equal(nic.MAC, GenerateMAC("vm1", 1)) || nic.MTU != 1500 || len(nic.TAPs) != 1 {
		t.Fatalf("NIC = %+v", nic)
	}
	tap := nic.TAPs[0].Name()
	info := ns.MustRun(t, "ip", "-o", "link", "show", tap)
	for _, w := range []string{"master rv-lan", ",UP,", "mtu 1500", "alias rayvmm vm=vm1 nic=1 network=lan"} {
		if !strings.Contains(info, w) {
			t.Fatalf("TAP %q lacks %q", info, w)
		}
	}
	// The host answers an ARP request sent through the TAP.
	if _, err := nic.Port().Write(nettest.ARPRequest(nic.MAC, net.ParseIP("192.0.2.10"), net.ParseIP("192.0.2.1"))); err != nil {
		t.Fatal(err)
	}
	reply := readUntil(t, nic.Port(), isARPReplyTo(nic.MAC))
	if !bytes.Equal(reply[28:32], net.ParseIP("192.0.2.1").To4()) {
		t.Fatalf("ARP reply %x is not from 192.0.2.1", reply)
	}
	if fdb := ns.MustRun(t, "bridge", "fdb", "show", "br", "rv-lan"); !strings.Contains(fdb, nic.MAC.String()) {
		t.Fatalf("bridge did not learn %s: %s", nic.MAC, fdb)
	}
	err = ns.Do(func() error { return Remove(ctx, dir, "lan") })
	if !errors.Is(err, ErrInUse) {
		t.Fatalf("Remove while attached = %v, want ErrInUse", err)
	}
	var st *Status
	do(t, ns, func() (err error) { st, err = Inspect(dir, "lan"); return err })
	if !st.Attached || len(st.Bridges[0].Ports) != 1 || st.Bridges[0].Ports[0].Name != tap {
		t.Fatalf("Inspect while attached = %+v", st)
	}
	if err := nic.Close(); err != nil {
		t.Fatal(err)
	}
	if l := links(t, ns); slices.Contains(l, tap) {
		t.Fatalf("TAP %s still there after Close: %v", tap, l)
	}
	do(t, ns, func() error { return Remove(ctx, dir, "lan") })
}

// TestAttachRecreatesOverlay: when the bridge of an overlay network is gone
// (deleted by hand), attaching recreates it and puts the VXLAN device,
// which survived, back on it.
func TestAttachRecreatesOverlay(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	createNet(t, ns, dir, CreateOptions{Name: "ov", Subnet: "192.0.2.0/24", Isolated: true, Overlay: "vxlan:42,remote=203.0.113.2,local=203.0.113.1"})
	ns.MustRun(t, "ip", "link", "del", "rv-ov")
	spec, _ := vmspec.ParseNIC("network=ov")
	var nic *NIC
	do(t, ns, func() (err error) { nic, err = Attach(context.Background(), dir, "vm", 0, spec); return err })
	defer nic.Close()
	if vx := ns.MustRun(t, "ip", "-o", "link", "show", "rvx-ov"); !strings.Contains(vx, "master rv-ov") || !strings.Contains(vx, ",UP") {
		t.Fatalf("VXLAN device after attach: %q, want up on rv-ov", vx)
	}
}

// TestDamagedRecord: a record edited or damaged so that it names an
// interface that is not the network's own is refused, so that "net rm"
// cannot delete someone else's bridge or VXLAN device and "boot" cannot
// put TAPs on it.
func TestDamagedRecord(t *testing.T) {
	ns := nettest.New(t)
	ctx := context.Background()
	tests := []struct {
		name string
		edit func(*Network)
	}{
		{name: "foreign bridge", edit: func(n *Network) { n.Bridge = "br-foreign" }},
		{name: "foreign VXLAN device", edit: func(n *Network) { n.Overlay.Device = "vx-foreign" }},
		{name: "MTU out of range", edit: func(n *Network) { n.MTU = 70000 }},
		{name: "subnet with host bits", edit: func(n *Network) { n.Subnet = netip.MustParsePrefix("192.0.2.7/24") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			createNet(t, ns, dir, CreateOptions{Name: "ov", Subnet: "192.0.2.0/24", Isolated: true, Overlay: "vxlan:42,remote=203.0.113.2,local=203.0.113.1"})
			defer func() {
				for _, l := range []string{"rv-ov", "rvx-ov", "br-foreign", "vx-foreign"} {
					ns.Run("ip", "link", "del", l)
				}
			}()
			ns.MustRun(t, "ip", "link", "add", "br-foreign", "type", "bridge")
			ns.MustRun(t, "ip", "link", "add", "vx-foreign", "type", "vxlan", "id", "7", "dstport", "4789")
			editRecord(t, dir, "ov", tt.edit)
			path := filepath.Join(dir, state.DBName)
			err := ns.Do(func() error { return Remove(ctx, dir, "ov") })
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), `networks record "ov"`) {
				t.Fatalf("Remove with a damaged record = %v, want an error naming %s and the record", err, path)
			}
			spec, _ := vmspec.ParseNIC("network=ov")
			var nic *NIC
			if err := ns.Do(func() (err error) { nic, err = Attach(ctx, dir, "vm", 0, spec); return err }); err == nil {
				nic.Close()
				t.Fatal("Attach with a damaged record succeeded")
			}
			if l := links(t, ns); !slices.Contains(l, "br-foreign") || !slices.Contains(l, "vx-foreign") {
				t.Fatalf("foreign interfaces gone: %v", l)
			}
		})
	}
}

func TestRemoveRefusedWithForeignTAP(t *testing.T) {
	ns := nettest.New(t)
	dir := t.TempDir()
	ctx := context.Background()
	createNet(t, ns, dir, CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"})
	ns.MustRun(t, "ip", "tuntap", "add", "qemutap", "mode", "tap")
	ns.MustRun(t, "ip", "link", "set", "qemutap", "master", "rv-lan")
	err := ns.Do(func() error { return Remove(ctx, dir, "lan") })
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "qemutap") {
		t.Fatalf("Remove = %v, want ErrInUse naming qemutap", err)
	}
	ns.MustRun(t, "ip", "link", "del", "qemutap")
	do(t, ns, func() error { return Remove(ctx, dir, "lan") })
}

func TestCloseUnblocksRead(t *testing.T) {
	ns := nettest.New(t)
	var tap *TAP
	do(t, ns, func() (err error) { tap, err = OpenTAP("rvtblock"); return err })
	errc := make(chan error, 1)
	go func() {
		_, err := tap.Read(make([]byte, 2048))
		errc <- err
	}()
	waitBlocked(t, "(*TAP).Read")
	tap.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("Read after Close = %v, want os.ErrClosed", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Read still blocked after Close")
	}
}

// TestTAPNotInherited: a child process started while a TAP is open does not
// inherit its descriptor, so closing the TAP still removes it (a TAP held
// by a child would outlive Close and the rayvmm process).
func TestTAPNotInherited(t *testing.T) {
	ns := nettest.New(t)
	var tap *TAP
	do(t, ns, func() (err error) { tap, err = OpenTAP("rvtinherit"); return err })
	child := exec.Command("sleep", "600")
	if err := child.Start(); err != nil {
		tap.Close()
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	if err := tap.Close(); err != nil {
		t.Fatal(err)
	}
	if l := links(t, ns); slices.Contains(l, "rvtinherit") {
		t.Fatalf("TAP rvtinherit still there after Close, held by child %d: %v", child.Process.Pid, l)
	}
}

func TestAttachTapSpec(t *testing.T) {
	ns := nettest.New(t)
	ns.MustRun(t, "ip", "tuntap", "add", "usertap", "mode", "tap")
	ns.MustRun(t, "ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1")
	tests := []struct {
		name      string
		spec      string
		wantErr   string
		remains   bool // the TAP is still there after Close
		wantAlias bool
	}{
		{name: "new tap", spec: "tap=newtap", wantAlias: true},
		{name: "existing persistent tap", spec: "tap=usertap", remains: true},
		{name: "not a tap", spec: "tap=dum0", wantErr: "is a veth, not a TAP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec, err := vmspec.ParseNIC(tt.spec)
			if err != nil {
				t.Fatal(err)
			}
			var nic *NIC
			err = ns.Do(func() (err error) { nic, err = Attach(context.Background(), t.TempDir(), "vm", 0, spec); return err })
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Attach = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			info := ns.MustRun(t, "ip", "-o", "link", "show", spec.Tap)
			if strings.Contains(info, "alias rayvmm") != tt.wantAlias || !strings.Contains(info, ",UP,") {
				t.Fatalf("TAP %q: want up, alias %v", info, tt.wantAlias)
			}
			nic.Close()
			if got := slices.Contains(links(t, ns), spec.Tap); got != tt.remains {
				t.Fatalf("after Close %s exists = %v, want %v", spec.Tap, got, tt.remains)
			}
		})
	}
}

// waitBlocked waits until a goroutine is blocked in a read (parked on the
// poller, "IO wait", or in a system call) inside fn, as runtime.Stack shows.
func waitBlocked(t *testing.T, fn string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	buf := make([]byte, 1<<20)
	for {
		stacks := string(buf[:runtime.Stack(buf, true)])
		for _, g := range strings.Split(stacks, "\n\n") {
			if (strings.Contains(g, "[IO wait") || strings.Contains(g, "[syscall")) && strings.Contains(g, fn) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no goroutine blocked in %s within a minute:\n%s", fn, stacks)
		}
		time.Sleep(time.Millisecond)
	}
}
