package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestPolicyCheck runs `rayvmm policy check` against a policy that names
// users and groups by id, so no passwd entries are needed.
func TestPolicyCheck(t *testing.T) {
	bin := buildRayvmm(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "policy.yaml")
	os.WriteFile(file, []byte(`subjects:
  users: {"64051": confidential}
  groups: {"64060": internal}
objects:
  - {kind: volume, name: "pay-*", classification: confidential}
rules:
  - name: team-volumes
    effect: allow
    subjects: ["group:64060", "user:64051"]
    actions: [inspect, attach-ro, attach-rw]
    objects: [{kind: volume}]
  - name: no-pay-inspect
    effect: deny
    subjects: ["group:64060"]
    actions: [inspect]
    objects: [{kind: volume, name: "pay-*"}]
`), 0o644)
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("rules:\n  - {effect: allow, subjects: [\"*\"], actions: [attach], objects: [{kind: volume}]}\n"), 0o644)

	tests := []struct {
		name    string
		args    []string
		code    int
		wantOut string
		wantErr string
	}{
		{"allowed by a rule", []string{"--user", "64050", "--group", "64060", "--action", "attach-rw", "--object", "volume/data"}, 0,
			`allow: 64050 attach-rw volume/data: rule "team-volumes" (rules[0]) allows it`, ""},
		{"read up", []string{"--user", "64050", "--group", "64060", "--action", "attach-ro", "--object", "volume/pay-1"}, 3,
			`deny: 64050 attach-ro volume/pay-1: level check "no read up"`, "rayvmm: denied"},
		{"write down", []string{"--user", "64051", "--action", "attach-rw", "--object", "volume/data"}, 3,
			`level check "no write down"`, ""},
		{"deny beats allow", []string{"--user", "64051", "--group", "64060", "--action", "inspect", "--object", "volume/pay-1"}, 3,
			`rule "no-pay-inspect" (rules[1]) denies it`, ""},
		{"default deny", []string{"--user", "64052", "--action", "inspect", "--object", "volume/data"}, 3,
			"no rule allows it (default deny)", ""},
		{"labels", []string{"--user", "64050", "--group", "64060", "--action", "inspect", "--object", "volume/data", "--label", "a=b"}, 0, "allow:", ""},
		{"root", []string{"--user", "root", "--action", "attach-rw", "--object", "volume/pay-1"}, 0,
			"allow: root attach-rw volume/pay-1: root (uid 0) is allowed everything", ""},
		{"bad action", []string{"--user", "root", "--action", "attach", "--object", "volume/x"}, 1, "", `rayvmm: --action: unknown action "attach"`},
		{"bad object", []string{"--user", "root", "--action", "inspect", "--object", "disk/x"}, 1, "", `rayvmm: --object: object "disk/x": unknown kind "disk"`},
		{"action on the wrong kind", []string{"--user", "root", "--action", "join", "--object", "volume/x"}, 1, "", "rayvmm: invalid request: join does not apply to a volume"},
		{"bad label", []string{"--user", "root", "--action", "inspect", "--object", "volume/x", "--label", "a"}, 1, "", `rayvmm: --label "a": want KEY=VALUE`},
		{"unknown user", []string{"--user", "no-such-user-here", "--action", "inspect", "--object", "volume/x"}, 1, "", `rayvmm: --user: user "no-such-user-here": no such user`},
		{"missing flag", []string{"--user", "root", "--action", "inspect"}, 1, "", `required flag(s) "object" not set`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(bin, append([]string{"policy", "check", "--policy", file}, tt.args...)...)
			var o, e bytes.Buffer
			cmd.Stdout, cmd.Stderr = &o, &e
			err := cmd.Run()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			}
			if code != tt.code || !strings.Contains(o.String(), tt.wantOut) || !strings.Contains(e.String(), tt.wantErr) {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tt.code, o.String(), e.String())
			}
			if strings.Count(e.String(), "\n") > 1 {
				t.Errorf("stderr is more than one line:\n%s", e.String())
			}
		})
	}
	t.Run("bad policy file", func(t *testing.T) {
		out, err := exec.Command(bin, "policy", "check", "--policy", bad, "--user", "root", "--action", "inspect", "--object", "volume/x").CombinedOutput()
		want := "rayvmm: policy " + bad + `: line 2: rules[0].actions[0]: unknown action "attach"`
		if err == nil || !strings.HasPrefix(string(out), want) {
			t.Errorf("%v: %s\nwant %s", err, out, want)
		}
	})
}
