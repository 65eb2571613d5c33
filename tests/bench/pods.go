package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rayvmm/rayvmm/pods/client"
)

// The pods benchmark (-pods 1,4,16): the rayvmm daemon's overhead when it
// starts a pod's VMs, against starting the same VMs with `rayvmm boot`
// directly, in the same run, interleaved round by round. Both sides start
// K rayguests (echo job, 16 MiB, 1 vCPU, no devices) and stop the clock
// when every guest has printed "rayguest: ready":
//
//   - direct: K `rayvmm boot` processes started at once, their consoles
//     read through pipes;
//   - pod: `pod apply` of one pod of K VMs through the daemon's API, then
//     its Ready condition (every VM running: these VMs have no readiness
//     probe, whose period of whole seconds would measure the period), and
//     each VM's console log (the file the daemon gives it) showing the
//     ready line.
//
// It also reads the daemon's own memory (VmRSS, VmHWM) while 16 VMs run.

// PodsResult is one pod size.
type PodsResult struct {
	K        int     `json:"k"`
	Rounds   int     `json:"rounds"`
	DirectMS Summary `json:"direct_ms"`
	PodMS    Summary `json:"pod_ms"`
	// Ratio is the medians' ratio, pod / direct; the goal is <= 1.5.
	Ratio    float64  `json:"ratio"`
	GoalMet  bool     `json:"goal_met"`
	Failures []string `json:"failures,omitempty"`
}

// PodsReport is the whole pods benchmark.
type PodsReport struct {
	Commit     string        `json:"commit"`
	Date       string        `json:"date"`
	LoadBefore float64       `json:"load_before"`
	LoadAfter  float64       `json:"load_after"`
	Results    []*PodsResult `json:"results"`
	// DaemonRSSKiB and DaemonHWMKiB are rayvmmd's resident and peak
	// memory with 16 VMs running (0 if no round ran 16).
	DaemonRSSKiB int64 `json:"daemon_rss_kib"`
	DaemonHWMKiB int64 `json:"daemon_hwm_kib"`
}

// podsGoal is the goal: the daemon's start of a pod at most 1.5
// times the direct start.
const podsGoal = 1.5

func podsBench(ctx context.Context, repo, rayvmm, tmp string, ks []int, rounds int) (*PodsReport, error) {
	rep := &PodsReport{Date: time.Now().UTC().Format(time.RFC3339), LoadBefore: load1()}
	if c, err := git(repo, "rev-parse", "HEAD"); err == nil {
		rep.Commit = c
	}
	state := filepath.Join(tmp, "pods-state")
	sock := filepath.Join(tmp, "pods.sock")
	parent := fmt.Sprintf("rayvmm-bench-%d", os.Getpid())
	daemon := exec.CommandContext(ctx, rayvmm, "--state-dir", state, "daemon", "--socket", sock, "--state-dir", state, "--cgroup-parent", parent)
	stderr, err := daemon.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := daemon.Start(); err != nil {
		return nil, fmt.Errorf("start rayvmm daemon: %w", err)
	}
	defer func() {
		daemon.Process.Signal(syscall.SIGTERM)
		daemon.Wait()
		for _, c := range []string{"cpu", "cpuacct", "memory", "pids"} {
			os.Remove(filepath.Join("/sys/fs/cgroup", c, parent))
		}
	}()
	if err := waitLine(stderr, "rayvmmd: serving pods on", time.Minute); err != nil {
		return nil, fmt.Errorf("rayvmm daemon: %w", err)
	}
	go io.Copy(io.Discard, stderr)
	c, err := client.New("unix://" + sock)
	if err != nil {
		return nil, err
	}
	defer c.Close()

	for _, k := range ks {
		res := &PodsResult{K: k, Rounds: rounds}
		var direct, pod []float64
		why := map[string]int{}
		for r := 0; r < rounds; r++ {
			runDirect := func() {
				d, err := startDirect(ctx, rayvmm, state, k)
				if err != nil {
					why["direct: "+err.Error()]++
					return
				}
				direct = append(direct, ms(d))
			}
			runPod := func() {
				d, rss, hwm, err := startPod(ctx, c, state, daemon.Process.Pid, k, r)
				if err != nil {
					why["pod: "+err.Error()]++
					return
				}
				pod = append(pod, ms(d))
				if k == 16 && rss > rep.DaemonRSSKiB {
					rep.DaemonRSSKiB, rep.DaemonHWMKiB = rss, hwm
				}
			}
			if r%2 == 0 {
				runDirect()
				runPod()
			} else {
				runPod()
				runDirect()
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
		}
		res.DirectMS, res.PodMS = summarize(direct), summarize(pod)
		res.Ratio = round3(ratio(res.PodMS.Median, res.DirectMS.Median))
		res.GoalMet = res.DirectMS.N > 0 && res.PodMS.N > 0 && res.Ratio <= podsGoal
		res.Failures = countedReasons(why)
		logf("pods: K=%d: direct %.1f ms, pod %.1f ms (%.2fx)", k, res.DirectMS.Median, res.PodMS.Median, res.Ratio)
		rep.Results = append(rep.Results, res)
	}
	rep.LoadAfter = load1()
	return rep, nil
}

// waitLine reads r until a line contains want.
func waitLine(r io.Reader, want string, timeout time.Duration) error {
	found := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if strings.Contains(sc.Text(), want) {
				found <- nil
				return
			}
		}
		found <- fmt.Errorf("ended without %q", want)
	}()
	select {
	case err := <-found:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("no %q within %v", want, timeout)
	}
}

