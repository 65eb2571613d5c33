package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/pods/cgroup"
	"github.com/rayvmm/rayvmm/pods/client"
)

func TestBackoff(t *testing.T) {
	// Kubernetes' sequence: at once, then 10 s doubling to 300 s.
	var next time.Duration
	var got []time.Duration
	for range 8 {
		var d time.Duration
		d, next = backoff(next, time.Second, 1)
		got = append(got, d)
	}
	want := []time.Duration{0, 10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 160 * time.Second, 300 * time.Second, 300 * time.Second}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("delays %v, want %v", got, want)
	}
	// Ten minutes of running resets it.
	if d, n := backoff(300*time.Second, 10*time.Minute, 1); d != 0 || n != 10*time.Second {
		t.Errorf("after a 10 minute run: %v then %v", d, n)
	}
	// Scaled for tests.
	if d, n := backoff(500*time.Millisecond, time.Second, 0.05); d != 500*time.Millisecond || n != time.Second {
		t.Errorf("scaled: %v then %v", d, n)
	}
	if d, _ := backoff(15*time.Second, 30*time.Second, 0.05); d != 0 {
		t.Errorf("scaled reset after 30 s (10 min x 0.05): delay %v", d)
	}
}

// testDaemon serves a daemon over a socket in a temporary directory,
// with a fake cgroup hierarchy; it starts no VM unless a test applies
// one that can start.
type testDaemon struct {
	d    *Daemon
	c    *client.Client
	sock string
	done chan error
	cg   string
}

func newTestDaemon(t *testing.T, cfg Config) *testDaemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "rvd") // short: the sockets' paths must fit
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cgRoot := filepath.Join(dir, "cg")
	for _, c := range []string{"cpu", "cpuacct", "memory", "pids"} {
		os.MkdirAll(filepath.Join(cgRoot, c), 0o755)
	}
	cg, err := cgroup.New(cgroup.V1, cgRoot, "rayvmm")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Cgroups != nil {
		cg = cfg.Cgroups
	}
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.Socket = filepath.Join(dir, "d.sock")
	cfg.SocketGID = -1
	cfg.Cgroups = cg
	cfg.KVMDevice = filepath.Join(dir, "no-kvm") // nothing can start
	ready := make(chan struct{})
	cfg.Ready = func() { close(ready) }
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	td := &testDaemon{d: d, sock: cfg.Socket, done: make(chan error, 1), cg: cgRoot}
	go func() { td.done <- d.Serve(context.Background()) }()
	select {
	case <-ready:
	case err := <-td.done:
		t.Fatalf("daemon: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("the daemon did not serve within a minute")
	}
	if td.c, err = client.New("unix://" + cfg.Socket); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		td.c.Close()
		d.Shutdown()
		select {
		case <-td.done:
		case <-time.After(time.Minute):
			t.Error("the daemon did not stop within a minute")
		}
	})
	return td
}

// raw sends a raw HTTP request and returns the status and body.
func (td *testDaemon) raw(t *testing.T, method, path string, body []byte) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", td.sock)
	}}}
	req, _ := http.NewRequest(method, "http://d"+path, bytes.NewReader(body))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

const okPod = `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: web}
spec:
  vms: [{name: a, nets: [{network: lab}], disks: [{volume: data}]}]
`

// Bad requests, many at once: each is answered on its own, with a 4xx and
// a JSON message, and the daemon goes on serving.
func TestBadRequests(t *testing.T) {
	td := newTestDaemon(t, Config{})
	cases := []struct {
		method, path string
		body         []byte
		code         int
		want         string
	}{
		{"POST", "/v1/pods", []byte("{"), 400, "not valid YAML"},
		{"POST", "/v1/pods", []byte(`{"apiVersion":"rayvmm/v1","kind":"Pod","metadata":{"name":"x"},"spec":{"vms":[{"name":"a","memory":-1}]}}`), 400, `"field":"spec.vms[0].memory"`},
		{"POST", "/v1/pods", bytes.Repeat([]byte("a"), pods.MaxDocument+10), 400, "larger than"},
		{"POST", "/v1/pods", nil, 400, "empty document"},
		{"GET", "/v1/pods/nope", nil, 404, "no such pod: nope"},
		{"GET", "/v1/pods/No%20Pe", nil, 400, "pod name"},
		{"GET", "/v1/pods/nope/events", nil, 404, "no such pod"},
		{"GET", "/v1/pods/nope/logs?vm=a", nil, 404, "no such pod"},
		{"GET", "/v1/pods/nope/wait?for=Sleeping", nil, 400, "want Ready"},
		{"GET", "/v1/pods/nope/wait?for=Ready&timeout=forever", nil, 400, "timeout"},
		{"POST", "/v1/pods/nope/stop", nil, 404, "no such pod"},
		{"DELETE", "/v1/pods/nope", nil, 404, "no such pod"},
		{"PUT", "/v1/pods", nil, 404, "no such call: PUT /v1/pods"},
		{"GET", "/v2/things", nil, 404, "no such call"},
	}
	var wg sync.WaitGroup
	for range 3 {
		for _, c := range cases {
			wg.Go(func() {
				code, body := td.raw(t, c.method, c.path, c.body)
				if code != c.code || !strings.Contains(body, c.want) {
					t.Errorf("%s %s: %d %s, want %d with %q", c.method, c.path, code, body, c.code, c.want)
				}
			})
		}
	}
	wg.Wait()
	if list, err := td.c.List(context.Background()); err != nil || len(list) != 0 {
		t.Errorf("after bad requests: %v, %v", list, err)
	}
}

