package main

import (
	"fmt"
	"os"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/shards/cluster"
	"github.com/rayvmm/rayvmm/vmproc"
)

// Commands that need etcd run in rayvmmd, rayvmm's third executable:
// linking etcd's client and server into rayvmm made every rayvmm start
// cost 9-16 ms instead of 3-5. rayvmm replaces itself with rayvmmd
// (syscall.Exec, the same arguments and environment), so that signals,
// exit status and the terminal are rayvmmd's as if the user had run it.

// etcdEndpoints is --etcd-endpoints: rayvmm only needs to know whether a
// cluster is configured (which names to look up in etcd); rayvmmd reads
// the flag again from the same arguments.
var etcdEndpoints []string

func init() {
	rootCmd.PersistentFlags().StringSliceVar(&etcdEndpoints, "etcd-endpoints", cluster.DefaultEndpoints(),
		"etcd client URLs holding sharded-volume metadata (default: $"+cluster.EnvEndpoints+", else an embedded etcd in the state directory)")
	rootCmd.AddCommand(&cobra.Command{
		Use:   "shard",
		Short: "Run and manage the storage nodes of sharded volumes (serve, nodes, rebalance, etcd)",
		Long: `Sharded volumes ("rayvmm volume create NAME --replicas N") are split into
shards, each kept as N replicas on distinct storage nodes. "rayvmm shard"
runs in rayvmmd, rayvmm's executable that links etcd: see "rayvmm shard --help".`,
		DisableFlagParsing: true,
		RunE:               func(*cobra.Command, []string) error { return handOver() },
	})
}

// clusterConfigured reports whether sharded volumes are in use here, so
// that a volume name that is not a local volume is looked up in etcd.
func clusterConfigured() bool { return cluster.Configured(etcdEndpoints, stateDir) }

// handOver replaces this process with rayvmmd, run with this process's
// arguments and environment; it returns only if that fails.
func handOver() error {
	bin, err := vmproc.FindDaemon()
	if err != nil {
		return fmt.Errorf("%s needs rayvmmd: %w", commandLine(), err)
	}
	if err := syscall.Exec(bin, os.Args, os.Environ()); err != nil {
		return fmt.Errorf("run %s: %w", bin, err)
	}
	return nil
}

func commandLine() string {
	if len(os.Args) < 2 {
		return "rayvmm"
	}
	s := "rayvmm"
	for _, a := range os.Args[1:] {
		if len(a) > 0 && a[0] == '-' {
			break
		}
		s += " " + a
	}
	return s
}
