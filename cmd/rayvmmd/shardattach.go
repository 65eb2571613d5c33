package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/cmd/internal/command"
	"github.com/rayvmm/rayvmm/shards"
)

// `shard attach` is the per-VM agent rayvmm boot starts for a sharded
// disk (shards/cluster.Agents): it owns the volume for the VM and serves
// the VM process's engine over the link it inherited, until the VM
// process is gone.
func init() {
	var holder string
	var linkFD, readyFD int
	var verbose bool
	attach := &cobra.Command{
		Use:    "attach NAME --link-fd N --ready-fd N",
		Short:  "Own a sharded volume for one VM and serve its VM process's engine (run by rayvmm boot)",
		Hidden: true,
		Long: `Attach sharded volume NAME for the VM process at the other end of the
link (a unix SOCK_SEQPACKET socket inherited as --link-fd): own the volume
(an etcd lease), give the VM process's engine the layout and, whenever it
asks, a connected NBD socket to a replica, record replica failures and
rebuilds in etcd, and rebuild failed replicas in the background. Write "ok"
(or the error) to --ready-fd once the volume is owned. Exit when the VM
process's end of the link is closed; a clean detach (the engine's final
flush worked) spares the next attach a resync.`,
		Args: command.Args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if linkFD < 3 || readyFD < 3 || linkFD == readyFD {
				return errors.New("--link-fd and --ready-fd: two inherited descriptors from 3 up (rayvmm boot passes them)")
			}
			var sst unix.Stat_t
			if err := unix.Fstat(linkFD, &sst); err != nil || sst.Mode&unix.S_IFMT != unix.S_IFSOCK {
				return fmt.Errorf("--link-fd %d is not a socket", linkFD)
			}
			link := os.NewFile(uintptr(linkFD), "link")
			ready := os.NewFile(uintptr(readyFD), "ready")
			say := func(line string) {
				ready.WriteString(strings.ReplaceAll(line, "\n", "; ") + "\n")
				ready.Close()
			}
			// An error goes to rayvmm boot, which prints it: exit
			// without printing it a second time on the same terminal.
			fail := func(err error) error {
				say(err.Error())
				os.Exit(1)
				return err
			}
			// The VM's terminal is not the agent's: the link alone says
			// when the VM is gone. SIGTERM ends it uncleanly (the VM
			// process's engine is fenced).
			signal.Ignore(syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT)
			ctx, cancel := signal.NotifyContext(cmd.Context(), syscall.SIGTERM)
			defer cancel()
			st, err := shardStore(ctx)
			if err != nil {
				link.Close()
				return fail(fmt.Errorf("sharded volume %s: %w", a[0], err))
			}
			defer st.Close()
			att, err := shards.AttachLink(ctx, st, a[0], shards.AttachOptions{Holder: holder, Log: cmdLog(verbose)}, link)
			if err != nil {
				return fail(err)
			}
			say("ok")
			if err := att.Serve(ctx); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		},
	}
	attach.Flags().StringVar(&holder, "holder", "rayvmm boot", "who owns the volume, for volume inspect")
	attach.Flags().IntVar(&linkFD, "link-fd", 0, "the inherited link socket")
	attach.Flags().IntVar(&readyFD, "ready-fd", 0, `the inherited descriptor to write "ok" or the error to`)
	attach.Flags().BoolVarP(&verbose, "verbose", "v", false, "log rebuilds and replica changes (warnings are always logged)")
	shardCmd.AddCommand(attach)
}
