// Command bench measures rayvmm side by side with its peers on this machine,
// in one run, and writes the results where the README shows them. `make
// bench` runs it from the repository root:
//
//	go run ./tests/bench [-runs 20] [-wait-load 0.5] [-out tests/bench/results]
//
// It finds QEMU (installing Debian's qemu-system-x86 if needed), builds
// gokvm at a pinned version from the Go module proxy and the raw KVM loop
// (./rawloop) into a temporary directory, and then:
//
//   - boots the embedded rayguest with the same memory, vCPU count and
//     command line under rayvmm, QEMU -M microvm and gokvm, interleaved, and
//     times process start to "rayguest: ready" and to process exit, with the
//     peak RSS from wait4 and, in separate sampled runs, the peak RSS of the
//     process holding guest RAM (for rayvmm its VM process, rayvmm-vm) and
//     how much of guest RAM was touched (/proc/PID/status and smaps);
//   - runs rayguest.run=pio:N at two N under rayvmm and the raw loop, for
//     the cost of one port-I/O exit round trip;
//   - times the VM's control API (GET /, PATCH /vm pause and resume) beside
//     a bare Unix socket round trip;
//   - starts K rayvmm microVMs at once for K = 1, 4, 16, 64;
//   - runs the virtio-blk and virtio-net benchmarks (device path against
//     raw pread/pwrite and raw TAP I/O);
//   - with -pods 1,4,16: times `pod apply` through the rayvmm daemon until
//     every VM is ready against `rayvmm boot` of the same VMs, and the
//     daemon's memory with 16 VMs (pods.go; -pods-only runs just this and
//     writes pods.json and pods.md);
//
// and writes latest.json, results.md and boot.png. A run that does not
// reach the ready line (or, where it counts, a clean exit) is a failure,
// listed as such and kept out of every time. Nothing here is pass/fail: the
// issue's goals are reported as met or not, with the ratios.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rayvmm/rayvmm/guestkernel"
	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

// VMM names as the tables show them.
const (
	nameRayvmm = "rayvmm"
	// nameRayvmmOff is rayvmm with its VM process's sandbox off (rayvmm
	// runs it strict by default), for the sandbox's cost.
	nameRayvmmOff = "rayvmm --sandbox off"
	nameQEMU      = "QEMU microvm"
	nameGokvm     = "gokvm"
)

var logStart = time.Now()

// logf reports progress on stderr; the table goes to stdout.
func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench %6.1fs: %s\n", time.Since(logStart).Seconds(), fmt.Sprintf(format, a...))
}

type options struct {
	rayvmm, out, readme      string
	runs, probeRuns, memMiB  int
	pioLow, pioHigh, pioRnds int
	densityKs                []int
	densityRounds, densityMB int
	blkN, netN, vsockN       int
	apiCalls                 int
	waitLoad                 float64
	waitMax                  time.Duration
	skip                     map[string]bool
	podKs                    []int
	podRounds                int
	podsOnly                 bool
}

func main() {
	var o options
	var ks, skip, podKs string
	flag.StringVar(&o.rayvmm, "rayvmm", "bin/rayvmm", "rayvmm binary to measure (make bench builds it)")
	flag.StringVar(&o.out, "out", "tests/bench/results", "directory for latest.json, results.md and boot.png")
	flag.StringVar(&o.readme, "readme", "README.md", "file whose bench:begin/bench:end block gets the results (only when -out is inside the repository)")
	flag.IntVar(&o.runs, "runs", 20, "timed boots per VMM (at least 10)")
	flag.IntVar(&o.probeRuns, "probe-runs", 5, "sampled boots per VMM for the memory accounting")
	flag.IntVar(&o.memMiB, "memory", 128, "guest memory in MiB for the boot and exit comparisons")
	flag.IntVar(&o.pioLow, "pio-low", 20000, "low N of rayguest.run=pio:N")
	flag.IntVar(&o.pioHigh, "pio-high", 120000, "high N of rayguest.run=pio:N")
	flag.IntVar(&o.pioRnds, "pio-rounds", 7, "rounds of the exit comparison")
	flag.StringVar(&ks, "density", "1,4,16,64", "numbers of microVMs started at once")
	flag.IntVar(&o.densityRounds, "density-rounds", 3, "rounds per K")
	flag.IntVar(&o.densityMB, "density-memory", 16, "guest memory in MiB of the density microVMs")
	flag.IntVar(&o.blkN, "blk-n", 2000, "iterations of each virtio-blk benchmark")
	flag.IntVar(&o.netN, "net-n", 20000, "iterations of each virtio-net benchmark")
	flag.IntVar(&o.apiCalls, "api-calls", 1000, "calls of each kind in the API latency measurement")
	flag.IntVar(&o.vsockN, "vsock-n", 20000, "iterations (chunks) of each virtio-vsock benchmark")
	flag.Float64Var(&o.waitLoad, "wait-load", 0, "first wait until the 1-minute load average is below this (0: don't wait)")
	flag.DurationVar(&o.waitMax, "wait-max", 15*time.Minute, "longest wait for -wait-load")
	flag.StringVar(&podKs, "pods", "", "pod sizes (VMs) for the pods benchmark, e.g. 1,4,16 (empty: not run)")
	flag.IntVar(&o.podRounds, "pods-rounds", 5, "interleaved rounds per pod size")
	flag.BoolVar(&o.podsOnly, "pods-only", false, "run only the pods benchmark (-pods), writing pods.json and pods.md")
	flag.StringVar(&skip, "skip", "", "comma-separated parts to leave out: exits, density, devices, api (for trying things out)")
	flag.Parse()
	var err error
	if o.densityKs, err = parseInts(ks); err != nil {
		fatalf("-density: %v", err)
	}
	if podKs != "" {
		if o.podKs, err = parseInts(podKs); err != nil {
			fatalf("-pods: %v", err)
		}
	}
	if o.podsOnly && len(o.podKs) == 0 {
		fatalf("-pods-only needs -pods, e.g. -pods 1,4,16")
	}
	o.skip = map[string]bool{}
	for _, s := range strings.Split(skip, ",") {
		switch s = strings.TrimSpace(s); s {
		case "":
		case "exits", "density", "devices", "api":
			o.skip[s] = true
		default:
			fatalf("-skip: unknown part %q (want exits, density, devices, api)", s)
		}
	}
	switch {
	case o.runs < 10:
		fatalf("-runs %d: the issue asks for at least 10", o.runs)
	case o.pioHigh <= o.pioLow || o.pioLow < 0:
		fatalf("-pio-low %d -pio-high %d: want 0 <= low < high", o.pioLow, o.pioHigh)
	case o.memMiB < 4 || o.densityMB < 4:
		fatalf("guest memory below 4 MiB")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := bench(ctx, o); err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", a...)
	os.Exit(1)
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// repoRoot finds the directory holding rayvmm's go.mod, from the working
// directory up.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/rayvmm/rayvmm\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run from inside the rayvmm repository (no go.mod of github.com/rayvmm/rayvmm above the working directory)")
		}
		dir = parent
	}
}

