// Package tests holds rayvmm's integration tests: they build bin/rayvmm and
// boot real microVMs on /dev/kvm, create real TAPs, bridges and network
// namespaces, and check what a user would see. They skip with a reason where
// /dev/kvm or root is missing, and fail instead when RAYVMM_REQUIRE_KVM=1
// (CI sets it).
package tests
