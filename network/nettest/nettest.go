// Package nettest gives tests network namespaces of their own, so they can
// make bridges, TAPs and NAT rules as root without touching the host's
// network. A namespace is named, so commands can run in it with
// "ip netns exec", and is deleted when the test ends, pass or fail.
package nettest

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// RequireRoot needs root and the ip tool to make network namespaces.
func RequireRoot(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip")
}

// RequireTool needs a host tool (CI installs them from Debian).
func RequireTool(t testing.TB, name string) {
	t.Helper()
	testenv.RequireTool(t, name)
}

// NS is a named network namespace owned by one test.
type NS struct {
	Name string
	h    netns.NsHandle
}

var seq atomic.Uint32

// New makes a namespace with lo up and IPv6 off (so no stray neighbour
// discovery frames reach the test's ports), deleted when t ends.
func New(t testing.TB) *NS {
	t.Helper()
	RequireRoot(t)
	name := fmt.Sprintf("rvtest-%d-%d", os.Getpid(), seq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	ns := &NS{Name: name}
	t.Cleanup(func() {
		if ns.h.IsOpen() {
			ns.h.Close()
		}
		exec.Command("ip", "netns", "del", name).Run()
	})
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open netns %s: %v", name, err)
	}
	ns.h = h
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	if err := ns.Do(func() error {
		for _, k := range []string{"all", "default"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+k+"/disable_ipv6", []byte("1"), 0); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("netns %s: disable IPv6: %v", name, err)
	}
	return ns
}

// Do runs fn on an OS thread that is inside the namespace. Sockets and
// TAPs fn opens belong to the namespace; goroutines fn starts do not run
// in it. The thread is thrown away afterwards.
func (ns *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := netns.Set(ns.h); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", ns.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Run runs a command inside the namespace and returns its combined output.
func (ns *NS) Run(args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s in netns %s: %w: %s", strings.Join(args, " "), ns.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// MustRun is Run that fails the test on error.
func (ns *NS) MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := ns.Run(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Veth joins two namespaces with a veth pair, giving each end an address
// (CIDR) and bringing both up.
func Veth(t testing.TB, a *NS, aName, aAddr string, b *NS, bName, bAddr string) {
	t.Helper()
	a.MustRun(t, "ip", "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
	a.MustRun(t, "ip", "addr", "add", aAddr, "dev", aName)
	a.MustRun(t, "ip", "link", "set", aName, "up")
	b.MustRun(t, "ip", "addr", "add", bAddr, "dev", bName)
	b.MustRun(t, "ip", "link", "set", bName, "up")
}
