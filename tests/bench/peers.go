package main

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// gokvmModule is the peer built from the Go module proxy. The proxy lists
// no tagged version for it (`go list -m -versions` prints none), so the
// pseudo-version of its latest commit there is pinned.
const (
	gokvmModule  = "github.com/bobuhiro11/gokvm"
	gokvmVersion = "v0.0.8-0.20231003020000-f53faca69d28"
)

// findQEMU returns qemu-system-x86_64, installing Debian's qemu-system-x86
// when it is missing and we are root.
func findQEMU(ctx context.Context) (string, error) {
	if p, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		return p, nil
	}
	if os.Geteuid() != 0 {
		return "", errors.New("qemu-system-x86_64 is not installed and installing qemu-system-x86 needs root")
	}
	logf("installing qemu-system-x86 from Debian")
	for _, args := range [][]string{{"update"}, {"install", "-y", "--no-install-recommends", "qemu-system-x86"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("apt-get %s: %w: %s", args[0], err, lastLines(string(out), 3))
		}
	}
	return exec.LookPath("qemu-system-x86_64")
}

// qemuVersion is the first line of `qemu-system-x86_64 --version`.
func qemuVersion(path string) string {
	out, err := exec.Command(path, "--version").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

// buildGokvm builds gokvm's main package at the pinned version into dir,
// with its own go.mod (go install pkg@version ignores ours). Nothing of it
// lands in the repository.
func buildGokvm(ctx context.Context, dir string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "install", gokvmModule+"@"+gokvmVersion)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=-mod=mod", "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install %s@%s: %w: %s", gokvmModule, gokvmVersion, err, lastLines(string(out), 5))
	}
	return filepath.Join(dir, "gokvm"), nil
}

// buildTool builds tests/bench/NAME (rawloop, launcher) into dir.
func buildTool(ctx context.Context, repo, dir, name string) (string, error) {
	out := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, "./tests/bench/"+name)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./tests/bench/%s: %w: %s", name, err, lastLines(string(b), 5))
	}
	return out, nil
}

// shellJoin quotes argv for display, as a shell would need it.
func shellJoin(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		if a == "" || strings.ContainsAny(a, " \t\"'$&|;<>()*?") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

// withZeroedBSS returns a copy of an ELF executable whose PT_LOAD segments
// carry their BSS as zero bytes in the file (p_filesz = p_memsz), section
// headers dropped. The loaded memory image is byte for byte what a
// conforming loader makes of the original.
//
// gokvm needs it: its PVH loader copies p_filesz bytes and leaves the rest
// of p_memsz as it was, and it fills all guest memory above 1 MiB with a
// poison pattern first, so rayguest's BSS (where its PML4 and PDPT live)
// starts out as poison instead of zeros.
func withZeroedBSS(img []byte) ([]byte, error) {
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		return nil, fmt.Errorf("parse ELF: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB {
		return nil, errors.New("not a little-endian ELF64 file")
	}
	le := binary.LittleEndian
	phoff := le.Uint64(img[32:])
	phent, phnum := uint64(le.Uint16(img[54:])), uint64(le.Uint16(img[56:]))
	if phent != 56 || phoff+phent*phnum > uint64(len(img)) {
		return nil, errors.New("bad program header table")
	}
	out := append([]byte(nil), img[:phoff+phent*phnum]...)
	// Segments keep their file offsets; a segment placed at an offset
	// below the end of an earlier, grown one would be overwritten.
	var end uint64
	for i, p := range f.Progs {
		if p.Type != elf.PT_LOAD {
			continue
		}
		if p.Off < end {
			return nil, fmt.Errorf("PT_LOAD %d at file offset %#x overlaps the previous segment's BSS", i, p.Off)
		}
		if p.Off+p.Filesz > uint64(len(img)) || p.Memsz < p.Filesz || p.Memsz > 64<<20 {
			return nil, fmt.Errorf("PT_LOAD %d: bad sizes", i)
		}
		if uint64(len(out)) < p.Off {
			out = append(out, make([]byte, p.Off-uint64(len(out)))...)
		}
		out = append(out[:p.Off], img[p.Off:p.Off+p.Filesz]...)
		out = append(out, make([]byte, p.Memsz-p.Filesz)...)
		le.PutUint64(out[phoff+uint64(i)*phent+32:], p.Memsz) // p_filesz
		end = p.Off + p.Memsz
	}
	// Other segments (the PVH note) must lie inside a loaded one's file
	// bytes, which kept their offsets.
	for i, p := range f.Progs {
		if p.Type == elf.PT_LOAD || p.Filesz == 0 {
			continue
		}
		inside := false
		for _, l := range f.Progs {
			if l.Type == elf.PT_LOAD && p.Off >= l.Off && p.Off+p.Filesz <= l.Off+l.Filesz {
				inside = true
			}
		}
		if !inside {
			return nil, fmt.Errorf("segment %d (%v) is not inside a PT_LOAD segment's file bytes", i, p.Type)
		}
	}
	le.PutUint64(out[40:], 0) // e_shoff
	le.PutUint16(out[60:], 0) // e_shnum
	le.PutUint16(out[62:], 0) // e_shstrndx
	return out, nil
}
