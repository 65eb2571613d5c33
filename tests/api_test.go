package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The VM's control API, exercised as a user would: with curl
// --unix-socket, rayvmm vm, and (for concurrency) Go's HTTP client.

// curl sends one request with curl and returns the status and the body.
func curl(t *testing.T, sock, method, path, body string) (int, string) {
	t.Helper()
	requireTool(t, "curl")
	args := []string{"-sS", "--unix-socket", sock, "-X", method, "-o", "-", "-w", "\n%{http_code}", "http://localhost" + path}
	if body != "" {
		args = append(args, "-H", "Content-Type: application/json")
		if strings.HasPrefix(body, "@") {
			args = append(args, "--data-binary", body)
		} else {
			args = append(args, "-d", body)
		}
	}
	out, err := exec.Command("curl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s %s: %v\n%s", method, path, err, out)
	}
	s := strings.TrimRight(string(out), "\n")
	i := strings.LastIndexByte(s, '\n')
	var code int
	fmt.Sscanf(s[i+1:], "%d", &code)
	return code, s[:max(i, 0)]
}

// curlOK sends a request that must get want, and returns the body.
func curlOK(t *testing.T, sock, method, path, body string, want int) string {
	t.Helper()
	code, out := curl(t, sock, method, path, body)
	if code != want {
		t.Fatalf("%s %s %s: HTTP %d %s, want %d", method, path, body, code, out, want)
	}
	return out
}

