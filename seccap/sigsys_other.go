//go:build !amd64

package seccap

// haveTrapHandler: no SIGSYS handler for this architecture yet, so strict
// mode refuses with SECCOMP_RET_KILL_PROCESS and the control plane learns
// only the signal.
const haveTrapHandler = false

func installSIGSYSHandler(int) error { return nil }
