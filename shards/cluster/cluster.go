// Package cluster is what rayvmm, which links no etcd, knows about
// sharded volumes: whether a cluster is configured here (etcd endpoints
// given, or the state directory's embedded etcd has data), and how to
// start the per-VM agent, `rayvmmd shard attach`, that owns a sharded
// volume for one VM and serves the VM process's end of its link (package
// shards/link). Everything that talks to etcd is in package shards, which
// only rayvmmd links.
package cluster

import (
	"os"
	"path/filepath"
	"strings"
)

// EnvEndpoints is the environment variable that --etcd-endpoints defaults
// to: etcd client URLs, comma-separated.
const EnvEndpoints = "RAYVMM_ETCD_ENDPOINTS"

// DefaultEndpoints is $RAYVMM_ETCD_ENDPOINTS split at commas, or nil.
func DefaultEndpoints() []string {
	if e := os.Getenv(EnvEndpoints); e != "" {
		return strings.Split(e, ",")
	}
	return nil
}

// EmbeddedDir is where the state directory's embedded etcd keeps its
// data, socket and lock.
func EmbeddedDir(stateDir string) string { return filepath.Join(stateDir, "shards") }

// Configured reports whether sharded volumes are in use here: etcd
// endpoints were given, or the state directory's embedded etcd has data.
// A volume name that is not a local volume is then looked up in etcd.
func Configured(endpoints []string, stateDir string) bool {
	if len(endpoints) > 0 {
		return true
	}
	_, err := os.Stat(filepath.Join(EmbeddedDir(stateDir), "etcd"))
	return err == nil
}
