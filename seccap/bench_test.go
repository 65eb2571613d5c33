package seccap

import (
	"fmt"
	"testing"
)

// BenchmarkAssemble: the cost of building the filters at VM start (the
// process filter once, the vCPU filter once per vCPU).
func BenchmarkAssemble(b *testing.B) {
	a := &Applied{Mode: ModeStrict, Trap: true, LandlockABI: 7, pid: 1}
	b.Run("process", func(b *testing.B) {
		for b.Loop() {
			if _, err := processProgram(Config{Mode: ModeStrict}, a); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("vcpu", func(b *testing.B) {
		for b.Loop() {
			if _, err := assemble(vcpuGroups(10, 5, 1), retTrap); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkVCPUCall: what the two filters cost a vCPU thread per system
// call they must evaluate by its arguments (as KVM_RUN: the kernel's
// verdict cache cannot skip those), with a futex wake, whose own cost is
// small, so the difference between the modes is the filters'.
func BenchmarkVCPUCall(b *testing.B) {
	benchVCPU(b, "vcpu callbench", benchCalls, "ns/call")
}

// BenchmarkVCPUExit: the round trip of one guest port write through
// KVM_RUN on a vCPU thread of a process without the sandbox and of one
// under strict (both filters run on every KVM_RUN), side by side.
func BenchmarkVCPUExit(b *testing.B) {
	benchVCPU(b, "vcpu bench", benchExits, "ns/exit")
}

// benchVCPU runs cmd on a vCPU thread of a child without the sandbox and
// of one under strict, alternating between the two so that both see the
// same load, and reports the time per one of its n operations.
func benchVCPU(b *testing.B, cmd string, n int, unit string) {
	needSandboxHost(b)
	modes := []Mode{ModeOff, ModeStrict}
	children := map[Mode]*sandboxed{}
	for _, m := range modes {
		children[m] = startChild(b, childSpec{Sandbox: Config{Mode: m}, VCPUs: 1}, 0, true)
	}
	total := map[Mode]int64{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, m := range modes {
			c := children[m]
			c.send(cmd)
			var ns int64
			if _, err := fmt.Sscanf(c.expect("bench "), "bench %d", &ns); err != nil {
				b.Fatal(err)
			}
			total[m] += ns
		}
	}
	for _, m := range modes {
		b.ReportMetric(float64(total[m])/float64(b.N*n), unit+"-"+string(m))
		children[m].send("exit")
	}
	b.ReportMetric(float64(total[ModeStrict]-total[ModeOff])/float64(b.N*n), unit+"-added")
}
