package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/cmd/internal/command"
	"github.com/rayvmm/rayvmm/shards"
	"github.com/rayvmm/rayvmm/shards/engine"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage/volume"
)

// The volume commands rayvmm hands over for sharded volumes: create with
// --replicas, list (local and sharded volumes in one table), inspect and
// rm of a name that is not a local volume, and rebuild. Local volumes
// are rayvmm's own business; rayvmmd only lists and inspects them so
// that one table and one lookup order serve both kinds.

func localStore() (*volume.Store, error) { return volume.Open(stateDir) }

func init() {
	volumeCmd := &cobra.Command{
		Use:   "volume",
		Short: "Sharded volumes: create, list, inspect, rm, rebuild",
	}

	var size, format, shardSize, consistency string
	var replicas, minReplicas int
	var nodes []string
	create := &cobra.Command{
		Use:   "create NAME --size SIZE --replicas N [--shard-size SIZE] [--consistency strong|eventual] [--min-replicas N] [--nodes A,B,C]",
		Short: "Create a sharded volume",
		Long: `Create a sharded volume: split into --shard-size shards, each kept as N
replicas on distinct storage nodes ("shard serve"), placed so every node
holds about as many replicas as any other. Its metadata lives in etcd.

Consistency: strong (default) acknowledges a write once every healthy replica
has it, and refuses writes to a shard with fewer than --min-replicas healthy
replicas (default: a majority); eventual acknowledges on the first replica,
the others follow, and a flush waits for all of them (default minimum 1).`,
		Args: command.Args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			n, err := spec.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			fl := cmd.Flags()
			if !fl.Changed("replicas") {
				for _, f := range []string{"shard-size", "consistency", "nodes", "min-replicas"} {
					if fl.Changed(f) {
						return fmt.Errorf("--%s is for sharded volumes: give --replicas too", f)
					}
				}
				return errors.New("--replicas: rayvmmd makes sharded volumes only; local volumes are made by rayvmm volume create")
			}
			if fl.Changed("format") {
				return errors.New("--format: a sharded volume's replicas are raw; leave --format out with --replicas")
			}
			return shardedCreate(cmd, a[0], n, shardSize, consistency, replicas, minReplicas, nodes)
		},
	}
	create.Flags().StringVar(&size, "size", "", "virtual size: bytes, or with a K, M, G or T suffix (powers of 1024)")
	create.Flags().StringVar(&format, "format", "", "not for sharded volumes (their replicas are raw)")
	create.Flags().IntVar(&replicas, "replicas", 0, "replicas of each shard")
	create.Flags().StringVar(&shardSize, "shard-size", "64M", "size of each shard (a multiple of 64K dividing --size)")
	create.Flags().StringVar(&consistency, "consistency", "strong", "strong or eventual")
	create.Flags().IntVar(&minReplicas, "min-replicas", 0, "fewest healthy replicas a shard needs to accept writes (default: a majority for strong, 1 for eventual)")
	create.Flags().StringSliceVar(&nodes, "nodes", nil, "nodes to place replicas on (default: every live node)")
	create.MarkFlagRequired("size")

	list := &cobra.Command{
		Use:   "list",
		Short: "List local and sharded volumes",
		Args:  command.Args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := localStore()
			if err != nil {
				return err
			}
			vs, err := s.List()
			if err != nil {
				return err
			}
			rows := command.LocalRows(vs)
			sharded, err := listSharded(cmd.Context())
			if err != nil {
				return err
			}
			for _, v := range sharded {
				rows = append(rows, command.VolumeRow{Name: v.Name,
					Format: fmt.Sprintf("sharded (%d x %s, R=%d, %s)", v.Volume.Shards(), spec.FormatSize(v.ShardSize), v.Replicas, v.Consistency),
					Size:   spec.FormatSize(v.Size), Allocated: "-", State: v.State, Parent: "-"})
			}
			return command.VolumeTable(cmd.OutOrStdout(), rows)
		},
	}

	inspect := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a volume as JSON (for a sharded volume: its shard map, replica states and rebuild progress)",
		Args:  command.Args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if s, err := localStore(); err == nil {
				if v, err := s.Get(a[0]); err == nil {
					return command.PrintJSON(cmd.OutOrStdout(), v)
				}
			}
			st, err := shardStore(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Close()
			v, err := st.Inspect(cmd.Context(), a[0])
			if err != nil {
				return err
			}
			return command.PrintJSON(cmd.OutOrStdout(), v)
		},
	}

	rm := &cobra.Command{
		Use:     "rm NAME",
		Aliases: []string{"remove"},
		Short:   "Remove a sharded volume (not while a VM has it attached)",
		Args:    command.Args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if s, err := localStore(); err == nil {
				if _, err := s.Get(a[0]); err == nil {
					return fmt.Errorf("%s is a local volume: rayvmm volume rm removes it", a[0])
				}
			}
			return onStore(cmd, func(ctx context.Context, st *shards.Store) error {
				if err := auditLog.Action(ctx, audit.VolumeRemove, command.VolumeObj(a[0]), volumeParams(ctx, st, a[0]), func() error { return st.RemoveVolume(ctx, a[0]) }); err != nil {
					return err
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "sharded volume %s removed\n", a[0])
				return err
			})
		},
	}

	rebuild := &cobra.Command{
		Use:   "rebuild NAME",
		Short: "Rebuild a sharded volume's failed replicas whose nodes are live",
		Long: `Bring every replica of a sharded volume back to health: replicas that failed
are rebuilt from a healthy one once their node is live, and pending moves of
a rebalance are completed. If a VM has the volume attached, its agent does
this by itself while the guest runs and this command waits for it.`,
		Args: command.Args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return onStore(cmd, func(ctx context.Context, st *shards.Store) error {
				if err := auditLog.Action(ctx, audit.VolumeRebuild, command.VolumeObj(a[0]), volumeParams(ctx, st, a[0]), func() error {
					return repairWithBar(ctx, st, a[0], "rebuilding "+a[0], "rayvmm volume rebuild")
				}); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "sharded volume %s: every replica healthy\n", a[0])
				return nil
			})
		},
	}

	volumeCmd.AddCommand(create, list, inspect, rm, rebuild)
	rootCmd.AddCommand(volumeCmd)
}

