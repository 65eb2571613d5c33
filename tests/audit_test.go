package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/audit"
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

// End to end: a VM boots with a volume and a network, and crashes once;
// the volume is snapshotted and cloned; a pod restart and a policy denial
// are recorded by the package API (their writers come with the daemon).
// `audit list --object` shows each object's whole history in order,
// `audit verify` passes, `audit report` flags the VM run with the sandbox
// off (the crash, booted with --sandbox off; the first ran strict, the
// default) and lists the denial, and a cut-off tail fails verify.
func TestAuditEndToEnd(t *testing.T) {
	h := newHost(t)
	h.must(t, "volume", "create", "data", "--size", "16M")
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	out := h.must(t, "boot", "--name", "web", "--disk", "volume=data", "--net", "network=lan",
		"--cmdline", "rayguest.run=blktest rayguest.seed=3 rayguest.blocks=4 rayguest.ip=192.0.2.2/24")
	if !strings.Contains(out, "rayguest: blk vda ok") {
		t.Fatalf("guest output:\n%s", out)
	}
	if r := h.rayvmm(t, "boot", "--name", "web", "--disk", "volume=data,readonly", "--net", "network=lan", "--cmdline", "rayguest.run=crash", "--sandbox", "off"); r.code != 1 {
		t.Fatalf("crash boot: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	h.must(t, "volume", "snapshot", "data", "monday")
	h.must(t, "volume", "clone", "monday", "scratch")
	if r := h.rayvmm(t, "volume", "rm", "monday"); r.code == 0 {
		t.Fatal("volume rm of a snapshot with a clone succeeded")
	}
	h.must(t, "volume", "rm", "scratch")

	// The daemon's writers do not exist yet: append their records as
	// they will, through the package.
	alice := audit.Actor{UID: 1000, GID: 1000, PID: 4242, Command: "rayvmm pod apply -f web.yaml"}
	l, err := audit.Open(audit.Config{Dir: audit.Dir(h.state), KeyDir: audit.KeyDir(h.state), Actor: &alice})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := l.Append(ctx, audit.Entry{Action: audit.PodRestart, Object: audit.Object{Kind: audit.KindPod, Name: "web"},
		Params: audit.Params{audit.ParamVM: "front", audit.ParamReason: "liveness probe failed 3 times"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(ctx, audit.Entry{Action: audit.PolicyDeny, Object: audit.Object{Kind: audit.KindVolume, Name: "data"}, Decision: audit.Deny,
		Err:    errors.New("denied: no write down: volume data is internal, pod web runs at confidential"),
		Params: audit.Params{audit.ParamRequest: audit.RequestAttachRW, audit.ParamRule: "level check", audit.ParamSubjectLevel: "confidential", audit.ParamObjectLevel: "internal", audit.ParamPod: "web"}}); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	want := []string{
		"volume.create volume/data",
		"volume.attach volume/data", "volume.detach volume/data", // the blktest boot
		"volume.attach volume/data", "volume.detach volume/data", // the crash
		"volume.snapshot volume/data",
		"policy.deny volume/data",
	}
	if got := h.auditActions(t, "--object", "volume/data"); !slices.Equal(got, want) {
		t.Fatalf("audit list --object volume/data:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	want = []string{"volume.snapshot volume/data", "volume.clone volume/scratch", "volume.rm volume/monday"}
	if got := h.auditActions(t, "--object", "volume/monday"); !slices.Equal(got, want) {
		t.Fatalf("audit list --object volume/monday: %q, want %q", got, want)
	}
	h.must(t, "net", "rm", "lan")
	want = []string{"net.create network/lan", "net.attach network/lan", "net.detach network/lan", "net.attach network/lan", "net.detach network/lan", "net.rm network/lan"}
	if got := h.auditActions(t, "--object", "network/lan"); !slices.Equal(got, want) {
		t.Fatalf("audit list --object network/lan: %q, want %q", got, want)
	}
	want = []string{"vm.boot vm/web", "volume.attach volume/data", "net.attach network/lan", "vm.exit vm/web", "volume.detach volume/data", "net.detach network/lan",
		"vm.boot vm/web", "volume.attach volume/data", "net.attach network/lan", "vm.crash vm/web", "volume.detach volume/data", "net.detach network/lan"}
	if got := h.auditActions(t, "--object", "vm/web"); !slices.Equal(got, want) {
		t.Fatalf("audit list --object vm/web:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	var modes []string
	for _, line := range strings.Split(strings.TrimSpace(h.must(t, "audit", "list", "--json", "--action", "vm.boot")), "\n") {
		r, err := audit.Parse([]byte(line))
		if err != nil {
			t.Fatal(err)
		}
		modes = append(modes, r.Params[audit.ParamSandbox])
	}
	if !slices.Equal(modes, []string{"strict", "off"}) {
		t.Fatalf("vm.boot sandbox modes %q, want the default strict, then off", modes)
	}
	table := h.must(t, "audit", "list", "--object", "vm/web", "--level", "warning")
	if !strings.Contains(table, "vm.crash") || !strings.Contains(table, "triple fault") || strings.Contains(table, "vm.exit") {
		t.Fatalf("audit list --level warning:\n%s", table)
	}
	if got := h.auditActions(t, "--actor", "1000"); !slices.Equal(got, []string{"pod.restart pod/web", "policy.deny volume/data"}) {
		t.Fatalf("audit list --actor 1000: %q", got)
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
	for _, s := range []string{"FAIL  sandbox", "1 of 2 VM runs with the sandbox off", "VM web ran with the sandbox off (sandbox=off)",
		"ok    integrity", "1 denied attempts by 1 users", "uid 1000: 1 denied, the last attach-rw volume/data (level check)",
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
