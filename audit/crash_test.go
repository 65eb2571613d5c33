package audit

import (
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// Writers are killed with SIGKILL in a loop: at a random point of their
// appends, half-way through a write (a torn line), and between syncing a
// seal and advancing the key. After each kill, verify finds the log
// clean, or one torn record at the end, which the next writer repairs
// and records; no append a writer saw return is ever lost.
func TestKill9Writers(t *testing.T) {
	tl := newTestLog(t)
	env := func(id, n int) helperEnv {
		return helperEnv{Dir: tl.dir, Keys: tl.keys, N: n, ID: id, SealEvery: 5}
	}
	acked := map[string]bool{}
	ack := func(l string) {
		if strings.HasPrefix(l, "acked ") {
			acked[strings.TrimPrefix(l, "acked ")] = true
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	torn, behind, repairs := 0, 0, 0
	for round := range 30 {
		mode := []string{"append", "torn", "synced"}[round%3]
		id := 100 + round
		p := startHelper(t, mode, env(id, 0))
		p.waitFor(t, "ready", nil)
		p.go_(t)
		switch mode {
		case "append":
			// Kill after a random number of acknowledged appends: the
			// kill lands anywhere in the ones after.
			for range 1 + rng.IntN(20) {
				ack(p.waitFor(t, "acked ", ack))
			}
		default:
			p.waitFor(t, mode, ack)
		}
		p.kill(t)

		s, err := tl.verify()
		if err != nil {
			ve, ok := err.(*VerifyError)
			if !ok || ve.Kind != Torn {
				t.Fatalf("round %d (%s): after kill -9: %v", round, mode, err)
			}
			torn++
		} else if mode == "torn" {
			t.Fatalf("round %d: killed half-way through a write, but verify found nothing torn (%+v)", round, s)
		} else if s.KeyBehind {
			behind++
		}
		if mode == "synced" && (err != nil || !s.KeyBehind) {
			t.Fatalf("round %d: killed between a seal and the key's step: want a clean log with the key one epoch behind, got %+v, %v", round, s, err)
		}

		// The next writer repairs and goes on.
		next := startHelper(t, "append", env(1000+round, 1))
		next.waitFor(t, "ready", nil)
		next.go_(t)
		next.finish(t)
		s = tl.mustVerify(t)
		repairs = s.Repairs
		if repairs != torn {
			t.Fatalf("round %d: %d torn lines seen, %d repair records", round, torn, repairs)
		}
	}
	if torn < 10 || behind < 10 {
		t.Fatalf("%d torn logs and %d logs with the key behind in 30 rounds: the kills did not land where they should", torn, behind)
	}

	// Every acknowledged append is in the log.
	rs, err := ReadAll(tl.dir)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, r := range rs {
		if r.Action == AuditRepair {
			if r.Level != Warning || r.Params["dropped_bytes"] == "0" {
				t.Fatalf("repair record %+v", r)
			}
		}
		have[r.Params["writer"]+" "+r.Params["i"]] = true
	}
	for k := range acked {
		if !have[k] {
			t.Fatalf("append %q was acknowledged but is not in the log", k)
		}
	}
	t.Logf("%d acknowledged appends, %d torn lines repaired, %d kills with the key behind; %d records", len(acked), torn, behind, len(rs))
}

// strace counts the fsync and fdatasync calls of a writer process that
// appends 100 records, one by one, the last sealed: 100 of the log, one
// for the sealing key per batch with a seal.
func TestFsyncsPerAppendStrace(t *testing.T) {
	testenv.RequireTool(t, "strace")
	tl := newTestLog(t)
	tl.fill(t, 1, 8) // make the keys first
	out := t.TempDir() + "/strace"
	const n = 100
	p := startHelper(t, "append", helperEnv{Dir: tl.dir, Keys: tl.keys, N: n, ID: 1, SealEvery: 25}, "strace", "-f", "-c", "-o", out, "-e", "trace=fsync,fdatasync,sync,syncfs,sync_file_range")
	p.waitFor(t, "ready", nil)
	p.go_(t)
	r := p.finish(t)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	calls := map[string]int{}
	for _, m := range regexp.MustCompile(`(?m)^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$`).FindAllStringSubmatch(string(b), -1) {
		c, _ := strconv.Atoi(m[1])
		calls[m[2]] = c
	}
	delete(calls, "total")
	t.Logf("strace -c: %v\n%s", calls, b)
	seals := n / 25
	if calls["fdatasync"] != n || calls["fsync"] != seals || len(calls) != 2 {
		t.Fatalf("strace counted %v for %d appends with %d seals: want %d fdatasync (one per append) and %d fsync (the key, once per seal)", calls, n, seals, n, seals)
	}
	if got := r.Syncs; got.Log != n || got.Key != int64(seals) {
		t.Fatalf("the helper counted %+v", got)
	}
}
