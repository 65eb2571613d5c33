package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

// ExitSide is one side of the exit round-trip comparison.
type ExitSide struct {
	Name    string  `json:"name"`
	Command string  `json:"command"`
	LowMS   Summary `json:"low_wall_ms"`
	HighMS  Summary `json:"high_wall_ms"`
	// PerExitNS: (wall(N high) - wall(N low)) / (N high - N low), one value
	// per round; the boot and setup both runs share cancel out.
	PerExitNS Summary  `json:"per_exit_ns"`
	Failures  []string `json:"failures,omitempty"`
	// InternalPerExitNS (raw loop only): the same difference of its own
	// first-KVM_RUN-to-reset timer.
	InternalPerExitNS *Summary `json:"internal_per_exit_ns,omitempty"`
}

// ExitResult compares rayvmm's exit path with the raw loop's.
type ExitResult struct {
	NLow   int       `json:"n_low"`
	NHigh  int       `json:"n_high"`
	Rounds int       `json:"rounds"`
	Rayvmm *ExitSide `json:"rayvmm"`
	Raw    *ExitSide `json:"raw_loop"`
	// RayvmmOff is rayvmm with the sandbox off (Rayvmm runs strict, the
	// default).
	RayvmmOff *ExitSide `json:"rayvmm_sandbox_off,omitempty"`
	// Ratio is rayvmm's median per-exit time over the raw loop's.
	Ratio float64 `json:"ratio"`
	// SandboxRatio is rayvmm's (strict) median per-exit time over rayvmm's
	// with the sandbox off: what the two seccomp filters cost an exit.
	SandboxRatio float64 `json:"sandbox_ratio,omitempty"`
}

// sides lists the sides that ran.
func (e *ExitResult) sides() []*ExitSide {
	out := []*ExitSide{e.Rayvmm}
	if e.RayvmmOff != nil {
		out = append(out, e.RayvmmOff)
	}
	return append(out, e.Raw)
}

// exitCompare runs rayguest's pio:N job at two N under rayvmm (sandbox
// strict, the default, and off) and the raw loop, interleaved, rounds
// times.
func exitCompare(ctx context.Context, rayvmm, rawloop string, memMiB, nLow, nHigh, rounds int) *ExitResult {
	res := &ExitResult{NLow: nLow, NHigh: nHigh, Rounds: rounds}
	type side struct {
		out  *ExitSide
		argv func(n int) []string
		low  []float64
		high []float64
		per  []float64
		in   []float64
	}
	sides := []*side{
		{out: &ExitSide{Name: "rayvmm"}, argv: func(n int) []string {
			return []string{rayvmm, "boot", "--memory", fmt.Sprintf("%dM", memMiB), "--cmdline", fmt.Sprintf("rayguest.run=pio:%d", n)}
		}},
		{out: &ExitSide{Name: "raw KVM loop"}, argv: func(n int) []string {
			return []string{rawloop, "-memory", fmt.Sprint(memMiB << 20), "-n", fmt.Sprint(n)}
		}},
		{out: &ExitSide{Name: nameRayvmmOff}, argv: func(n int) []string {
			return []string{rayvmm, "boot", "--sandbox", "off", "--memory", fmt.Sprintf("%dM", memMiB), "--cmdline", fmt.Sprintf("rayguest.run=pio:%d", n)}
		}},
	}
	for _, s := range sides {
		s.out.Command = shellJoin(s.argv(0))
		s.out.Command = strings.Replace(s.out.Command, "pio:0", "pio:N", 1)
		s.out.Command = strings.Replace(s.out.Command, "-n 0", "-n N", 1)
	}
	for r := 0; r < rounds; r++ {
		type pair struct{ low, high outcome }
		got := make([]pair, len(sides))
		ok := make([]bool, len(sides))
		for i := range ok {
			ok[i] = true
		}
		for _, n := range []int{nLow, nHigh} {
			for k := range sides {
				i := (k + r) % len(sides)
				s := sides[i]
				o := run(ctx, launch.Request{Argv: s.argv(n)})
				if why := pioFailure(o, n); why != "" {
					s.out.Failures = append(s.out.Failures, fmt.Sprintf("round %d pio:%d: %s", r+1, n, why))
					ok[i] = false
				}
				if n == nLow {
					got[i].low = o
				} else {
					got[i].high = o
				}
			}
		}
		for i, s := range sides {
			if !ok[i] {
				continue
			}
			lo, hi := got[i].low, got[i].high
			s.low = append(s.low, ms(lo.Exit))
			s.high = append(s.high, ms(hi.Exit))
			s.per = append(s.per, float64(hi.Exit-lo.Exit)/float64(nHigh-nLow))
			if a, b := rawRunNS(lo.Stderr), rawRunNS(hi.Stderr); a > 0 && b > 0 {
				s.in = append(s.in, float64(b-a)/float64(nHigh-nLow))
			}
		}
		logf("exits: round %d/%d done", r+1, rounds)
	}
	for _, s := range sides {
		s.out.LowMS, s.out.HighMS, s.out.PerExitNS = summarize(s.low), summarize(s.high), summarize(s.per)
		if len(s.in) > 0 {
			in := summarize(s.in)
			s.out.InternalPerExitNS = &in
		}
	}
	res.Rayvmm, res.Raw, res.RayvmmOff = sides[0].out, sides[1].out, sides[2].out
	if res.Rayvmm.PerExitNS.N > 0 && res.Raw.PerExitNS.N > 0 {
		res.Ratio = res.Rayvmm.PerExitNS.Median / res.Raw.PerExitNS.Median
	}
	if res.Rayvmm.PerExitNS.N > 0 && res.RayvmmOff.PerExitNS.N > 0 {
		res.SandboxRatio = res.Rayvmm.PerExitNS.Median / res.RayvmmOff.PerExitNS.Median
	}
	return res
}

// pioFailure says why a pio:N run does not count, or "".
func pioFailure(o outcome, n int) string {
	want := fmt.Sprintf("rayguest: pio %d done", n)
	switch {
	case o.Err != "":
		return o.Err
	case o.Code != 0:
		return fmt.Sprintf("exit status %d: %s", o.Code, lastLines(o.Stderr+o.Output, 2))
	case !strings.Contains(o.Output, want):
		return fmt.Sprintf("no %q line: %s", want, lastLines(o.Output, 2))
	}
	return ""
}

// rawRunNS is the raw loop's own timer from its stderr JSON line, 0 if none.
func rawRunNS(stderr string) int64 {
	for _, l := range strings.Split(stderr, "\n") {
		var st struct {
			RunNS int64 `json:"run_ns"`
		}
		if json.Unmarshal([]byte(l), &st) == nil && st.RunNS > 0 {
			return st.RunNS
		}
	}
	return 0
}
