package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Machine is where and from what the numbers came.
type Machine struct {
	Commit      string  `json:"commit"`
	Dirty       bool    `json:"dirty"` // tracked files differed from the commit
	Date        string  `json:"date"`
	CPU         string  `json:"cpu"`
	Cores       int     `json:"cores"`
	MemoryGiB   float64 `json:"memory_gib"`
	Kernel      string  `json:"kernel"`
	KVMPVM      bool    `json:"kvm_pvm_backed"`
	KVMNote     string  `json:"kvm_note"`
	Go          string  `json:"go"`
	QEMU        string  `json:"qemu"`
	Gokvm       string  `json:"gokvm"`
	LoadBefore  float64 `json:"load1_before"`
	LoadAfter   float64 `json:"load1_after"`
	WaitedForLo string  `json:"waited_for_low_load,omitempty"`
}

func git(repo string, args ...string) (string, error) {
	cmd := exec.Command("git", args...)
	cmd.Dir = repo
	out, err := cmd.Output()
	return strings.TrimSpace(string(out)), err
}

func machine(repo string) Machine {
	m := Machine{
		Date:  time.Now().UTC().Format(time.RFC3339),
		Cores: runtime.NumCPU(),
		Go:    runtime.Version(),
	}
	if c, err := git(repo, "rev-parse", "HEAD"); err == nil {
		m.Commit = c
	} else {
		m.Commit = "unknown (not a git checkout)"
	}
	if _, err := git(repo, "diff", "--quiet", "HEAD", "--"); err != nil {
		m.Dirty = true
	}
	m.CPU = cpuModel()
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		m.MemoryGiB = float64(uint64(si.Totalram)*uint64(si.Unit)) / (1 << 30)
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:])
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		m.KVMPVM = true
		m.KVMNote = "/dev/kvm is PVM-backed (kvm_pvm): guest code runs in KVM's x86 instruction emulator " +
			"(~3.6 M guest instructions/s, ~10 µs per port-I/O exit); on VMX/SVM hardware the guest runs natively"
	} else {
		m.KVMNote = "/dev/kvm is hardware-backed (no kvm_pvm module)"
	}
	m.LoadBefore = load1()
	return m
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// load1 is the one-minute load average.
func load1() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

// waitForLowLoad waits up to max for the one-minute load average to drop
// below limit and says what happened.
func waitForLowLoad(ctx context.Context, limit float64, max time.Duration) string {
	deadline := time.Now().Add(max)
	start := time.Now()
	for {
		l := load1()
		if l < limit {
			return fmt.Sprintf("load %.2f < %.2f after %v", l, limit, time.Since(start).Round(time.Second))
		}
		if time.Now().After(deadline) {
			return fmt.Sprintf("load still %.2f (limit %.2f) after %v; ran anyway", l, limit, max)
		}
		logf("load average %.2f >= %.2f, waiting (up to %v more)", l, limit, time.Until(deadline).Round(time.Second))
		select {
		case <-ctx.Done():
			return "interrupted"
		case <-time.After(30 * time.Second):
		}
	}
}
