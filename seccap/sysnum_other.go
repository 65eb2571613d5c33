//go:build !amd64

package seccap

// No allow-list for this architecture yet: Apply fails, naming the first
// call it cannot find.
var sysnum = map[string]int{}

const (
	auditArch = 0
	archName  = "this architecture"
)
