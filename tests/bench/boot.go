package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

// vmmUnderTest is one VMM of the boot comparison.
type vmmUnderTest struct {
	name string
	req  launch.Request
	// cleanExit says whether a run that reached ready also ended the way
	// the guest asked (power off), and if not, why.
	cleanExit func(o outcome) (bool, string)
	note      string
}

// poweredOff is the clean-exit check for VMMs that end when rayguest powers
// off: exit status 0 and rayguest's last line.
func poweredOff(o outcome) (bool, string) {
	switch {
	case o.Err != "":
		return false, o.Err
	case o.Code != 0:
		return false, fmt.Sprintf("exit status %d: %s", o.Code, lastLines(o.Stderr+o.Output, 2))
	case !strings.Contains(o.Output, "rayguest: poweroff"):
		return false, "no 'rayguest: poweroff' line: " + lastLines(o.Output, 2)
	}
	return true, ""
}

// BootRun is one timed boot.
type BootRun struct {
	ReadyMS   float64 `json:"ready_ms"` // 0: never ready
	ExitMS    float64 `json:"exit_ms"`
	MaxRSSKiB int64   `json:"max_rss_kib"`
	// RSSBound: MaxRSSKiB is the launcher's own peak, so the VMM's is at
	// most that (see package launch).
	RSSBound  bool       `json:"max_rss_is_upper_bound,omitempty"`
	Code      int        `json:"exit_status"`
	Ready     bool       `json:"ready"`
	CleanExit bool       `json:"clean_exit"`
	Why       string     `json:"why,omitempty"`
	Timer     *BootTimer `json:"rayvmm_boot_timer,omitempty"`
}

// BootTimer is what `rayvmm boot --boot-timer` logged, in milliseconds from
// its process start.
type BootTimer struct {
	FirstRunWall float64 `json:"first_kvm_run_wall_ms"`
	// FirstRunCPU is the CPU time of both processes from exec to the first
	// KVM_RUN: rayvmm boot's until it launched the VM process, plus the
	// VM process's (FirstRunCPUVM) until its first KVM_RUN.
	FirstRunCPU   float64 `json:"first_kvm_run_cpu_ms"`
	FirstRunCPUVM float64 `json:"first_kvm_run_cpu_vm_process_ms"`
	ReadyWall     float64 `json:"ready_wall_ms"`
	ReadyCPU      float64 `json:"ready_cpu_ms"`
	// Split is the wall time from rayvmm boot having the VM ready to hand
	// over (where a single process would go on to build it) to the VM
	// process having read its handoff: what running the guest in a
	// process of its own adds to the boot. rayvmm boot starts rayvmm-vm
	// ahead, while it starts itself (vmproc/spawn), so the VM process's
	// fork/exec and Go runtime start count only where they outlast
	// rayvmm's own start and its opening of the VM's resources.
	Split float64 `json:"split_ms"`
}

// parseBootTimer finds rayvmm's boot timer log lines (slog text) in
// stderr.
func parseBootTimer(stderr string) *BootTimer {
	t := &BootTimer{}
	fields := map[string]*float64{
		"wall": &t.ReadyWall, "cpu": &t.ReadyCPU,
		"first_kvm_run_wall": &t.FirstRunWall, "first_kvm_run_cpu": &t.FirstRunCPU,
		"vm_process_first_kvm_run_cpu": &t.FirstRunCPUVM, "split": &t.Split,
	}
	n := 0
	for _, line := range strings.Split(stderr, "\n") {
		if !strings.Contains(line, "boot timer: ") {
			continue
		}
		for _, f := range strings.Fields(line) {
			k, v, ok := strings.Cut(f, "=")
			if p := fields[k]; ok && p != nil {
				if d, err := time.ParseDuration(v); err == nil {
					*p = ms(d)
					n++
				}
			}
		}
	}
	if n != len(fields) {
		return nil
	}
	return t
}

