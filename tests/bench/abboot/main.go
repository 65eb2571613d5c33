// Command abboot compares the boot of two or more rayvmm builds side by
// side, interleaved in one run, for trying out a change to the boot path
// before `make bench` (which compares rayvmm with its peers):
//
//	go run ./tests/bench/abboot -runs 40 -probe-runs 10 old/rayvmm bin/rayvmm
//
// Each argument is a rayvmm binary with its rayvmm-vm beside it; more words
// after it (quoted as one argument) are extra flags for its boot, so one
// build can be compared with itself under other flags:
//
//	go run ./tests/bench/abboot bin/rayvmm "bin/rayvmm --sandbox off"
//
// For each it prints the medians (and quartiles) of: wall time from
// fork/exec to "rayguest: ready" as the bench's launcher sees it; the boot
// timer's CPU to the first KVM_RUN, both processes and the VM process
// alone; the split; and, from separately sampled runs, the VM process's
// peak RSS less touched guest RAM, as `make bench` measures them.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

func main() {
	runs := flag.Int("runs", 30, "timed boots per build")
	probes := flag.Int("probe-runs", 5, "sampled boots per build, for the memory")
	mem := flag.Int("memory", 128, "guest memory in MiB")
	flag.Parse()
	if flag.NArg() < 1 {
		fmt.Fprintln(os.Stderr, "usage: abboot [flags] RAYVMM [RAYVMM ...]")
		os.Exit(2)
	}
	tmp, err := os.MkdirTemp("", "abboot-")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(tmp)
	launcher := filepath.Join(tmp, "launcher")
	if out, err := exec.Command("go", "build", "-o", launcher, "./tests/bench/launcher").CombinedOutput(); err != nil {
		fatal(fmt.Errorf("build the launcher: %v: %s", err, out))
	}
	type variant struct {
		name                                    string
		argv                                    []string
		ready, cpu, cpuVM, split, firstRun, hwm []float64
		fails                                   int
	}
	var vs []*variant
	for _, a := range flag.Args() {
		w := strings.Fields(a)
		abs, err := filepath.Abs(w[0])
		if err != nil {
			fatal(err)
		}
		argv := append([]string{abs, "--state-dir", filepath.Join(tmp, "state"), "boot", "--memory", fmt.Sprintf("%dM", *mem),
			"--cpus", "1", "--cmdline", "", "--boot-timer"}, w[1:]...)
		vs = append(vs, &variant{name: a, argv: argv})
	}
	ctx := context.Background()
	one := func(req launch.Request) launch.Outcome {
		b, _ := json.Marshal(req)
		out, err := exec.CommandContext(ctx, launcher, string(b)).Output()
		if err != nil {
			return launch.Outcome{Err: err.Error()}
		}
		var resp launch.Response
		if err := json.Unmarshal(out, &resp); err != nil || len(resp.Outcomes) != 1 {
			return launch.Outcome{Err: fmt.Sprintf("launcher reply: %v", err)}
		}
		return resp.Outcomes[0]
	}
	for _, v := range vs { // warm-up
		one(launch.Request{Argv: v.argv, Wait: "rayguest: ready"})
	}
	load := func() string {
		b, _ := os.ReadFile("/proc/loadavg")
		return strings.Join(strings.Fields(string(b))[:3], " ")
	}
	fmt.Printf("load before: %s\n", load())
	for r := 0; r < *runs; r++ {
		for k := range vs {
			v := vs[(k+r)%len(vs)]
			o := one(launch.Request{Argv: v.argv, Wait: "rayguest: ready"})
			t := timer(o.Stderr)
			if o.Err != "" || o.Ready == 0 || o.Code != 0 || t == nil {
				v.fails++
				if v.fails < 3 {
					fmt.Fprintf(os.Stderr, "%s: failed: %s %s\n", v.name, o.Err, lastLine(o.Stderr))
				}
				continue
			}
			v.ready = append(v.ready, ms(o.Ready))
			v.cpu = append(v.cpu, t["first_kvm_run_cpu"])
			v.cpuVM = append(v.cpuVM, t["vm_process_first_kvm_run_cpu"])
			v.split = append(v.split, t["split"])
			v.firstRun = append(v.firstRun, t["first_kvm_run_wall"])
		}
	}
	for r := 0; r < *probes; r++ {
		for k := range vs {
			v := vs[(k+r)%len(vs)]
			o := one(launch.Request{Argv: v.argv, Wait: "rayguest: ready", SampleEvery: time.Millisecond,
				GuestKiB: int64(*mem) << 10, SampleChild: "rayvmm-vm"})
			if s := o.Sample; s != nil && s.GuestFound {
				v.hwm = append(v.hwm, float64(s.HWMKiB-s.GuestRSS)/1024)
			}
		}
	}
	fmt.Printf("load after: %s\n", load())
	fmt.Printf("%-40s %6s  %-22s %-22s %-22s %-22s %-22s %s\n", "build", "ok", "ready ms", "first KVM_RUN wall", "CPU both", "CPU rayvmm-vm", "split ms", "rayvmm-vm HWM-guest MiB")
	for _, v := range vs {
		fmt.Printf("%-40s %3d/%-3d %-22s %-22s %-22s %-22s %-22s %s\n", v.name, len(v.ready), len(v.ready)+v.fails,
			q(v.ready), q(v.firstRun), q(v.cpu), q(v.cpuVM), q(v.split), q(v.hwm))
	}
}

// timer reads the boot timer's fields (milliseconds) from the log lines.
func timer(stderr string) map[string]float64 {
	m := map[string]float64{}
	for _, line := range strings.Split(stderr, "\n") {
		if !strings.Contains(line, "boot timer: ") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, "="); ok {
				if d, err := time.ParseDuration(v); err == nil {
					m[k] = ms(d)
				}
			}
		}
	}
	if _, ok := m["first_kvm_run_cpu"]; !ok {
		return nil
	}
	return m
}

// q is the median with the quartiles.
func q(xs []float64) string {
	if len(xs) == 0 {
		return "-"
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	at := func(p float64) float64 { return s[int(p*float64(len(s)-1)+0.5)] }
	return fmt.Sprintf("%.2f (%.2f-%.2f)", at(0.5), at(0.25), at(0.75))
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func lastLine(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return l[len(l)-1]
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "abboot:", err)
	os.Exit(1)
}
