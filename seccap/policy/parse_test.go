package policy

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"empty", "", "empty document: a policy needs subjects, objects or rules"},
		{"only a comment", "# nothing\n", "empty document: a policy needs subjects, objects or rules"},
		{"empty mapping", "{}\n", "line 1: empty policy: a policy needs subjects, objects or rules"},
		{"not YAML", "rules: [\n", "not valid YAML: "},
		{"two documents", "rules: []\n---\nrules: []\n", "line 2: a policy file holds one YAML document"},
		{"not a mapping", "- a\n", "line 1: want a mapping with subjects, objects, rules"},
		{"unknown top field", "rulez: []\n", "line 1: rulez: unknown field (want subjects, objects, rules)"},
		{"repeated field", "rules: []\nrules: []\n", "line 2: rules: repeated"},
		{"unknown subjects field", "subjects:\n  userz: {}\n", "line 2: subjects.userz: unknown field (want users, groups)"},
		{"unknown level", "subjects:\n  users:\n    alice: topsecret\n", `line 3: subjects.users.alice: unknown level "topsecret" (want public, internal, confidential, secret)`},
		{"level not a string", "subjects:\n  users:\n    alice: 3\n", `line 3: subjects.users.alice: want a string, not int (quote it: "3")`},
		{"repeated user", "subjects:\n  users:\n    alice: public\n    alice: secret\n", "line 4: subjects.users.alice: repeated"},
		{"bad user name", "subjects:\n  users:\n    \"al ice\": public\n", `line 3: subjects.users.al ice: "al ice" is not a user or group name, uid or gid`},
		{"object without kind", "objects:\n  - name: x\n    classification: public\n", "line 2: objects[0].kind: missing"},
		{"object bad kind", "objects:\n  - kind: disk\n    classification: public\n", `line 2: objects[0].kind: unknown kind "disk" (want volume, network, pod), or "*"`},
		{"object without classification", "objects:\n  - kind: volume\n", "line 2: objects[0].classification: missing"},
		{"bad glob", "objects:\n  - kind: volume\n    name: \"a[\"\n    classification: public\n", `line 3: objects[0].name: "a[" is not a valid glob: syntax error in pattern`},
		{"label not a string", "objects:\n  - kind: volume\n    labels: {golden: true}\n    classification: public\n", `line 3: objects[0].labels.golden: want a string, not bool (quote it: "true")`},
		{"repeated label", "objects:\n  - kind: volume\n    labels: {a: x, a: y}\n    classification: public\n", "line 3: objects[0].labels.a: repeated"},
		{"rule without effect", "rules:\n  - subjects: [\"*\"]\n    actions: [inspect]\n    objects: [{kind: volume}]\n", "line 2: rules[0].effect: missing"},
		{"rule bad effect", "rules:\n  - effect: permit\n    subjects: [\"*\"]\n    actions: [inspect]\n    objects: [{kind: volume}]\n", `line 2: rules[0].effect: "permit": want allow or deny`},
		{"rule bad action", "rules:\n  - effect: allow\n    subjects: [\"*\"]\n    actions: [inspect, attach]\n    objects: [{kind: volume}]\n", `line 4: rules[0].actions[1]: unknown action "attach" (want create, delete, inspect, attach-ro, attach-rw, snapshot, clone, run, join)`},
		{"rule repeated action", "rules:\n  - effect: allow\n    subjects: [\"*\"]\n    actions: [inspect, inspect]\n    objects: [{kind: volume}]\n", "line 4: rules[0].actions[1]: inspect is listed twice"},
		{"rule star with others", "rules:\n  - effect: allow\n    subjects: [\"*\"]\n    actions: [\"*\", inspect]\n    objects: [{kind: volume}]\n", `line 4: rules[0].actions: "*" stands for every action and comes alone`},
		{"rule action on no object", "rules:\n  - effect: allow\n    subjects: [\"*\"]\n    actions: [join]\n    objects: [{kind: volume}]\n", "line 4: rules[0].actions[0]: join does not apply to any of the rule's objects (it applies to network)"},
		{"rule bad subject", "rules:\n  - effect: allow\n    subjects: [alice]\n    actions: [inspect]\n    objects: [{kind: volume}]\n", `line 3: rules[0].subjects[0]: "alice": want user:NAME, group:NAME or "*"`},
		{"rule no subjects", "rules:\n  - effect: allow\n    subjects: []\n    actions: [inspect]\n    objects: [{kind: volume}]\n", "line 3: rules[0].subjects: empty"},
		{"rule no objects", "rules:\n  - effect: allow\n    subjects: [\"*\"]\n    actions: [inspect]\n    objects: []\n", "line 5: rules[0].objects: empty: a rule needs at least one object match"},
		{"rule object classification", "rules:\n  - effect: allow\n    subjects: [\"*\"]\n    actions: [inspect]\n    objects: [{kind: volume, classification: secret}]\n", "line 5: rules[0].objects[0].classification: unknown field (want kind, name, labels)"},
		{"duplicate rule names", "rules:\n  - name: a\n    effect: allow\n    subjects: [\"*\"]\n    actions: [inspect]\n    objects: [{kind: volume}]\n  - name: a\n    effect: deny\n    subjects: [\"*\"]\n    actions: [inspect]\n    objects: [{kind: volume}]\n", `line 7: rules[1].name: "a" is also the name of rules[0]`},
		{"alias", "objects:\n  - &v {kind: volume, classification: public}\n  - *v\n", "line 3: aliases (*v) are not allowed in a policy"},
		{"merge key", "rules:\n  - <<: {effect: allow}\n    subjects: [\"*\"]\n    actions: [inspect]\n    objects: [{kind: volume}]\n", "line 2: rules[0]: merge keys (<<) are not allowed in a policy"},
		{"null subjects", "subjects:\n", "line 1: subjects: want a mapping with users, groups"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			if err == nil {
				t.Fatalf("parsed; want %q", tt.want)
			}
			if !errors.Is(err, ErrParse) {
				t.Errorf("%v is not ErrParse", err)
			}
			if !strings.HasPrefix(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error:\n got %s\nwant %s", err, tt.want)
			}
		})
	}
}