// MemProbe is the memory accounting of one VMM, from runs sampled through
// /proc/PID/smaps every millisecond (untimed).
type MemProbe struct {
	Runs int `json:"runs"`
	// GuestTouchedKiB: resident part of the guest RAM mapping at the last
	// sample before exit.
	GuestTouchedKiB Summary `json:"guest_touched_kib"`
	// OverheadKiB: the peak RSS (VmHWM at the last sample) of the process
	// holding guest RAM minus GuestTouchedKiB. For rayvmm that process is
	// the VM process, rayvmm-vm.
	OverheadKiB Summary `json:"overhead_kib"`
	// ControlKiB: rayvmm boot's own peak RSS (VmHWM), beside its VM
	// process (rayvmm only).
	ControlKiB Summary `json:"control_plane_kib,omitzero"`
	// At the last sample: resident file-backed pages (binary, libraries)
	// and anonymous pages other than guest RAM.
	FileKiB  Summary  `json:"file_kib"`
	AnonKiB  Summary  `json:"anon_kib"`
	Failures []string `json:"failures,omitempty"`

	guest, over, file, anon, control []float64
}

// BootResult is the boot comparison for one VMM.
type BootResult struct {
	VMM       string  `json:"vmm"`
	Command   string  `json:"command"`
	Note      string  `json:"note,omitempty"`
	Runs      int     `json:"runs"`
	Ready     int     `json:"runs_ready"`
	Clean     int     `json:"runs_clean_exit"`
	ReadyMS   Summary `json:"ready_ms"`    // runs that printed the ready line
	ExitMS    Summary `json:"exit_ms"`     // runs that also exited cleanly
	AnyExitMS Summary `json:"any_exit_ms"` // runs that were ready, however they ended
	// PeakRSSKiB: ru_maxrss of the runs that were ready.
	PeakRSSKiB Summary `json:"peak_rss_kib"`
	// RSSBoundRuns: runs whose ru_maxrss was the launcher's own peak.
	RSSBoundRuns int       `json:"peak_rss_upper_bound_runs,omitempty"`
	Failures     []string  `json:"failures,omitempty"`
	Timer        *TimerSum `json:"rayvmm_boot_timer,omitempty"`
	Mem          *MemProbe `json:"memory,omitempty"`
	RunsDetail   []BootRun `json:"runs_detail"`
}

// TimerSum summarizes rayvmm's own boot timer over the runs.
type TimerSum struct {
	FirstRunWall  Summary `json:"first_kvm_run_wall_ms"`
	FirstRunCPU   Summary `json:"first_kvm_run_cpu_ms"`
	FirstRunCPUVM Summary `json:"first_kvm_run_cpu_vm_process_ms"`
	ReadyWall     Summary `json:"ready_wall_ms"`
	ReadyCPU      Summary `json:"ready_cpu_ms"`
	Split         Summary `json:"split_ms"`
}

// bootCompare runs each VMM runs times, interleaved (each round runs every
// VMM once, in an order that rotates), after one untimed warm-up round, then
// probeRuns sampled runs each for the memory accounting.
func bootCompare(ctx context.Context, vmms []vmmUnderTest, runs, probeRuns int, guestKiB int64) []*BootResult {
	res := make([]*BootResult, len(vmms))
	for i, v := range vmms {
		res[i] = &BootResult{VMM: v.name, Command: shellJoin(v.req.Argv), Note: v.note}
	}
	logf("boot: warm-up round")
	for _, v := range vmms {
		run(ctx, v.req)
	}
	for r := 0; r < runs; r++ {
		for k := range vmms {
			i := (k + r) % len(vmms)
			v := vmms[i]
			res[i].RunsDetail = append(res[i].RunsDetail, v.bootRun(run(ctx, v.req)))
		}
		logf("boot: round %d/%d done", r+1, runs)
	}
	for _, b := range res {
		b.summarize()
	}
	for r := 0; r < probeRuns; r++ {
		for k := range vmms {
			i := (k + r) % len(vmms)
			o := sampled(ctx, vmms[i].req, guestKiB)
			if res[i].Mem == nil {
				res[i].Mem = &MemProbe{}
			}
			res[i].Mem.add(o)
		}
	}
	for _, b := range res {
		if b.Mem != nil {
			b.Mem.finish()
		}
	}
	return res
}

