// Package prestart starts rayvmm boot's VM process (rayvmm-vm) ahead of
// its VM, from a package initializer: its exec and Go runtime start (about
// 2 ms of CPU on the machines we measure on, see tests/bench/abboot) then
// run on the other core while rayvmm itself starts, parses its flags and
// opens the VM's resources, instead of after. The VM's handoff follows on
// the process's handoff socket (package vmproc, Hand).
//
// It only looks at the command line: it starts nothing unless the
// command is `rayvmm [--state-dir DIR] boot ...` without help,
// --print-config, a jail or vsock (whose sandboxes need the fork prepared
// differently, see spawn.Prep). The sandbox mode is --sandbox's, else the
// default; a --config file that asks for another one gets a VM process
// started the usual way and this one is discarded. The package links only
// what package spawn does, so that its initializer runs early (Go
// initializes a package as soon as its imports are).
package prestart

import (
	"os"
	"strings"

	"github.com/rayvmm/rayvmm/seccap"
	"github.com/rayvmm/rayvmm/seccap/forbidden"
	"github.com/rayvmm/rayvmm/vmproc/spawn"
)

var child *spawn.Child

func init() {
	mode, ok := bootSandbox(os.Args[1:])
	if !ok {
		return
	}
	c := &seccap.Config{Mode: mode}
	if mode != seccap.ModeOff && seccap.Supported() != nil {
		return // the boot fails, or runs with --sandbox off
	}
	child, _ = spawn.Start(spawn.Options{
		Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr,
		Env: spawn.PassEnv(forbidden.Env), Prep: spawn.For(c),
	})
}

// bootSandbox tells whether args (without the program name) are a boot
// that can use a VM process started ahead, and its sandbox mode.
func bootSandbox(args []string) (seccap.Mode, bool) {
	i := 0
	for ; i < len(args) && strings.HasPrefix(args[i], "-"); i++ {
		switch {
		case args[i] == "--state-dir":
			i++
		case strings.HasPrefix(args[i], "--state-dir="):
		default:
			return "", false
		}
	}
	if i >= len(args) || args[i] != "boot" {
		return "", false
	}
	mode := seccap.DefaultMode()
	for j := i + 1; j < len(args); j++ {
		a := args[j]
		if a == "--" {
			return "", false
		}
		name, val, hasVal := strings.Cut(a, "=")
		switch name {
		case "-h", "--help", "--print-config", "--jail", "--vsock", "--uid", "--gid":
			return "", false
		case "--sandbox":
			if !hasVal {
				if j+1 >= len(args) {
					return "", false
				}
				j++
				val = args[j]
			}
			m, err := seccap.ParseMode(val)
			if err != nil {
				return "", false
			}
			mode = m
		}
	}
	return mode, true
}

// Take returns the VM process started ahead, if any, once: the caller
// hands it its VM (vmproc.Hand) or discards it.
func Take() *spawn.Child {
	c := child
	child = nil
	return c
}

// Discard ends the VM process started ahead if nobody took it, and waits
// for it to be gone: rayvmm leaves nothing running behind.
func Discard() {
	if c := Take(); c != nil {
		c.Discard()
	}
}
