package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestShardedCreateBadInput: bad flags of a sharded volume get a
// one-line error naming the problem before anything is started: no
// embedded etcd, nothing in the state directory.
func TestShardedCreateBadInput(t *testing.T) {
	c := cli{t: t, bin: buildBoth(t), state: t.TempDir()}
	for _, tc := range []struct {
		args    []string
		wantErr string
	}{
		{[]string{"volume", "create", "v", "--size", "1G", "--replicas", "0"}, "--replicas 0"},
		{[]string{"volume", "create", "v", "--size", "1G", "--replicas", "3", "--consistency", "weak"}, `--consistency "weak"`},
		{[]string{"volume", "create", "v", "--size", "1G", "--replicas", "3", "--shard-size", "100K"}, "--shard-size"},
		{[]string{"volume", "create", "v", "--size", "100M", "--replicas", "3", "--shard-size", "64M"}, "multiple of the shard size"},
		{[]string{"volume", "create", "v", "--size", "1G", "--replicas", "3", "--min-replicas", "4"}, "--min-replicas 4"},
		{[]string{"volume", "create", "v", "--size", "1G", "--replicas", "3", "--format", "raw"}, "--format"},
		{[]string{"volume", "create", "v", "--size", "1G", "--shard-size", "64M"}, "give --replicas too"},
		{[]string{"volume", "create", "bad/name", "--size", "1G", "--replicas", "1"}, "volume name"},
	} {
		_, stderr, ok := c.run(tc.args...)
		if ok || !strings.Contains(stderr, tc.wantErr) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
			t.Errorf("%v: ok=%v, stderr %q, want one line with %q", tc.args, ok, stderr, tc.wantErr)
		}
	}
	if _, err := os.Stat(filepath.Join(c.state, "shards")); !os.IsNotExist(err) {
		t.Errorf("bad input left %s behind (an etcd was started?)", filepath.Join(c.state, "shards"))
	}
}

// TestEmbeddedEtcdShared: with no --etcd-endpoints, commands share one
// embedded etcd that the first of them starts in the background; several
// starting at once agree on one; it keeps the metadata across commands,
// is reachable only through its 0600 socket, and `shard etcd stop` ends it.
func TestEmbeddedEtcdShared(t *testing.T) {
	c := cli{t: t, bin: buildBoth(t), state: t.TempDir()}
	t.Cleanup(func() { c.run("shard", "etcd", "stop") })
	errs := make(chan string, 3)
	for i := range 3 {
		go func() {
			_, stderr, ok := c.run("shard", "nodes", "add", fmt.Sprintf("q%d", i), "--address", "127.0.0.1:1")
			if !ok {
				errs <- stderr
				return
			}
			errs <- ""
		}()
	}
	for range 3 {
		if e := <-errs; e != "" {
			t.Fatalf("a command racing to start the embedded etcd failed: %s", e)
		}
	}
	out, stderr, ok := c.run("shard", "nodes")
	if !ok || strings.Count(out, "static") != 3 {
		t.Fatalf("shard nodes after the adds: %v %s%s", ok, out, stderr)
	}
	st, err := os.Stat(filepath.Join(c.state, "shards", "etcd.sock"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("the embedded etcd's socket: %v %v", st.Mode(), err)
	}
	out, _, ok = c.run("shard", "etcd", "stop")
	if !ok || !strings.Contains(out, "embedded etcd stopped") {
		t.Fatalf("shard etcd stop: %s", out)
	}
	if out, _, _ := c.run("shard", "etcd", "stop"); !strings.Contains(out, "not running") {
		t.Fatalf("a second stop: %s", out)
	}
}

// TestHandOver: rayvmm runs its etcd commands in rayvmmd, found next to
// it, else through $RAYVMMD_BINARY, else on PATH, and says clearly (one
// line, non-zero exit) when there is none; rayvmmd answers in rayvmm's
// name.
func TestHandOver(t *testing.T) {
	both := buildBoth(t)
	c := cli{t: t, bin: both, state: t.TempDir()}
	out, stderr, ok := c.run("shard", "--help")
	if !ok || !strings.Contains(out, "rayvmm shard [command]") || !strings.Contains(out, "serve") {
		t.Fatalf("rayvmm shard --help: ok=%v\n%s%s", ok, out, stderr)
	}
	_, stderr, ok = c.run("volume", "create", "v", "--size", "1G", "--replicas", "0")
	if ok || !strings.HasPrefix(stderr, "rayvmm: ") {
		t.Fatalf("an error from rayvmmd: ok=%v, stderr %q; want it in rayvmm's name", ok, stderr)
	}

	// rayvmm alone, rayvmmd neither beside it nor on PATH.
	alone := filepath.Join(t.TempDir(), "rayvmm")
	b, err := os.ReadFile(both)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(alone, b, 0o755); err != nil {
		t.Fatal(err)
	}
	c = cli{t: t, bin: alone, state: t.TempDir(), env: []string{"PATH=/usr/bin:/bin"}}
	for _, args := range [][]string{{"shard", "nodes"}, {"volume", "create", "v", "--size", "1G", "--replicas", "3"}, {"volume", "rebuild", "v"}} {
		_, stderr, ok := c.run(args...)
		msg := strings.TrimSpace(stderr)
		if ok || strings.Contains(msg, "\n") || !strings.Contains(msg, "rayvmmd not found") || !strings.Contains(msg, "RAYVMMD_BINARY") {
			t.Errorf("%v without rayvmmd: ok=%v, stderr %q; want one line saying rayvmmd is missing and how to point at it", args, ok, stderr)
		}
	}
	c.env = append(c.env, "RAYVMMD_BINARY="+filepath.Join(filepath.Dir(both), "rayvmmd"))
	if out, stderr, ok := c.run("shard", "--help"); !ok || !strings.Contains(out, "serve") {
		t.Fatalf("with $RAYVMMD_BINARY: ok=%v\n%s%s", ok, out, stderr)
	}
	// Local volumes need no rayvmmd.
	if out, stderr, ok := c.run("volume", "list"); !ok || !strings.Contains(out, "NAME") {
		t.Fatalf("volume list with no cluster: ok=%v\n%s%s", ok, out, stderr)
	}
}
