package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"time"

	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

// readyLine is what rayguest prints once it is up, in every VMM.
const readyLine = "rayguest: ready"

// launcherPath is the built tests/bench/launcher every measured process is
// started through.
var launcherPath string

// outcome is one measured process run.
type outcome = launch.Outcome

// runMany asks the launcher to run req.
func runMany(ctx context.Context, req launch.Request) (launch.Response, error) {
	if req.Wait == "" {
		req.Wait = readyLine
	}
	b, err := json.Marshal(req)
	if err != nil {
		return launch.Response{}, err
	}
	cmd := exec.CommandContext(ctx, launcherPath, string(b))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return launch.Response{}, fmt.Errorf("launcher: %w: %s", err, lastLines(stderr.String(), 3))
	}
	var resp launch.Response
	if err := json.Unmarshal(out, &resp); err != nil {
		return launch.Response{}, fmt.Errorf("launcher: reply: %w", err)
	}
	return resp, nil
}

// run runs one process; a failure of the launcher itself is the run's
// error.
func run(ctx context.Context, req launch.Request) outcome {
	resp, err := runMany(ctx, req)
	if err != nil || len(resp.Outcomes) != 1 {
		if err == nil {
			err = fmt.Errorf("launcher: %d outcomes for one run", len(resp.Outcomes))
		}
		return outcome{Code: -1, Err: err.Error()}
	}
	return resp.Outcomes[0]
}

// sampled is a run sampled through /proc/PID/smaps every millisecond.
func sampled(ctx context.Context, req launch.Request, guestKiB int64) outcome {
	req.SampleEvery, req.GuestKiB = time.Millisecond, guestKiB
	return run(ctx, req)
}

// lastLines returns the last n non-empty lines of s, joined with " | ",
// for failure messages.
func lastLines(s string, n int) string {
	var out []string
	for _, l := range strings.Split(strings.ReplaceAll(s, "\r", ""), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, " | ")
}
