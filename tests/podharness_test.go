package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	dto "github.com/prometheus/client_model/go"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/pods/cgroup"
	"github.com/rayvmm/rayvmm/pods/client"
)

// The pods daemon end to end: a real rayvmmd (started as `rayvmm
// daemon`, in a network namespace of the test's own through nsenter, which
// unlike `ip netns exec` keeps the host's /sys and so its cgroups) runs
// real VM processes in real cgroups; the tests use the CLI and the
// daemon's API as a user would. Back-off times are scaled down
// (--backoff-scale); every wait has a deadline that names what it waited
// for.

// podWait bounds a wait for a pod's state; it catches a lost VM, it
// measures nothing.
const podWait = 2 * time.Minute

// backoffScale makes Kubernetes' back-off (10 s doubling to 300 s) 0.5 s
// doubling to 15 s.
const backoffScale = 0.05

var cgroupSeq atomic.Int32

// podDaemon is a rayvmm daemon a test runs, with its state directory,
// network namespace and cgroup parent.
type podDaemon struct {
	h        *host
	sock     string
	cgParent string
	cg       *cgroup.Manager
	proc     *proc
	c        *client.Client
	extra    []string
	// bin is the rayvmm it runs ("": the one under test), env what it
	// adds to the environment of the daemon and the CLI.
	bin string
	env []string
}

// startPodDaemon starts a daemon in a new namespace with network "lab"
// (192.0.2.0/24).
func startPodDaemon(t *testing.T, extra ...string) *podDaemon {
	t.Helper()
	return startPodDaemonAt(t, "", extra...)
}

// startPodDaemonAt is startPodDaemon with the API socket at sock ("": in
// the state directory).
func startPodDaemonAt(t *testing.T, sock string, extra ...string) *podDaemon {
	t.Helper()
	d := newPodDaemon(t, sock, extra...)
	d.start(t)
	return d
}

// newPodDaemon is startPodDaemonAt without the start.
func newPodDaemon(t *testing.T, sock string, extra ...string) *podDaemon {
	t.Helper()
	h := newHost(t)
	h.must(t, "net", "create", "lab", "--subnet", "192.0.2.0/24")
	if sock == "" {
		sock = filepath.Join(h.state, "d.sock")
	}
	d := &podDaemon{
		h:        h,
		sock:     sock,
		cgParent: fmt.Sprintf("rayvmm-test-%d-%d", os.Getpid(), cgroupSeq.Add(1)),
		extra:    extra,
	}
	var err error
	if d.cg, err = cgroup.Detect(d.cgParent); err != nil {
		t.Fatal(err)
	}
	if d.c, err = client.New("unix://" + d.sock); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.cleanup(t) })
	return d
}

