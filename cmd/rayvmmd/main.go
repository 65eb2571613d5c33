// Command rayvmmd is rayvmm's third executable, beside rayvmm (the CLI and
// foreground control plane) and rayvmm-vm (the VM process): the pods
// daemon and everything that links etcd, the Prometheus client or the
// cgroup library. Keeping them out of rayvmm keeps every rayvmm command's
// start (and rayvmm boot's boot-to-ready) fast. rayvmm runs rayvmmd in its
// own place (syscall.Exec, same arguments) for the commands that need it
// (`rayvmm daemon ...` runs `rayvmmd daemon ...`), so users type rayvmm;
// rayvmmd names itself after argv[0] in help and errors.
//
// Each command lives in its own file and registers itself on rootCmd in
// init.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/cmd/internal/command"
)

// version is set by the build (-X main.version=...).
var version = "dev"

var rootCmd = &cobra.Command{
	Use:           "rayvmmd",
	Short:         "rayvmm's daemon and sharded-volume commands (run through rayvmm)",
	SilenceUsage:  true,
	SilenceErrors: true,
}

// stateDir is the directory for everything rayvmm keeps between runs.
var stateDir string

func init() {
	rootCmd.PersistentFlags().StringVar(&stateDir, "state-dir", command.DefaultStateDir(),
		"directory for volumes, networks and other state rayvmm keeps between runs")
}

func main() {
	name := filepath.Base(os.Args[0])
	rootCmd.Use = name
	err := rootCmd.Execute()
	if cerr := auditLog.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
}