// A second daemon on the same state directory is refused, naming the
// first one's pid.
func TestSecondDaemon(t *testing.T) {
	td := newTestDaemon(t, Config{})
	_, err := New(Config{StateDir: td.d.st.Dir(), Socket: td.sock + "2", Cgroups: td.d.cg})
	if !errors.Is(err, ErrAlreadyRunning) || !strings.Contains(err.Error(), fmt.Sprintf("(pid %d)", os.Getpid())) {
		t.Fatalf("second daemon: %v", err)
	}
}

// fakePolicy denies joining network lab and allows the rest; fakeAudit
// keeps what it is given.
type fakePolicy struct{}

func (fakePolicy) Decide(c Caller, action string, o Object) (Decision, error) {
	if action == ActJoin && o.Name == "lab" {
		return Decision{Allow: false, Reason: `deny: 1000 join network/lab: rule "no-lab" (rules[0]) denies it`}, nil
	}
	if action == ActInspect && o.Name == "hidden" {
		return Decision{Allow: false, Reason: `deny: 1000 inspect pod/hidden: rule "hide" (rules[2]) denies it`}, nil
	}
	return Decision{Allow: true, Reason: `rule "anything" (rules[1])`}, nil
}

type fakeAudit struct {
	mu sync.Mutex
	e  []Entry
	// failOn: records about this object are refused (a full disk).
	failOn string
}

func (a *fakeAudit) Record(_ context.Context, es ...Entry) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, e := range es {
		if a.failOn != "" && e.Object.String() == a.failOn {
			return errors.New("write audit: no space left on device")
		}
	}
	a.e = append(a.e, es...)
	return nil
}

func (a *fakeAudit) actions() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, e := range a.e {
		s := e.Action + " " + e.Object.String()
		if r := e.Params["request"]; r != "" {
			s += " " + r
		}
		out = append(out, s)
	}
	return out
}

// The request path's hooks: every object an apply touches is decided, a
// denial is a 403 naming the rule and makes nothing, and every decision
// is recorded with the caller.
func TestPolicyHook(t *testing.T) {
	audit := &fakeAudit{}
	td := newTestDaemon(t, Config{Authorizer: fakePolicy{}, Auditor: audit})
	_, err := td.c.Apply(context.Background(), []byte(okPod))
	var ce *client.Error
	if !errors.As(err, &ce) || ce.Status != http.StatusForbidden || !strings.Contains(ce.Message, `rule "no-lab" (rules[0])`) {
		t.Fatalf("apply joining a denied network: %v", err)
	}
	if list, _ := td.c.List(context.Background()); len(list) != 0 {
		t.Errorf("a denied apply made %d pods", len(list))
	}
	if ents, _ := os.ReadDir(filepath.Join(td.cg, "memory")); len(ents) != 0 {
		t.Errorf("a denied apply made cgroups: %v", ents)
	}
	// A wait is an inspect: denied also when waiting for a removal.
	if _, err := td.c.Wait(context.Background(), "hidden", "Removed", time.Minute); !errors.As(err, &ce) || ce.Status != http.StatusForbidden || !strings.Contains(ce.Message, `rule "hide"`) {
		t.Errorf("wait for the removal of a pod the caller may not inspect: %v", err)
	}
	if _, err := td.c.Wait(context.Background(), "gone", "Removed", time.Minute); err != nil {
		t.Errorf("wait for the removal of a pod that is gone: %v", err)
	}
	got := strings.Join(audit.actions(), "\n")
	for _, want := range []string{"daemon.start", "policy.allow pod/web create", "policy.allow pod/web run", "policy.allow volume/data attach-rw", "policy.deny network/lab join"} {
		if !strings.Contains(got, want) {
			t.Errorf("audit lacks %q:\n%s", want, got)
		}
	}
	audit.mu.Lock()
	for _, e := range audit.e {
		if strings.HasPrefix(e.Action, "policy.") && (e.Caller == nil || e.Caller.UID != uint32(os.Getuid()) || e.Caller.PID != int32(os.Getpid())) {
			t.Errorf("%s recorded caller %+v, want this process", e.Action, e.Caller)
		}
	}
	audit.mu.Unlock()
}