// bootRun is what one launcher outcome of v contributes to the results.
// The launcher stamps a line no later than the exit (package launch); a run
// whose stamps say otherwise counts as failed, so no published ready time
// is ever later than its run's exit.
func (v vmmUnderTest) bootRun(o outcome) BootRun {
	if o.Ready > o.Exit {
		o.Err = fmt.Sprintf("launcher stamped %q at %v, after the exit at %v", readyLine, o.Ready, o.Exit)
		o.Ready = 0
	}
	br := BootRun{ExitMS: ms(o.Exit), MaxRSSKiB: o.MaxRSSKiB, Code: o.Code, Ready: o.Ready > 0, ReadyMS: ms(o.Ready),
		RSSBound: o.MaxRSSKiB <= o.ParentHWMKiB}
	switch {
	case o.Err != "":
		br.Why = o.Err
	case !br.Ready:
		br.Why = fmt.Sprintf("no %q line (exit status %d): %s", readyLine, o.Code, lastLines(o.Output+o.Stderr, 3))
	default:
		br.CleanExit, br.Why = v.cleanExit(o)
	}
	br.Timer = parseBootTimer(o.Stderr)
	return br
}

func (b *BootResult) summarize() {
	var ready, clean, any, rss []float64
	var t struct{ frw, frc, frv, rw, rc, split []float64 }
	why := map[string]int{}
	for _, r := range b.RunsDetail {
		b.Runs++
		if r.Why != "" {
			why[r.Why]++
		}
		if !r.Ready {
			continue
		}
		b.Ready++
		ready = append(ready, r.ReadyMS)
		any = append(any, r.ExitMS)
		rss = append(rss, float64(r.MaxRSSKiB))
		if r.RSSBound {
			b.RSSBoundRuns++
		}
		if r.CleanExit {
			b.Clean++
			clean = append(clean, r.ExitMS)
		}
		if r.Timer != nil {
			t.frw = append(t.frw, r.Timer.FirstRunWall)
			t.frc = append(t.frc, r.Timer.FirstRunCPU)
			t.frv = append(t.frv, r.Timer.FirstRunCPUVM)
			t.split = append(t.split, r.Timer.Split)
			t.rw = append(t.rw, r.Timer.ReadyWall)
			t.rc = append(t.rc, r.Timer.ReadyCPU)
		}
	}
	b.ReadyMS, b.ExitMS, b.AnyExitMS, b.PeakRSSKiB = summarize(ready), summarize(clean), summarize(any), summarize(rss)
	b.Failures = countedReasons(why)
	if len(t.rw) > 0 {
		b.Timer = &TimerSum{summarize(t.frw), summarize(t.frc), summarize(t.frv), summarize(t.rw), summarize(t.rc), summarize(t.split)}
	}
}

// countedReasons turns reason counts into "N× reason" lines, most frequent
// first.
func countedReasons(why map[string]int) []string {
	var out []string
	for w, n := range why {
		out = append(out, fmt.Sprintf("%d× %s", n, w))
	}
	sort.Slice(out, func(i, j int) bool { return out[i] > out[j] })
	return out
}

func (m *MemProbe) add(o outcome) {
	m.Runs++
	switch {
	case o.Err != "":
		m.Failures = append(m.Failures, o.Err)
	case o.Ready == 0:
		m.Failures = append(m.Failures, "never ready")
	case o.Sample == nil:
		m.Failures = append(m.Failures, "no smaps sample with a guest-memory-sized mapping")
	default:
		s := o.Sample
		m.guest = append(m.guest, float64(s.GuestRSS))
		// VmHWM is at least the RSS the kernel counts; smaps' sum can be
		// higher for shared guest RAM (gokvm's), so take the larger.
		m.over = append(m.over, float64(max(s.HWMKiB, s.TotalRSS)-s.GuestRSS))
		if s.ControlHWMKiB > 0 {
			m.control = append(m.control, float64(s.ControlHWMKiB))
		}
		m.file = append(m.file, float64(s.OtherFileRSS))
		m.anon = append(m.anon, float64(s.OtherAnonRSS))
	}
}

func (m *MemProbe) finish() {
	m.GuestTouchedKiB, m.OverheadKiB = summarize(m.guest), summarize(m.over)
	m.FileKiB, m.AnonKiB = summarize(m.file), summarize(m.anon)
	m.ControlKiB = summarize(m.control)
}
