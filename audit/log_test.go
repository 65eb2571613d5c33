package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gowebpki/jcs"
)

// The canonical JSON is RFC 8785's: the encoder's output equals what an
// independent JCS implementation makes of the same record.
func TestCanonicalIsJCS(t *testing.T) {
	recs := []*Record{
		{Seq: 1, Time: epoch0, Action: VolumeCreate, Object: Object{KindVolume, "data"}, Result: ResultOK, Level: Info},
		{Seq: 2, Time: epoch0.Add(1), Action: VMCrash, Object: Object{KindVM, "wéb/\u2028<&>"}, Level: Critical,
			Actor:  Actor{UID: 4294967295, GID: 7, PID: 1, Command: "rayvmm \"boot\"\t\\ \x00\x01\x1f\x7f 😀"},
			Params: Params{"z": "", "a": "\b\f\n\r\t", "reason": "triple fault", "a.b-c_d": "ü"}, Decision: Deny,
			Result: "guest shut down \u00e9\U0001F600", Prev: Hash{1, 2, 3}, Hash: Hash{0xff}},
		{Seq: maxSeq, Time: time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC), Action: AuditSeal, Object: Object{KindAudit, "log"},
			Result: ResultOK, Level: Warning, Seal: &Seal{Epoch: 1 << 40, MAC: Hash{9}}},
	}
	for _, r := range recs {
		if err := r.validate(); err != nil {
			t.Fatal(err)
		}
		m := map[string]any{
			"seq": r.Seq, "time": formatTime(r.Time), "action": r.Action, "decision": r.Decision, "result": r.Result, "level": r.Level,
			"actor":  map[string]any{"uid": r.Actor.UID, "gid": r.Actor.GID, "pid": r.Actor.PID, "command": r.Actor.Command},
			"object": map[string]any{"kind": r.Object.Kind, "name": r.Object.Name},
			"params": map[string]string(r.Params), "prev": r.Prev.String(), "hash": r.Hash.String(),
		}
		if m["params"] == nil || len(r.Params) == 0 {
			m["params"] = map[string]string{}
		}
		if r.Seal != nil {
			m["seal"] = map[string]any{"epoch": r.Seal.Epoch, "mac": r.Seal.MAC.String()}
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		want, err := jcs.Transform(b)
		if err != nil {
			t.Fatal(err)
		}
		got := appendRecord(nil, r, true, true)
		if !bytes.Equal(got, want) {
			t.Fatalf("canonical JSON differs from JCS:\n got %s\nwant %s", got, want)
		}
		back, err := Parse(got)
		if err != nil {
			t.Fatalf("parse of %s: %v", got, err)
		}
		if again := appendRecord(nil, back, true, true); !bytes.Equal(again, got) {
			t.Fatalf("round trip:\n%s\n%s", got, again)
		}
	}
}

