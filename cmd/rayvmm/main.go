// Command rayvmm is a virtual machine monitor for microVMs on Linux KVM.
//
// This package holds only the command line: flags and specs are parsed into
// config structs and handed to the packages that do the work. Each
// subcommand lives in its own file and registers itself on rootCmd in init.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/cmd/internal/command"
	"github.com/rayvmm/rayvmm/cmd/rayvmm/internal/prestart"
)

// exitError carries a specific exit status out of a command (a guest that
// crashed, say) without printing cobra's usage text. With no err, nothing
// is printed: someone (the VM process) already said why.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}
func (e *exitError) Unwrap() error { return e.err }

var rootCmd = &cobra.Command{
	Use:   "rayvmm",
	Short: "rayvmm runs microVMs on Linux KVM",
	Long: `rayvmm is a virtual machine monitor for microVMs on Linux KVM.

With no kernel given, "rayvmm boot" runs rayguest, a tiny guest kernel built
into the binary, so a first run needs nothing but /dev/kvm:

    sudo rayvmm boot

It can also boot a Linux kernel (an ELF vmlinux or a bzImage) with an initrd,
and attaches virtio-blk disks and virtio-net NICs behind which live volumes
(raw and qcow2, snapshots, QoS) and networks (bridges, VLANs, NAT).`,
	SilenceUsage:  true,
	SilenceErrors: true,
}

// stateDir is the directory for everything rayvmm keeps between runs.
var stateDir string

func defaultStateDir() string { return command.DefaultStateDir() }

func init() {
	rootCmd.PersistentFlags().StringVar(&stateDir, "state-dir", defaultStateDir(),
		"directory for volumes, networks, the audit log and other state rayvmm keeps between runs ($RAYVMM_STATE_DIR)")
}

func main() {
	err := rootCmd.Execute()
	prestart.Discard() // the VM process started ahead, if unused
	if cerr := closeAudit(); err == nil {
		err = cerr
	}
	if err == nil {
		return
	}
	var ee *exitError
	if errors.As(err, &ee) && ee.err == nil {
		os.Exit(ee.code)
	}
	fmt.Fprintf(os.Stderr, "rayvmm: %v\n", err)
	if ee != nil {
		os.Exit(ee.code)
	}
	os.Exit(1)
}
