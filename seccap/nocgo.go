//go:build !cgo

package seccap

const builtWithCgo = false
