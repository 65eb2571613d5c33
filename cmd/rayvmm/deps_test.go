package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoDaemonDependencies: rayvmm links none of what made it slow to
// start (etcd's client and server, gRPC, protobuf, the Prometheus client,
// containerd's cgroups): those live in rayvmmd, which rayvmm runs for the
// commands that need them. Every rayvmm command pays for what rayvmm
// links at each start, and rayvmm boot's boot-to-ready with it.
func TestNoDaemonDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	forbidden := []string{
		"go.etcd.io/etcd/", "google.golang.org/grpc", "google.golang.org/protobuf",
		"github.com/golang/protobuf", "github.com/prometheus/client_golang", "github.com/containerd/cgroups",
		"github.com/rayvmm/rayvmm/shards\n", // the package that talks to etcd (shards/cluster is allowed)
	}
	var bad []string
	for _, d := range strings.SplitAfter(string(out), "\n") {
		for _, f := range forbidden {
			if strings.HasPrefix(d, f) || d == f {
				bad = append(bad, strings.TrimSpace(d))
			}
		}
	}
	if len(bad) > 0 {
		t.Fatalf("rayvmm links (these belong in rayvmmd):\n  %s", strings.Join(bad, "\n  "))
	}
	if !strings.Contains(string(out), "\ngithub.com/spf13/cobra\n") {
		t.Fatal("rayvmm does not link cobra; is this test looking at the right package?")
	}
}
