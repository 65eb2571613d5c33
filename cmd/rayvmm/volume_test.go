package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/storage/volume"
)

// buildRayvmm builds the binary once per test run.
func buildRayvmm(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "rayvmm")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

type cli struct {
	t     *testing.T
	bin   string
	state string
}

// cliWait bounds one rayvmm command: it turns a hang into a failure that
// names the command; it measures nothing.
const cliWait = time.Minute

func (c cli) run(args ...string) (stdout, stderr string, ok bool) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliWait)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, append([]string{"--state-dir", c.state}, args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ctx.Err() != nil {
		c.t.Fatalf("rayvmm %s did not finish in %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), cliWait, o.String(), e.String())
	}
	return o.String(), e.String(), err == nil
}

func (c cli) files() []string {
	ents, _ := os.ReadDir(filepath.Join(c.state, "volumes"))
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func TestVolumeCLI(t *testing.T) {
	c := cli{t: t, bin: buildRayvmm(t), state: t.TempDir()}
	steps := []struct {
		name    string
		args    []string
		wantOut string // substring of stdout on success
		wantErr string // substring of the one-line error on failure
	}{
		{name: "create qcow2", args: []string{"volume", "create", "data", "--size", "1G"}, wantOut: "created volume data (qcow2, 1G)"},
		{name: "create raw", args: []string{"volume", "create", "scratch", "--size", "512M", "--format", "raw"}, wantOut: "(raw, 512M)"},
		{name: "size in bytes", args: []string{"volume", "create", "tiny", "--size", "4096"}, wantOut: "(qcow2, 4K)"},
		{name: "size 0", args: []string{"volume", "create", "z", "--size", "0"}, wantErr: "must be greater than zero"},
		{name: "size junk", args: []string{"volume", "create", "z", "--size", "big"}, wantErr: `invalid size "big"`},
		{name: "size overflow", args: []string{"volume", "create", "z", "--size", "9E"}, wantErr: "too large"},
		{name: "size missing", args: []string{"volume", "create", "z"}, wantErr: `"size" not set`},
		{name: "bad format", args: []string{"volume", "create", "z", "--size", "1M", "--format", "vmdk"}, wantErr: `format "vmdk"`},
		{name: "bad name", args: []string{"volume", "create", "a/b", "--size", "1M"}, wantErr: `name "a/b"`},
		{name: "duplicate", args: []string{"volume", "create", "data", "--size", "1M"}, wantErr: `volume "data" already exists`},
		{name: "inspect missing", args: []string{"volume", "inspect", "nope"}, wantErr: `no such volume "nope"`},
		{name: "rm missing", args: []string{"volume", "rm", "nope"}, wantErr: `no such volume "nope"`},
		{name: "missing argument", args: []string{"volume", "rm"}, wantErr: "takes NAME"},
		{name: "snapshot", args: []string{"volume", "snapshot", "data", "snap1"}, wantOut: "snapshot snap1 of volume data created"},
		{name: "clone", args: []string{"volume", "clone", "snap1", "copy"}, wantOut: "volume copy cloned from snapshot snap1"},
		{name: "clone a non-snapshot", args: []string{"volume", "clone", "data", "copy2"}, wantErr: "is not a snapshot"},
		{name: "rm a parent", args: []string{"volume", "rm", "snap1"}, wantErr: `cannot remove volume "snap1": it is the parent of copy, data`},
		{name: "import missing file", args: []string{"volume", "import", "/nonexistent.img", "imp"}, wantErr: "no such file"},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			before := c.files()
			out, errOut, ok := c.run(s.args...)
			if s.wantErr == "" {
				if !ok || !strings.Contains(out, s.wantOut) {
					t.Fatalf("rayvmm %v: ok=%v\nstdout: %s\nstderr: %s", s.args, ok, out, errOut)
				}
				return
			}
			if ok {
				t.Fatalf("rayvmm %v succeeded:\n%s", s.args, out)
			}
			lines := strings.Split(strings.TrimSpace(errOut), "\n")
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "rayvmm: ") || !strings.Contains(lines[0], s.wantErr) {
				t.Fatalf("rayvmm %v: stderr %q, want one line containing %q", s.args, errOut, s.wantErr)
			}
			if after := c.files(); !slices.Equal(before, after) && len(before) > 0 {
				t.Fatalf("failed command changed the volume directory: %v -> %v", before, after)
			}
		})
	}

	t.Run("list is an aligned table", func(t *testing.T) {
		out, errOut, ok := c.run("volume", "list")
		if !ok {
			t.Fatal(errOut)
		}
		lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
		if len(lines) != 6 { // header + copy, data, scratch, snap1, tiny
			t.Fatalf("list:\n%s", out)
		}
		col := strings.Index(lines[0], "STATE")
		for _, l := range lines[1:] {
			if len(l) < col || l[col-1] != ' ' || l[col] == ' ' {
				t.Fatalf("STATE column not aligned:\n%s", out)
			}
		}
		if !strings.Contains(out, "available (snapshot)") || !strings.Contains(lines[1], "copy") || !strings.Contains(lines[1], "snap1") {
			t.Fatalf("list:\n%s", out)
		}
	})

	t.Run("inspect is JSON with the chain", func(t *testing.T) {
		out, errOut, ok := c.run("volume", "inspect", "data")
		if !ok {
			t.Fatal(errOut)
		}
		var v volume.Volume
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("inspect output is not JSON: %v\n%s", err, out)
		}
		if v.Name != "data" || v.Parent != "snap1" || v.Size != 1<<30 || len(v.Chain) != 2 || v.State != volume.Available {
			t.Fatalf("inspect: %+v", v)
		}
	})

	t.Run("attached volume", func(t *testing.T) {
		s, _ := volume.Open(c.state)
		a, err := s.Attach("scratch", false)
		if err != nil {
			t.Fatal(err)
		}
		out, _, _ := c.run("volume", "list")
		if !strings.Contains(out, "attached") {
			t.Errorf("list while attached:\n%s", out)
		}
		for _, args := range [][]string{{"volume", "rm", "scratch"}, {"volume", "snapshot", "scratch", "s"}} {
			if _, errOut, ok := c.run(args...); ok || !strings.Contains(errOut, `volume "scratch" is attached (by pid`) {
				t.Errorf("rayvmm %v while attached: ok=%v %s", args, ok, errOut)
			}
		}
		a.Close()
		if _, errOut, ok := c.run("volume", "rm", "scratch"); !ok {
			t.Errorf("rm after detach: %s", errOut)
		}
	})

	t.Run("import", func(t *testing.T) {
		src := filepath.Join(t.TempDir(), "src.img")
		data := bytes.Repeat([]byte("rayvmm!!"), 1<<16)
		if err := os.WriteFile(src, data, 0o644); err != nil {
			t.Fatal(err)
		}
		out, errOut, ok := c.run("volume", "import", src, "imp", "--format", "qcow2")
		if !ok || !strings.Contains(out, "as volume imp (qcow2, 512K)") {
			t.Fatalf("import: %s %s", out, errOut)
		}
		if errOut != "" {
			t.Errorf("progress bar drawn on a non-terminal: %q", errOut)
		}
	})

	t.Run("rm everything leaves nothing", func(t *testing.T) {
		for _, n := range []string{"copy", "data", "snap1", "tiny", "imp"} {
			if _, errOut, ok := c.run("volume", "rm", n); !ok {
				t.Fatalf("rm %s: %s", n, errOut)
			}
		}
		if f := c.files(); len(f) != 0 {
			t.Fatalf("left behind: %v", f)
		}
	})
}
