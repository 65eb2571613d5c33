package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
)

// DeviceBench is one benchmark of the device packages: the device path
// through the mock driver against raw pread/pwrite, raw TAP I/O or a raw
// Unix-socket copy in the same run. Ratio is device rate / raw rate (1.0: the device costs nothing
// over the raw path).
type DeviceBench struct {
	Name    string             `json:"name"`
	Metrics map[string]float64 `json:"metrics"`
	Ratio   float64            `json:"ratio"`
}

// DeviceResult is the output of one package's benchmarks.
type DeviceResult struct {
	Package   string        `json:"package"`
	Command   string        `json:"command"`
	Benches   []DeviceBench `json:"benchmarks"`
	Error     string        `json:"error,omitempty"`
	rawOutput string
}

// deviceBenches runs the virtio-blk, virtio-net and virtio-vsock
// benchmarks, and the sharded-volume data path (shards/engine: R=1,2,3
// against a raw file) and NBD server (shards/nbd: rayvmm's server against
// qemu-nbd, same clients; there "raw" is qemu-nbd).
func deviceBenches(ctx context.Context, repo string, blkN, netN, vsockN int) []*DeviceResult {
	var out []*DeviceResult
	for _, p := range []struct {
		pkg string
		n   int
	}{{"./devices/virtio/blk", blkN}, {"./devices/virtio/net", netN}, {"./devices/virtio/vsock", vsockN}, {"./shards/engine", blkN}, {"./shards/nbd", blkN}} {
		args := []string{"test", "-run", "^$", "-bench", ".", "-benchtime", fmt.Sprintf("%dx", p.n), "-count", "1", p.pkg}
		r := &DeviceResult{Package: p.pkg, Command: "go " + strings.Join(args, " ")}
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = repo
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		b, err := cmd.CombinedOutput()
		r.rawOutput = string(b)
		r.Benches = parseBenchOutput(string(b))
		if err != nil {
			r.Error = fmt.Sprintf("%v: %s", err, lastLines(string(b), 4))
		} else if len(r.Benches) == 0 {
			r.Error = "no benchmark results: " + lastLines(string(b), 4)
		}
		logf("devices: %s: %d benchmarks", p.pkg, len(r.Benches))
		out = append(out, r)
	}
	return out
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(-\d+)?\s+(\d+)\s+(.*)$`)

// parseBenchOutput reads `go test -bench` result lines: name, iterations,
// then value-unit pairs.
func parseBenchOutput(s string) []DeviceBench {
	var out []DeviceBench
	for _, line := range strings.Split(s, "\n") {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		f := strings.Fields(m[4])
		if len(f) < 2 || len(f)%2 != 0 {
			continue
		}
		b := DeviceBench{Name: strings.TrimPrefix(m[1], "Benchmark"), Metrics: map[string]float64{}}
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				b.Metrics = nil
				break
			}
			b.Metrics[f[i+1]] = v
		}
		if b.Metrics == nil {
			continue
		}
		b.Ratio = b.Metrics["ratio"]
		out = append(out, b)
	}
	return out
}