// Parse refuses every other spelling of a record and every bad value.
func TestParseStrict(t *testing.T) {
	good := string(appendRecord(nil, &Record{Seq: 12, Time: epoch0, Action: VolumeCreate, Object: Object{KindVolume, "data"},
		Params: Params{"format": "qcow2", "size": "1024"}, Result: "no \"such\" file", Level: Info}, true, true))
	if _, err := Parse([]byte(good)); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, old, new string }{
		{"space after colon", `"seq":12`, `"seq": 12`},
		{"leading zero", `"seq":12`, `"seq":012`},
		{"seq 0", `"seq":12`, `"seq":0`},
		{"seq too big", `"seq":12`, `"seq":9007199254740992`},
		{"exponent", `"seq":12`, `"seq":1.2e1`},
		{"escaped solidus", `"data"`, `"d\/ata"`},
		{"unicode escape of a letter", `"data"`, `"\u0064ata"`},
		{"upper-case hex escape", `"data"`, `"da\u001Fta"`},
		{"long form of newline", `"data"`, `"da\u000ata"`},
		{"raw control character", `"data"`, "\"da\x01ta\""},
		{"invalid UTF-8", `"data"`, "\"da\xffta\""},
		{"surrogate in UTF-8", `"data"`, "\"da\xed\xa0\x80ta\""},
		{"params out of order", `"format":"qcow2","size":"1024"`, `"size":"1024","format":"qcow2"`},
		{"duplicate param", `"format":"qcow2","size":"1024"`, `"format":"qcow2","format":"qcow2"`},
		{"members out of order", `"decision":""`, `"decision":"" `},
		{"unknown member", `"level":"info"`, `"level":"info","extra":1`},
		{"missing member", `"decision":"",`, ``},
		{"bad level", `"level":"info"`, `"level":"debug"`},
		{"bad decision", `"decision":""`, `"decision":"maybe"`},
		{"upper-case hash", `"hash":"`, `"hash":"A`},
		{"short time", `.000000000Z`, `Z`},
		{"other zone", `.000000000Z`, `.000000000+00:00`},
		{"month 13", `2026-11-01`, `2026-13-01`},
		{"seal on a plain record", `,"seq":12`, `,"seal":{"epoch":0,"mac":"` + strings.Repeat("0", 64) + `"},"seq":12`},
		{"upper-case action", `"volume.create"`, `"Volume.create"`},
		{"empty name", `"name":"data"`, `"name":""`},
		{"empty result", `"result":"no \"such\" file"`, `"result":""`},
		{"trailing data", `"}`, `"} `},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bad := strings.Replace(good, tc.old, tc.new, 1)
			if bad == good {
				t.Fatalf("%q not in %s", tc.old, good)
			}
			if r, err := Parse([]byte(bad)); !errors.Is(err, ErrInvalid) {
				t.Fatalf("Parse(%s) = %+v, %v; want an error", bad, r, err)
			}
		})
	}
}

// Appends validate names and keys, and cut long free text.
func TestAppendChecks(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, 0, 0)
	defer l.Close()
	ctx := context.Background()
	for _, e := range []Entry{
		{Action: "Volume Create", Object: Object{KindVolume, "v"}},
		{Action: VolumeCreate, Object: Object{"", "v"}},
		{Action: VolumeCreate, Object: Object{KindVolume, ""}},
		{Action: VolumeCreate, Object: Object{KindVolume, "v"}, Params: Params{"Bad Key": "x"}},
		{Action: VolumeCreate, Object: Object{KindVolume, "v"}, Level: "debug"},
		{Action: VolumeCreate, Object: Object{KindVolume, "v"}, Decision: "maybe"},
		{Action: AuditSeal, Object: Object{KindAudit, "log"}},
		{Action: AuditRepair, Object: Object{KindAudit, "log"}},
	} {
		if _, err := l.Append(ctx, e); !errors.Is(err, ErrInvalid) {
			t.Errorf("Append(%+v): %v, want ErrInvalid", e, err)
		}
	}
	rs, err := l.Append(ctx, Entry{Action: VMBoot, Object: Object{KindVM, "v"}, Err: errors.New(strings.Repeat("é", 5000)),
		Params: Params{"cmdline": "bad \xff utf-8"}})
	if err != nil {
		t.Fatal(err)
	}
	if r := rs[0]; len(r.Result) > MaxValue || !strings.HasSuffix(r.Result, "...") || r.Level != Warning || r.Params["cmdline"] != "bad \uFFFD utf-8" {
		t.Fatalf("record %+v", r)
	}
	if s := tl.mustVerify(t); s.Records != 1 {
		t.Fatalf("%+v", s)
	}
}