func bench(ctx context.Context, o options) error {
	start := time.Now()
	repo, err := repoRoot()
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root (for /dev/kvm, and for the TAPs of the virtio-net benchmark)")
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		return fmt.Errorf("needs /dev/kvm: %w", err)
	} else {
		f.Close()
	}
	rayvmm := o.rayvmm
	if !filepath.IsAbs(rayvmm) {
		rayvmm = filepath.Join(repo, rayvmm)
	}
	if _, err := os.Stat(rayvmm); err != nil {
		return fmt.Errorf("-rayvmm: %w (run `make` first, or `make bench`)", err)
	}
	outDir := o.out
	if !filepath.IsAbs(outDir) {
		outDir = filepath.Join(repo, outDir)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "rayvmm-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	// Every rayvmm started here writes its boots to the audit log of a
	// state directory of its own, never the host's /var/lib/rayvmm.
	if err := os.Setenv("RAYVMM_STATE_DIR", filepath.Join(tmp, "state")); err != nil {
		return err
	}

	if len(o.podKs) > 0 {
		if o.waitLoad > 0 {
			logf("pods: %s", waitForLowLoad(ctx, o.waitLoad, o.waitMax))
		}
		logf("pods: sizes %v, %d rounds", o.podKs, o.podRounds)
		pr, err := podsBench(ctx, repo, rayvmm, tmp, o.podKs, o.podRounds)
		if err != nil {
			return fmt.Errorf("pods: %w", err)
		}
		if err := writeJSON(filepath.Join(outDir, "pods.json"), pr); err != nil {
			return err
		}
		md := pr.markdown()
		if err := os.WriteFile(filepath.Join(outDir, "pods.md"), []byte(md), 0o644); err != nil {
			return err
		}
		fmt.Print(md)
		logf("wrote %s/{pods.json,pods.md}", o.out)
		if o.podsOnly {
			return nil
		}
	}

	res := &Results{Machine: machine(repo), ChartFile: "boot.png"}
	res.Settings = Settings{
		MemoryMiB: o.memMiB, CPUs: 1, Cmdline: "", Runs: o.runs, ProbeRuns: o.probeRuns,
		PIOLow: o.pioLow, PIOHigh: o.pioHigh, PIORounds: o.pioRnds,
		DensityMemMiB: o.densityMB, DensityKs: o.densityKs, DensityRounds: o.densityRounds,
		BlkBenchN: o.blkN, NetBenchN: o.netN, VsockBenchN: o.vsockN,
	}

	logf("peers: QEMU, gokvm %s, raw loop", gokvmVersion)
	qemu, err := findQEMU(ctx)
	if err != nil {
		return err
	}
	res.Machine.QEMU = qemuVersion(qemu)
	gokvm, err := buildGokvm(ctx, tmp)
	if err != nil {
		return err
	}
	res.Machine.Gokvm = fmt.Sprintf("%s@%s (go install from the module proxy)", gokvmModule, gokvmVersion)
	rawloop, err := buildTool(ctx, repo, tmp, "rawloop")
	if err != nil {
		return err
	}
	if launcherPath, err = buildTool(ctx, repo, tmp, "launcher"); err != nil {
		return err
	}
	kernel := filepath.Join(tmp, "rayguest.elf")
	if err := os.WriteFile(kernel, guestkernel.ELF, 0o644); err != nil {
		return err
	}
	zeroed, err := withZeroedBSS(guestkernel.ELF)
	if err != nil {
		return fmt.Errorf("rayguest.elf for gokvm: %w", err)
	}
	gokvmKernel := filepath.Join(tmp, "rayguest-bss-in-file.elf")
	if err := os.WriteFile(gokvmKernel, zeroed, 0o644); err != nil {
		return err
	}

	if o.waitLoad > 0 {
		res.Machine.WaitedForLo = waitForLowLoad(ctx, o.waitLoad, o.waitMax)
		res.Machine.LoadBefore = load1()
	}

	mem := fmt.Sprintf("%dM", o.memMiB)
	vmms := []vmmUnderTest{
		{
			name:      nameRayvmm,
			req:       launch.Request{Argv: []string{rayvmm, "boot", "--memory", mem, "--cpus", "1", "--cmdline", "", "--boot-timer"}, SampleChild: "rayvmm-vm"},
			cleanExit: poweredOff,
		},
		{
			name:      nameRayvmmOff,
			req:       launch.Request{Argv: []string{rayvmm, "boot", "--sandbox", "off", "--memory", mem, "--cpus", "1", "--cmdline", "", "--boot-timer"}, SampleChild: "rayvmm-vm"},
			cleanExit: poweredOff,
		},
		{
			name: nameQEMU,
			req: launch.Request{Argv: []string{qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-cx16,-arch-capabilities",
				"-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-serial", "stdio",
				"-m", mem, "-smp", "1", "-kernel", kernel, "-append", ""}},
			cleanExit: poweredOff,
		},
		{
			name:      nameGokvm,
			req:       launch.Request{Argv: []string{gokvm, "boot", "-k", gokvmKernel, "-m", mem, "-c", "1"}, TTY: true},
			cleanExit: gokvmExit,
		},
	}
	res.Notes = append(res.Notes, staticNotes...)
	res.Notes = append(res.Notes, gokvmAsIs(ctx, gokvm, kernel, mem))

	logf("boot: %d interleaved rounds of %d VMMs", o.runs, len(vmms))
	guestKiB := int64(o.memMiB) << 10
	res.Boot = bootCompare(ctx, vmms, o.runs, o.probeRuns, guestKiB)
	if err := ctx.Err(); err != nil {
		return err
	}
	if !o.skip["exits"] {
		logf("exits: pio:%d and pio:%d, %d rounds", o.pioLow, o.pioHigh, o.pioRnds)
		res.Exits = exitCompare(ctx, rayvmm, rawloop, o.memMiB, o.pioLow, o.pioHigh, o.pioRnds)
	}
	if !o.skip["api"] {
		logf("api: %d calls of each kind", o.apiCalls)
		res.API = apiLatency(ctx, rayvmm, tmp, o.apiCalls)
	}
	if !o.skip["density"] {
		res.Density = density(ctx, rayvmm, o.densityMB, o.densityKs, o.densityRounds)
	}
	if !o.skip["devices"] {
		res.Devices = deviceBenches(ctx, repo, o.blkN, o.netN, o.vsockN)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	res.Machine.LoadAfter = load1()
	res.Seconds = time.Since(start).Round(time.Second).Seconds()
	res.evaluateGoals()
	res.collectFailures()

	if rel, err := filepath.Rel(repo, outDir); err == nil && filepath.IsLocal(rel) {
		res.resultsDir = filepath.ToSlash(rel)
	}
	md := res.markdown(false)
	if err := writeJSON(filepath.Join(outDir, "latest.json"), res); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(outDir, "results.md"), []byte(md), 0o644); err != nil {
		return err
	}
	if err := writeChart(filepath.Join(outDir, "boot.png"), res.Boot, res.machineLine()); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	fmt.Print(md)
	logf("wrote %s/{latest.json,results.md,boot.png}", o.out)
	if res.resultsDir == "" || o.readme == "" {
		logf("README not updated: results are outside the repository or -readme is empty")
		return nil
	}
	readme := filepath.Join(repo, o.readme)
	if err := updateReadme(readme, res.markdown(true)); err != nil {
		return err
	}
	logf("updated the Performance section of %s", o.readme)
	return nil
}

// The README's Performance section holds the compact results between these
// markers; updateReadme rewrites only what lies between them.
const (
	readmeBegin = "<!-- bench:begin: written by `make bench` (tests/bench), do not edit -->"
	readmeEnd   = "<!-- bench:end -->"
)

func updateReadme(path, section string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("-readme: %w", err)
	}
	s := string(b)
	i, j := strings.Index(s, readmeBegin), strings.Index(s, readmeEnd)
	if i < 0 || j < i {
		return fmt.Errorf("-readme: %s has no %q ... %q block for the results", path, readmeBegin, readmeEnd)
	}
	s = s[:i+len(readmeBegin)] + "\n" + section + s[j:]
	return os.WriteFile(path, []byte(s), 0o644)
}
