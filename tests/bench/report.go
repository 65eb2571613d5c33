package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// Settings are the parameters of the run.
type Settings struct {
	MemoryMiB     int    `json:"memory_mib"`
	CPUs          int    `json:"cpus"`
	Cmdline       string `json:"cmdline"`
	Runs          int    `json:"boot_runs"`
	ProbeRuns     int    `json:"memory_probe_runs"`
	PIOLow        int    `json:"pio_low"`
	PIOHigh       int    `json:"pio_high"`
	PIORounds     int    `json:"pio_rounds"`
	DensityMemMiB int    `json:"density_memory_mib"`
	DensityKs     []int  `json:"density_k"`
	DensityRounds int    `json:"density_rounds"`
	BlkBenchN     int    `json:"blk_bench_n"`
	NetBenchN     int    `json:"net_bench_n"`
	VsockBenchN   int    `json:"vsock_bench_n"`
}

// Goal is one of the targets, as measured in this run.
type Goal struct {
	Name   string  `json:"name"`
	Target string  `json:"target"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit"`
	Met    bool    `json:"met"`
	Note   string  `json:"note,omitempty"`
}

// Results is everything latest.json holds.
type Results struct {
	Machine   Machine          `json:"machine"`
	Settings  Settings         `json:"settings"`
	Seconds   float64          `json:"duration_s"`
	Boot      []*BootResult    `json:"boot"`
	Exits     *ExitResult      `json:"exit_round_trip,omitempty"`
	Density   []*DensityResult `json:"density,omitempty"`
	Devices   []*DeviceResult  `json:"devices,omitempty"`
	API       *APIResult       `json:"api,omitempty"`
	Goals     []Goal           `json:"goals"`
	Notes     []string         `json:"notes"`
	Failures  []string         `json:"failures"`
	ChartFile string           `json:"chart"`

	resultsDir string // relative to the repository, for README links
}

func (r *Results) boot(name string) *BootResult {
	for _, b := range r.Boot {
		if b.VMM == name {
			return b
		}
	}
	return nil
}

