//go:build !seccaptest

package forbidden

// Enabled says this is a seccaptest build; in others the hooks do nothing
// and Try is not linked.
const Enabled = false

// AfterSandbox does nothing outside seccaptest builds.
func AfterSandbox() {}

// OnVCPU does nothing outside seccaptest builds.
func OnVCPU(int) {}
