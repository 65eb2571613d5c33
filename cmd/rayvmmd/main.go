// Command rayvmmd is rayvmm's daemon binary: the commands that link what
// the rayvmm CLI must not (the Prometheus client, the cgroup library,
// etcd), so that every rayvmm command starts fast. `rayvmm daemon ...`
// execs `rayvmmd daemon ...`.
//
// Each command lives in its own file and registers itself on rootCmd in
// init.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// version is set by the build (-X main.version=...).
var version = "dev"

var rootCmd = &cobra.Command{
	Use:           "rayvmmd",
	Short:         "rayvmmd runs rayvmm's long-running services (the pods daemon)",
	SilenceUsage:  true,
	SilenceErrors: true,
}

// exitError carries an exit status out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func main() {
	err := rootCmd.Execute()
	if err == nil {
		return
	}
	fmt.Fprintf(os.Stderr, "rayvmmd: %v\n", err)
	var ee *exitError
	if errors.As(err, &ee) {
		os.Exit(ee.code)
	}
	os.Exit(1)
}
