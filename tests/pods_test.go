package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/seccap/forbidden"
)

const twoVMPod = `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  vms:
  - name: front
    cmdline: rayguest.run=serve rayguest.ip=192.0.2.10/24
    memory: 32M
    nets: [{network: lab}]
    resources: {limits: {cpu: 500m, memory: 64M, pids: 48}}
    readinessProbe: {udp: {port: 7}, periodSeconds: 1}
  - name: back
    cmdline: rayguest.run=serve rayguest.ip=192.0.2.11/24
    memory: 32M
    nets: [{network: lab}]
    readinessProbe: {udp: {port: 7}, periodSeconds: 1}
`

// 1, 5 and 8: a pod of two VMs reaches Running, then Ready once both
// readiness probes pass, and pod ps shows 2/2; the VM process's cgroup
// holds its limits and its pid; /metrics parses and shows the probes; a
// memory limit below guest memory is refused and makes nothing.
func TestPodReady(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	d.apply(t, twoVMPod)
	d.waitFor(t, "web", "phase Running", func(i *pods.Info) bool { return i.Status.Phase == pods.Running })
	i := d.waitReady(t, "web")
	ps := d.podOK(t, "", "ps")
	if !regexpMatch(`(?m)^web\s+2/2\s+Running\s+0\s`, ps) {
		t.Errorf("pod ps:\n%s", ps)
	}
	// Ready came after the readiness probes, in the events.
	ev := d.events(t, "web")
	for _, vm := range []string{"front", "back"} {
		if !slices.ContainsFunc(ev, func(e pods.Event) bool { return e.VM == vm && e.Reason == "Ready" }) {
			t.Errorf("no Ready event of %s: %+v", vm, ev)
		}
	}

	// The cgroup rayvmm/<pod>/<vm> of the daemon's parent.
	front := vmStatus(t, i, "front")
	if front.PID == 0 || front.Cgroup != d.cgParent+"/web/front" {
		t.Fatalf("front: %+v", front)
	}
	dirs := d.cg.Dirs(front.Cgroup)
	for file, want := range map[string]string{
		filepath.Join(dirs["cpu"], "cpu.cfs_quota_us"):         "50000",
		filepath.Join(dirs["cpu"], "cpu.cfs_period_us"):        "100000",
		filepath.Join(dirs["memory"], "memory.limit_in_bytes"): strconv.Itoa(64 << 20),
		filepath.Join(dirs["pids"], "pids.max"):                "48",
	} {
		if got := strings.TrimSpace(readFileT(t, file)); got != want {
			t.Errorf("%s = %q, want %q", file, got, want)
		}
	}
	for c, dir := range dirs {
		procs := strings.Fields(readFileT(t, filepath.Join(dir, "cgroup.procs")))
		if !slices.Contains(procs, strconv.Itoa(front.PID)) {
			t.Errorf("%s cgroup.procs = %v, lacks the VM process %d", c, procs, front.PID)
		}
	}
	back := vmStatus(t, i, "back")
	procs := strings.Fields(readFileT(t, filepath.Join(d.cg.Dirs(back.Cgroup)["memory"], "cgroup.procs")))
	if !slices.Contains(procs, strconv.Itoa(back.PID)) {
		t.Errorf("back's cgroup.procs = %v, lacks %d", procs, back.PID)
	}
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", front.PID)); exe != rayvmmVM {
		t.Errorf("the VM process is %s, want %s", exe, rayvmmVM)
	}
	if logs := d.podOK(t, "", "logs", "web", "--vm", "front"); !strings.Contains(logs, "rayguest: serving 192.0.2.10/24") {
		t.Errorf("pod logs:\n%s", logs)
	}

	// /metrics: the probes that made it Ready, its cgroup, its NIC.
	fams := d.metrics(t)
	for _, vm := range []string{"front", "back"} {
		l := map[string]string{"pod": "web", "vm": vm}
		if v := metricValue(fams, "rayvmm_pod_vm_probe_total", map[string]string{"pod": "web", "vm": vm, "probe": "readiness", "result": "success"}); v < 1 {
			t.Errorf("%s: readiness successes %v", vm, v)
		}
		if v := metricValue(fams, "rayvmm_pod_vm_ready", l); v != 1 {
			t.Errorf("%s: ready %v", vm, v)
		}
		if v := metricValue(fams, "rayvmm_pod_vm_restarts_total", l); v != 0 {
			t.Errorf("%s: restarts %v", vm, v)
		}
		if v := metricValue(fams, "rayvmm_pod_vm_cpu_seconds_total", l); v <= 0 {
			t.Errorf("%s: CPU seconds %v", vm, v)
		}
		if v := metricValue(fams, "rayvmm_net_rx_frames_total", map[string]string{"pod": "web", "vm": vm, "nic": "net0"}); v < 1 {
			t.Errorf("%s: NIC rx frames %v (scraped from the VM's API)", vm, v)
		}
	}
	if v := metricValue(fams, "rayvmm_pods", map[string]string{"phase": "Running"}); v != 1 {
		t.Errorf("pods Running: %v", v)
	}

	// A memory limit below guest memory plus the VMM's is refused at
	// apply, naming the field, and nothing is made.
	small := strings.NewReplacer("name: web,", "name: small,", "memory: 64M, pids", "memory: 40M, pids").Replace(twoVMPod)
	r := d.pod(t, small, "apply", "-f", "-")
	if r.code == 0 || !strings.Contains(r.stderr, "spec.vms[0].resources.limits.memory: 40M is less than the VM needs: guest memory 32M") {
		t.Errorf("apply of a too small memory limit: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(d.podOK(t, "", "ps"), "small") || d.cg.Exists("small", "") {
		t.Error("the refused pod was made")
	}
}

// 2. Always: a VM process killed with kill -9 is restarted and its
// restart count goes up; repeated kills wait a growing back-off (the
// first restart at once, then 10 s doubling, scaled by 0.05 here).
func TestPodRestartAlways(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	d.apply(t, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: crashy}
spec:
  restartPolicy: Always
  vms:
  - {name: vm, cmdline: rayguest.run=echo, memory: 16M}
`)
	running := func(n int32) func(*pods.Info) bool {
		return func(i *pods.Info) bool {
			v := i.Status.VMs[0]
			return v.RestartCount == n && v.State.Running != nil && v.PID != 0
		}
	}
	i := d.waitFor(t, "crashy", "the VM running", running(0))
	want := []time.Duration{0, 500 * time.Millisecond, time.Second}
	for n := range want {
		pid := i.Status.VMs[0].PID
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		i = d.waitFor(t, "crashy", fmt.Sprintf("restart %d", n+1), running(int32(n+1)))
		if i.Status.VMs[0].PID == pid {
			t.Fatalf("restart %d runs the killed pid %d", n+1, pid)
		}
		last := i.Status.VMs[0].LastState.Terminated
		if last == nil || last.ExitCode == nil || *last.ExitCode != 137 || last.Signal != 9 || last.Reason != pods.ReasonError {
			t.Errorf("restart %d: last state %+v", n+1, i.Status.VMs[0].LastState)
		}
	}
	// The back-off each restart waited: from its Terminated event to the
	// next Started one, at least the scaled Kubernetes delay, growing.
	ev := d.events(t, "crashy")
	var gaps []time.Duration
	var afters []string
	var endAt time.Time
	for _, e := range ev {
		switch e.Reason {
		case "Terminated":
			endAt = e.Time
		case "Started":
			if !endAt.IsZero() {
				gaps = append(gaps, e.Time.Sub(endAt))
				endAt = time.Time{}
			}
		case "Restarting":
			if m := restartRE.FindStringSubmatch(e.Message); m != nil {
				afters = append(afters, m[3])
			}
		}
	}
	if len(gaps) != len(want) || !slices.Equal(afters, []string{"0s", "500ms", "1s"}) {
		t.Fatalf("restarts waited %v (announced %v), want %d restarts after 0s, 500ms, 1s", gaps, afters, len(want))
	}
	for k, g := range gaps {
		if g < want[k] {
			t.Errorf("restart %d came %v after the kill, before its back-off of %v", k+1, g, want[k])
		}
	}
	if v := metricValue(d.metrics(t), "rayvmm_pod_vm_restarts_total", map[string]string{"pod": "crashy", "vm": "vm"}); v != 3 {
		t.Errorf("restarts metric %v, want 3", v)
	}
	if ps := d.podOK(t, "", "ps"); !regexpMatch(`(?m)^crashy\s+1/1\s+Running\s+3\s`, ps) {
		t.Errorf("pod ps:\n%s", ps)
	}
}

// 3. OnFailure restarts a crashing guest and leaves one that powered off
// Succeeded; Never restarts neither.
func TestPodOnFailureNever(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	doc := `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: NAME}
spec:
  restartPolicy: POLICY
  vms:
VMS`
	crash := "  - {name: crash, cmdline: rayguest.run=crash, memory: 16M}\n"
	off := "  - {name: halt, cmdline: rayguest.run=poweroff, memory: 16M}\n"
	d.apply(t, podDoc(doc, "NAME", "of-crash", "POLICY", "OnFailure", "VMS", crash))
	d.apply(t, podDoc(doc, "NAME", "of-off", "POLICY", "OnFailure", "VMS", off))
	d.apply(t, podDoc(doc, "NAME", "never", "POLICY", "Never", "VMS", crash+off))

	i := d.waitFor(t, "of-crash", "a restart of the crashed VM", func(i *pods.Info) bool { return i.Status.VMs[0].RestartCount >= 1 })
	if last := i.Status.VMs[0].LastState.Terminated; last == nil || last.ExitCode == nil || *last.ExitCode != 1 || !strings.Contains(last.Message, "triple fault") {
		t.Errorf("of-crash: last state %+v", i.Status.VMs[0].LastState)
	}
	i = d.waitFor(t, "of-off", "phase Succeeded", func(i *pods.Info) bool { return i.Status.Phase != pods.Running && i.Status.Phase != pods.Pending })
	v := i.Status.VMs[0]
	if i.Status.Phase != pods.Succeeded || v.RestartCount != 0 || v.State.Terminated == nil || !v.State.Terminated.Succeeded() || v.State.Terminated.Reason != pods.ReasonCompleted {
		t.Errorf("of-off: phase %s, VM %+v", i.Status.Phase, v)
	}
	i = d.waitFor(t, "never", "phase Failed", func(i *pods.Info) bool { return i.Status.Phase == pods.Failed || i.Status.Phase == pods.Succeeded })
	if i.Status.Phase != pods.Failed {
		t.Errorf("never: phase %s", i.Status.Phase)
	}
	for _, v := range i.Status.VMs {
		if v.RestartCount != 0 || v.State.Terminated == nil {
			t.Errorf("never: VM %+v", v)
		}
	}
	if c := vmStatus(t, i, "crash").State.Terminated; c == nil || c.Reason != pods.ReasonError || c.ExitCode == nil || *c.ExitCode != 1 {
		t.Errorf("never: crash %+v", c)
	}
	if o := vmStatus(t, i, "halt").State.Terminated; o == nil || o.Reason != pods.ReasonCompleted {
		t.Errorf("never: halt %+v", o)
	}
	ps := d.podOK(t, "", "ps")
	for _, re := range []string{`(?m)^of-off\s+0/1\s+Succeeded\s+0\s`, `(?m)^never\s+0/2\s+Error\s+0\s`} {
		if !regexpMatch(re, ps) {
			t.Errorf("pod ps lacks %s:\n%s", re, ps)
		}
	}
}

// 4. Probes: a failing liveness probe restarts its VM after
// failureThreshold x period; a failing readiness probe clears Ready and
// restarts nothing; the startup probe holds liveness back.
func TestPodProbes(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	doc := `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: NAME}
spec:
  vms:
  - name: vm
    cmdline: rayguest.run=serve rayguest.ip=IP/24
    memory: 16M
    nets: [{network: lab}]
PROBES`
	// UDP port 9 is not echoed: a probe of it always fails.
	d.apply(t, podDoc(doc, "NAME", "live", "IP", "192.0.2.20", "PROBES",
		"    livenessProbe: {udp: {port: 9}, periodSeconds: 1, failureThreshold: 2}\n"))
	d.apply(t, podDoc(doc, "NAME", "ready", "IP", "192.0.2.21", "PROBES",
		"    readinessProbe: {udp: {port: 7}, periodSeconds: 1, failureThreshold: 2}\n"))
	d.apply(t, podDoc(doc, "NAME", "gate", "IP", "192.0.2.22", "PROBES",
		"    startupProbe: {udp: {port: 9}, periodSeconds: 1, failureThreshold: 3}\n    livenessProbe: {udp: {port: 9}, periodSeconds: 1, failureThreshold: 1}\n"))

	// Liveness: restarted, no sooner than the threshold's failures allow.
	i := d.waitFor(t, "live", "a liveness restart", func(i *pods.Info) bool { return i.Status.VMs[0].RestartCount >= 1 })
	last := i.Status.VMs[0].LastState.Terminated
	if last == nil || !strings.Contains(last.Message, "liveness probe failed") {
		t.Fatalf("live: last state %+v", i.Status.VMs[0].LastState)
	}
	if ran := last.FinishedAt.Sub(last.StartedAt); ran < time.Second {
		t.Errorf("live: killed %v after its start, before 2 failures 1 s apart", ran)
	}

	// Readiness: Ready, then the guest's TAP goes down: not Ready, same
	// process, no restart; up again: Ready again.
	i = d.waitReady(t, "ready")
	pid := i.Status.VMs[0].PID
	tap := d.tapOf(t, "ready.vm")
	d.h.ns.MustRun(t, "ip", "link", "set", tap, "down")
	i = d.waitFor(t, "ready", "Ready cleared", func(i *pods.Info) bool { return !i.Status.Ready() })
	if v := i.Status.VMs[0]; v.PID != pid || v.RestartCount != 0 || v.State.Running == nil || i.Status.Phase != pods.Running {
		t.Errorf("ready: after failed readiness: phase %s, VM %+v (pid was %d)", i.Status.Phase, v, pid)
	}
	if !slices.ContainsFunc(d.events(t, "ready"), func(e pods.Event) bool { return e.Reason == "NotReady" }) {
		t.Error("ready: no NotReady event")
	}
	d.h.ns.MustRun(t, "ip", "link", "set", tap, "up")
	i = d.waitReady(t, "ready")
	if v := i.Status.VMs[0]; v.PID != pid || v.RestartCount != 0 {
		t.Errorf("ready: after readiness came back: VM %+v (pid was %d)", v, pid)
	}

	// Startup gates liveness: the startup probe fails 3 times and
	// restarts the VM; liveness (which would fail at once) never ran.
	i = d.waitFor(t, "gate", "a startup restart", func(i *pods.Info) bool { return i.Status.VMs[0].RestartCount >= 1 })
	if last := i.Status.VMs[0].LastState.Terminated; last == nil || !strings.Contains(last.Message, "startup probe failed") {
		t.Errorf("gate: last state %+v", i.Status.VMs[0].LastState)
	}
	fams := d.metrics(t)
	if v := metricValue(fams, "rayvmm_pod_vm_probe_total", map[string]string{"pod": "gate", "probe": "liveness"}); v > 0 {
		t.Errorf("gate: liveness ran %v times before startup succeeded", v)
	}
	if v := metricValue(fams, "rayvmm_pod_vm_probe_total", map[string]string{"pod": "gate", "probe": "startup", "result": "failure"}); v < 3 {
		t.Errorf("gate: startup failures %v, want at least 3", v)
	}
	if v := metricValue(fams, "rayvmm_pod_vm_probe_total", map[string]string{"pod": "live", "probe": "liveness", "result": "failure"}); v < 2 {
		t.Errorf("live: liveness failures %v, want at least 2", v)
	}
}

// vsockEcho connects to a guest port through a VM's hybrid vsock socket
// and checks that msg comes back (rayguest.run=vsock-echo, port 52). The
// guest runs under the instruction emulator: the deadline is generous.
func vsockEcho(uds string, port int, msg string) error {
	c, err := net.DialTimeout("unix", uds, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return err
	}
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		return fmt.Errorf("CONNECT %d: %q, %v", port, line, err)
	}
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return err
	}
	back, err := r.ReadString('\n')
	if err != nil || back != msg+"\n" {
		return fmt.Errorf("echo %q, %v; want %q", back, err, msg)
	}
	return nil
}

// TestPodVsockProbes: probes over the VM's hybrid vsock socket against
// rayguest's health responder, which stops answering failafter seconds
// after it started: liveness restarts the VM failureThreshold x period
// later; readiness clears Ready and restarts nothing.
func TestPodVsockProbes(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	doc := `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: NAME}
spec:
  vms:
  - name: vm
    cmdline: rayguest.run=vsock-echo rayguest.health=53 rayguest.health.failafter=3
    memory: 16M
    vsock: {cid: 3}
    PROBE: {vsock: {port: 53}, periodSeconds: 1, failureThreshold: 2}
