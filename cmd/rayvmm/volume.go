package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/cmd/internal/command"
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
func args(names ...string) cobra.PositionalArgs { return command.Args(names...) }

func store() (*volume.Store, error) { return volume.Open(stateDir) }

func init() {
	var size, format string
	var sharded shardedFlags
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
				return handOver() // sharded: rayvmmd checks the flags and talks to etcd
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
			var v *volume.Volume
			if err := auditAction(cmd.Context(), audit.VolumeCreate, volumeObj(a[0]), audit.Params{"size": strconv.FormatInt(n, 10), "format": format}, func() (err error) { v, err = s.Create(a[0], n, format); return err }); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created volume %s (%s, %s)\n", v.Name, v.Format, spec.FormatSize(v.Size))
			return nil
		},
	}
	create.Flags().StringVar(&size, "size", "", "virtual size: bytes, or with a K, M, G or T suffix (powers of 1024)")
	create.Flags().StringVar(&format, "format", "qcow2", "image format: raw or qcow2")
	// Parsed here for the help and the flag checks; rayvmmd reads them
	// again from the same arguments.
	create.Flags().IntVar(&sharded.replicas, "replicas", 0, "make a sharded volume with this many replicas of each shard (runs in rayvmmd)")
	create.Flags().StringVar(&sharded.shardSize, "shard-size", "64M", "sharded: size of each shard (a multiple of 64K dividing --size)")
	create.Flags().StringVar(&sharded.consistency, "consistency", "strong", "sharded: strong or eventual")
	create.Flags().IntVar(&sharded.minReplicas, "min-replicas", 0, "sharded: fewest healthy replicas a shard needs to accept writes (default: a majority for strong, 1 for eventual)")
	create.Flags().StringSliceVar(&sharded.nodes, "nodes", nil, "sharded: nodes to place replicas on (default: every live node)")
	create.MarkFlagRequired("size")

	list := &cobra.Command{
		Use:   "list",
		Short: "List volumes",
		Args:  args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if clusterConfigured() {
				return handOver() // rayvmmd lists local and sharded volumes
			}
			s, err := store()
			if err != nil {
				return err
			}
			vs, err := s.List()
			if err != nil {
				return err
			}
			return command.VolumeTable(cmd.OutOrStdout(), command.LocalRows(vs))
		},
	}

	inspect := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a volume as JSON (for a sharded volume: its shard map, replica states and rebuild progress)",
		Args:  args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			s, err := store()
			if err != nil {
				return err
			}
			v, err := s.Get(a[0])
			if shardedName(err) {
				return handOver() // rayvmmd looks it up in etcd
			}
			if err != nil {
				return err
			}
			return command.PrintJSON(cmd.OutOrStdout(), v)
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
			if err := auditAction(cmd.Context(), audit.VolumeSnapshot, volumeObj(a[0]), audit.Params{audit.ParamSnapshot: a[1]}, func() error { _, err := s.Snapshot(a[0], a[1]); return err }); err != nil {
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
			if err := auditAction(cmd.Context(), audit.VolumeClone, volumeObj(a[1]), audit.Params{audit.ParamFrom: a[0]}, func() error { _, err := s.Clone(a[0], a[1]); return err }); err != nil {
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
			s, err := store()
			if err != nil {
				return err
			}
			if _, err := s.Get(a[0]); shardedName(err) {
				return handOver() // rayvmmd removes it from etcd
			}
			if err := auditAction(cmd.Context(), audit.VolumeRemove, volumeObj(a[0]), nil, func() error { return s.Remove(a[0]) }); err != nil {
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
			var v *volume.Volume
			err = auditAction(cmd.Context(), audit.VolumeImport, volumeObj(a[1]), audit.Params{"source": a[0], "format": importFormat}, func() (err error) { v, err = s.Import(a[0], a[1], opts); return err })
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
		Use:                "rebuild NAME",
		Short:              "Rebuild a sharded volume's failed replicas whose nodes are live (runs in rayvmmd)",
		DisableFlagParsing: true,
		RunE:               func(*cobra.Command, []string) error { return handOver() },
	}

	volumeCmd.AddCommand(create, list, inspect, snapshot, clone, rm, imp, rebuild)
	rootCmd.AddCommand(volumeCmd)
}

// shardedFlags are volume create's flags for sharded volumes.
type shardedFlags struct {
	replicas, minReplicas  int
	shardSize, consistency string
	nodes                  []string
}

// shardedName reports whether err says a volume name is not a local
// volume while sharded volumes are configured here: then rayvmmd looks
// the name up in etcd.
func shardedName(err error) bool {
	return errors.Is(err, volume.ErrNotFound) && clusterConfigured()
}
