package main

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// buildBoth builds rayvmm and rayvmmd into one directory, as make does,
// so that rayvmm finds rayvmmd next to itself; it returns rayvmm's path.
func buildBoth(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for name, pkg := range map[string]string{"rayvmm": "../rayvmm", "rayvmmd": "."} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, name), pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, out)
		}
	}
	return filepath.Join(dir, "rayvmm")
}

// cli runs rayvmm commands on one state directory.
type cli struct {
	t     *testing.T
	bin   string
	state string
	env   []string // added to the environment
}

// cliWait bounds one command: it turns a hang into a failure that names
// the command; it measures nothing.
const cliWait = time.Minute

func (c cli) run(args ...string) (stdout, stderr string, ok bool) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliWait)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, append([]string{"--state-dir", c.state}, args...)...)
	cmd.Env = append(cmd.Environ(), c.env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ctx.Err() != nil {
		c.t.Fatalf("rayvmm %s did not finish in %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), cliWait, o.String(), e.String())
	}
	return o.String(), e.String(), err == nil
}
