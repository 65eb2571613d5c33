package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestCLIDependencies: the rayvmm CLI links none of what makes a start
// slow (etcd's client, gRPC, protobuf, the Prometheus client, the cgroup
// library): those live in rayvmmd, which `rayvmm daemon` runs.
func TestCLIDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, bad := range []string{"go.etcd.io/etcd", "google.golang.org/grpc", "google.golang.org/protobuf", "github.com/prometheus/client_golang", "github.com/containerd/cgroups"} {
			if strings.HasPrefix(dep, bad) {
				t.Errorf("rayvmm links %s", dep)
			}
		}
	}
}
