// Command testrepeat runs the test suite several times and reports how
// often each test failed, to find flaky tests before CI does (`make
// test-repeat N=5`). Each run is a separate `go test -json -count=1`
// invocation, so state one run leaves behind can trip the next, as it
// would between CI runs.
//
//	go run ./internal/testrepeat [-n 5] [-- go-test-args...]
//
// The arguments after -- go to `go test` (default: -timeout 30m ./...). It
// prints each run's totals and the output of every failure as it happens,
// then a table of the tests that failed at least once, and exits 1 if any
// test (or a package's build or test binary) failed.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

func main() {
	n := flag.Int("n", 5, "how many times to run the suite")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: testrepeat [-n N] [-- go-test-args...]")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *n < 1 {
		fmt.Fprintln(os.Stderr, "testrepeat: -n must be at least 1")
		os.Exit(2)
	}
	args := flag.Args()
	if len(args) == 0 {
		args = []string{"-timeout", "30m", "./..."}
	}
	sum := newSummary()
	for run := 1; run <= *n; run++ {
		start := time.Now()
		r := sum.newRun(run)
		r.finish(goTest(args, r))
		fmt.Printf("run %d/%d: %s in %s\n", run, *n, r.totals(), time.Since(start).Round(time.Second))
	}
	fmt.Println()
	sum.report(os.Stdout)
	if sum.failed() {
		os.Exit(1)
	}
}

// goTest runs go test -json with args, feeds its output to r and returns
// its exit error (non-zero also when a test failed).
func goTest(args []string, r *run) error {
	cmd := exec.Command("go", append([]string{"test", "-json", "-count=1"}, args...)...)
	cmd.Stderr = os.Stderr // build errors, go vet findings
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("go test: %w", err)
	}
	r.read(out, os.Stdout)
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("go test %s: %w", strings.Join(args, " "), err)
	}
	return nil
}
