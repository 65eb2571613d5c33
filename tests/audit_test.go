package tests

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/pods"
)

// auditActions returns the actions `audit list --json` prints for args,
// with their objects, in order.
func (h *host) auditActions(t *testing.T, args ...string) []string {
	t.Helper()
	return actionsOf(parseAuditList(t, h.must(t, append([]string{"audit", "list", "--json"}, args...)...)))
}

// parseAuditList parses what `audit list --json` printed, checking that
// seqs rise.
func parseAuditList(t *testing.T, out string) []*audit.Record {
	t.Helper()
	var rs []*audit.Record
	var last uint64
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		r, err := audit.Parse([]byte(line))
		if err != nil {
			t.Fatalf("audit list --json printed %q: %v", line, err)
		}
		if r.Seq <= last {
			t.Fatalf("audit list: seq %d after seq %d", r.Seq, last)
		}
		last = r.Seq
		rs = append(rs, r)
	}
	return rs
}

// actionsOf is "ACTION KIND/NAME" of each record.
func actionsOf(rs []*audit.Record) []string {
	var got []string
	for _, r := range rs {
		got = append(got, r.Action+" "+r.Object.String())
	}
	return got
}

// End to end, every record written by the command that acted: a VM
// boots with a volume and a network, and again read-only with the
// sandbox off and crashes; the volume is snapshotted and cloned; a pod of
// a real daemon (rayvmmd, as the pods tests start it) runs a VM on that
// volume and network, which is killed (kill -9) and restarted
// (restartPolicy Always), and the pod is removed; then the daemon's
// access policy denies a non-root user (setpriv) a read up of the volume.
// `audit list --object` shows each object's whole history in order,
// `audit verify` passes, `audit report` flags the VM run with the sandbox
// off and lists the denial, and a cut-off tail fails verify.
func TestAuditEndToEnd(t *testing.T) {
	t.Parallel()
	requireTool(t, "setpriv")
	const (
		bob     = "64402" // confidential
		carol   = "64403" // internal
		sockGrp = "64400"
	)
	dir, cli := userCLI(t)
	policy := writePolicy(t, dir, `subjects:
  users: {"64402": confidential, "64403": internal}
objects:
  - {kind: volume, name: data, classification: confidential}
  - {kind: network, name: lab, classification: confidential}
rules:
  - name: team-pods
    effect: allow
    subjects: ["user:64402", "user:64403"]
    actions: [create, run, inspect, delete]
    objects: [{kind: pod}]
  - name: team-resources
    effect: allow
    subjects: ["user:64402", "user:64403"]
    actions: [attach-ro, attach-rw, join]
    objects: [{kind: volume}, {kind: network}]`)
	sock := filepath.Join(dir, "d.sock")
	d := startPodDaemonAt(t, sock, "--socket-group", sockGrp, "--policy", policy)
	h := d.h // network lab (192.0.2.0/24) is the daemon's

	h.must(t, "volume", "create", "data", "--size", "16M")
	out := h.must(t, "boot", "--name", "web", "--disk", "volume=data", "--net", "network=lab",
		"--cmdline", "rayguest.run=blktest rayguest.seed=3 rayguest.blocks=4 rayguest.ip=192.0.2.2/24")
	if !strings.Contains(out, "rayguest: blk vda ok") {
		t.Fatalf("guest output:\n%s", out)
	}
	if r := h.rayvmm(t, "boot", "--name", "web", "--disk", "volume=data,readonly", "--net", "network=lab", "--cmdline", "rayguest.run=crash", "--sandbox", "off"); r.code != 1 {
		t.Fatalf("crash boot: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	h.must(t, "volume", "snapshot", "data", "monday")
	h.must(t, "volume", "clone", "monday", "scratch")
	if r := h.rayvmm(t, "volume", "rm", "monday"); r.code == 0 {
		t.Fatal("volume rm of a snapshot with a clone succeeded")
	}
	h.must(t, "volume", "rm", "scratch")

	// Bob's pod runs a VM on the volume and the network at his level;
	// it is killed and restarted, and bob removes the pod.
	as := func(uid, stdin string, args ...string) {
		t.Helper()
		if r := asUser(t, cli, sock, uid, []string{sockGrp}, stdin, args...); r.code != 0 {
			t.Fatalf("rayvmm pod %s as %s: exit %d\n%s%s", strings.Join(args, " "), uid, r.code, r.stdout, r.stderr)
		}
	}
	as(bob, `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: web}
spec:
  restartPolicy: Always
  vms:
  - name: front
    cmdline: rayguest.run=echo rayguest.ip=192.0.2.3/24
    memory: 16M
    nets: [{network: lab}]
    disks: [{volume: data}]
`, "apply", "-f", "-")
	running := func(n int32) func(*pods.Info) bool {
		return func(i *pods.Info) bool {
			v := i.Status.VMs[0]
			return v.RestartCount == n && v.State.Running != nil && v.PID != 0
		}
	}
	pid := d.waitFor(t, "web", "the VM running", running(0)).Status.VMs[0].PID
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitFor(t, "web", "the restart", running(1))
	as(bob, "", "rm", "--force", "--grace-period", "0", "web")

	// Carol (internal) may not read the confidential volume: a 403
	// naming the level check, and a policy.deny record on the volume.
	peek := `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: peek}
spec:
  vms:
  - {name: vm, cmdline: rayguest.run=echo, memory: 16M, disks: [{volume: data, readOnly: true}]}
`
	if r := asUser(t, cli, sock, carol, []string{sockGrp}, peek, "apply", "-f", "-"); r.code == 0 || !strings.Contains(r.stderr, `level check "no read up"`) {
		t.Fatalf("carol's read up: exit %d, want a denial naming the level check\n%s%s", r.code, r.stdout, r.stderr)
	}
	// The daemon's stop seals its records.
	d.proc.cmd.Process.Signal(syscall.SIGTERM)
	d.proc.exited(t, "SIGTERM", time.Minute)

	// The volume's whole history: the CLI's records, rayvmm boot's, and
	// the daemon's (bob's attach allowed, the pod VM's two runs with the
	// restart between them, carol's denial).
	rs := parseAuditList(t, h.must(t, "audit", "list", "--json", "--object", "volume/data"))
	want := []string{
		"volume.create volume/data",
		"volume.attach volume/data", "volume.detach volume/data", // the blktest boot
		"volume.attach volume/data", "volume.detach volume/data", // the crash
		"volume.snapshot volume/data",
		"policy.allow volume/data",                               // bob's pod apply: attach-rw
		"volume.attach volume/data", "volume.detach volume/data", // the pod VM, killed
		"volume.attach volume/data", "volume.detach volume/data", // restarted, then removed
		"policy.deny volume/data", // carol's read up
	}
	if got := actionsOf(rs); !slices.Equal(got, want) {
		t.Fatalf("audit list --object volume/data:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	daemonPid := uint32(d.proc.cmd.Process.Pid)
	for _, r := range rs[7:11] {
		if r.Params[audit.ParamPod] != "web" || r.Params[audit.ParamVM] != "web.front" || r.Params[audit.ParamMode] != audit.ModeRW || r.Actor.PID != daemonPid {
			t.Errorf("the pod VM's %s record: actor pid %d (the daemon is %d), params %v", r.Action, r.Actor.PID, daemonPid, r.Params)
		}
	}
	if allow := rs[6]; allow.Actor.UID != 64402 || allow.Params[audit.ParamRequest] != "attach-rw" || allow.Params[audit.ParamSubjectLevel] != "confidential" {
		t.Errorf("the allow's record: %s", audit.Encode(allow))
	}
	if deny := rs[11]; deny.Actor.UID != 64403 || deny.Decision != audit.Deny || deny.Params[audit.ParamRequest] != "attach-ro" ||
		deny.Params[audit.ParamRule] != `level check "no read up"` || deny.Level != audit.Warning {
		t.Errorf("the denial's record: %s", audit.Encode(deny))
	}
	// The pod VM's runs: the first crashed (kill -9), the second was
	// stopped by pod rm.
	var runs []string
	for _, r := range parseAuditList(t, h.must(t, "audit", "list", "--json", "--object", "vm/web.front", "--action", "vm.*")) {
		runs = append(runs, r.Action)
		if r.Action == audit.VMCrash && len(runs) == 2 && !strings.Contains(r.Result, "signal 9") {
			t.Errorf("the killed run's vm.crash: %s", audit.Encode(r))
		}
	}
	if len(runs) != 4 || runs[0] != audit.VMBoot || runs[1] != audit.VMCrash || runs[2] != audit.VMBoot {
		t.Errorf("the pod VM's runs: %v, want vm.boot vm.crash vm.boot and its end", runs)
	}
	// The restart (recorded on the pod) comes between the killed run's
	// detach and the next run's attach.
	var restart uint64
	for _, r := range parseAuditList(t, h.must(t, "audit", "list", "--json", "--object", "pod/web", "--action", "pod.restart")) {
		if r.Params[audit.ParamVM] == "web.front" && strings.Contains(r.Params[audit.ParamReason], "signal 9") {
			restart = r.Seq
		}
	}
	if restart == 0 || restart < rs[8].Seq || restart > rs[9].Seq {
		t.Errorf("pod.restart of web.front at seq %d, the killed run's detach at %d, the next attach at %d", restart, rs[8].Seq, rs[9].Seq)
	}
	want = []string{"volume.snapshot volume/data", "volume.clone volume/scratch", "volume.rm volume/monday"}
	if got := h.auditActions(t, "--object", "volume/monday"); !slices.Equal(got, want) {
		t.Fatalf("audit list --object volume/monday: %q, want %q", got, want)
	}
	h.must(t, "net", "rm", "lab")
	want = []string{"net.create network/lab", "net.attach network/lab", "net.detach network/lab", "net.attach network/lab", "net.detach network/lab",
		"policy.allow network/lab", "net.attach network/lab", "net.detach network/lab", "net.attach network/lab", "net.detach network/lab", "net.rm network/lab"}
	if got := h.auditActions(t, "--object", "network/lab"); !slices.Equal(got, want) {
		t.Fatalf("audit list --object network/lab:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	want = []string{"vm.boot vm/web", "volume.attach volume/data", "net.attach network/lab", "vm.exit vm/web", "volume.detach volume/data", "net.detach network/lab",
		"vm.boot vm/web", "volume.attach volume/data", "net.attach network/lab", "vm.crash vm/web", "volume.detach volume/data", "net.detach network/lab"}
	if got := h.auditActions(t, "--object", "vm/web"); !slices.Equal(got, want) {
		t.Fatalf("audit list --object vm/web:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	var modes []string
	for _, r := range parseAuditList(t, h.must(t, "audit", "list", "--json", "--action", "vm.boot")) {
		modes = append(modes, r.Object.Name+"="+r.Params[audit.ParamSandbox])
	}
	if want := []string{"web=strict", "web=off", "web.front=strict", "web.front=strict"}; !slices.Equal(modes, want) {
		t.Fatalf("vm.boot sandbox modes %q, want %q: rayvmm boot's default strict, then off, and the pod VM's runs", modes, want)
	}
	table := h.must(t, "audit", "list", "--object", "vm/web", "--level", "warning")
	if !strings.Contains(table, "vm.crash") || !strings.Contains(table, "triple fault") || strings.Contains(table, "vm.exit") {
		t.Fatalf("audit list --level warning:\n%s", table)
	}
	if got := h.auditActions(t, "--actor", carol); len(got) == 0 || got[len(got)-1] != "policy.deny volume/data" {
		t.Fatalf("audit list --actor %s: %q", carol, got)
	}
	if got := h.auditActions(t, "--result", "error", "--action", "volume.*"); !slices.Equal(got, []string{"volume.rm volume/monday"}) {
		t.Fatalf("audit list --result error --action 'volume.*': %q", got)
	}

	if out := h.must(t, "audit", "verify"); !strings.Contains(out, "intact") {
		t.Fatalf("audit verify: %s", out)
	}
	r := h.rayvmm(t, "audit", "report")
	if r.code != 1 {
		t.Fatalf("audit report: exit %d, want 1 (the sandbox check fails)\n%s%s", r.code, r.stdout, r.stderr)
	}
	for _, s := range []string{"FAIL  sandbox", "1 of 4 VM runs with the sandbox off", "VM web ran with the sandbox off (sandbox=off)",
		"ok    integrity", "1 denied attempts by 1 users", "uid 64403: 1 denied, the last attach-ro volume/data (level check \"no read up\")",
		"ok    cross-level read-write attaches", "ok    snapshots", "ok    seals"} {
		if !strings.Contains(r.stdout, s) {
			t.Fatalf("audit report does not say %q:\n%s", s, r.stdout)
		}
	}
	if !strings.Contains(r.stderr, "failed: sandbox") {
		t.Fatalf("audit report stderr: %s", r.stderr)
	}

	// Cut off the last three records, the seal with them.
	f := filepath.Join(audit.Dir(h.state), "audit-00000001.jsonl")
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.SplitAfter(b, []byte("\n"))
	lines = lines[:len(lines)-1]
	last, err := audit.Parse(lines[len(lines)-1])
	if err != nil || last.Action != audit.AuditSeal {
		t.Fatalf("the log does not end with a seal: %s", lines[len(lines)-1])
	}
	if err := os.WriteFile(f, bytes.Join(lines[:len(lines)-3], nil), 0o600); err != nil {
		t.Fatal(err)
	}
	r = h.rayvmm(t, "audit", "verify")
	want1 := fmt.Sprintf("seq %d: truncated", last.Seq-2)
	if r.code == 0 || !strings.Contains(r.stderr, want1) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("audit verify of a log cut short: exit %d, stderr %q; want one line naming %q", r.code, r.stderr, want1)
	}
}
