package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/vmm/api/client"
)

func init() {
	var socket string
	var asJSON bool
	vmCmd := &cobra.Command{
		Use:   "vm",
		Short: "Control a running VM through its API socket",
		Long: `Control a running VM through the API socket it was started with
("rayvmm boot --api-socket PATH", or apiSocket in its spec). The API is
HTTP/1.1 with JSON bodies; curl --unix-socket PATH http://localhost/ works
too (see README.md).`,
	}
	vmCmd.PersistentFlags().StringVar(&socket, "api-socket", "", "the VM's API socket (required)")
	vmCmd.MarkPersistentFlagRequired("api-socket")

	status := &cobra.Command{
		Use:     "status --api-socket PATH",
		Short:   "Show a VM's name, state, uptime, vCPUs, memory and version",
		Example: "  rayvmm vm status --api-socket /tmp/vm.sock\n  rayvmm vm status --api-socket /tmp/vm.sock --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := client.New(socket)
			defer c.Close()
			i, err := c.Info(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				b, _ := json.MarshalIndent(i, "", "  ")
				fmt.Fprintln(cmd.OutOrStdout(), string(b))
				return nil
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tSTATE\tUPTIME\tVCPUS\tMEMORY\tVERSION")
			up := (time.Duration(i.UptimeSeconds*1e9) / time.Millisecond) * time.Millisecond
			fmt.Fprintf(w, "%s\t%s\t%v\t%d\t%s\t%s\n", i.ID, i.State, up, i.VCPUs, i.Memory, i.VMMVersion)
			return w.Flush()
		},
	}
	status.Flags().BoolVar(&asJSON, "json", false, "print GET / as JSON")

	action := func(use, short, done string, do func(*client.Client, *cobra.Command) error) *cobra.Command {
		return &cobra.Command{
			Use:   use + " --api-socket PATH",
			Short: short,
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				c := client.New(socket)
				defer c.Close()
				if err := do(c, cmd); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), done)
				return nil
			},
		}
	}
	vmCmd.AddCommand(status,
		action("pause", "Pause a VM: every vCPU stops; returns once none runs guest code", "paused",
			func(c *client.Client, cmd *cobra.Command) error { return c.Pause(cmd.Context()) }),
		action("resume", "Resume a paused VM", "resumed",
			func(c *client.Client, cmd *cobra.Command) error { return c.Resume(cmd.Context()) }),
		action("shutdown", "Stop a VM cleanly: its disks are flushed and rayvmm boot exits 0", "shutting down",
			func(c *client.Client, cmd *cobra.Command) error { return c.Shutdown(cmd.Context()) }),
	)
	rootCmd.AddCommand(vmCmd)
}