// Files rotate by size, each ending with a seal; the chain runs on across
// them. A whole file deleted is a gap; the last files deleted are a cut.
func TestRotation(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, 50, 4<<10)
	for i := range 100 {
		if _, err := l.Append(context.Background(), entry(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	s := tl.mustVerify(t)
	if s.Files < 5 || s.Records != 100 {
		t.Fatalf("%+v: want 100 records in 5 or more files", s)
	}
	for n := 1; n < s.Files; n++ {
		ls := tl.lines(t, n)
		if r, err := Parse(ls[len(ls)-1]); err != nil || r.Action != AuditSeal {
			t.Fatalf("file %d does not end with a seal: %v", n, err)
		}
	}
	first, err := Parse(tl.lines(t, 3)[0])
	if err != nil {
		t.Fatal(err)
	}
	os.Rename(tl.file(3), tl.file(3)+".bak")
	_, err = tl.verify()
	expectKind(t, err, first.Seq, Deleted)
	os.Rename(tl.file(3)+".bak", tl.file(3))

	firstLast, _ := Parse(tl.lines(t, s.Files)[0])
	os.Remove(tl.file(s.Files))
	_, err = tl.verify()
	expectKind(t, err, firstLast.Seq, Truncated)
}

// Goroutines appending at once share writes and fdatasyncs (group
// commit), and the log stays whole.
func TestGroupCommit(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, 0, 0)
	before := Syncs()
	const g, n = 32, 25
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range g {
		wg.Go(func() {
			<-start
			for j := range n {
				if _, err := l.Append(context.Background(), entry(i*n+j)); err != nil {
					t.Error(err)
				}
			}
		})
	}
	close(start)
	wg.Wait()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	syncs := Syncs().Log - before.Log
	if syncs > g*n+1 {
		t.Fatalf("%d fdatasyncs for %d appends", syncs, g*n)
	}
	t.Logf("%d appends from %d goroutines: %d fdatasyncs of the log", g*n, g, syncs)
	if s := tl.mustVerify(t); s.Records != g*n {
		t.Fatalf("%+v", s)
	}
}

// The key directory is made 0700 and refused when others can enter it;
// the key files are 0400 and 0600.
func TestKeyFiles(t *testing.T) {
	tl := newTestLog(t)
	tl.fill(t, 1, 0)
	for name, want := range map[string]os.FileMode{"": 0o700 | os.ModeDir, VerifyKeyFile: 0o400, SealKeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(tl.keys, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", filepath.Join(tl.keys, name), fi.Mode(), want)
		}
	}
	other := newTestLog(t)
	os.MkdirAll(other.keys, 0o755)
	os.Chmod(other.keys, 0o755)
	l := other.open(t, 0, 0)
	_, err := l.AppendSealed(context.Background(), entry(1))
	if !errors.Is(err, ErrKey) || !strings.Contains(err.Error(), "0700") {
		t.Fatalf("sealing with a key directory of mode 0755: %v", err)
	}
	if _, err := Open(Config{Dir: tl.dir, KeyDir: filepath.Join(tl.dir, "keys")}); err == nil {
		t.Fatal("a key directory inside the log directory was accepted")
	}
}

// A log file replaced while a writer has it open: the writer appends to
// the file that is there now, and verify tells what happened.
func TestFileReplacedUnderWriter(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, 4, 0)
	defer l.Close()
	for i := range 6 {
		if _, err := l.Append(context.Background(), entry(i)); err != nil {
			t.Fatal(err)
		}
	}
	ls := tl.lines(t, 1)
	if err := os.Remove(tl.file(1)); err != nil {
		t.Fatal(err)
	}
	tl.setLines(t, 1, ls[:3])
	if _, err := l.Append(context.Background(), entry(7)); err != nil {
		t.Fatal(err)
	}
	// 3 old records, the new one, and a seal: the writer counted 4
	// unsealed records. The seal's epoch says one was lost.
	if got := len(tl.lines(t, 1)); got != 5 {
		t.Fatalf("the new file has %d lines, want 5: the append went to the old one", got)
	}
	_, err := tl.verify()
	expectKind(t, err, 5, BadSeal)
}