// Decisions that cannot be recorded fail the request (closed): the apply
// answers the audit log's error and leaves no pod; a wait answers it too.
func TestAuditFailsClosed(t *testing.T) {
	audit := &fakeAudit{failOn: "pod/unrecorded"}
	td := newTestDaemon(t, Config{Authorizer: fakePolicy{}, Auditor: audit})
	ctx := context.Background()
	_, err := td.c.Apply(ctx, []byte("apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: unrecorded}\nspec: {vms: [{name: a}]}\n"))
	var ce *client.Error
	if !errors.As(err, &ce) || ce.Status != http.StatusInternalServerError || !strings.Contains(ce.Message, "audit log: write audit: no space left on device") {
		t.Fatalf("apply whose decisions cannot be recorded: %v", err)
	}
	if list, err := td.c.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("after the failed apply: %d pods (%v)", len(list), err)
	}
	if td.d.cg.Exists("unrecorded", "") {
		t.Error("the failed apply left a cgroup")
	}
	if _, err := td.c.Wait(ctx, "unrecorded", "Removed", time.Minute); !errors.As(err, &ce) || !strings.Contains(ce.Message, "no space left on device") {
		t.Errorf("wait whose decision cannot be recorded: %v", err)
	}
}

// A pod that cannot start (here: no KVM device) is Failed with the
// reason, and leaves no cgroup.
func TestStartFailure(t *testing.T) {
	td := newTestDaemon(t, Config{})
	if _, err := td.c.Apply(context.Background(), []byte("apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: x}\nspec: {vms: [{name: a}]}\n")); err != nil {
		t.Fatal(err)
	}
	i, err := td.c.Wait(context.Background(), "x", "Ended", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if i.Status.Phase != pods.Failed || i.Status.Reason != pods.ReasonStartError || !strings.Contains(i.Status.Message, "KVM device") {
		t.Errorf("status %+v", i.Status)
	}
	if td.d.cg.Exists("x", "a") {
		t.Error("the failed VM's cgroup is left")
	}
	if err := td.c.Remove(context.Background(), "x", false, client.Default); err != nil {
		t.Errorf("rm of a failed pod: %v", err)
	}
}

// A cgroup that cannot be made fails the pod with CgroupError and leaves
// nothing.
func TestCgroupUnwritable(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-hierarchy")
	os.WriteFile(file, nil, 0o644)
	cg, err := cgroup.New(cgroup.V1, file, "rayvmm")
	if err != nil {
		t.Fatal(err)
	}
	td := newTestDaemon(t, Config{Cgroups: cg})
	if _, err := td.c.Apply(context.Background(), []byte("apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: x}\nspec: {vms: [{name: a}, {name: b}]}\n")); err != nil {
		t.Fatal(err)
	}
	i, err := td.c.Wait(context.Background(), "x", "Ended", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if i.Status.Phase != pods.Failed || i.Status.Reason != "CgroupError" || !strings.Contains(i.Status.Message, "cannot set up the VM's cgroup") {
		t.Errorf("status %+v", i.Status)
	}
	if ents, _ := os.ReadDir(filepath.Join(td.d.st.Dir(), "run")); len(ents) != 0 {
		t.Errorf("sockets left: %v", ents)
	}
}

// A log past its limit is copied to .1 and cut; the writer's next
// O_APPEND write lands at the new end.
func TestRotateLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.log")
	w, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.Write(bytes.Repeat([]byte("a"), 2000))
	if rotated, err := rotateLog(path, 4096); rotated || err != nil {
		t.Fatalf("a log under the limit: %v, %v", rotated, err)
	}
	w.Write(bytes.Repeat([]byte("b"), 3000))
	if rotated, err := rotateLog(path, 4096); !rotated || err != nil {
		t.Fatalf("a log over the limit: %v, %v", rotated, err)
	}
	w.Write([]byte("after\n"))
	if b, _ := os.ReadFile(path); string(b) != "after\n" {
		t.Errorf("the log after rotation holds %d bytes: %.20q...", len(b), b)
	}
	if b, _ := os.ReadFile(path + ".1"); len(b) != 4096 || b[0] != 'a' || b[4095] != 'b' {
		t.Errorf("the rotated log holds %d bytes", len(b))
	}
}