// command runs rayvmm ARGS in the daemon's namespace (nsenter: the
// process keeps the host's /sys).
func (d *podDaemon) command(ctx context.Context, args ...string) *exec.Cmd {
	bin := rayvmm
	if d.bin != "" {
		bin = d.bin
	}
	full := append([]string{"--net=/run/netns/" + d.h.ns.Name, "--", bin, "--state-dir", d.h.state}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	cmd.Env = append(append(os.Environ(), client.EnvHost+"=unix://"+d.sock), d.env...)
	return cmd
}

// start runs `rayvmm daemon` (which execs rayvmmd) and waits until it
// serves.
func (d *podDaemon) start(t *testing.T) {
	t.Helper()
	args := append([]string{"daemon", "--socket", d.sock, "--cgroup-parent", d.cgParent,
		"--backoff-scale", strconv.FormatFloat(backoffScale, 'f', -1, 64)}, d.extra...)
	d.proc = startProc(t, d.command(context.Background(), args...))
	d.proc.out.waitFor(t, "rayvmmd: serving pods on", podWait)
}

// kill9 kills the daemon with SIGKILL and waits for it to be gone.
func (d *podDaemon) kill9(t *testing.T) {
	t.Helper()
	d.proc.cmd.Process.Signal(syscall.SIGKILL)
	d.proc.exited(t, "SIGKILL", time.Minute)
}

// pod runs rayvmm pod ARGS with stdin and returns the result.
func (d *podDaemon) pod(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	return runCommand(t, strings.NewReader(stdin), podWait, func(ctx context.Context) *exec.Cmd {
		return d.command(ctx, append([]string{"pod"}, args...)...)
	})
}

// podOK is pod that must succeed.
func (d *podDaemon) podOK(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	r := d.pod(t, stdin, args...)
	if r.code != 0 {
		t.Fatalf("rayvmm pod %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// apply applies a pod document through the CLI.
func (d *podDaemon) apply(t *testing.T, doc string) {
	t.Helper()
	d.podOK(t, doc, "apply", "-f", "-")
}

// info reads a pod through the API.
func (d *podDaemon) info(t *testing.T, name string) *pods.Info {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	i, err := d.c.Get(ctx, name)
	if err != nil {
		t.Fatalf("pod %s: %v", name, err)
	}
	return i
}

// waitFor polls a pod's state until cond holds; what names the wait.
func (d *podDaemon) waitFor(t *testing.T, name, what string, cond func(*pods.Info) bool) *pods.Info {
	t.Helper()
	deadline := time.Now().Add(podWait)
	var i *pods.Info
	for {
		i = d.info(t, name)
		if cond(i) {
			return i
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s: no %s within %v; phase %s, ready %s; events:\n%s\ndaemon:\n%s", name, what, podWait,
				i.Status.Phase, i.ReadyCount(), d.podOK(t, "", "events", name), d.proc.out.String())
		}
		time.Sleep(50 * time.Millisecond) // polling the daemon's API for a state change
	}
}

// waitReady waits for the Ready condition through the daemon's wait call.
func (d *podDaemon) waitReady(t *testing.T, name string) *pods.Info {
	t.Helper()
	i := d.waitFor(t, name, "Ready condition", func(i *pods.Info) bool { return i.Status.Ready() || i.Status.Phase == pods.Failed })
	if !i.Status.Ready() {
		t.Fatalf("pod %s failed before it was Ready: %s %s\n%s", name, i.Status.Reason, i.Status.Message, d.podOK(t, "", "events", name))
	}
	return i
}

// vm finds a VM's status.
func vmStatus(t *testing.T, i *pods.Info, vm string) pods.VMStatus {
	t.Helper()
	for _, v := range i.Status.VMs {
		if v.Name == vm {
			return v
		}
	}
	t.Fatalf("pod %s has no VM %s", i.Metadata.Name, vm)
	return pods.VMStatus{}
}

// events reads a pod's events through the API.
func (d *podDaemon) events(t *testing.T, name string) []pods.Event {
	t.Helper()
	ev, err := d.c.Events(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

// metrics scrapes the daemon's /metrics and parses it as Prometheus does.
func (d *podDaemon) metrics(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	b, err := d.c.Metrics(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, b)
	}
	return fams
}

// metricValue is the value of the sample of family name with labels
// (a subset), or -1 if there is none.
func metricValue(fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		}
	}
	return -1
}

// cleanup kills the daemon and every VM process in its cgroups, and
// removes the cgroups.
func (d *podDaemon) cleanup(t *testing.T) {
	if d.proc != nil {
		d.proc.kill()
	}
	d.c.Close()
	root := filepath.Join(cgroup.DefaultRoot, "pids", d.cgParent)
	podDirs, _ := os.ReadDir(root)
	var pids []int
	for _, pd := range podDirs {
		vmDirs, _ := os.ReadDir(filepath.Join(root, pd.Name()))
		for _, vd := range vmDirs {
			if !vd.IsDir() {
				continue
			}
			b, _ := os.ReadFile(filepath.Join(root, pd.Name(), vd.Name(), "cgroup.procs"))
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					syscall.Kill(pid, syscall.SIGKILL)
					pids = append(pids, pid)
				}
			}
		}
	}
	for _, pid := range pids {
		waitGone(t, pid, "a VM process killed at the test's end")
	}
	// A killed process leaves its cgroup a moment after it is gone from
	// /proc: retry the removal until it works.
	deadline := time.Now().Add(time.Minute)
	for {
		var err error
		for _, pd := range podDirs {
			err = errors.Join(err, d.cg.RemovePod(pd.Name()))
		}
		for _, c := range []string{"cpu", "cpuacct", "memory", "pids"} {
			if rerr := os.Remove(filepath.Join(cgroup.DefaultRoot, c, d.cgParent)); rerr != nil && !os.IsNotExist(rerr) {
				err = errors.Join(err, rerr)
			}
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("cgroups of the test left: %v", err)
			return
		}
		time.Sleep(10 * time.Millisecond) // waiting for the kernel to let the groups go
	}
}

// podDoc fills a pod template: {{name}} and the rest as given.
func podDoc(tmpl string, kv ...string) string {
	r := strings.NewReplacer(kv...)
	return r.Replace(tmpl)
}

var restartRE = regexp.MustCompile(`restarting VM (\S+) \(restart (\d+), after ([^)]+)\)`)
