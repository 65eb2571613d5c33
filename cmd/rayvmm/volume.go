package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/rayvmm/rayvmm/shards"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage/volume"
)

// progressMin is the smallest import that gets a progress bar.
const progressMin = 64 << 20

var volumeCmd = &cobra.Command{
	Use:   "volume",
	Short: "Manage volumes: disk images kept under the state directory",
	Long: `Volumes are raw or qcow2 disk images that rayvmm keeps under
<state-dir>/volumes, with their metadata in the state store
(<state-dir>/state.db).

A snapshot freezes a volume's current image as a read-only parent and gives
the volume a new qcow2 overlay on top of it; a clone is a new volume on top
of a snapshot. "qemu-img info --backing-chain" shows the same chain.
A volume is attached while a running VMM uses it; an attached volume cannot
be attached again, snapshotted or removed.`,
}

// args makes cobra check for exactly the named positional arguments.
func args(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if len(a) != len(names) {
			return fmt.Errorf("%s takes %s (got %d argument(s))", cmd.CommandPath(), strings.Join(names, " "), len(a))
		}
		return nil
	}
}

func store() (*volume.Store, error) { return volume.Open(stateDir) }

func init() {
	var size, format, shardSize, consistency string
	var replicas, minReplicas int
	var nodes []string
	create := &cobra.Command{
		Use:   "create NAME --size SIZE [--format raw|qcow2] | --replicas N [--shard-size SIZE] [--consistency strong|eventual] [--nodes A,B,C]",
		Short: "Create an empty volume, local or sharded",
		Long: `Create an empty volume. Without --replicas it is a local raw or qcow2 image
under the state directory. With --replicas it is a sharded volume: split into
--shard-size shards, each kept as N replicas on distinct storage nodes
("rayvmm shard serve"), placed so every node holds about as many replicas
as any other. Its metadata lives in etcd (see "rayvmm shard").

Consistency: strong (default) acknowledges a write once every healthy replica
has it, and refuses writes to a shard with fewer than --min-replicas healthy
replicas (default: a majority); eventual acknowledges on the first replica,
the others follow, and a flush waits for all of them (default minimum 1).`,
		Example: `  rayvmm volume create data --size 10G
  rayvmm volume create scratch --size 512M --format raw
  rayvmm volume create db --size 4G --replicas 3 --shard-size 64M
  rayvmm volume create logs --size 1G --replicas 2 --consistency eventual --nodes a,b`,
		Args: args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			n, err := spec.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			if cmd.Flags().Changed("replicas") {
				if cmd.Flags().Changed("format") {
					return fmt.Errorf("--format: a sharded volume's replicas are raw; leave --format out with --replicas")
				}
				return shardedCreate(cmd, a[0], n, shardSize, consistency, replicas, minReplicas, nodes)
			}
			for _, f := range []string{"shard-size", "consistency", "nodes", "min-replicas"} {
				if cmd.Flags().Changed(f) {
					return fmt.Errorf("--%s is for sharded volumes: give --replicas too", f)
				}
			}
			s, err := store()
			if err != nil {
				return err
			}
			v, err := s.Create(a[0], n, format)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created volume %s (%s, %s)\n", v.Name, v.Format, spec.FormatSize(v.Size))
			return nil
		},
	}
	create.Flags().StringVar(&size, "size", "", "virtual size: bytes, or with a K, M, G or T suffix (powers of 1024)")
	create.Flags().StringVar(&format, "format", "qcow2", "image format: raw or qcow2")
	create.Flags().IntVar(&replicas, "replicas", 0, "make a sharded volume with this many replicas of each shard")
	create.Flags().StringVar(&shardSize, "shard-size", "64M", "sharded: size of each shard (a multiple of 64K dividing --size)")
	create.Flags().StringVar(&consistency, "consistency", "strong", "sharded: strong or eventual")
	create.Flags().IntVar(&minReplicas, "min-replicas", 0, "sharded: fewest healthy replicas a shard needs to accept writes (default: a majority for strong, 1 for eventual)")
	create.Flags().StringSliceVar(&nodes, "nodes", nil, "sharded: nodes to place replicas on (default: every live node)")
	create.MarkFlagRequired("size")

	list := &cobra.Command{
		Use:   "list",
		Short: "List volumes",
		Args:  args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := store()
			if err != nil {
				return err
			}
			vs, err := s.List()
			if err != nil {
				return err
			}
			sharded, err := listSharded(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tFORMAT\tSIZE\tALLOCATED\tSTATE\tPARENT")
			for _, v := range vs {
				st := string(v.State)
				if v.ReadOnly {
					st += " (snapshot)"
				}
				parent := v.Parent
				if parent == "" {
					parent = "-"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, v.Format, spec.FormatSize(v.Size), spec.FormatSize(v.Allocated), st, parent)
			}
			for _, v := range sharded {
				fmt.Fprintf(w, "%s\tsharded (%d x %s, R=%d, %s)\t%s\t-\t%s\t-\n", v.Name, v.Volume.Shards(), spec.FormatSize(v.ShardSize),
					v.Replicas, v.Consistency, spec.FormatSize(v.Size), v.State)
			}
			return w.Flush()
		},
	}

	inspect := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a volume as JSON (for a sharded volume: its shard map, replica states and rebuild progress)",
		Args:  args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if shardedOnly(a[0]) {
				st, err := shardStore(cmd.Context())
				if err != nil {
					return err
				}
				defer st.Close()
				v, err := st.Inspect(cmd.Context(), a[0])
				if err != nil {
					return err
				}
				return printJSON(cmd, v)
			}
			s, err := store()
			if err != nil {
				return err
			}
			v, err := s.Get(a[0])
			if err != nil {
				return err
			}
			b, err := json.MarshalIndent(v, "", "  ")
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\n", b)
			return nil
		},
	}

	snapshot := &cobra.Command{
		Use:   "snapshot NAME SNAPNAME",
		Short: "Freeze a volume's current content as a read-only snapshot",
		Long: `Freeze NAME's current image as the read-only snapshot SNAPNAME. NAME
carries on as a new qcow2 overlay on top of it, so later writes to NAME do
not change SNAPNAME. Use "volume clone" to make a new volume from it.`,
		Args: args("NAME", "SNAPNAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			s, err := store()
			if err != nil {
				return err
			}
			if _, err := s.Snapshot(a[0], a[1]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "snapshot %s of volume %s created\n", a[1], a[0])
			return nil
		},
	}

	clone := &cobra.Command{
		Use:   "clone SNAPNAME NEWNAME",
		Short: "Create a volume from a snapshot",
		Args:  args("SNAPNAME", "NEWNAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			s, err := store()
			if err != nil {
				return err
			}
			if _, err := s.Clone(a[0], a[1]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s cloned from snapshot %s\n", a[1], a[0])
			return nil
		},
	}

	rm := &cobra.Command{
		Use:     "rm NAME",
		Aliases: []string{"remove"},
		Short:   "Remove a volume (not while attached or while it is a parent)",
		Args:    args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if shardedOnly(a[0]) {
				return withStore(cmd, func(st *shards.Store) error { return st.RemoveVolume(cmd.Context(), a[0]) }, "sharded volume %s removed\n", a[0])
			}
			s, err := store()
			if err != nil {
				return err
			}
			if err := s.Remove(a[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s removed\n", a[0])
			return nil
		},
	}

	var importFormat string
	imp := &cobra.Command{
		Use:   "import FILE NAME [--format raw|qcow2]",
		Short: "Create a volume from a raw or qcow2 image file",
		Long: `Copy the raw or qcow2 image FILE (format detected; a qcow2 backing chain is
flattened) into the new volume NAME. The copy stays sparse. A progress bar is
shown on a terminal for large files.`,
		Args: args("FILE", "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			s, err := store()
			if err != nil {
				return err
			}
			opts := volume.ImportOptions{Format: importFormat}
			var bar *progressbar.ProgressBar
			if fi, err := os.Stat(a[0]); err == nil && fi.Size() >= progressMin && term.IsTerminal(int(os.Stderr.Fd())) {
				bar = progressbar.NewOptions64(fi.Size(),
					progressbar.OptionSetWriter(os.Stderr),
					progressbar.OptionSetDescription("importing "+a[1]),
					progressbar.OptionShowBytes(true),
					progressbar.OptionThrottle(100*time.Millisecond),
					progressbar.OptionClearOnFinish())
				opts.Progress = func(done, total int64) {
					bar.ChangeMax64(total)
					bar.Set64(done)
				}
			}
			v, err := s.Import(a[0], a[1], opts)
			if bar != nil {
				bar.Finish()
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "imported %s as volume %s (%s, %s)\n", a[0], v.Name, v.Format, spec.FormatSize(v.Size))
			return nil
		},
	}
	imp.Flags().StringVar(&importFormat, "format", "", "format of the new volume: raw or qcow2 (default: the file's)")

	rebuild := &cobra.Command{
		Use:   "rebuild NAME",
		Short: "Rebuild a sharded volume's failed replicas whose nodes are live",
		Long: `Bring every replica of a sharded volume back to health: replicas that failed
are rebuilt from a healthy one once their node is live, and pending moves of
a rebalance are completed. If a VM has the volume attached, its rayvmm does
this by itself while the guest runs and this command waits for it.`,
		Args: args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			ctx, cancel := signalContext(cmd.Context())
			defer cancel()
			st, err := shardStore(ctx)
			if err != nil {
				return err
			}
			defer st.Close()
			if err := repairWithBar(ctx, st, a[0], "rebuilding "+a[0], "rayvmm volume rebuild"); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "sharded volume %s: every replica healthy\n", a[0])
			return nil
		},
	}

	volumeCmd.AddCommand(create, list, inspect, snapshot, clone, rm, imp, rebuild)
	rootCmd.AddCommand(volumeCmd)
}
