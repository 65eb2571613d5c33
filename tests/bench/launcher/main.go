// Command launcher runs the processes tests/bench measures and prints what
// it measured as one JSON object (launch.Response) on stdout. The request
// (launch.Request) is its only argument, as JSON:
//
//	launcher '{"argv":["bin/rayvmm","boot"],"wait":"rayguest: ready"}'
//
// It is a process of its own so that the children's peak RSS is not
// inflated by the benchmark program's (see package launch).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: launcher REQUEST-JSON")
		os.Exit(2)
	}
	var req launch.Request
	if err := json.Unmarshal([]byte(os.Args[1]), &req); err != nil {
		fmt.Fprintf(os.Stderr, "launcher: request: %v\n", err)
		os.Exit(2)
	}
	if len(req.Argv) == 0 {
		fmt.Fprintln(os.Stderr, "launcher: request: empty argv")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := json.NewEncoder(os.Stdout).Encode(launch.Run(ctx, req)); err != nil {
		fmt.Fprintf(os.Stderr, "launcher: %v\n", err)
		os.Exit(1)
	}
}
