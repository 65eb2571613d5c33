package main

import "github.com/rayvmm/rayvmm/guestkernel"

// builtinKernel is rayguest, embedded in the binary.
func builtinKernel() ([]byte, error) { return guestkernel.ELF, nil }
