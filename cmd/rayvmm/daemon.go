package main

import (
	"github.com/spf13/cobra"
)

func init() {
	rootCmd.AddCommand(&cobra.Command{
		Use:   "daemon [flags]",
		Short: "Run the rayvmm daemon, which runs pods (in rayvmmd)",
		Long: `Run the rayvmm daemon in the foreground: it serves the pods API on a Unix
socket, decides every request with the access policy, and runs each pod VM
as a process of its own. It runs in rayvmmd, rayvmm's executable next to it
that links the Prometheus client and the cgroup library, which the CLI does
not: rayvmm replaces itself with rayvmmd, given the same arguments. See
"rayvmm daemon --help" there for its flags.`,
		DisableFlagParsing: true,
		RunE:               func(*cobra.Command, []string) error { return handOver() },
	})
}