var guestArgs = []string{"--memory", "16M", "--cpus", "1", "--cmdline", "rayguest.run=echo"}

// startDirect starts k `rayvmm boot` at once and times until every guest
// is ready; then it quits them.
func startDirect(ctx context.Context, rayvmm, state string, k int) (time.Duration, error) {
	type vm struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
	}
	vms := make([]vm, k)
	ready := make(chan error, k)
	start := time.Now()
	for i := range vms {
		args := append([]string{"--state-dir", state, "boot", "--name", fmt.Sprintf("direct-%d", i)}, guestArgs...)
		cmd := exec.CommandContext(ctx, rayvmm, args...)
		in, _ := cmd.StdinPipe()
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			return 0, err
		}
		vms[i] = vm{cmd, in}
		go func() {
			err := waitLine(out, "rayguest: ready", 2*time.Minute)
			ready <- err
			io.Copy(io.Discard, out)
		}()
	}
	var err error
	for range k {
		if e := <-ready; e != nil && err == nil {
			err = e
		}
	}
	d := time.Since(start)
	for _, v := range vms {
		io.WriteString(v.stdin, "quit\n")
		v.stdin.Close()
	}
	for _, v := range vms {
		v.cmd.Wait()
	}
	return d, err
}

// startPod applies a pod of k VMs and times until it is Ready and every
// guest's console shows the ready line; it reads the daemon's memory
// while they run, then removes the pod.
func startPod(ctx context.Context, c *client.Client, state string, daemonPid, k, round int) (time.Duration, int64, int64, error) {
	name := fmt.Sprintf("bench-%d-%d", k, round)
	var doc bytes.Buffer
	fmt.Fprintf(&doc, "apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: %s}\nspec:\n  vms:\n", name)
	for i := range k {
		fmt.Fprintf(&doc, "  - {name: v%d, memory: 16M, cpus: 1, cmdline: rayguest.run=echo}\n", i)
	}
	defer c.Remove(context.Background(), name, true, client.Default)
	start := time.Now()
	if _, err := c.Apply(ctx, doc.Bytes()); err != nil {
		return 0, 0, 0, err
	}
	i, err := c.Wait(ctx, name, "Ready", 2*time.Minute)
	if err != nil {
		return 0, 0, 0, err
	}
	if !i.Status.Ready() {
		return 0, 0, 0, fmt.Errorf("pod %s ended: %s", name, i.StatusWord())
	}
	var wg sync.WaitGroup
	errs := make(chan error, k)
	for v := range k {
		wg.Go(func() {
			log := filepath.Join(state, "pods", name, fmt.Sprintf("v%d.log", v))
			deadline := time.Now().Add(2 * time.Minute)
			for {
				if b, _ := os.ReadFile(log); bytes.Contains(b, []byte("rayguest: ready")) {
					return
				}
				if time.Now().After(deadline) {
					errs <- fmt.Errorf("VM v%d: no ready line in its log", v)
					return
				}
				time.Sleep(time.Millisecond) // the log is a file: poll it
			}
		})
	}
	wg.Wait()
	d := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return 0, 0, 0, err
	}
	rss, hwm := procMemKiB(daemonPid)
	return d, rss, hwm, nil
}

// procMemKiB reads VmRSS and VmHWM of a process.
func procMemKiB(pid int) (rss, hwm int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = n
		case "VmHWM:":
			hwm = n
		}
	}
	return rss, hwm
}

// markdown renders the pods benchmark.
func (r *PodsReport) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "### Pods: `pod apply` to every VM ready, against `rayvmm boot` directly\n\n")
	fmt.Fprintf(&b, "Commit %s, %s, 1-minute load %.2f before and %.2f after. Median (min-max) of interleaved rounds.\n\n", shortCommit(r.Commit), r.Date, r.LoadBefore, r.LoadAfter)
	fmt.Fprintf(&b, "| VMs | direct (ms) | pod (ms) | pod / direct | goal <= %.1fx |\n|---|---|---|---|---|\n", podsGoal)
	for _, x := range r.Results {
		met := "met"
		if !x.GoalMet {
			met = "not met"
		}
		fmt.Fprintf(&b, "| %d | %.1f (%.1f-%.1f) | %.1f (%.1f-%.1f) | %.2fx | %s |\n", x.K,
			x.DirectMS.Median, x.DirectMS.Min, x.DirectMS.Max, x.PodMS.Median, x.PodMS.Min, x.PodMS.Max, x.Ratio, met)
		for _, f := range x.Failures {
			fmt.Fprintf(&b, "\nK=%d failure: %s\n", x.K, f)
		}
	}
	if r.DaemonRSSKiB > 0 {
		fmt.Fprintf(&b, "\nThe daemon (rayvmmd) with 16 VMs running: RSS %.1f MiB, peak %.1f MiB.\n", float64(r.DaemonRSSKiB)/1024, float64(r.DaemonHWMKiB)/1024)
	}
	return b.String()
}

func shortCommit(c string) string {
	if len(c) > 7 {
		return c[:7]
	}
	return c
}