// evaluateGoals computes the goals from this run's numbers only.
func (r *Results) evaluateGoals() {
	ray, q, g := r.boot(nameRayvmm), r.boot(nameQEMU), r.boot(nameGokvm)
	bootGoal := func(peer *BootResult, limit float64) Goal {
		goal := Goal{Name: "boot to ready: rayvmm / " + peer.VMM, Target: fmt.Sprintf("≤ %g×", limit), Unit: "×"}
		if ray.ReadyMS.N == 0 || peer.ReadyMS.N == 0 {
			goal.Note = "not measured: a VMM never reached ready"
			return goal
		}
		goal.Value = round3(ray.ReadyMS.Median / peer.ReadyMS.Median)
		goal.Met = goal.Value <= limit
		goal.Note = fmt.Sprintf("medians %.2f ms / %.2f ms", ray.ReadyMS.Median, peer.ReadyMS.Median)
		return goal
	}
	if ray != nil && q != nil {
		r.Goals = append(r.Goals, bootGoal(q, 0.15))
	}
	if ray != nil && g != nil {
		r.Goals = append(r.Goals, bootGoal(g, 0.8))
	}
	if ray != nil {
		goal := Goal{Name: "rayvmm's VM process (rayvmm-vm) peak RSS − touched guest memory", Target: "≤ 5 MiB", Unit: "MiB"}
		if m := ray.Mem; m != nil && m.OverheadKiB.N > 0 {
			goal.Value = round3(m.OverheadKiB.Median / 1024)
			goal.Met = goal.Value <= 5
			goal.Note = fmt.Sprintf("at the last sample: file-backed (binary text/data, shared page cache) %.1f MiB, anonymous %.1f MiB; guest RAM touched %.2f MiB; rayvmm boot beside it %.1f MiB",
				m.FileKiB.Median/1024, m.AnonKiB.Median/1024, m.GuestTouchedKiB.Median/1024, m.ControlKiB.Median/1024)
		} else {
			goal.Note = "not measured: no memory sample"
		}
		r.Goals = append(r.Goals, goal)
	}
	if ray != nil && ray.Timer != nil {
		t := ray.Timer
		r.Goals = append(r.Goals,
			Goal{Name: "CPU from exec to the first KVM_RUN (rayvmm boot + rayvmm-vm)", Target: "≤ 4 ms", Unit: "ms",
				Value: round3(t.FirstRunCPU.Median), Met: t.FirstRunCPU.Median <= 4,
				Note: fmt.Sprintf("of which rayvmm-vm %.2f ms, rayvmm boot %.2f ms", t.FirstRunCPUVM.Median, t.FirstRunCPU.Median-t.FirstRunCPUVM.Median)},
			Goal{Name: "cost of the split: rayvmm boot ready to hand over to the handoff read in rayvmm-vm", Target: "≤ ~1 ms", Unit: "ms",
				Value: round3(t.Split.Median), Met: t.Split.Median <= 1.1,
				Note: "the part of the VM process's fork/exec and Go runtime start not overlapped with rayvmm boot's own start (rayvmm-vm is started ahead), and the handoff (median wall time)"})
	}
	if ray != nil {
		if off := r.boot(nameRayvmmOff); off != nil {
			goal := Goal{Name: "the sandbox's cost at boot: boot to ready, rayvmm (strict) − rayvmm --sandbox off", Target: "≤ 0.3 ms", Unit: "ms"}
			if ray.ReadyMS.N > 0 && off.ReadyMS.N > 0 {
				goal.Value = round3(ray.ReadyMS.Median - off.ReadyMS.Median)
				goal.Met = goal.Value <= 0.3
				goal.Note = fmt.Sprintf("medians %.2f ms − %.2f ms, interleaved runs", ray.ReadyMS.Median, off.ReadyMS.Median)
			} else {
				goal.Note = "not measured: a VMM never reached ready"
			}
			r.Goals = append(r.Goals, goal)
		}
	}
	if e := r.Exits; e != nil && e.RayvmmOff != nil {
		goal := Goal{Name: "the sandbox's cost per exit: rayvmm (strict) / rayvmm --sandbox off", Target: "≤ 1.05× (nothing measurable)", Unit: "×"}
		if e.SandboxRatio > 0 {
			goal.Value = round3(e.SandboxRatio)
			goal.Met = goal.Value <= 1.05
			goal.Note = fmt.Sprintf("%.2f µs / %.2f µs per exit", e.Rayvmm.PerExitNS.Median/1000, e.RayvmmOff.PerExitNS.Median/1000)
		} else {
			goal.Note = "not measured: runs failed"
		}
		r.Goals = append(r.Goals, goal)
	}
	if e := r.Exits; e != nil {
		goal := Goal{Name: "exit round trip: rayvmm / raw KVM loop", Target: "≤ 1.1×", Unit: "×"}
		if e.Ratio > 0 {
			goal.Value = round3(e.Ratio)
			goal.Met = goal.Value <= 1.1
			goal.Note = fmt.Sprintf("%.2f µs / %.2f µs per exit", e.Rayvmm.PerExitNS.Median/1000, e.Raw.PerExitNS.Median/1000)
		} else {
			goal.Note = "not measured: runs failed"
		}
		r.Goals = append(r.Goals, goal)
	}
	for _, d := range r.Density {
		if d.K != 16 {
			continue
		}
		goal := Goal{Name: "microVMs booted per second at K=16", Target: "≥ 50 /s", Unit: "/s"}
		if d.VMsPerSec.N > 0 {
			goal.Value = round3(d.VMsPerSec.Median)
			goal.Met = goal.Value >= 50
			goal.Note = fmt.Sprintf("%d cores", r.Machine.Cores)
		} else {
			goal.Note = "not measured: every round had a failed VM"
		}
		r.Goals = append(r.Goals, goal)
	}
}