// shardedCreate is `volume create` with --replicas.
func shardedCreate(cmd *cobra.Command, name string, size int64, shardSize, consistency string, replicas, minReplicas int, nodes []string) error {
	ss, err := spec.ParseSize(shardSize)
	if err != nil {
		return fmt.Errorf("--shard-size: %w", err)
	}
	opts := shards.CreateOptions{Size: size, ShardSize: ss, Replicas: replicas,
		MinReplicas: minReplicas, Consistency: engine.Consistency(consistency), Nodes: nodes}
	want, err := opts.Volume(name)
	if err != nil {
		return err // bad flags: refused before etcd is started or written
	}
	var v *shards.Volume
	err = auditLog.Action(cmd.Context(), audit.VolumeCreate, command.VolumeObj(name), shardedParams(want), func() error {
		if local, err := localStore(); err == nil {
			if _, err := local.Get(name); err == nil {
				return fmt.Errorf("create %s: a local volume of that name exists", name)
			}
		}
		st, err := shardStore(cmd.Context())
		if err != nil {
			return err
		}
		defer st.Close()
		v, err = st.CreateVolume(cmd.Context(), name, opts)
		return err
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "created sharded volume %s (%s, %d shards of %s, %d replicas, %s)\n",
		v.Name, spec.FormatSize(v.Size), v.Shards(), spec.FormatSize(v.ShardSize), v.Replicas, v.Consistency)
	return nil
}

// listSharded returns the sharded volumes' statuses when sharded volumes
// are configured here (and nothing otherwise).
func listSharded(ctx context.Context) ([]*shards.VolumeStatus, error) {
	if !shards.Configured(connectOptions(false)) {
		return nil, nil
	}
	st, err := shardStore(ctx)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	vols, err := st.Volumes(ctx)
	if err != nil {
		return nil, err
	}
	var out []*shards.VolumeStatus
	for _, v := range vols {
		s, err := st.Inspect(ctx, v.Name)
		if err != nil {
			if errors.Is(err, shards.ErrNotFound) {
				continue // removed meanwhile
			}
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// withStore runs f on the cluster metadata and prints the message
// (format, args) when it succeeds.
func withStore(cmd *cobra.Command, f func(*shards.Store) error, format string, a ...any) error {
	return onStore(cmd, func(_ context.Context, st *shards.Store) error {
		if err := f(st); err != nil {
			return err
		}
		_, err := fmt.Fprintf(cmd.OutOrStdout(), format, a...)
		return err
	})
}