func TestLoadNamesTheFile(t *testing.T) {
	f := filepath.Join(t.TempDir(), "p.yaml")
	os.WriteFile(f, []byte("rules: 3\n"), 0o644)
	_, err := Load(f)
	if err == nil || err.Error() != "policy "+f+": line 1: rules: want a list" {
		t.Errorf("Load: %v", err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "none.yaml")); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("Load of a missing file: %v", err)
	}
}

// TestReload: a policy that does not parse is refused at start and on
// reload, and the old one stays in force.
func TestReload(t *testing.T) {
	f := filepath.Join(t.TempDir(), "p.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(f, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("rules:\n  - {name: bad, effect: allow, subjects: [\"*\"], actions: [attach]}\n")
	if _, err := Open(f); err == nil {
		t.Fatal("Open took a policy that does not parse")
	}
	allowBob := "rules:\n  - {name: bob-inspects, effect: allow, subjects: [\"user:bob\"], actions: [inspect], objects: [{kind: volume}]}\n"
	write(allowBob)
	s, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	check := func(want bool, by string) {
		t.Helper()
		d, err := s.Decide(bob, Inspect, obj(Volume, "v"))
		if err != nil || d.Allow != want || (d.Rule != nil && d.Rule.Name != by) {
			t.Fatalf("decision %v (%v), want allow %v by %s", d, err, want, by)
		}
	}
	check(true, "bob-inspects")
	write("rules:\n  - {name: deny-bob, effect: deny, subjects: [\"user:bob\"], actions: [inspect], objects: [{kind: volume}]\n")
	if err := s.Reload(); err == nil || !strings.Contains(err.Error(), "the policy in force is unchanged") {
		t.Fatalf("Reload of a broken file: %v", err)
	}
	check(true, "bob-inspects")
	write("rules:\n  - {name: deny-bob, effect: deny, subjects: [\"user:bob\"], actions: [inspect], objects: [{kind: volume}]}\n")
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	check(false, "deny-bob")
}