`
	d.apply(t, podDoc(doc, "NAME", "vlive", "PROBE", "livenessProbe"))
	d.apply(t, podDoc(doc, "NAME", "vready", "PROBE", "readinessProbe"))

	i := d.waitFor(t, "vlive", "a liveness restart", func(i *pods.Info) bool { return i.Status.VMs[0].RestartCount >= 1 })
	last := i.Status.VMs[0].LastState.Terminated
	if last == nil || !strings.Contains(last.Message, "liveness probe failed") {
		t.Fatalf("vlive: last state %+v", i.Status.VMs[0].LastState)
	}
	// Healthy for 3 s, then 2 failures 1 s apart.
	if ran := last.FinishedAt.Sub(last.StartedAt); ran < 4*time.Second {
		t.Errorf("vlive: killed %v after its start; health answers for 3 s, then 2 failures 1 s apart", ran)
	}
	fams := d.metrics(t)
	if v := metricValue(fams, "rayvmm_pod_vm_probe_total", map[string]string{"pod": "vlive", "probe": "liveness", "result": "success"}); v < 1 {
		t.Errorf("vlive: liveness successes %v: the probe never passed", v)
	}

	// Ready once health answers, then cleared when it stops (both may
	// have happened while the liveness half ran: the events tell).
	i = d.waitFor(t, "vready", "Ready, then cleared once health stops", func(i *pods.Info) bool {
		ev := d.events(t, "vready")
		ready := slices.IndexFunc(ev, func(e pods.Event) bool { return e.Reason == "Ready" })
		return ready >= 0 && slices.ContainsFunc(ev[ready:], func(e pods.Event) bool { return e.Reason == "NotReady" }) && !i.Status.Ready()
	})
	if v := i.Status.VMs[0]; v.RestartCount != 0 || v.State.Running == nil || slices.ContainsFunc(d.events(t, "vready"), func(e pods.Event) bool { return e.Reason == "Terminated" }) {
		t.Errorf("vready: after failed readiness: VM %+v", v)
	}
	// The guest itself still runs: its vsock echo answers.
	if err := vsockEcho(i.Status.VMs[0].VsockSocket, 52, "alive"); err != nil {
		t.Errorf("vready: %v", err)
	}
}

// tapOf finds the TAP of a VM (pod.vm) by the alias rayvmm gives it.
func (d *podDaemon) tapOf(t *testing.T, vm string) string {
	t.Helper()
	out := d.h.ns.MustRun(t, "ip", "-o", "link", "show")
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "vm="+vm+" ") {
			if f := strings.Fields(line); len(f) > 1 {
				return strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0]
			}
		}
	}
	t.Fatalf("no TAP of VM %s in:\n%s", vm, out)
	return ""
}

// udpEcho sends a datagram to a serving guest from the daemon's
// namespace and reports whether it came back.
func (d *podDaemon) udpEcho(t *testing.T, addr string) error {
	t.Helper()
	return d.h.ns.Do(func() error {
		c, err := net.Dial("udp4", addr+":7")
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("still there?")); err != nil {
			return err
		}
		b := make([]byte, 64)
		n, err := c.Read(b)
		if err != nil {
			return err
		}
		if string(b[:n]) != "still there?" {
			return fmt.Errorf("echo %q", b[:n])
		}
		return nil
	})
}

// 6. A kill -9 of the daemon leaves its VMs running (a guest still
// answers); a second daemon on the state directory is refused; after a
// restart pod ps is the same, probes resume and a later VM kill is
// restarted; VMs that ended while no daemon ran are reported with the
// status their process recorded (or Unknown) and restarted.
func TestPodDaemonKill9(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	d.apply(t, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: keep}
spec:
  vms:
  - name: a
    cmdline: rayguest.run=serve rayguest.ip=192.0.2.30/24
    memory: 16M
    nets: [{network: lab}]
    readinessProbe: {udp: {port: 7}, periodSeconds: 1}
  - {name: b, cmdline: rayguest.run=vsock-echo, memory: 16M, vsock: {cid: 3}}
`)
	before := d.waitReady(t, "keep")
	uds := vmStatus(t, before, "b").VsockSocket
	if err := vsockEcho(uds, 52, "before"); err != nil {
		t.Fatalf("vsock echo before the daemon's kill: %v", err)
	}
	psBefore := psColumns(d.podOK(t, "", "ps"))
	pids := map[string]int{}
	for _, v := range before.Status.VMs {
		pids[v.Name] = v.PID
	}

	d.kill9(t)
	for vm, pid := range pids {
		if !alive(pid) {
			t.Fatalf("VM %s (pid %d) died with the daemon", vm, pid)
		}
	}
	if err := d.udpEcho(t, "192.0.2.30"); err != nil {
		t.Fatalf("the guest does not answer with the daemon gone: %v", err)
	}
	if err := vsockEcho(uds, 52, "the daemon is gone"); err != nil {
		t.Fatalf("the vsock echo does not answer with the daemon gone: %v", err)
	}
	d.start(t)
	// A second daemon on the same state directory is refused.
	r := runCommand(t, nil, time.Minute, func(ctx context.Context) *exec.Cmd {
		return d.command(ctx, "daemon", "--socket", filepath.Join(d.h.state, "second.sock"), "--cgroup-parent", d.cgParent)
	})
	if r.code == 0 || !strings.Contains(r.stderr, "another rayvmm daemon serves this state directory (pid ") {
		t.Errorf("a second daemon: exit %d\n%s", r.code, r.stderr)
	}
	after := d.info(t, "keep")
	if got := psColumns(d.podOK(t, "", "ps")); got != psBefore {
		t.Errorf("pod ps after the restart:\n%s\nbefore:\n%s", got, psBefore)
	}
	for _, v := range after.Status.VMs {
		if v.PID != pids[v.Name] || v.RestartCount != 0 || v.State.Running == nil {
			t.Errorf("after the restart VM %s: %+v, want pid %d running", v.Name, v, pids[v.Name])
		}
	}
	// Adoption runs beside the API (it asks each VM's API who it is):
	// wait for its event.
	d.waitFor(t, "keep", "VM a's Adopted event", func(*pods.Info) bool {
		return slices.ContainsFunc(d.events(t, "keep"), func(e pods.Event) bool { return e.Reason == "Adopted" && e.VM == "a" })
	})
	// Probes resume: this daemon's own readiness successes.
	deadline := time.Now().Add(podWait)
	for metricValue(d.metrics(t), "rayvmm_pod_vm_probe_total", map[string]string{"pod": "keep", "vm": "a", "probe": "readiness", "result": "success"}) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("no readiness probe after the restart within %v", podWait)
		}
		time.Sleep(50 * time.Millisecond) // polling /metrics for the first probe
	}
	// A later kill of a VM is restarted by the new daemon.
	syscall.Kill(pids["a"], syscall.SIGKILL)
	i := d.waitFor(t, "keep", "VM a restarted", func(i *pods.Info) bool {
		v := i.Status.VMs[0]
		return v.RestartCount == 1 && v.State.Running != nil && v.PID != pids["a"]
	})
	pids["a"] = i.Status.VMs[0].PID

	// A clean stop (SIGTERM) of the daemon leaves the VMs running too, as
	// stopping containerd leaves containers to their shims.
	d.proc.cmd.Process.Signal(syscall.SIGTERM)
	if err := d.proc.exited(t, "SIGTERM", time.Minute); err != nil {
		t.Errorf("the daemon's exit after SIGTERM: %v\n%s", err, d.proc.out.String())
	}
	for vm, pid := range pids {
		if !alive(pid) {
			t.Fatalf("VM %s (pid %d) stopped with the daemon's SIGTERM", vm, pid)
		}
	}
	d.start(t)
	d.waitFor(t, "keep", "both VMs adopted after a clean stop", func(i *pods.Info) bool {
		return i.Status.VMs[0].PID == pids["a"] && i.Status.VMs[1].PID == pids["b"] && i.Status.Ready()
	})

	// VMs that end while no daemon runs: b stops cleanly (SIGTERM: its
	// outcome says status 0), a is killed (no outcome: Unknown).
	d.kill9(t)
	syscall.Kill(pids["b"], syscall.SIGTERM)
	syscall.Kill(pids["a"], syscall.SIGKILL)
	waitGone(t, pids["a"], "VM a, killed")
	waitGone(t, pids["b"], "VM b, stopped with SIGTERM")
	d.start(t)
	i = d.waitFor(t, "keep", "both VMs restarted", func(i *pods.Info) bool {
		return i.Status.VMs[0].RestartCount == 2 && i.Status.VMs[1].RestartCount == 1 && i.Status.VMs[0].State.Running != nil && i.Status.VMs[1].State.Running != nil
	})
	if err := vsockEcho(vmStatus(t, i, "b").VsockSocket, 52, "after"); err != nil {
		t.Errorf("vsock echo of the restarted VM: %v", err)
	}
	if lb := vmStatus(t, i, "b").LastState.Terminated; lb == nil || lb.ExitCode == nil || *lb.ExitCode != 0 || lb.Reason != pods.ReasonCompleted || !strings.Contains(lb.Message, "received terminated") {
		t.Errorf("b ended while the daemon was down: last state %+v", vmStatus(t, i, "b").LastState)
	}
	if la := vmStatus(t, i, "a").LastState.Terminated; la == nil || la.ExitCode != nil || la.Reason != pods.ReasonUnknown {
		t.Errorf("a was killed while the daemon was down: last state %+v", vmStatus(t, i, "a").LastState)
	}
}