// info is GET /.
func info(t *testing.T, sock string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(curlOK(t, sock, "GET", "/", "", 200)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// scrape reads /metrics with the Prometheus text parser.
func scrape(t *testing.T, sock string) map[string]*dto.MetricFamily {
	t.Helper()
	body := curlOK(t, sock, "GET", "/metrics", "", 200)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	return fams
}

// sample finds the value of a sample by its labels.
func sample(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		t.Fatalf("no metric %s", name)
	}
next:
	for _, m := range f.Metric {
		for k, v := range labels {
			found := false
			for _, l := range m.Label {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("no sample of %s with %v", name, labels)
	return 0
}

// TestAPI runs an echo guest (2 vCPUs) with a disk and an API socket and goes
// through every endpoint, pause and resume, live rate limits, every kind
// of bad request, concurrent clients, the metrics and rayvmm vm.
func TestAPI(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	img := sparseFile(t, 16<<20)
	// Two vCPUs, so that pausing parks an AP too.
	b := startBoot(t, "rayguest: cpu 1 up", "boot", "--name", "apivm", "--cpus", "2", "--cmdline", "rayguest.run=echo",
		"--disk", "path="+img+",format=raw", "--api-socket", sock)

	// GET / and GET /vm/config.
	i := info(t, sock)
	if i["id"] != "apivm" || i["state"] != "Running" || i["vcpus"] != 2.0 || i["memory"] != "128M" || i["app_name"] != "rayvmm" {
		t.Fatalf("GET / = %v", i)
	}
	var cfg struct {
		Name      string `json:"name"`
		APISocket string `json:"apiSocket"`
		Disks     []struct {
			ID        string           `json:"id"`
			RateLimit map[string]int64 `json:"rateLimit"`
		} `json:"disks"`
	}
	if err := json.Unmarshal([]byte(curlOK(t, sock, "GET", "/vm/config", "", 200)), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "apivm" || cfg.APISocket != sock || len(cfg.Disks) != 1 || cfg.Disks[0].ID != "vda" {
		t.Fatalf("GET /vm/config = %+v", cfg)
	}

	// Pause: the guest runs no instruction, so a line typed meanwhile is
	// not echoed, and no vCPU exit is counted, until it is resumed. The
	// window is many times what an echo takes while running.
	start := time.Now()
	io.WriteString(b.stdin, "one\n")
	b.out.waitFor(t, "rayguest: echo one\n", guestWait)
	echo := time.Since(start)
	curlOK(t, sock, "PATCH", "/vm", `{"state": "Paused"}`, 204)
	if s := info(t, sock)["state"]; s != "Paused" {
		t.Fatalf("state %v after pause", s)
	}
	exits := func() float64 {
		fams := scrape(t, sock)
		var n float64
		for _, m := range fams["rayvmm_vcpu_exits_total"].Metric {
			n += m.Counter.GetValue()
		}
		return n
	}
	before := exits()
	io.WriteString(b.stdin, "two\n")
	window := max(2*time.Second, 20*echo)
	deadline := time.After(window)
	for waiting := true; waiting; {
		select {
		case <-deadline:
			waiting = false
		case <-time.After(50 * time.Millisecond):
			if strings.Contains(b.out.String(), "echo two") {
				t.Fatalf("a paused guest echoed (within %v of the input)", window)
			}
		}
	}
	if after := exits(); after != before {
		t.Fatalf("vCPU exits went from %v to %v while paused", before, after)
	}
	curlOK(t, sock, "PATCH", "/vm", `{"state": "Resumed"}`, 204)
	b.out.waitFor(t, "rayguest: echo two\n", guestWait)
	if s := info(t, sock)["state"]; s != "Running" {
		t.Fatalf("state %v after resume", s)
	}

	// Live rate limits: a PATCH changes the fields it names.
	curlOK(t, sock, "PATCH", "/drives/vda", `{"rateLimit": {"iops": 100}}`, 204)
	curlOK(t, sock, "PATCH", "/drives/vda", `{"id": "vda", "rateLimit": {"bps": 4096, "burst": 8192}}`, 204)
	if err := json.Unmarshal([]byte(curlOK(t, sock, "GET", "/vm/config", "", 200)), &cfg); err != nil {
		t.Fatal(err)
	}
	if rl := cfg.Disks[0].RateLimit; rl["iops"] != 100 || rl["bps"] != 4096 || rl["burst"] != 8192 {
		t.Fatalf("rate limit after two PATCHes: %v", rl)
	}
	curlOK(t, sock, "PATCH", "/drives/vda", `{"rateLimit": {"iops": 0, "bps": 0, "burst": 0}}`, 204)

	// Every kind of bad request gets a 4xx and a fault message, and the
	// VM runs on.
	big := filepath.Join(dir, "big.json")
	if err := os.WriteFile(big, append([]byte(`{"state": "`), bytes.Repeat([]byte("x"), 1<<20)...), 0o644); err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		name, method, path, body string
		code                     int
		msg                      string
	}{
		{"malformed JSON", "PATCH", "/vm", `{"state": `, 400, "not valid JSON"},
		{"not an object", "PATCH", "/vm", `["Paused"]`, 400, "want an object"},
		{"unknown field", "PATCH", "/vm", `{"state": "Paused", "colour": 1}`, 400, "colour: unknown field"},
		{"unknown nested field", "PATCH", "/drives/vda", `{"rateLimit": {"iopz": 1}}`, 400, "rateLimit.iopz: unknown field"},
		{"negative rate", "PATCH", "/drives/vda", `{"rateLimit": {"iops": -1}}`, 400, "rateLimit.iops: must not be negative"},
		{"burst without rate", "PATCH", "/drives/vda", `{"rateLimit": {"burst": 5}}`, 400, "rateLimit.burst: needs iops or bps"},
		{"mismatched id", "PATCH", "/drives/vda", `{"id": "vdb"}`, 400, "does not match"},
		{"bad state", "PATCH", "/vm", `{"state": "Sleeping"}`, 400, `"Sleeping": want Paused or Resumed`},
		{"no body", "PATCH", "/vm", "", 400, "needs a JSON body"},
		{"bad action", "PUT", "/actions", `{"action_type": "Reboot"}`, 400, "this API knows Shutdown"},
		{"unknown drive", "PATCH", "/drives/vdz", `{"rateLimit": {"iops": 1}}`, 404, `no drive with id "vdz"`},
		{"unknown NIC", "PATCH", "/network-interfaces/net9", `{"rateLimit": {"txBps": 1}}`, 404, `no network interface with id "net9"`},
		{"unknown path", "GET", "/machine-config", "", 404, "no such resource"},
		{"wrong method", "DELETE", "/vm", "", 405, "method DELETE is not allowed on /vm (use PATCH)"},
		{"wrong method on /", "POST", "/", `{}`, 405, "not allowed"},
		{"GET an action", "GET", "/actions", "", 405, "use PUT"},
		{"body over 1 MiB", "PATCH", "/vm", "@" + big, 413, "larger than 1048576"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			code, body := curl(t, sock, tt.method, tt.path, tt.body)
			var f struct {
				Message string `json:"fault_message"`
			}
			if err := json.Unmarshal([]byte(body), &f); err != nil || code != tt.code || !strings.Contains(f.Message, tt.msg) {
				t.Fatalf("HTTP %d %s; want %d with a fault_message containing %q", code, body, tt.code, tt.msg)
			}
			if s := info(t, sock)["state"]; s != "Running" {
				t.Fatalf("state %v after a bad request", s)
			}
		})
	}

	// Concurrent clients: reads, scrapes and pause/resume at once.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range 25 {
				method, path, body := "GET", "/", ""
				switch {
				case w == 0:
					method, path, body = "PATCH", "/vm", []string{`{"state":"Paused"}`, `{"state":"Resumed"}`}[n%2]
				case w%2 == 1:
					path = "/metrics"
				}
				req, _ := http.NewRequest(method, "http://localhost"+path, strings.NewReader(body))
				resp, err := hc.Do(req)
				if err != nil {
					errs <- err
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode >= 300 {
					errs <- fmt.Errorf("%s %s: HTTP %d", method, path, resp.StatusCode)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	curlOK(t, sock, "PATCH", "/vm", `{"state": "Resumed"}`, 204)

	// rayvmm vm.
	if out := rayvmmOK(t, dir, "vm", "status", "--api-socket", sock); !strings.Contains(out, "apivm") || !strings.Contains(out, "Running") {
		t.Fatalf("rayvmm vm status:\n%s", out)
	}
	rayvmmOK(t, dir, "vm", "pause", "--api-socket", sock)
	if out := rayvmmOK(t, dir, "vm", "status", "--api-socket", sock, "--json"); !strings.Contains(out, `"state": "Paused"`) {
		t.Fatalf("rayvmm vm status --json after pause:\n%s", out)
	}
	rayvmmOK(t, dir, "vm", "resume", "--api-socket", sock)
	r := run(t, nil, time.Minute, "vm", "status", "--api-socket", filepath.Join(dir, "nope.sock"))
	if r.code == 0 || !strings.Contains(r.stderr, "is the VM running?") {
		t.Fatalf("rayvmm vm status on no socket: exit %d, %q", r.code, r.stderr)
	}

	// The guest still echoes after all that, and /metrics has what the
	// VM did: exits by vCPU and reason, the disk's counters, boot times.
	io.WriteString(b.stdin, "three\n")
	b.out.waitFor(t, "rayguest: echo three\n", guestWait)
	fams := scrape(t, sock)
	if n := sample(t, fams, "rayvmm_vcpu_exits_total", map[string]string{"vcpu": "0", "reason": "io"}); n == 0 {
		t.Error("no I/O exits counted on vCPU 0")
	}
	if n := sample(t, fams, "rayvmm_boot_ready_seconds", nil); n <= 0 {
		t.Errorf("boot ready time %v", n)
	}
	sample(t, fams, "rayvmm_disk_read_ops_total", map[string]string{"disk": "vda"})
	if n := sample(t, fams, "rayvmm_disk_request_duration_seconds", map[string]string{"disk": "vda"}); n < 0 {
		t.Errorf("latency histogram count %v", n)
	}

	// Shutdown: exit status 0, the socket removed.
	curlOK(t, sock, "PUT", "/actions", `{"action_type": "Shutdown"}`, 204)
	if code := b.wait(t); code != 0 {
		t.Fatalf("exit %d after Shutdown\n%s", code, b.out.String())
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("API socket left after the VM exited: %v", err)
	}
}
