package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

// key names a test, or with Test "" a package as a whole (its build, its
// TestMain, a panic or timeout outside any one test).
type key struct{ pkg, test string }

func (k key) String() string {
	if k.test == "" {
		return k.pkg + " (package)"
	}
	return k.pkg + " " + k.test
}

// summary counts, over all runs, in how many runs each test failed or was
// skipped.
type summary struct {
	runs  int
	seen  map[key]bool
	fails map[key]int
	skips map[key]int
}

func newSummary() *summary {
	return &summary{seen: map[key]bool{}, fails: map[key]int{}, skips: map[key]int{}}
}

// run is one `go test` invocation being read.
type run struct {
	s       *summary
	n       int
	out     io.Writer        // where failures are shown as they happen
	output  map[key][]string // output of tests (and packages) not finished yet
	running map[key]bool     // tests started and not finished
	failed  map[key]bool     // what failed in this run
	pass    int
	skip    int
	// sawPackage: go test reported at least one package result, so a
	// non-zero exit is explained by the events.
	sawPackage bool
}

func (s *summary) newRun(n int) *run {
	s.runs++
	return &run{s: s, n: n, output: map[key][]string{}, running: map[key]bool{}, failed: map[key]bool{}}
}

// read consumes go test -json output; lines that are not JSON events are
// copied to out unchanged.
func (r *run) read(in io.Reader, out io.Writer) {
	r.out = out
	br := bufio.NewReader(in)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			var e event
			if json.Unmarshal([]byte(line), &e) != nil || e.Action == "" {
				fmt.Fprint(out, line)
			} else {
				r.event(e)
			}
		}
		if err != nil {
			return
		}
	}
}

func (r *run) event(e event) {
	k := key{e.Package, e.Test}
	switch e.Action {
	case "run":
		r.running[k] = true
	case "output":
		r.output[k] = append(r.output[k], e.Output)
	case "build-output":
		fmt.Fprint(r.out, e.Output)
	case "pass", "fail", "skip":
		if e.Test == "" {
			r.sawPackage = true
		}
		r.result(k, e.Action)
	}
}

// result records what happened to k in this run.
func (r *run) result(k key, action string) {
	r.s.seen[k] = true
	delete(r.running, k)
	switch action {
	case "pass":
		if k.test != "" {
			r.pass++
		}
	case "skip":
		if k.test != "" {
			r.skip++
			r.s.skips[k]++
		}
	case "fail":
		if k.test == "" {
			// Tests that never finished (a panic, a timeout) failed
			// with their package.
			for t := range r.running {
				if t.pkg == k.pkg {
					r.fail(t, "did not finish")
				}
			}
			if r.packageHasFailure(k.pkg) {
				break // explained by its tests
			}
		}
		r.fail(k, "")
	}
	delete(r.output, k)
}

func (r *run) packageHasFailure(pkg string) bool {
	for k := range r.failed {
		if k.pkg == pkg && k.test != "" {
			return true
		}
	}
	return false
}

// fail records a failure of k and shows its output.
func (r *run) fail(k key, why string) {
	if r.failed[k] {
		return
	}
	r.failed[k] = true
	r.s.seen[k] = true
	r.s.fails[k]++
	delete(r.running, k)
	head := fmt.Sprintf("--- run %d: FAIL %s", r.n, k)
	if why != "" {
		head += " (" + why + ")"
	}
	fmt.Fprintln(r.out, head)
	lines := r.output[k]
	if k.test == "" {
		lines = append(lines, r.packageOutput(k.pkg)...)
	}
	const keep = 200
	if len(lines) > keep {
		fmt.Fprintf(r.out, "    ... %d earlier lines\n", len(lines)-keep)
		lines = lines[len(lines)-keep:]
	}
	for _, l := range lines {
		fmt.Fprint(r.out, l)
		if !strings.HasSuffix(l, "\n") {
			fmt.Fprintln(r.out)
		}
	}
}

// packageOutput is the output of a package's tests that have not
// finished, for a package failure that no test explains.
func (r *run) packageOutput(pkg string) []string {
	var out []string
	for k, lines := range r.output {
		if k.pkg == pkg && k.test != "" {
			out = append(out, lines...)
		}
	}
	return out
}

// finish ends the run given go test's exit error: tests still running
// when go test ended failed, and so did go test itself if it exited
// non-zero (or could not start) with no failure to show for it.
func (r *run) finish(err error) {
	for k := range r.running {
		r.fail(k, "did not finish")
	}
	if err != nil && len(r.failed) == 0 {
		r.fail(key{pkg: "go test"}, err.Error())
	}
}

func (r *run) totals() string {
	return fmt.Sprintf("%d tests passed, %d failed, %d skipped", r.pass, len(r.failed), r.skip)
}

func (s *summary) failed() bool { return len(s.fails) > 0 }

// report prints each test that failed or was skipped in some run with the
// number of runs it did so in; every other test passed every time.
func (s *summary) report(w io.Writer) {
	table := func(title string, counts map[key]int) {
		keys := make([]key, 0, len(counts))
		for k := range counts {
			keys = append(keys, k)
		}
		sort.Slice(keys, func(i, j int) bool {
			if counts[keys[i]] != counts[keys[j]] {
				return counts[keys[i]] > counts[keys[j]]
			}
			return keys[i].String() < keys[j].String()
		})
		fmt.Fprintf(w, "%s (runs out of %d):\n", title, s.runs)
		for _, k := range keys {
			fmt.Fprintf(w, "  %d/%d  %s\n", counts[k], s.runs, k)
		}
	}
	if len(s.skips) > 0 {
		table("skipped", s.skips)
	}
	if len(s.fails) > 0 {
		table("FAILED", s.fails)
	}
	tests, clean := 0, 0
	for k := range s.seen {
		if k.test == "" {
			continue
		}
		tests++
		if s.fails[k] == 0 && s.skips[k] == 0 {
			clean++
		}
	}
	fmt.Fprintf(w, "%d runs: %d tests, %d passed in every run; %d tests or packages failed at least once\n",
		s.runs, tests, clean, len(s.fails))
}
