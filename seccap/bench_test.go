package seccap

import "testing"

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
