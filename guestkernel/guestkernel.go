// Package guestkernel embeds rayguest, the minimal guest kernel rayvmm boots
// when no kernel is given.
//
// rayguest is freestanding C and assembly (this directory, built with
// "make -C guestkernel"). It boots through the Linux x86 64-bit boot protocol
// (the ELF entry point, zero page in RSI) or through PVH (the Xen ELF note,
// which is how QEMU -M microvm boots it), prints "rayguest: ready", brings up
// the other CPUs, and runs the job named by rayguest.run= on its command
// line. README.md is the contract: command-line keys, output lines, ports,
// and the block pattern and checksum that tests compute independently.
package guestkernel

import _ "embed"

// ELF is the committed build of rayguest (rayguest.elf). TestReproducible
// checks that it matches a fresh build of the sources.
//
//go:embed rayguest.elf
var ELF []byte