// psColumns drops pod ps's AGE column.
func psColumns(ps string) string {
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(ps), "\n") {
		f := strings.Fields(l)
		if len(f) > 1 {
			f = f[:len(f)-1]
		}
		out = append(out, strings.Join(f, " "))
	}
	return strings.Join(out, "\n")
}

func readFileT(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// 7. Cleanup: a running pod is not removed without --force; pod stop
// leaves no VM process, TAP, bridge port, cgroup, socket or lock behind,
// and pod rm no pod volume (but the retained one), cgroup directory or
// file of the pod.
func TestPodCleanup(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	h := d.h
	h.must(t, "volume", "create", "base", "--size", "4M")
	h.must(t, "volume", "snapshot", "base", "golden")
	d.apply(t, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: tidy}
spec:
  volumes: [{name: data, from: golden}, {name: keep, from: golden, retain: true}]
  vms:
  - name: a
    cmdline: rayguest.run=serve rayguest.ip=192.0.2.40/24
    memory: 16M
    nets: [{network: lab}]
    disks: [{volume: data}]
  - name: b
    cmdline: rayguest.run=echo
    memory: 16M
    nets: [{network: lab}]
    disks: [{volume: keep, readOnly: true}]
`)
	i := d.waitReady(t, "tidy")
	var pids []int
	for _, v := range i.Status.VMs {
		pids = append(pids, v.PID)
	}
	bridgePorts := func() []string {
		out := strings.TrimSpace(h.ns.MustRun(t, "ip", "-o", "link", "show", "master", "rv-lab"))
		if out == "" {
			return nil
		}
		return strings.Split(out, "\n")
	}
	runDir := filepath.Join(h.state, "run")
	sockets := func() []string {
		ents, _ := os.ReadDir(runDir)
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	locks := func() []string {
		m, _ := filepath.Glob(filepath.Join(h.state, "*", "*.lock"))
		// Not the daemon's own, nor networks/.lock, which orders network
		// changes and stays.
		return slices.DeleteFunc(m, func(p string) bool { return strings.HasSuffix(p, "daemon.lock") || filepath.Base(p) == ".lock" })
	}
	// What a running pod holds, so that its absence below means something.
	if n := len(h.taps(t)); n != 2 {
		t.Fatalf("%d TAPs for 2 VMs: %v", n, h.taps(t))
	}
	if n := len(bridgePorts()); n != 2 {
		t.Fatalf("bridge ports: %v", bridgePorts())
	}
	if !d.cg.Exists("tidy", "a") || !d.cg.Exists("tidy", "b") {
		t.Fatal("no cgroups while the pod runs")
	}
	if n := len(sockets()); n != 2 {
		t.Fatalf("sockets: %v", sockets())
	}
	if got := inspect(t, h.state, "tidy-data").State; got != "attached" {
		t.Fatalf("pod volume tidy-data is %s while its VM runs", got)
	}
	if len(locks()) == 0 {
		t.Fatal("no lock files while the pod runs")
	}

	r := d.pod(t, "", "rm", "tidy")
	if r.code == 0 || !strings.Contains(r.stderr, "pod tidy is running: stop it first, or rm --force") {
		t.Fatalf("rm of a running pod: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	for _, pid := range pids {
		if !alive(pid) {
			t.Fatalf("the refused rm stopped VM process %d", pid)
		}
	}

	if out := d.podOK(t, "", "stop", "tidy"); !strings.Contains(out, "pod/tidy stopped (Succeeded)") {
		t.Errorf("pod stop: %s", out)
	}
	for _, pid := range pids {
		waitGone(t, pid, "a VM process after pod stop")
	}
	if taps := h.taps(t); len(taps) != 0 {
		t.Errorf("TAPs after stop: %v", taps)
	}
	if p := bridgePorts(); len(p) != 0 {
		t.Errorf("bridge ports after stop: %v", p)
	}
	if d.cg.Exists("tidy", "a") || d.cg.Exists("tidy", "b") {
		t.Error("VM cgroups after stop")
	}
	if s := sockets(); len(s) != 0 {
		t.Errorf("sockets after stop: %v", s)
	}
	if l := locks(); len(l) != 0 {
		t.Errorf("lock files after stop: %v", l)
	}
	for _, v := range []string{"tidy-data", "tidy-keep"} {
		if got := inspect(t, h.state, v).State; got != "available" {
			t.Errorf("volume %s is %s after stop", v, got)
		}
	}

	if out := d.podOK(t, "", "rm", "tidy"); !strings.Contains(out, "pod/tidy removed") {
		t.Errorf("pod rm: %s", out)
	}
	if ps := d.podOK(t, "", "ps"); strings.Contains(ps, "tidy") {
		t.Errorf("pod ps after rm:\n%s", ps)
	}
	vols := h.must(t, "volume", "list")
	if strings.Contains(vols, "tidy-data") || !strings.Contains(vols, "tidy-keep") {
		t.Errorf("volumes after rm (tidy-data goes, retained tidy-keep stays):\n%s", vols)
	}
	if d.cg.Exists("tidy", "") {
		t.Error("the pod's cgroup directory after rm")
	}
	if _, err := os.Stat(filepath.Join(h.state, "pods", "tidy")); !os.IsNotExist(err) {
		t.Errorf("the pod's log directory after rm: %v", err)
	}
	if r := d.pod(t, "", "inspect", "tidy"); r.code == 0 || !strings.Contains(r.stderr, "no such pod: tidy") {
		t.Errorf("inspect after rm: exit %d %s", r.code, r.stderr)
	}
}

// 7 and 9. Bad input: spec errors answer 400 naming the field and make
// nothing; a missing network or snapshot makes the pod Failed with that
// reason and leaks nothing; requests for missing pods are answered on
// their own.
func TestPodBadInput(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	for _, tt := range []struct{ doc, want string }{
		{"apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: bad}\nspec: {vms: [{name: a, colour: red}]}", "spec.vms[0].colour: unknown field"},
		{"apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: bad}\nspec: {vms: [{name: a, livenessProbe: {exec: {command: [true]}}}]}", "spec.vms[0].livenessProbe.exec: exec probes are not supported"},
		{"apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: bad}\nspec: {restartPolicy: Sometimes, vms: [{name: a}]}", "spec.restartPolicy"},
		{"apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: Bad}\nspec: {vms: [{name: a}]}", "metadata.name"},
		{"{", "not valid YAML"},
	} {
		r := d.pod(t, tt.doc, "apply", "-f", "-")
		if r.code == 0 || !strings.Contains(r.stderr, tt.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 {
			t.Errorf("apply %q: exit %d, stderr %q, want one line with %q", tt.doc, r.code, r.stderr, tt.want)
		}
	}
	if ps := d.podOK(t, "", "ps"); strings.Count(strings.TrimSpace(ps), "\n") != 0 {
		t.Errorf("a refused spec made a pod:\n%s", ps)
	}

	d.apply(t, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: nonet}
spec:
  vms:
  - {name: a, cmdline: rayguest.run=echo, memory: 16M}
  - {name: b, cmdline: rayguest.run=echo, memory: 16M, nets: [{network: nope}]}
`)
	d.apply(t, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: nosnap}
spec:
  volumes: [{name: data, from: nosuchsnap}]
  vms: [{name: a, cmdline: rayguest.run=echo, memory: 16M, disks: [{volume: data}]}]
`)
	for pod, reason := range map[string]string{"nonet": "NetworkNotFound", "nosnap": "VolumeNotFound"} {
		// Failed, and every VM terminated: a VM whose launch was under
		// way when the pod failed ends (and is cleaned up) after it.
		i := d.waitFor(t, pod, "phase Failed, every VM terminated", func(i *pods.Info) bool {
			return i.Status.Phase == pods.Failed && !slices.ContainsFunc(i.Status.VMs, func(v pods.VMStatus) bool { return v.PID != 0 || v.State.Terminated == nil })
		})
		if i.Status.Reason != reason {
			t.Errorf("%s: reason %q (%s), want %s", pod, i.Status.Reason, i.Status.Message, reason)
		}
		for _, v := range i.Status.VMs {
			if d.cg.Exists(pod, v.Name) {
				t.Errorf("%s: cgroup of VM %s left", pod, v.Name)
			}
		}
	}
	if taps := d.h.taps(t); len(taps) != 0 {
		t.Errorf("TAPs left by failed pods: %v", taps)
	}
	if ents, _ := os.ReadDir(filepath.Join(d.h.state, "run")); len(ents) != 0 {
		t.Errorf("sockets left by failed pods: %v", ents)
	}
	if vols := d.h.must(t, "volume", "list"); strings.Contains(vols, "nosnap-data") {
		t.Errorf("a pod volume from a missing snapshot:\n%s", vols)
	}
	for _, args := range [][]string{{"inspect", "ghost"}, {"stop", "ghost"}, {"rm", "ghost"}, {"logs", "nonet", "--vm", "zz"}, {"inspect", "BAD/../x"}} {
		if r := d.pod(t, "", args...); r.code == 0 || r.stderr == "" {
			t.Errorf("pod %v: exit %d %q", args, r.code, r.stderr)
		}
	}
	// The daemon still answers.
	d.podOK(t, "", "ps")
}

// The socket is mode 0660 in --socket-group's group: a user in that group
// reaches the daemon, who applies a pod is its owner (SO_PEERCRED), and a
// user outside it is refused by the kernel. The users are uids without
// names, made by setpriv; the policy lets the member run pods.
func TestPodSocketGroup(t *testing.T) {
	t.Parallel()
	requireTool(t, "setpriv")
	const member, stranger = "64123", "64124"
	dir, cli := userCLI(t)
	policy := writePolicy(t, dir, `rules: [{name: member-pods, effect: allow, subjects: ["user:64123"], actions: ["*"], objects: [{kind: pod}]}]`)
	sock := filepath.Join(dir, "d.sock")
	d := startPodDaemonAt(t, sock, "--socket-group", member, "--policy", policy)
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 || st.Sys().(*syscall.Stat_t).Gid != 64123 {
		t.Errorf("socket mode %v gid %d, want 0660 gid %s", st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Gid, member)
	}
	as := func(uid string, stdin string, args ...string) result {
		return asUser(t, cli, sock, uid, nil, stdin, args...)
	}
	if r := as(member, "apply", "apply", "-f", "-"); r.code == 0 {
		t.Fatal("apply of a stdin that says apply succeeded")
	}
	r := as(member, "apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: mine}\nspec: {vms: [{name: a, cmdline: rayguest.run=echo, memory: 16M}]}\n", "apply", "-f", "-")
	if r.code != 0 {
		t.Fatalf("apply by a member of the socket's group: exit %d %s", r.code, r.stderr)
	}
	if i := d.info(t, "mine"); i.Owner.UID != 64123 || i.Owner.GID != 64123 {
		t.Errorf("owner %+v, want uid and gid %s", i.Owner, member)
	}
	if r := as(member, "", "ps"); r.code != 0 || !strings.Contains(r.stdout, "mine") {
		t.Errorf("ps by a member: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	r = as(stranger, "", "ps")
	if r.code == 0 || !strings.Contains(r.stderr, "permission denied") {
		t.Errorf("ps by a user outside the group: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	d.podOK(t, "", "rm", "--force", "mine")
}

// A pod VM whose VM process the sandbox kills (a seccaptest rayvmm-vm
// that calls execve) is reported Terminated with the one line naming the
// call and its SIGSYS exit code, is handled by its restart policy, and
// the daemon records a critical vm.sandbox-kill.
func TestPodSandboxKill(t *testing.T) {
	t.Parallel()
	d := startSeccaptestDaemon(t, "execve")
	d.apply(t, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: jailbreak}
spec:
  restartPolicy: Never
  vms: [{name: vm, cmdline: rayguest.run=echo, memory: 16M}]
`)
	const line = "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)"
	i := d.waitFor(t, "jailbreak", "phase Failed", func(i *pods.Info) bool { return i.Status.Phase == pods.Failed })
	vs := vmStatus(t, i, "vm")
	if term := vs.State.Terminated; term == nil || term.Message != line || term.ExitCode == nil || *term.ExitCode != 128+int(syscall.SIGSYS) || vs.RestartCount != 0 {
		t.Errorf("VM status %+v (terminated %+v), want terminated with %q, exit code 159, no restart", vs, vs.State.Terminated, line)
	}
	// Stopping the daemon waits for its records.
	d.proc.cmd.Process.Signal(syscall.SIGTERM)
	d.proc.exited(t, "SIGTERM", time.Minute)
	var found bool
	for _, r := range auditRecords(t, d.h.state) {
		if r.Action == audit.VMSandboxKill {
			found = true
			if r.Level != audit.Critical || r.Result != line || r.Object.Name != "jailbreak.vm" || r.Params["pod"] != "jailbreak" {
				t.Errorf("vm.sandbox-kill record: %+v", r)
			}
		}
	}
	if !found {
		t.Error("no vm.sandbox-kill record")
	}
}

