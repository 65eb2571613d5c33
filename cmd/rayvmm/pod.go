package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/pods/client"
)

func init() {
	var host string
	podCmd := &cobra.Command{
		Use:   "pod",
		Short: "Run pods of microVMs through the rayvmm daemon",
		Long: `Run pods of microVMs through the rayvmm daemon ("rayvmm daemon"), which
starts each VM as a process of its own in a cgroup with the pod's limits,
restarts VMs by the pod's restart policy with Kubernetes' back-off, probes
them (startup, liveness, readiness over vsock or UDP) and keeps them running
across its own restarts. A pod is a Kubernetes-shaped YAML or JSON document
(see pods/README.md):

    apiVersion: rayvmm/v1
    kind: Pod
    metadata: {name: web}
    spec:
      restartPolicy: Always
      vms:
      - name: front
        cmdline: rayguest.run=serve rayguest.ip=192.0.2.10/24
        memory: 64M
        nets: [{network: lab}]
        resources: {limits: {cpu: 500m, memory: 96M, pids: 64}}
        readinessProbe: {udp: {port: 7}, periodSeconds: 2}

The daemon's socket is --host unix:///PATH, else $RAYVMM_HOST, else
` + client.DefaultHost + `.`,
	}
	podCmd.PersistentFlags().StringVar(&host, "host", "", "the daemon's socket, unix:///PATH (default $"+client.EnvHost+", else "+client.DefaultHost+")")
	// run makes a command's RunE that talks to the daemon.
	run := func(fn func(cmd *cobra.Command, c *client.Client, args []string) error) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, args []string) error {
			c, err := client.New(host)
			if err != nil {
				return err
			}
			defer c.Close()
			return fn(cmd, c, args)
		}
	}

	var file string
	var wait bool
	var grace int
	var timeout time.Duration
	apply := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Create a pod from a YAML or JSON file (- is stdin), or start a stopped one again",
		Long: `Create a pod from a YAML or JSON file ("-" reads stdin). The daemon checks the
spec strictly and answers a bad one with the field at fault; nothing is made
then. Applying an existing pod's spec again changes nothing, and starts it
again if it was stopped; a different spec for an existing pod is refused
(pod specs cannot change, as in Kubernetes: rm it first).

The pod starts in the background; --wait waits until it is Ready (or ends).`,
		Example: "  rayvmm pod apply -f web.yaml\n  rayvmm pod apply -f web.yaml --wait --timeout 2m",
		Args:    cobra.NoArgs,
		RunE: run(func(cmd *cobra.Command, c *client.Client, _ []string) error {
			if file == "" {
				return errors.New("-f FILE is required")
			}
			doc, err := pods.ReadFile(file)
			if err != nil {
				return err
			}
			res, err := c.Apply(cmd.Context(), doc)
			if err != nil {
				return fmt.Errorf("%s: %w", file, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pod/%s %s\n", res.Name, res.Result)
			if !wait {
				return nil
			}
			return waitPod(cmd, c, res.Name, "Ready", timeout)
		}),
	}
	apply.Flags().StringVarP(&file, "filename", "f", "", "the pod's YAML or JSON file (- for stdin)")
	apply.Flags().BoolVar(&wait, "wait", false, "wait until the pod is Ready")
	apply.Flags().DurationVar(&timeout, "timeout", 5*time.Minute, "how long --wait waits")

	ps := &cobra.Command{
		Use:     "ps",
		Aliases: []string{"list", "ls"},
		Short:   "List pods: ready VMs, status, restarts and age",
		Args:    cobra.NoArgs,
		RunE: run(func(cmd *cobra.Command, c *client.Client, _ []string) error {
			list, err := c.List(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 3, ' ', 0)
			fmt.Fprintln(w, "NAME\tREADY\tSTATUS\tRESTARTS\tAGE")
			for _, p := range list {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\n", p.Metadata.Name, p.ReadyCount(), p.StatusWord(), p.Restarts(), pods.FormatAge(time.Since(p.Status.StartTime)))
			}
			return w.Flush()
		}),
	}

	inspect := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Print a pod as JSON: its spec, status (phase, conditions, each VM's state) and owner",
		Args:  cobra.ExactArgs(1),
		RunE: run(func(cmd *cobra.Command, c *client.Client, args []string) error {
			i, err := c.Get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			b, _ := json.MarshalIndent(i, "", "  ")
			fmt.Fprintln(cmd.OutOrStdout(), string(b))
			return nil
		}),
	}

	var vm string
	var follow, previous bool
	logs := &cobra.Command{
		Use:   "logs NAME [--vm VM] [-f]",
		Short: "Print a VM's console: the guest's serial output and the VM process's messages",
		Long: `Print a VM's console: the guest's serial output and what its VM process said
(how the VM ended, for one). --vm names the VM (not needed in a pod of one);
-f follows the output until the VM's run ends; --previous prints the run
before the current one (after a restart).`,
		Args: cobra.ExactArgs(1),
		RunE: run(func(cmd *cobra.Command, c *client.Client, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return c.Logs(ctx, args[0], vm, follow, previous, cmd.OutOrStdout())
		}),
	}
	logs.Flags().StringVar(&vm, "vm", "", "the VM (needed when the pod has more than one)")
	logs.Flags().BoolVarP(&follow, "follow", "f", false, "follow the output until the VM's run ends")
	logs.Flags().BoolVar(&previous, "previous", false, "the previous run's output")

	events := &cobra.Command{
		Use:   "events NAME",
		Short: "List a pod's events: every transition with its time and reason",
		Args:  cobra.ExactArgs(1),
		RunE: run(func(cmd *cobra.Command, c *client.Client, args []string) error {
			evs, err := c.Events(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "TIME\tTYPE\tREASON\tVM\tMESSAGE")
			for _, e := range evs {
				msg := e.Message
				if e.Count > 1 {
					msg += fmt.Sprintf(" (x%d)", e.Count)
				}
				vm := e.VM
				if vm == "" {
					vm = "-"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", e.Time.Local().Format("15:04:05.000"), e.Type, e.Reason, vm, msg)
			}
			return w.Flush()
		}),
	}

	stop := &cobra.Command{
		Use:   "stop NAME",
		Short: "Stop every VM of a pod (SIGTERM: disks flushed; SIGKILL after the grace period)",
		Args:  cobra.ExactArgs(1),
		RunE: run(func(cmd *cobra.Command, c *client.Client, args []string) error {
			i, err := c.Stop(cmd.Context(), args[0], client.Grace(grace))
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pod/%s stopped (%s)\n", args[0], i.Status.Phase)
			return nil
		}),
	}

	stop.Flags().IntVar(&grace, "grace-period", -1, "seconds a VM has to stop cleanly before SIGKILL (default: the pod's terminationGracePeriodSeconds; 0: SIGKILL at once)")

	var force bool
	rm := &cobra.Command{
		Use:   "rm NAME [--force]",
		Short: "Remove a stopped pod: its record, cgroups, logs and volumes (but retained ones)",
		Long: `Remove a pod: its record and events, its cgroups, logs and sockets, and its pod
volumes (those not marked retain: true). A running pod is refused unless
--force, which stops it first.`,
		Args: cobra.ExactArgs(1),
		RunE: run(func(cmd *cobra.Command, c *client.Client, args []string) error {
			if err := c.Remove(cmd.Context(), args[0], force, client.Grace(grace)); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pod/%s removed\n", args[0])
			return nil
		}),
	}
	rm.Flags().BoolVar(&force, "force", false, "stop the pod first if it runs")
	rm.Flags().IntVar(&grace, "grace-period", -1, "with --force: seconds a VM has to stop cleanly before SIGKILL")

	var waitFor string
	waitCmd := &cobra.Command{
		Use:     "wait NAME --for Ready|Running|Ended|Removed",
		Short:   "Wait until a pod is Ready, Running, has ended or is removed",
		Example: "  rayvmm pod wait web --for Ready --timeout 1m",
		Args:    cobra.ExactArgs(1),
		RunE: run(func(cmd *cobra.Command, c *client.Client, args []string) error {
			return waitPod(cmd, c, args[0], waitFor, timeout)
		}),
	}
	waitCmd.Flags().StringVar(&waitFor, "for", "Ready", "Ready, Running, Ended (Succeeded or Failed) or Removed")
	waitCmd.Flags().DurationVar(&timeout, "timeout", 5*time.Minute, "how long to wait")

	podCmd.AddCommand(apply, ps, inspect, logs, events, stop, rm, waitCmd)
	rootCmd.AddCommand(podCmd)
}

// waitPod waits for a condition and prints the pod's line.
func waitPod(cmd *cobra.Command, c *client.Client, name, cond string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(cmd.Context(), timeout+10*time.Second)
	defer cancel()
	i, err := c.Wait(ctx, name, cond, timeout)
	if err != nil {
		return err
	}
	if i == nil {
		fmt.Fprintf(cmd.OutOrStdout(), "pod/%s removed\n", name)
		return nil
	}
	fmt.Fprintf(cmd.OutOrStdout(), "pod/%s %s %s\n", name, i.ReadyCount(), strings.ToLower(i.StatusWord()))
	if cond == "Ready" && !i.Status.Ready() {
		return fmt.Errorf("pod %s ended before it was Ready (%s)", name, i.StatusWord())
	}
	return nil
}
