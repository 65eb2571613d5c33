package main

import (
	"bytes"
	"encoding/csv"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/audit"
)

// The audit commands on a log the volume commands wrote: filters, the
// export formats, verify with and without the key on the host, a
// one-byte edit, and bad flags.
func TestAuditCLI(t *testing.T) {
	c := cli{t: t, bin: buildRayvmm(t), state: t.TempDir()}
	must := func(args ...string) string {
		t.Helper()
		out, stderr, ok := c.run(args...)
		if !ok {
			t.Fatalf("rayvmm %s: %s", strings.Join(args, " "), stderr)
		}
		return out
	}
	if _, stderr, ok := c.run("audit", "list"); ok || !strings.Contains(stderr, "no audit log") {
		t.Fatalf("audit list with no log: %v %s", ok, stderr)
	}
	must("volume", "create", "data", "--size", "8M")
	must("volume", "snapshot", "data", "monday")
	if _, _, ok := c.run("volume", "rm", "nope"); ok {
		t.Fatal("volume rm nope succeeded")
	}
	must("volume", "clone", "monday", "scratch")
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	must("volume", "import", img, "imported")

	rows := func(args ...string) []string {
		t.Helper()
		lines := strings.Split(strings.TrimSpace(must(append([]string{"audit", "list"}, args...)...)), "\n")
		if !strings.HasPrefix(lines[0], "SEQ ") {
			t.Fatalf("audit list %v: no header: %q", args, lines[0])
		}
		var actions []string
		for _, l := range lines[1:] {
			actions = append(actions, strings.Fields(l)[4])
		}
		return actions
	}
	me, _ := user.Current()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "volume.create volume.snapshot volume.rm volume.clone volume.import"},
		{[]string{"--seals"}, "volume.create audit.seal volume.snapshot audit.seal volume.rm audit.seal volume.clone audit.seal volume.import audit.seal"},
		{[]string{"--action", "volume.create"}, "volume.create"},
		{[]string{"--action", "volume.*", "--result", "ok"}, "volume.create volume.snapshot volume.clone volume.import"},
		{[]string{"--result", "error"}, "volume.rm"},
		{[]string{"--level", "warning"}, "volume.rm"},
		{[]string{"--level", "critical"}, ""},
		{[]string{"--object", "volume/monday"}, "volume.snapshot volume.clone"},
		{[]string{"--since", "1h", "--until", "2999-01-01"}, "volume.create volume.snapshot volume.rm volume.clone volume.import"},
		{[]string{"--until", "2000-01-01"}, ""},
		{[]string{"--actor", me.Username}, "volume.create volume.snapshot volume.rm volume.clone volume.import"},
		{[]string{"--actor", "4000000000"}, ""},
	} {
		if got := strings.Join(rows(tc.args...), " "); got != tc.want {
			t.Errorf("audit list %v: %q, want %q", tc.args, got, tc.want)
		}
	}

	r, err := audit.Parse([]byte(must("audit", "list", "--object", "volume/imported", "--json")))
	if err != nil || r.Action != audit.VolumeImport || r.Params["source"] != img || !r.OK() {
		t.Fatalf("audit list --object volume/imported --json: %+v, %v", r, err)
	}

	// export jsonl is the log as stored; csv has one row a record.
	file := filepath.Join(audit.Dir(c.state), "audit-00000001.jsonl")
	stored, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if got := must("audit", "export"); got != string(stored) {
		t.Fatalf("export jsonl differs from the log:\n%s\n%s", got, stored)
	}
	recs, err := csv.NewReader(strings.NewReader(must("audit", "export", "--format", "csv"))).ReadAll()
	if err != nil || len(recs) != 11 || recs[0][0] != "seq" || recs[3][6] != "volume.snapshot" || !strings.Contains(recs[3][9], `"snapshot":"monday"`) || recs[2][15] != "0" {
		t.Fatalf("export csv: %v %q", err, recs)
	}

	// verify, with the verification key moved off the host.
	if out := must("audit", "verify"); !strings.Contains(out, "intact: 5 records and 5 seals") {
		t.Fatalf("audit verify: %s", out)
	}
	key := filepath.Join(audit.KeyDir(c.state), audit.VerifyKeyFile)
	offHost := filepath.Join(t.TempDir(), "audit-verify.key")
	if err := os.Rename(key, offHost); err != nil {
		t.Fatal(err)
	}
	if _, stderr, ok := c.run("audit", "verify"); ok || !strings.Contains(stderr, "--key") {
		t.Fatalf("verify without the key: %v %s", ok, stderr)
	}
	must("volume", "rm", "scratch") // writers need only the sealing state
	if out := must("audit", "verify", "--key", offHost); !strings.Contains(out, "intact: 6 records") {
		t.Fatalf("audit verify --key: %s", out)
	}

	// One byte edited: verify names the seq and why, in one line.
	edited := bytes.Replace(stored, []byte(`"snapshot":"monday"`), []byte(`"snapshot":"mondaz"`), 1)
	rest, _ := os.ReadFile(file)
	if err := os.WriteFile(file, append(edited, rest[len(stored):]...), 0o600); err != nil {
		t.Fatal(err)
	}
	_, stderr, ok := c.run("audit", "verify", "--key", offHost)
	if ok || !strings.HasPrefix(stderr, "rayvmm: audit verify: seq 3: edited: ") || strings.Count(stderr, "\n") != 1 {
		t.Fatalf("verify of an edited log: ok=%v %q", ok, stderr)
	}
	if out, _, ok := c.run("audit", "report", "--key", offHost); ok || !strings.Contains(out, "FAIL  integrity") {
		t.Fatalf("report on an edited log: ok=%v\n%s", ok, out)
	}

	for _, tc := range []struct{ args []string }{
		{[]string{"audit", "list", "--since", "yesterday"}},
		{[]string{"audit", "list", "--until", "-1h"}},
		{[]string{"audit", "list", "--result", "maybe"}},
		{[]string{"audit", "list", "--level", "debug"}},
		{[]string{"audit", "list", "--object", "data"}},
		{[]string{"audit", "list", "--actor", "no-such-user-here"}},
		{[]string{"audit", "list", "--action", "[a"}},
		{[]string{"audit", "export", "--format", "xml"}},
		{[]string{"audit", "verify", "--key", "/nonexistent/key"}},
	} {
		_, stderr, ok := c.run(tc.args...)
		flag := tc.args[2]
		if ok || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, flag) {
			t.Errorf("rayvmm %s: ok=%v, stderr %q: want one line naming %s", strings.Join(tc.args, " "), ok, stderr, flag)
		}
	}
}
