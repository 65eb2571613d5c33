package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/pods/daemon"
)

// The daemon's authorizer: decisions of the policy in force for callers
// by uid and groups (ids without names, as the kernel gives them), the
// short rule and the levels for the audit record, reload that swaps a
// good file in and keeps the old policy for a bad one, and the empty
// policy (root only) when the default file does not exist.
func TestAuthorizer(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "policy.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(file, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(`subjects:
  users: {"64201": confidential}
  groups: {"64300": internal}
objects:
  - {kind: volume, name: "secret-*", classification: secret}
rules:
  - name: team
    effect: allow
    subjects: ["group:64300", "user:64201"]
    actions: ["*"]
    objects: [{kind: pod, name: "*"}, {kind: volume, name: "*"}]
  - name: no-rm
    effect: deny
    subjects: ["user:64202"]
    actions: [delete]
    objects: [{kind: pod, name: "*"}]
`)
	a, err := openPolicy(file, true)
	if err != nil {
		t.Fatal(err)
	}
	member := daemon.Caller{UID: 64202, GID: 64202, Groups: []uint32{64300}}
	for _, tt := range []struct {
		name          string
		c             daemon.Caller
		action        string
		o             daemon.Object
		allow         bool
		reason, rule  string
		subLvl, objLv string
	}{
		{"allowed by a group", member, daemon.ActCreate, daemon.Object{Kind: "pod", Name: "web"}, true, `rule "team" (rules[0]) allows it`, `rule "team" (rules[0])`, "internal", "internal"},
		{"deny beats allow", member, daemon.ActDelete, daemon.Object{Kind: "pod", Name: "web"}, false, `rule "no-rm" (rules[1]) denies it`, `rule "no-rm" (rules[1])`, "internal", "internal"},
		{"no read up", member, daemon.ActAttachRO, daemon.Object{Kind: "volume", Name: "secret-1"}, false, `level check "no read up"`, `level check "no read up"`, "internal", "secret"},
		{"no write down", daemon.Caller{UID: 64201, GID: 64201}, daemon.ActAttachRW, daemon.Object{Kind: "volume", Name: "data"}, false, `level check "no write down"`, `level check "no write down"`, "confidential", "internal"},
		{"default deny", daemon.Caller{UID: 64299, GID: 64299}, daemon.ActInspect, daemon.Object{Kind: "pod", Name: "web"}, false, "no rule allows it (default deny)", "default deny", "public", "internal"},
		{"root", daemon.Caller{}, daemon.ActDelete, daemon.Object{Kind: "volume", Name: "secret-1"}, true, "root (uid 0) is allowed everything", "root", "", "secret"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d, err := a.Decide(tt.c, tt.action, tt.o)
			if err != nil {
				t.Fatal(err)
			}
			if d.Allow != tt.allow || !strings.Contains(d.Reason, tt.reason) || d.Params["rule"] != tt.rule ||
				d.Params["subject_level"] != tt.subLvl || d.Params["object_level"] != tt.objLv {
				t.Errorf("got %v %q %v, want %v %q rule %q levels %s %s", d.Allow, d.Reason, d.Params, tt.allow, tt.reason, tt.rule, tt.subLvl, tt.objLv)
			}
		})
	}
	if _, err := a.Decide(member, daemon.ActJoin, daemon.Object{Kind: "pod", Name: "web"}); err == nil {
		t.Error("join of a pod decided")
	}

	// A bad file is refused and the old policy stays in force.
	write("rules: [\n")
	if err := a.Reload(); err == nil || !strings.Contains(err.Error(), "the policy in force is unchanged") || strings.Contains(err.Error(), "\n") {
		t.Errorf("reload of a bad file: %v", err)
	}
	if d, _ := a.Decide(member, daemon.ActCreate, daemon.Object{Kind: "pod", Name: "web"}); !d.Allow {
		t.Errorf("after a refused reload: %s", d.Reason)
	}
	// A good one changes the answer.
	write("rules: []\n")
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if d, _ := a.Decide(member, daemon.ActCreate, daemon.Object{Kind: "pod", Name: "web"}); d.Allow || !strings.Contains(d.Reason, "default deny") {
		t.Errorf("after reload to no rules: %v %s", d.Allow, d.Reason)
	}

	// No default file: root only, and the denial says why.
	missing := filepath.Join(dir, "none.yaml")
	a, err = openPolicy(missing, false)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := a.Decide(member, daemon.ActInspect, daemon.Object{Kind: "pod", Name: "web"}); d.Allow || !strings.Contains(d.Reason, missing+" does not exist") {
		t.Errorf("without a policy file: %v %s", d.Allow, d.Reason)
	}
	if d, _ := a.Decide(daemon.Caller{}, daemon.ActCreate, daemon.Object{Kind: "pod", Name: "web"}); !d.Allow {
		t.Errorf("root without a policy file: %s", d.Reason)
	}
	// The file appears: a reload reads it.
	write("subjects: {users: {\"64202\": internal}}\nrules: [{effect: allow, subjects: [\"*\"], actions: [inspect], objects: [{kind: pod}]}]\n")
	os.Rename(file, missing)
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if d, _ := a.Decide(member, daemon.ActInspect, daemon.Object{Kind: "pod", Name: "web"}); !d.Allow {
		t.Errorf("after the default file appeared: %s", d.Reason)
	}
	if _, err := openPolicy(filepath.Join(dir, "given-missing.yaml"), true); err == nil {
		t.Error("a --policy file that does not exist was accepted")
	}
}