// TestPodSandboxKillAdopted: the sandbox's report outlives the daemon
// that launched the VM. Two pods' VMs make a forbidden call (execve) when
// they get SIGUSR2. The daemon is killed with SIGKILL; one VM is signalled
// while no daemon runs, the other once a new daemon has re-adopted it.
// Neither is the new daemon's child, so it has no wait status for them,
// yet both end as killed by the sandbox naming the call, each with its
// critical vm.sandbox-kill record.
func TestPodSandboxKillAdopted(t *testing.T) {
	t.Parallel()
	d := startSeccaptestDaemon(t, "execve@sigusr2")
	pids := map[string]int{}
	for _, name := range []string{"away", "adopted"} {
		d.apply(t, fmt.Sprintf(`apiVersion: rayvmm/v1
kind: Pod
metadata: {name: %s}
spec:
  restartPolicy: Never
  vms: [{name: vm, cmdline: rayguest.run=echo, memory: 16M}]
`, name))
		i := d.waitFor(t, name, "VM running", func(i *pods.Info) bool {
			v := i.Status.VMs[0]
			return v.State.Running != nil && v.PID > 0
		})
		pids[name] = i.Status.VMs[0].PID
	}
	const line = "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)"
	sandboxKilled := func(i *pods.Info) bool {
		term := vmStatus(t, i, "vm").State.Terminated
		return i.Status.Phase == pods.Failed && term != nil && term.Message == line && term.ExitCode != nil && *term.ExitCode == 128+int(syscall.SIGSYS)
	}

	d.kill9(t)
	syscall.Kill(pids["away"], syscall.SIGUSR2)
	deadline := time.Now().Add(podWait)
	for alive(pids["away"]) {
		if time.Now().After(deadline) {
			t.Fatalf("VM process %d still runs %v after SIGUSR2 asked it for execve", pids["away"], podWait)
		}
		time.Sleep(20 * time.Millisecond) // polling for the process to end
	}
	d.start(t)
	i := d.waitFor(t, "away", "the sandbox kill while the daemon was down", func(i *pods.Info) bool { return i.Status.Phase == pods.Failed })
	if !sandboxKilled(i) {
		t.Errorf("pod away: %+v, want Failed with %q, exit code 159", vmStatus(t, i, "vm").State.Terminated, line)
	}
	d.waitFor(t, "adopted", "the VM's Adopted event", func(*pods.Info) bool {
		return slices.ContainsFunc(d.events(t, "adopted"), func(e pods.Event) bool { return e.Reason == "Adopted" })
	})
	syscall.Kill(pids["adopted"], syscall.SIGUSR2)
	i = d.waitFor(t, "adopted", "the sandbox kill after adoption", func(i *pods.Info) bool { return i.Status.Phase == pods.Failed })
	if !sandboxKilled(i) {
		t.Errorf("pod adopted: %+v, want Failed with %q, exit code 159", vmStatus(t, i, "vm").State.Terminated, line)
	}

	// Stopping the daemon waits for its records.
	d.proc.cmd.Process.Signal(syscall.SIGTERM)
	d.proc.exited(t, "SIGTERM", time.Minute)
	found := map[string]bool{}
	for _, r := range auditRecords(t, d.h.state) {
		if r.Action == audit.VMSandboxKill {
			found[r.Object.Name] = true
			if r.Level != audit.Critical || r.Result != line {
				t.Errorf("vm.sandbox-kill record: %+v", r)
			}
		}
	}
	if !found["away.vm"] || !found["adopted.vm"] {
		t.Errorf("vm.sandbox-kill records for %v, want away.vm and adopted.vm", found)
	}
}

