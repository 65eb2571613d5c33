package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// A run with a passing, a failing and a skipped test, a package that does
// not build, and one whose test binary died mid-test (a timeout panic),
// as go test -json reports them; then a run where everything passes.
const badRun = `{"Action":"start","Package":"ex/a"}
{"Action":"run","Package":"ex/a","Test":"TestA"}
{"Action":"output","Package":"ex/a","Test":"TestA","Output":"=== RUN   TestA\n"}
{"Action":"pass","Package":"ex/a","Test":"TestA","Elapsed":0}
{"Action":"run","Package":"ex/a","Test":"TestB"}
{"Action":"output","Package":"ex/a","Test":"TestB","Output":"    b_test.go:9: helper's TAP not in [lo]\n"}
{"Action":"fail","Package":"ex/a","Test":"TestB","Elapsed":0.1}
{"Action":"run","Package":"ex/a","Test":"TestC"}
{"Action":"skip","Package":"ex/a","Test":"TestC","Elapsed":0}
{"Action":"fail","Package":"ex/a","Elapsed":0.2}
{"ImportPath":"ex/b","Action":"build-output","Output":"b.go:3:1: syntax error\n"}
{"ImportPath":"ex/b","Action":"build-fail"}
{"Action":"start","Package":"ex/b"}
{"Action":"fail","Package":"ex/b","Elapsed":0,"FailedBuild":"ex/b"}
{"Action":"start","Package":"ex/c"}
{"Action":"run","Package":"ex/c","Test":"TestD"}
{"Action":"output","Package":"ex/c","Test":"TestD","Output":"panic: test timed out after 1s\n"}
{"Action":"output","Package":"ex/c","Output":"FAIL\tex/c\t1.0s\n"}
{"Action":"fail","Package":"ex/c","Elapsed":1}
not json: printed as is
`

const goodRun = `{"Action":"run","Package":"ex/a","Test":"TestA"}
{"Action":"pass","Package":"ex/a","Test":"TestA"}
{"Action":"run","Package":"ex/a","Test":"TestB"}
{"Action":"pass","Package":"ex/a","Test":"TestB"}
{"Action":"run","Package":"ex/a","Test":"TestC"}
{"Action":"pass","Package":"ex/a","Test":"TestC"}
{"Action":"pass","Package":"ex/a"}
{"Action":"pass","Package":"ex/b"}
{"Action":"run","Package":"ex/c","Test":"TestD"}
{"Action":"pass","Package":"ex/c","Test":"TestD"}
{"Action":"pass","Package":"ex/c"}
`

func TestSummary(t *testing.T) {
	s := newSummary()
	var live bytes.Buffer
	r := s.newRun(1)
	r.read(strings.NewReader(badRun), &live)
	r.finish(errors.New("exit status 1"))
	if got, want := r.totals(), "1 tests passed, 3 failed, 1 skipped"; got != want {
		t.Errorf("run 1: %q, want %q", got, want)
	}
	r = s.newRun(2)
	r.read(strings.NewReader(goodRun), &live)
	r.finish(nil)
	if got, want := r.totals(), "4 tests passed, 0 failed, 0 skipped"; got != want {
		t.Errorf("run 2: %q, want %q", got, want)
	}
	for _, want := range []string{
		"--- run 1: FAIL ex/a TestB\n    b_test.go:9: helper's TAP not in [lo]\n",
		"b.go:3:1: syntax error\n--- run 1: FAIL ex/b (package)\n",
		"--- run 1: FAIL ex/c TestD (did not finish)\npanic: test timed out after 1s\n",
		"not json: printed as is\n",
	} {
		if !strings.Contains(live.String(), want) {
			t.Errorf("live output lacks %q:\n%s", want, live.String())
		}
	}
	if strings.Contains(live.String(), "FAIL ex/a (package)") || strings.Contains(live.String(), "FAIL ex/c (package)") {
		t.Errorf("a package failure its tests explain was reported on its own:\n%s", live.String())
	}
	var rep bytes.Buffer
	s.report(&rep)
	want := `skipped (runs out of 2):
  1/2  ex/a TestC
FAILED (runs out of 2):
  1/2  ex/a TestB
  1/2  ex/b (package)
  1/2  ex/c TestD
2 runs: 4 tests, 1 passed in every run; 3 tests or packages failed at least once
`
	if rep.String() != want {
		t.Errorf("report:\n%s\nwant:\n%s", rep.String(), want)
	}
	if !s.failed() {
		t.Error("failed() = false")
	}
}

func TestSummaryGoTestFailsAlone(t *testing.T) {
	s := newSummary()
	var live bytes.Buffer
	r := s.newRun(1)
	r.read(strings.NewReader(""), &live)
	r.finish(errors.New(`go test: exec: "go": executable file not found in $PATH`))
	if !s.failed() || !strings.Contains(live.String(), "FAIL go test (package)") {
		t.Errorf("a go test that never ran passed:\n%s", live.String())
	}
	s = newSummary()
	r = s.newRun(1)
	r.read(strings.NewReader(goodRun), &live)
	r.finish(nil)
	if s.failed() {
		t.Error("a clean run failed")
	}
}
