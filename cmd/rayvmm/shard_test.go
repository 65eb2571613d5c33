package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestShardedCreateBadInput: bad flags of a sharded volume get a
// one-line error naming the problem before anything is started: no
// embedded etcd, nothing in the state directory.
func TestShardedCreateBadInput(t *testing.T) {
	c := cli{t: t, bin: buildRayvmm(t), state: t.TempDir()}
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
