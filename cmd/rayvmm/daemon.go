package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"
)

// rayvmmd is the daemon binary: `rayvmm daemon ...` runs it with the same
// arguments. It links what the CLI must not (the Prometheus client, the
// cgroup library), so that every rayvmm command starts fast.
const rayvmmdBinary = "rayvmmd"

// envRayvmmd names rayvmmd explicitly.
const envRayvmmd = "RAYVMMD_BINARY"

// findRayvmmd locates rayvmmd: next to this executable, then
// $RAYVMMD_BINARY, then on PATH.
func findRayvmmd() (string, error) {
	var tried []string
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), rayvmmdBinary)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
		tried = append(tried, p)
	}
	if p := os.Getenv(envRayvmmd); p != "" {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
		tried = append(tried, "$"+envRayvmmd+"="+p)
	}
	if p, err := exec.LookPath(rayvmmdBinary); err == nil {
		return p, nil
	}
	tried = append(tried, "PATH")
	return "", fmt.Errorf("%s not found (looked in %v); build it with `make`, or set %s", rayvmmdBinary, tried, envRayvmmd)
}

// execRayvmmd replaces this process with `rayvmmd sub args...` (rayvmm
// daemon --socket S -> rayvmmd daemon --socket S; rayvmm's own flags given
// before the command, such as --state-dir, are among args too).
func execRayvmmd(sub string, args []string) error {
	bin, err := findRayvmmd()
	if err != nil {
		return err
	}
	argv := append([]string{rayvmmdBinary, sub}, args...)
	err = syscall.Exec(bin, argv, os.Environ())
	return errors.Join(fmt.Errorf("exec %s", bin), err)
}

func init() {
	rootCmd.AddCommand(&cobra.Command{
		Use:   "daemon [flags]",
		Short: "Run the rayvmm daemon, which runs pods (runs rayvmmd daemon)",
		Long: `Run the rayvmm daemon in the foreground: it serves the pods API on a Unix
socket and runs each pod VM as a process of its own. It is rayvmmd, a
binary of its own next to rayvmm (it links the Prometheus client and the
cgroup library, which the CLI does not); "rayvmm daemon ARGS" runs
"rayvmmd daemon ARGS". See "rayvmmd daemon --help" for its flags.`,
		DisableFlagParsing: true,
		RunE:               func(_ *cobra.Command, args []string) error { return execRayvmmd("daemon", args) },
	})
}