// collectFailures lists every failed run so a reader cannot miss them.
func (r *Results) collectFailures() {
	for _, b := range r.Boot {
		for _, f := range b.Failures {
			r.Failures = append(r.Failures, b.VMM+" boot: "+f)
		}
		if b.Mem != nil {
			for _, f := range b.Mem.Failures {
				r.Failures = append(r.Failures, b.VMM+" memory probe: "+f)
			}
		}
	}
	if e := r.Exits; e != nil {
		for _, s := range e.sides() {
			for _, f := range s.Failures {
				r.Failures = append(r.Failures, s.Name+" pio: "+f)
			}
		}
	}
	for _, d := range r.Density {
		for _, f := range d.Failures {
			r.Failures = append(r.Failures, fmt.Sprintf("density K=%d: %s", d.K, f))
		}
	}
	for _, d := range r.Devices {
		if d.Error != "" {
			r.Failures = append(r.Failures, d.Package+": "+d.Error)
		}
	}
	if r.API != nil && r.API.Error != "" {
		r.Failures = append(r.Failures, "api: "+r.API.Error)
	}
	if r.Failures == nil {
		r.Failures = []string{}
	}
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// machineLine is the one-line provenance under the chart and table.
func (r *Results) machineLine() string {
	m := r.Machine
	pvm := "hardware KVM"
	if m.KVMPVM {
		pvm = "PVM-backed KVM (guest code emulated)"
	}
	commit := m.Commit
	if len(commit) > 12 {
		commit = commit[:12]
	}
	if m.Dirty {
		commit += " (dirty)"
	}
	return fmt.Sprintf("%s, %d cores, %s, %s; commit %s, %s; load %.2f/%.2f before/after",
		m.CPU, m.Cores, m.Kernel, pvm, commit, m.Date[:10], m.LoadBefore, m.LoadAfter)
}

func fmtMS(s Summary) string {
	if s.N == 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f ms (%.1f–%.1f)", s.Median, s.Min, s.Max)
}

func fmtMiB(kib float64) string { return fmt.Sprintf("%.1f MiB", kib/1024) }

// markdown renders the results: everything for results.md, or (compact)
// the README's Performance section, which links to results.md for the rest.
func (r *Results) markdown(compact bool) string {
	var b strings.Builder
	m, s := r.Machine, r.Settings
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	commit := m.Commit
	if m.Dirty {
		commit += " (working tree differed from it)"
	}
	p("Produced by `make bench` at commit `%s` on %s in %.0f s.\n\n", commit, m.Date, r.Seconds)
	p("Machine: %s, %d cores, %.0f GiB, %s, Go %s. %s. ", m.CPU, m.Cores, m.MemoryGiB, m.Kernel, m.Go, m.KVMNote)
	p("Load average (1 min): %.2f before, %.2f after", m.LoadBefore, m.LoadAfter)
	if m.WaitedForLo != "" {
		p(" (%s)", m.WaitedForLo)
	}
	p(". Peers: %s; gokvm %s.\n\n", m.QEMU, m.Gokvm)

	h := "###"
	if compact {
		h = "####"
	}
	p("%s Boot: %d MiB, %d vCPU, command line %q, %d runs each, interleaved\n\n", h, s.MemoryMiB, s.CPUs, s.Cmdline, s.Runs)
	p("Wall time from just before fork/exec to the launcher reading the ready line, and to the end of the run (process reaped and its console output ended); median (min–max). Peak RSS is wait4's ru_maxrss.\n\n")
	p("| VMM | to `rayguest: ready` | to process exit | peak RSS | peak RSS − touched guest RAM | ready / clean exit |\n")
	p("|---|---|---|---|---|---|\n")
	for _, x := range r.Boot {
		exit := fmtMS(x.ExitMS)
		if x.ExitMS.N == 0 && x.AnyExitMS.N > 0 {
			exit = fmt.Sprintf("no clean exit (%.1f ms, see notes)", x.AnyExitMS.Median)
		}
		ready := fmtMS(x.ReadyMS)
		if x.ReadyMS.N == 0 {
			ready = "**failed** (see notes)"
		}
		over, peak := "—", "—"
		if x.PeakRSSKiB.N > 0 {
			peak = fmtMiB(x.PeakRSSKiB.Median)
			if x.RSSBoundRuns > 0 {
				peak = "≤ " + peak + " (launcher's own peak)"
			}
		}
		if x.Mem != nil && x.Mem.OverheadKiB.N > 0 {
			over = fmt.Sprintf("%s (guest %s)", fmtMiB(x.Mem.OverheadKiB.Median), fmtMiB(x.Mem.GuestTouchedKiB.Median))
		}
		p("| %s | %s | %s | %s | %s | %d/%d / %d/%d |\n", x.VMM, ready, exit, peak, over, x.Ready, x.Runs, x.Clean, x.Runs)
	}
	p("\n")
	if ray := r.boot(nameRayvmm); ray != nil && ray.Timer != nil {
		t := ray.Timer
		p("rayvmm's own boot timer (`--boot-timer`, median; its wall clock starts when rayvmm boot's internal/starttime initializes, early in package init but after the Go runtime's own start, so it reads a little lower than the first column; CPU is rayvmm boot's until it starts the VM process plus rayvmm-vm's): first KVM_RUN at %.2f ms wall / %.2f ms CPU (rayvmm-vm's share %.2f ms), guest ready (port 0x440) at %.2f ms wall / %.2f ms CPU. Cost of the split, from rayvmm boot having the VM ready to hand over to the handoff read in rayvmm-vm (which rayvmm boot starts ahead, during its own start): %.2f ms (%.2f–%.2f).\n\n",
			t.FirstRunWall.Median, t.FirstRunCPU.Median, t.FirstRunCPUVM.Median, t.ReadyWall.Median, t.ReadyCPU.Median, t.Split.Median, t.Split.Min, t.Split.Max)
	}
	if ray := r.boot(nameRayvmm); ray != nil && ray.Mem != nil && ray.Mem.ControlKiB.N > 0 {
		p("rayvmm runs as two processes: rayvmm boot (the control plane: resolves the spec, opens every resource, waits) and rayvmm-vm (the VM process, which holds guest RAM). The table's peak RSS is wait4's for rayvmm boot, which covers both; \"peak RSS − touched guest RAM\" is rayvmm-vm's own (VmHWM), and rayvmm boot's own peak beside it is %s.\n\n", fmtMiB(ray.Mem.ControlKiB.Median))
	}
	if a := r.API; a != nil {
		p("%s Control API: %d calls of each, on the VM's Unix socket, µs median / p99\n\n", h, a.Calls)
		if a.Error != "" {
			p("**failed**: %s\n\n", a.Error)
		}
		p("| call | median | p99 |\n|---|---|---|\n")
		for _, x := range []struct {
			name string
			l    Latency
		}{
			{"bare Unix socket round trip, 64 bytes (the floor)", a.RawRoundTrip},
			{"`GET /`, keep-alive connection", a.Get},
			{"`GET /`, a new connection each", a.GetNewConn},
			{"`PATCH /vm` Paused then Resumed (one pair)", a.PauseResume},
		} {
			p("| %s | %.0f µs | %.0f µs |\n", x.name, x.l.Median, x.l.P99)
		}
		p("\n")
	}

	if e := r.Exits; e != nil {
		p("%s Exit round trip: `rayguest.run=pio:N`, N = %d and %d, %d rounds interleaved\n\n", h, e.NLow, e.NHigh, e.Rounds)
		p("Per exit = (wall(N=%d) − wall(N=%d)) / %d, median over rounds; boot and setup cancel out.\n\n", e.NHigh, e.NLow, e.NHigh-e.NLow)
		p("| | per port-write exit | wall, N=%d | wall, N=%d |\n|---|---|---|---|\n", e.NLow, e.NHigh)
		for _, x := range e.sides() {
			per := "—"
			if x.PerExitNS.N > 0 {
				per = fmt.Sprintf("%.2f µs (%.2f–%.2f)", x.PerExitNS.Median/1000, x.PerExitNS.Min/1000, x.PerExitNS.Max/1000)
			}
			p("| %s | %s | %s | %s |\n", x.Name, per, fmtMS(x.LowMS), fmtMS(x.HighMS))
		}
		if e.Ratio > 0 {
			p("\nrayvmm / raw loop: **%.3f×**.", e.Ratio)
		}
		if e.SandboxRatio > 0 {
			p(" rayvmm (sandbox strict) / rayvmm --sandbox off: **%.3f×**.", e.SandboxRatio)
		}
		if in := e.Raw.InternalPerExitNS; in != nil {
			p(" (The raw loop's own timer, first KVM_RUN to reset: %.2f µs per exit.)", in.Median/1000)
		}
		p("\n\n")
	}

	if len(r.Density) > 0 {
		p("%s Density: K `rayvmm boot --memory %dM` started at once (rayguest powers off), %d rounds\n\n", h, s.DensityMemMiB, s.DensityRounds)
		p("| K | microVMs/s | first start to last exit | RSS per VM (median, min–max) | failed VMs |\n|---|---|---|---|---|\n")
		for _, d := range r.Density {
			rate := "—"
			if d.VMsPerSec.N > 0 {
				rate = fmt.Sprintf("%.0f (%.0f–%.0f)", d.VMsPerSec.Median, d.VMsPerSec.Min, d.VMsPerSec.Max)
			}
			rss := "—"
			if d.RSSPerVMKiB.N > 0 {
				rss = fmt.Sprintf("%.1f MiB (%.1f–%.1f)", d.RSSPerVMKiB.Median/1024, d.RSSPerVMKiB.Min/1024, d.RSSPerVMKiB.Max/1024)
			}
			failed := 0
			for _, f := range d.Failures {
				var n int
				fmt.Sscanf(f, "%d×", &n)
				failed += n
			}
			p("| %d | %s | %s | %s | %d |\n", d.K, rate, fmtMS(d.WallMS), rss, failed)
		}
		p("\n")
	}

	if len(r.Devices) > 0 && compact {
		p("%s Device paths against raw I/O\n\n", h)
		for _, d := range r.Devices {
			if d.Error != "" {
				p("- `%s`: **failed**: %s\n", d.Package, d.Error)
				continue
			}
			var rs []float64
			for _, x := range d.Benches {
				rs = append(rs, x.Ratio)
			}
			sm := summarize(rs)
			p("- `%s`: device rate / raw rate %.2f–%.2f× over %d benchmarks (median %.2f×)\n", d.Package, sm.Min, sm.Max, sm.N, sm.Median)
		}
		p("\n")
	}
	if len(r.Devices) > 0 && !compact {
		p("%s Device paths against raw I/O (same process, alternating rounds)\n\n", h)
		p("Ratio = device rate / raw rate (1.0: the device path costs nothing over pread/pwrite, the raw TAP or a raw Unix-socket copy).\n\n")
		p("| benchmark | device | raw | ratio |\n|---|---|---|---|\n")
		for _, d := range r.Devices {
			pkg := d.Package[strings.LastIndex(d.Package, "/")+1:]
			for _, x := range d.Benches {
				dev, raw := deviceRates(x.Metrics)
				p("| %s %s | %s | %s | %.2f |\n", pkg, x.Name, dev, raw, x.Ratio)
			}
			if d.Error != "" {
				p("| %s | **failed**: %s | | |\n", pkg, d.Error)
			}
		}
		p("\n")
	}

	p("%s Goals (ratios from this run)\n\n| goal | target | measured | met |\n|---|---|---|---|\n", h)
	for _, g := range r.Goals {
		met := "**no**"
		if g.Met {
			met = "yes"
		}
		val := fmt.Sprintf("%.3f×", g.Value)
		if g.Unit != "×" {
			val = fmt.Sprintf("%.2f %s", g.Value, g.Unit)
		}
		if g.Note != "" {
			val += " — " + g.Note
		}
		p("| %s | %s | %s | %s |\n", g.Name, g.Target, val, met)
	}
	p("\n")
	if compact {
		p("![Boot time and peak RSS of rayvmm, QEMU microvm and gokvm](%s/%s)\n\n", r.resultsDir, r.ChartFile)
		p("How each VMM is run, how memory is accounted and every failed run: [%s/results.md](%s/results.md); raw numbers: [%s/latest.json](%s/latest.json).\n",
			r.resultsDir, r.resultsDir, r.resultsDir, r.resultsDir)
		return b.String()
	}
	if len(r.Notes) > 0 {
		p("Notes:\n\n")
		for _, n := range r.Notes {
			p("- %s\n", n)
		}
		p("\n")
	}
	if len(r.Failures) > 0 {
		p("Runs that failed or did not end cleanly (one that never reached `rayguest: ready` counts in no number above; one that did counts for boot-to-ready and peak RSS only):\n\n")
		for _, f := range r.Failures {
			p("- %s\n", f)
		}
		p("\n")
	}
	return b.String()
}

// deviceRates picks the device and raw rate columns of a benchmark.
func deviceRates(m map[string]float64) (string, string) {
	for _, u := range []string{"iops", "frames/s", "MB/s"} {
		if d, ok := m[u]; ok {
			peer, ok := m["raw-"+u]
			if !ok {
				peer = m["qemu-nbd-"+u] // shards/nbd: the peer is qemu-nbd
			}
			return fmt.Sprintf("%.0f %s", d, u), fmt.Sprintf("%.0f %s", peer, u)
		}
	}
	return "—", "—"
}
