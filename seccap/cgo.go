//go:build cgo

package seccap

// builtWithCgo: this build links cgo (go-landlock's psx then does), whose
// threads the Go runtime cannot reach (AllThreadsSyscall refuses) and
// whose pthread_create (clone3) the filter refuses.
const builtWithCgo = true
