package audit

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The tests start writers as real processes: this test binary run again
// with AUDIT_TEST_HELPER set.
func TestMain(m *testing.M) {
	if mode := os.Getenv("AUDIT_TEST_HELPER"); mode != "" {
		if err := helper(mode); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// helperEnv describes a helper: where the log is, how many records to
// append (0: until killed), its writer id, the seal interval.
type helperEnv struct {
	Dir, Keys string
	N, ID     int
	SealEvery int
}

// helperResult is what a helper prints last.
type helperResult struct {
	Appends int
	Syncs   SyncCounts
}

// helper appends records: it prints "ready", waits for a line on stdin,
// then appends, printing "acked ID I" after each append returns, and
// finally its result as JSON. Mode "torn" stops half-way through its
// first write, prints "torn" and waits to be killed; mode "synced" does
// the same after its first batch with a seal is synced and before the
// key is advanced.
func helper(mode string) error {
	var e helperEnv
	if err := json.Unmarshal([]byte(os.Getenv("AUDIT_TEST_ENV")), &e); err != nil {
		return err
	}
	wait := func(what string) {
		fmt.Println(what)
		io.Copy(io.Discard, os.Stdin) // until killed
	}
	switch mode {
	case "torn":
		testHookWrite = func(f *os.File, b []byte, off int64) error {
			if _, err := f.WriteAt(b[:len(b)/2], off); err != nil {
				return err
			}
			wait("torn")
			return nil
		}
	case "synced":
		testHookSynced = func() { wait("synced") }
	}
	l, err := Open(Config{Dir: e.Dir, KeyDir: e.Keys, SealEvery: e.SealEvery})
	if err != nil {
		return err
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return err
	}
	n := 0
	for ; e.N == 0 || n < e.N; n++ {
		en := Entry{Action: VolumeSnapshot, Object: Object{KindVolume, fmt.Sprintf("w%d", e.ID)},
			Params: Params{"writer": strconv.Itoa(e.ID), "i": strconv.Itoa(n), ParamSnapshot: fmt.Sprintf("w%d-%d", e.ID, n)}}
		if n == e.N-1 {
			_, err = l.AppendSealed(context.Background(), en) // a clean stop: the last append seals
		} else {
			_, err = l.Append(context.Background(), en)
		}
		if err != nil {
			return err
		}
		fmt.Printf("acked %d %d\n", e.ID, n)
	}
	if err := l.Close(); err != nil {
		return err
	}
	b, _ := json.Marshal(helperResult{Appends: n, Syncs: Syncs()})
	fmt.Printf("result %s\n", b)
	return nil
}

// proc is a running helper.
type proc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	done  chan error
}

func startHelper(t testing.TB, mode string, e helperEnv, wrap ...string) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(e)
	args := append(wrap, exe, "-test.run=^$")
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "AUDIT_TEST_HELPER="+mode, "AUDIT_TEST_ENV="+string(b))
	cmd.Stderr = os.Stderr
	p := &proc{cmd: cmd, lines: make(chan string, 1024), done: make(chan error, 1)}
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() { cmd.Process.Kill(); <-p.done })
	return p
}

// waitFor returns the next line with prefix, within a deadline that
// names it; lines before it go to seen.
func (p *proc) waitFor(t testing.TB, prefix string, seen func(string)) string {
	t.Helper()
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("helper exited before printing %q", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
			if seen != nil {
				seen(l)
			}
		case <-deadline:
			t.Fatalf("no %q from the helper in 2 minutes", prefix)
		}
	}
}

func (p *proc) go_(t testing.TB) {
	if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
}

// kill ends the helper with SIGKILL and waits for it.
func (p *proc) kill(t testing.TB) {
	p.cmd.Process.Kill()
	for range p.lines {
	}
}

// finish waits for a helper that runs to completion and returns its result.
func (p *proc) finish(t testing.TB) helperResult {
	t.Helper()
	l := p.waitFor(t, "result ", nil)
	var r helperResult
	if err := json.Unmarshal([]byte(strings.TrimPrefix(l, "result ")), &r); err != nil {
		t.Fatal(err)
	}
	for range p.lines {
	}
	if err := <-p.done; err != nil {
		t.Fatalf("helper: %v", err)
	}
	p.done <- nil
	return r
}

// 8 processes append 200 records each at the same time: the log verifies
// with exactly 1600 records, seqs 1.. with no gap, each writer's records
// in its own order, and every append cost exactly one fdatasync of the log.
func TestConcurrentProcesses(t *testing.T) {
	const procs, n = 8, 200
	tl := newTestLog(t)
	var ps []*proc
	for i := range procs {
		ps = append(ps, startHelper(t, "append", helperEnv{Dir: tl.dir, Keys: tl.keys, N: n, ID: i, SealEvery: DefaultSealEvery}))
	}
	for _, p := range ps {
		p.waitFor(t, "ready", nil)
	}
	for _, p := range ps {
		p.go_(t)
	}
	for i, p := range ps {
		r := p.finish(t)
		if r.Appends != n || r.Syncs.Log != n {
			t.Errorf("writer %d: %d appends, %d fdatasyncs of the log: want %d and one per append", i, r.Appends, r.Syncs.Log, n)
		}
		t.Logf("writer %d: %+v", i, r)
	}
	s := tl.mustVerify(t)
	if s.Records != procs*n {
		t.Fatalf("verify: %d records, want %d (%+v)", s.Records, procs*n, s)
	}
	if s.LastSeq != uint64(s.Records+s.Seals) || s.Unsealed != 0 {
		t.Fatalf("verify: %+v: want seqs 1..%d, all sealed", s, s.Records+s.Seals)
	}
	next := make([]int, procs)
	var seq uint64
	rs, err := ReadAll(tl.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		seq++
		if r.Seq != seq {
			t.Fatalf("record %d has seq %d", seq, r.Seq)
		}
		if r.Action == AuditSeal {
			continue
		}
		w, _ := strconv.Atoi(r.Params["writer"])
		if r.Params["i"] != strconv.Itoa(next[w]) {
			t.Fatalf("seq %d: writer %d's record %s, want %d", r.Seq, w, r.Params["i"], next[w])
		}
		next[w]++
	}
	t.Logf("%+v", s)
}
