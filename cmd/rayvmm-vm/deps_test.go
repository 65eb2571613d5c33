package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies: the VM process links only what running a guest needs.
// The control plane's libraries (CLI, netlink, nftables, the volume
// database, YAML, etcd, Prometheus' client, HTTP) and its packages must
// not creep in: each would add to the memory every guest pays for.
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	forbidden := []struct{ pattern, why string }{
		{"github.com/spf13/cobra", "the CLI"},
		{"github.com/spf13/pflag", "the CLI"},
		{"github.com/vishvananda/netlink", "netlink: networks are made by the control plane"},
		{"github.com/vishvananda/netns", "netlink"},
		{"github.com/mdlayher/netlink", "netlink"},
		{"github.com/google/nftables", "NAT rules are the control plane's"},
		{"github.com/songgao/water", "TAPs are created by the control plane"},
		{"go.etcd.io/", "bbolt and etcd: state is the control plane's"},
		{"yaml", "specs are read by the control plane"},
		{"github.com/prometheus/", "the metrics are written by hand (see vmm/api)"},
		{"google.golang.org/protobuf", "protobuf"},
		{"net/http", "the API's HTTP server is a small one (see vmm/api)"},
		{"crypto/tls", "no TLS on a Unix socket"},
		{"github.com/rayvmm/rayvmm/network", "package network is the control plane's (network/port is allowed)"},
		{"github.com/rayvmm/rayvmm/storage/volume", "volumes are resolved by the control plane"},
		{"github.com/rayvmm/rayvmm/vmproc/control", "the control plane's side of the handoff"},
		{"github.com/rayvmm/rayvmm/guestkernel", "the built-in kernel comes through a memfd"},
		{"os/exec", "the VM process starts nothing"},
	}
	var bad []string
	for _, d := range deps {
		for _, f := range forbidden {
			match := strings.Contains(d, f.pattern)
			if f.pattern == "github.com/rayvmm/rayvmm/network" {
				match = d == f.pattern
			}
			if match {
				bad = append(bad, d+" ("+f.why+")")
			}
		}
	}
	if len(bad) > 0 {
		t.Fatalf("rayvmm-vm links:\n  %s", strings.Join(bad, "\n  "))
	}
	for _, want := range []string{"github.com/rayvmm/rayvmm/vmm", "github.com/rayvmm/rayvmm/network/port", "github.com/rayvmm/rayvmm/storage/qcow2"} {
		if !strings.Contains(" "+string(out)+" ", "\n"+want+"\n") {
			t.Errorf("rayvmm-vm does not link %s; is this test looking at the right package?", want)
		}
	}
}