// startSeccaptestDaemon starts a daemon whose VM processes are a
// seccaptest build asked for the forbidden call request (forbidden.Env).
func startSeccaptestDaemon(t *testing.T, request string) *podDaemon {
	t.Helper()
	d := newPodDaemon(t, "")
	d.bin = seccaptestRayvmm(t)
	d.env = []string{forbidden.Env + "=" + request}
	d.start(t)
	return d
}

// userCLI copies the CLI where other users may run it, into a directory
// they may enter, which can also hold the daemon's socket.
func userCLI(t *testing.T) (dir, cli string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "rvsock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	cli = filepath.Join(dir, "rayvmm")
	copyFile(t, rayvmm, cli)
	return dir, cli
}

// writePolicy writes an access policy file into dir.
func writePolicy(t *testing.T, dir, text string) string {
	t.Helper()
	f := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(f, []byte(text+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// asUser runs "rayvmm pod ARGS" against the daemon at sock as uid (its
// gid the same number) with exactly the supplementary groups given,
// through setpriv: the daemon knows the caller only from the kernel.
func asUser(t *testing.T, cli, sock, uid string, groups []string, stdin string, args ...string) result {
	t.Helper()
	return runCommand(t, strings.NewReader(stdin), podWait, func(ctx context.Context) *exec.Cmd {
		full := []string{"--reuid", uid, "--regid", uid}
		if len(groups) == 0 {
			full = append(full, "--clear-groups")
		} else {
			full = append(full, "--groups", strings.Join(groups, ","))
		}
		full = append(full, cli, "pod", "--host", "unix://"+sock)
		return exec.CommandContext(ctx, "setpriv", append(full, args...)...)
	})
}

// The access policy with real uids (setpriv) through the CLI: the daemon
// knows each caller from SO_PEERCRED and SO_PEERGROUPS, and the policy
// decides. An allowed user applies a pod that runs and is its owner; a
// read up, a write down and a deny rule that beats an allow are each a
// 403 naming the rule or check, and leave no pod, process, cgroup, TAP or
// volume attachment behind; ps lists only what the caller may inspect;
// SIGHUP reloads the policy and changes the answer, a file that does not
// parse is refused on SIGHUP and the old policy stays in force; every
// decision and both reloads are in the audit log.
func TestPodPolicy(t *testing.T) {
	t.Parallel()
	requireTool(t, "setpriv")
	requireTool(t, "curl")
	const (
		alice    = "64401" // confidential through group 64410
		bob      = "64402" // internal
		stranger = "64403" // no clearance, no rules
		sockGrp  = "64400"
	)
	team := []string{sockGrp, "64410"}
	dir, cli := userCLI(t)
	const allowTeam = `subjects:
  users: {"64402": internal}
  groups: {"64410": confidential}
objects:
  - {kind: volume, name: "conf-*", classification: confidential}
rules:
  - name: team-pods
    effect: allow
    subjects: ["group:64410", "user:64402"]
    actions: [create, run, inspect, delete]
    objects: [{kind: pod}]
  - name: team-resources
    effect: allow
    subjects: ["group:64410", "user:64402"]
    actions: [attach-ro, attach-rw, join, clone, create]
    objects: [{kind: volume}, {kind: network}]
`
	policy := writePolicy(t, dir, allowTeam+`  - name: bob-keeps-pods
    effect: deny
    subjects: ["user:64402"]
    actions: [delete]
    objects: [{kind: pod}]`)
	sock := filepath.Join(dir, "d.sock")
	d := startPodDaemonAt(t, sock, "--socket-group", sockGrp, "--policy", policy)
	h := d.h
	h.must(t, "volume", "create", "conf-data", "--size", "1M")
	h.must(t, "volume", "create", "plain", "--size", "1M")
	h.must(t, "volume", "snapshot", "plain", "golden")
	as := func(uid string, groups []string, stdin string, args ...string) result {
		return asUser(t, cli, sock, uid, groups, stdin, args...)
	}
	doc := func(name, disk, nets string) string {
		return podDoc(`apiVersion: rayvmm/v1
kind: Pod
metadata: {name: {{name}}}
spec:
  vms:
  - name: vm
    cmdline: rayguest.run=echo
    memory: 16M
    nets: [{{nets}}]
    disks: [{{disk}}]
`, "{{name}}", name, "{{disk}}", disk, "{{nets}}", nets)
	}
	// denied checks a 403 naming what decided, and that the pod left
	// nothing: no record, no cgroup, no TAP, the volumes free.
	denied := func(r result, pod, want string) {
		t.Helper()
		if r.code == 0 || !strings.Contains(r.stderr, want) || !strings.Contains(r.stderr, "403") && !strings.Contains(r.stderr, "deny: ") {
			t.Errorf("pod %s: exit %d, want a denial naming %q:\n%s%s", pod, r.code, want, r.stdout, r.stderr)
		}
		if r := d.pod(t, "", "inspect", pod); r.code == 0 || !strings.Contains(r.stderr, "no such pod: "+pod) {
			t.Errorf("pod %s after its denial: exit %d %s%s", pod, r.code, r.stdout, r.stderr)
		}
		if d.cg.Exists(pod, "") {
			t.Errorf("pod %s: a cgroup after its denial", pod)
		}
		if taps := h.taps(t); len(taps) != 0 {
			t.Errorf("pod %s: TAPs after its denial: %v", pod, taps)
		}
		if got := inspect(t, h.state, "plain").State; got != "available" {
			t.Errorf("pod %s: volume plain is %s after its denial", pod, got)
		}
		if vols := h.must(t, "volume", "list"); strings.Contains(vols, pod+"-") {
			t.Errorf("pod %s: a pod volume after its denial:\n%s", pod, vols)
		}
	}

	// Alice is confidential through a supplementary group the kernel
	// reports (SO_PEERGROUPS): she attaches a confidential volume
	// read-write and her pod runs, owned by her.
	if r := as(alice, team, doc("a-ok", "{volume: conf-data}", ""), "apply", "-f", "-"); r.code != 0 {
		t.Fatalf("apply by alice: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	i := d.waitFor(t, "a-ok", "phase Running", func(i *pods.Info) bool { return i.Status.Phase == pods.Running })
	if i.Owner.UID != 64401 {
		t.Errorf("a-ok's owner %+v, want uid %s", i.Owner, alice)
	}
	if got := inspect(t, h.state, "conf-data").State; got != "attached" {
		t.Errorf("conf-data is %s while alice's pod runs", got)
	}
	// Without her group she has no clearance and no rule.
	denied(as(alice, []string{sockGrp}, doc("a-nogroup", "{volume: plain}", ""), "apply", "-f", "-"), "a-nogroup", `rule allows it (default deny)`)
	// No write down: read-write on an internal volume.
	denied(as(alice, team, doc("a-down", "{volume: plain}", ""), "apply", "-f", "-"), "a-down", `level check "no write down"`)
	// Networks at exactly the pod's level: lab is internal.
	denied(as(alice, team, doc("a-net", "", "{network: lab}"), "apply", "-f", "-"), "a-net", `level check "network at the pod's level"`)
	// No read up: bob (internal) reads a confidential volume; the pod
	// volume he may clone is not made.
	bUp := strings.Replace(doc("b-up", "{volume: conf-data, readOnly: true}", "{network: lab}"), "spec:\n", "spec:\n  volumes: [{name: scratch, from: golden}]\n", 1)
	denied(as(bob, []string{sockGrp}, bUp, "apply", "-f", "-"), "b-up", `level check "no read up"`)

	// Bob runs a pod at his level; the deny rule beats team-pods' allow
	// of delete.
	if r := as(bob, []string{sockGrp}, doc("b-ok", "{volume: plain, readOnly: true}", "{network: lab}"), "apply", "-f", "-"); r.code != 0 {
		t.Fatalf("apply by bob: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	d.waitFor(t, "b-ok", "phase Running", func(i *pods.Info) bool { return i.Status.Phase == pods.Running })
	r := as(bob, []string{sockGrp}, "", "rm", "--force", "b-ok")
	if r.code == 0 || !strings.Contains(r.stderr, `rule "bob-keeps-pods" (rules[2]) denies it`) {
		t.Errorf("rm by bob: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	if d.info(t, "b-ok").Status.Phase != pods.Running {
		t.Error("bob's denied rm touched b-ok")
	}
	// ps shows what the caller may inspect: everything to bob, nothing
	// to a user no rule lets in.
	if r := as(bob, []string{sockGrp}, "", "ps"); r.code != 0 || !strings.Contains(r.stdout, "a-ok") || !strings.Contains(r.stdout, "b-ok") {
		t.Errorf("ps by bob: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	if r := as(stranger, []string{sockGrp}, "", "ps"); r.code != 0 || strings.Contains(r.stdout, "a-ok") {
		t.Errorf("ps by a stranger: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	if r := as(stranger, []string{sockGrp}, "", "inspect", "a-ok"); r.code == 0 || !strings.Contains(r.stderr, "default deny") {
		t.Errorf("inspect by a stranger: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	// So does /metrics: the samples of a pod only to a caller who may
	// inspect it; what names no pod (pods by phase) to everyone.
	metricsAs := func(uid string) string {
		t.Helper()
		r := runCommand(t, nil, podWait, func(ctx context.Context) *exec.Cmd {
			return exec.CommandContext(ctx, "setpriv", "--reuid", uid, "--regid", uid, "--groups", sockGrp,
				"curl", "-sS", "--fail", "--unix-socket", sock, "http://rayvmm/metrics")
		})
		if r.code != 0 || !strings.Contains(r.stdout, `rayvmm_pods{phase="Running"} 2`) {
			t.Fatalf("GET /metrics as uid %s: exit %d, no pods by phase:\n%s%s", uid, r.code, r.stdout, r.stderr)
		}
		return r.stdout
	}
	for _, pod := range []string{"a-ok", "b-ok"} {
		sample := `rayvmm_pod_vm_restarts_total{pod="` + pod + `",vm="vm"} 0`
		if out := metricsAs(bob); !strings.Contains(out, sample) {
			t.Errorf("/metrics for bob lacks %s:\n%s", sample, out)
		}
		if out := metricsAs(stranger); strings.Contains(out, `pod="`+pod+`"`) {
			t.Errorf("/metrics for a stranger shows pod %s:\n%s", pod, out)
		}
	}

	// SIGHUP: without the deny rule, bob may remove his pod.
	writePolicy(t, dir, allowTeam)
	d.proc.cmd.Process.Signal(syscall.SIGHUP)
	d.proc.out.waitForLine(t, "rayvmmd: policy reloaded: policy "+policy+": 2 rules", podWait)
	if r := as(bob, []string{sockGrp}, "", "rm", "--force", "--grace-period", "0", "b-ok"); r.code != 0 {
		t.Errorf("rm by bob after the reload: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	// A file that does not parse is refused; the old policy stays.
	writePolicy(t, dir, allowTeam+"  - {name: broken, effect: allow, subjects: [\"*\"], actions: [attach], objects: [{kind: volume}]}")
	d.proc.cmd.Process.Signal(syscall.SIGHUP)
	d.proc.out.waitForLine(t, "the policy in force is unchanged", podWait)
	if !strings.Contains(d.proc.out.String(), `rayvmmd: policy reload: policy `+policy+`: line 17: rules[2].actions[0]: unknown action "attach"`) {
		t.Errorf("the refused reload's line:\n%s", d.proc.out.String())
	}
	if r := as(bob, []string{sockGrp}, "", "inspect", "a-ok"); r.code != 0 {
		t.Errorf("inspect by bob after a refused reload: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	if r := as(stranger, []string{sockGrp}, "", "inspect", "a-ok"); r.code == 0 {
		t.Error("the refused policy (which allows anyone) let a stranger inspect")
	}
	d.podOK(t, "", "rm", "--force", "--grace-period", "0", "a-ok")

	// The audit log holds every decision with its caller, and both
	// reloads, the refused one with its error.
	var decisions []string
	for _, line := range strings.Split(strings.TrimSpace(h.must(t, "audit", "list", "--json")), "\n") {
		var rec struct {
			Action string                `json:"action"`
			Object struct{ Name string } `json:"object"`
			Actor  struct{ UID uint32 }  `json:"actor"`
			Params map[string]string     `json:"params"`
			Result string                `json:"result"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("audit list --json: %v: %s", err, line)
		}
		switch rec.Action {
		case "policy.allow", "policy.deny":
			decisions = append(decisions, fmt.Sprintf("%d %s %s %s", rec.Actor.UID, rec.Action, rec.Params["request"], rec.Object.Name))
			// Root is exempt from the levels and has no clearance: its
			// decisions name no subject level; everyone else's do.
			root := rec.Params["rule"] == "root"
			if rec.Params["rule"] == "" || (rec.Params["subject_level"] == "") != root || rec.Params["object_level"] == "" {
				t.Errorf("decision record without its rule or levels (or root's with a subject level): %s", line)
			}
		case "daemon.reload":
			decisions = append(decisions, fmt.Sprintf("reload ok=%v", rec.Result == "ok"))
		}
	}
	for _, want := range []string{
		"64401 policy.allow attach-rw conf-data",
		"64401 policy.deny create a-nogroup",
		"64401 policy.deny attach-rw plain",
		"64401 policy.deny join lab",
		"64402 policy.allow clone golden",
		"64402 policy.allow create b-up-scratch",
		"64402 policy.deny attach-ro conf-data",
		"64402 policy.deny delete b-ok",
		"64403 policy.deny inspect a-ok",
		"reload ok=true",
		"64402 policy.allow delete b-ok",
		"reload ok=false",
		"0 policy.allow delete a-ok",
	} {
		if !slices.Contains(decisions, want) {
			t.Errorf("no audit record %q in:\n%s", want, strings.Join(decisions, "\n"))
		}
	}
}

// The daemon's audit log: its start and stop, and a pod's apply (by the
// caller the kernel named), each restart, a probe failure that acted, the
// stop and the rm, in order, each request's access decision (root's: no
// policy file, root is allowed everything), in a log that verifies.
func TestPodAudit(t *testing.T) {
	t.Parallel()
	d := startPodDaemon(t)
	d.apply(t, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: audited}
spec:
  vms:
  - name: vm
    cmdline: rayguest.run=serve rayguest.ip=192.0.2.50/24
    memory: 16M
    nets: [{network: lab}]
    livenessProbe: {udp: {port: 9}, periodSeconds: 1, failureThreshold: 1}
`)
	d.waitFor(t, "audited", "a liveness restart", func(i *pods.Info) bool { return i.Status.VMs[0].RestartCount >= 1 })
	d.podOK(t, "", "stop", "audited")
	d.podOK(t, "", "rm", "audited")
	d.proc.cmd.Process.Signal(syscall.SIGTERM)
	d.proc.exited(t, "SIGTERM", time.Minute)

	list := d.h.must(t, "audit", "list", "--object", "pod/audited", "--json")
	var actions, decided, runs []string
	for _, line := range strings.Split(strings.TrimSpace(list), "\n") {
		var r struct {
			Action string `json:"action"`
			Actor  struct {
				UID uint32 `json:"uid"`
				PID uint32 `json:"pid"`
			} `json:"actor"`
			Params map[string]string `json:"params"`
		}
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("audit list --json: %v: %s", err, line)
		}
		if r.Action == "policy.allow" {
			// Root's requests are decided too (root is allowed everything).
			if r.Params["rule"] != "root" || r.Actor.PID == uint32(d.proc.cmd.Process.Pid) {
				t.Errorf("policy.allow of root's %s by actor pid %d, rule %q", r.Params["request"], r.Actor.PID, r.Params["rule"])
			}
			if r.Params["request"] != "inspect" { // the test's polls
				decided = append(decided, r.Params["request"])
			}
			continue
		}
		if strings.HasPrefix(r.Action, "vm.") || strings.HasPrefix(r.Action, "net.") {
			// Each run of the pod's VM: vm.boot and net.attach, then
			// vm.exit or vm.crash (stopped by SIGTERM after the failed
			// liveness probe, or by the pod's stop: the VM process stops
			// the guest, or dies of the signal if it comes before its
			// handler is set) and net.detach, by the daemon, naming the
			// pod.
			runs = append(runs, r.Action)
			if r.Actor.PID != uint32(d.proc.cmd.Process.Pid) || r.Params["pod"] != "audited" ||
				r.Params["vm"] != "audited.vm" && r.Action != "vm.boot" && r.Action != "vm.exit" && r.Action != "vm.crash" {
				t.Errorf("%s record: actor pid %d, params %v", r.Action, r.Actor.PID, r.Params)
			}
			continue
		}
		if len(actions) == 0 || actions[len(actions)-1] != r.Action {
			actions = append(actions, r.Action)
		}
		if r.Action == "pod.restart" && r.Params["vm"] != "audited.vm" {
			t.Errorf("pod.restart record names VM %q", r.Params["vm"])
		}
		// Apply, stop and rm are the caller's (the CLI, named by
		// SO_PEERCRED); restarts and probe failures the daemon's own.
		daemonPid := uint32(d.proc.cmd.Process.Pid)
		byCaller := r.Action == "pod.apply" || r.Action == "pod.stop" || r.Action == "pod.rm"
		if byCaller == (r.Actor.PID == daemonPid) {
			t.Errorf("%s recorded with actor pid %d (the daemon is %d)", r.Action, r.Actor.PID, daemonPid)
		}
	}
	// A restart follows each failed probe; the run killed by the stop is
	// not restarted.
	want := []string{"pod.apply", "pod.probe-failure", "pod.restart"}
	if len(actions) < 5 || !slices.Equal(actions[:3], want) || !slices.Equal(actions[len(actions)-2:], []string{"pod.stop", "pod.rm"}) {
		t.Errorf("the pod's audit history: %v, want %v ... pod.stop pod.rm", actions, want)
	}
	// At least two runs (the first, stopped after the probe failed, and
	// the restart, stopped by the pod's stop), each recorded whole, in
	// order.
	if len(runs) < 8 || len(runs)%4 != 0 {
		t.Errorf("the pod VM's runs in the audit log: %v", runs)
	}
	for i := 0; i+4 <= len(runs); i += 4 {
		run := []string{"vm.boot", "net.attach", "vm.exit", "net.detach"}
		if runs[i+2] == "vm.crash" {
			run[2] = "vm.crash"
		}
		if !slices.Equal(runs[i:i+4], run) {
			t.Errorf("the pod VM's run %d in the audit log: %v, want %v", i/4+1, runs[i:i+4], run)
		}
	}
	// The apply (create, run), the stop (run) and the rm (delete).
	if want := []string{"create", "run", "run", "delete"}; !slices.Equal(decided, want) {
		t.Errorf("the pod's access decisions: %v, want %v", decided, want)
	}
	daemonRecs := d.h.must(t, "audit", "list", "--object", "daemon/"+d.h.state)
	for _, a := range []string{"daemon.start", "daemon.stop"} {
		if !strings.Contains(daemonRecs, a) {
			t.Errorf("no %s record:\n%s", a, daemonRecs)
		}
	}
	if r := d.h.rayvmm(t, "audit", "verify"); r.code != 0 {
		t.Errorf("audit verify: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}
