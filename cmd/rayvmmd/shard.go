package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/cmd/internal/command"
	"github.com/rayvmm/rayvmm/shards"
	"github.com/rayvmm/rayvmm/shards/cluster"
)

// etcdEndpoints is --etcd-endpoints: the cluster metadata of sharded
// volumes; empty means the state directory's embedded etcd.
var etcdEndpoints []string

func init() {
	rootCmd.PersistentFlags().StringSliceVar(&etcdEndpoints, "etcd-endpoints", cluster.DefaultEndpoints(),
		"etcd client URLs holding sharded-volume metadata (default: $RAYVMM_ETCD_ENDPOINTS, else an embedded etcd in the state directory)")
}

func connectOptions(start bool) shards.ConnectOptions {
	o := shards.ConnectOptions{Endpoints: etcdEndpoints, StateDir: stateDir}
	if start {
		o.Start = func() *exec.Cmd {
			exe, err := os.Executable()
			if err != nil {
				exe = os.Args[0]
			}
			return exec.Command(exe, "--state-dir", stateDir, "shard", "etcd", "--ready-fd", "3")
		}
	}
	return o
}

// shardStore connects to the cluster metadata, starting the embedded
// etcd in the background when it is the one in use and not running.
func shardStore(ctx context.Context) (*shards.Store, error) {
	return shards.Connect(ctx, connectOptions(true))
}

// onStore runs f on the cluster metadata (see shardStore) with a context
// that SIGINT and SIGTERM cancel.
func onStore(cmd *cobra.Command, f func(context.Context, *shards.Store) error) error {
	ctx, cancel := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	st, err := shardStore(ctx)
	if err != nil {
		return err
	}
	defer st.Close()
	return f(ctx, st)
}

func cmdLog(verbose bool) *slog.Logger {
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// shardCmd is `shard`; its subcommands register themselves in init.
var shardCmd = &cobra.Command{
	Use:   "shard",
	Short: "Run and manage the storage nodes of sharded volumes",
	Long: `Sharded volumes ("rayvmm volume create NAME --replicas N") are split into
shards, each kept as N replicas on distinct storage nodes. A storage node is
"rayvmm shard serve", an NBD server with one export per replica it holds
(qemu-nbd or nbdkit can stand in for one: "shard nodes add"). The shard maps,
nodes and their liveness live in etcd: --etcd-endpoints for a cluster, or by
default a single-node etcd embedded in the state directory, which the first
command that needs it starts in the background ("rayvmm shard etcd"; stop it
with "rayvmm shard etcd stop").`,
}

func init() {
	var listen, dir, nodeName, advertise string
	var verbose bool
	serve := &cobra.Command{
		Use:   "serve --listen ADDR --dir DIR --node NAME",
		Short: "Run a storage node: serve the replicas placed on it over NBD",
		Long: `Serve, over NBD (fixed newstyle; any NBD client works, e.g.
nbd://HOST:PORT/VOLUME/SHARD with qemu-img), one export per replica the shard
maps place on node NAME, kept as sparse files under DIR. The node registers
in etcd with a lease that it keeps alive, so a dead node is noticed within
seconds. It runs until SIGINT or SIGTERM.`,
		Example: `  rayvmm shard serve --listen 0.0.0.0:10809 --dir /srv/rayvmm --node a`,
		Args:    command.Args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return onStore(cmd, func(ctx context.Context, st *shards.Store) error {
				return shards.ServeNode(ctx, shards.NodeConfig{Name: nodeName, Listen: listen, Advertise: advertise, Dir: dir,
					Store: st, Log: cmdLog(verbose), Ready: func(addr string) {
						fmt.Fprintf(cmd.OutOrStdout(), "shard node %s serving on %s\n", nodeName, addr)
					}})
			})
		},
	}
	serve.Flags().StringVar(&listen, "listen", "", "TCP address to serve NBD on, e.g. 127.0.0.1:10809")
	serve.Flags().StringVar(&advertise, "advertise", "", "address clients reach this node at (default: the listening address)")
	serve.Flags().StringVar(&dir, "dir", "", "directory for the replica files")
	serve.Flags().StringVar(&nodeName, "node", "", "this node's name")
	serve.Flags().BoolVarP(&verbose, "verbose", "v", false, "log what the node does")
	for _, f := range []string{"listen", "dir", "node"} {
		serve.MarkFlagRequired(f)
	}

	var asJSON bool
	nodes := &cobra.Command{
		Use:   "nodes",
		Short: "List the storage nodes, live or dead",
		Args:  command.Args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := shardStore(cmd.Context())
			if err != nil {
				return err
			}
			defer st.Close()
			ns, err := st.NodeStatuses(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return command.PrintJSON(cmd.OutOrStdout(), ns)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tADDRESS\tSTATE\tREPLICAS\tNOT HEALTHY")
			for _, n := range ns {
				state := "dead"
				if n.Live {
					state = "live"
				}
				if n.Static {
					state = "static"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\n", n.Name, n.Address, state, n.Replicas, n.Failed)
			}
			return w.Flush()
		},
	}
	nodes.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	var address string
	add := &cobra.Command{
		Use:   "add NAME --address HOST:PORT",
		Short: "Add an NBD server rayvmm does not run (qemu-nbd, nbdkit) as a static node",
		Long: `Record an NBD server as node NAME. A static node has no lease and counts as
live; its exports must be named VOLUME/SHARD and be the shard's size.`,
		Args: command.Args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return withStore(cmd, func(st *shards.Store) error {
				return auditLog.Action(cmd.Context(), audit.ShardNodeAdd, nodeObj(a[0]), audit.Params{"address": address, "static": "true"}, func() error {
					return st.AddStaticNode(cmd.Context(), a[0], address)
				})
			}, "node %s added (static, %s)\n", a[0], address)
		},
	}
	add.Flags().StringVar(&address, "address", "", "the NBD server's host:port")
	add.MarkFlagRequired("address")
	rmNode := &cobra.Command{
		Use:   "rm NAME",
		Short: "Forget a node that holds no replicas",
		Args:  command.Args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return withStore(cmd, func(st *shards.Store) error {
				return auditLog.Action(cmd.Context(), audit.ShardNodeRemove, nodeObj(a[0]), nil, func() error { return st.RemoveNode(cmd.Context(), a[0]) })
			}, "node %s removed\n", a[0])
		},
	}
	nodes.AddCommand(add, rmNode)

	var dryRun bool
	rebalance := &cobra.Command{
		Use:   "rebalance [--dry-run]",
		Short: "Move replicas so every shard has its replicas on live nodes, balanced",
		Long: `Plan and carry out replica moves after nodes joined or left: replicas on nodes
that are not live move to live ones, then replicas move from the fullest to
the emptiest node until counts differ by at most one. Each move adds a new
replica, rebuilds it from a healthy one and then drops the old one. A
volume attached to a VM is moved by that VM's rayvmm while the guest runs;
others are moved by this command. --dry-run prints the plan only.`,
		Args: command.Args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return onStore(cmd, func(ctx context.Context, st *shards.Store) error {
				moves, err := st.Plan(ctx)
				if err != nil {
					return err
				}
				out := cmd.OutOrStdout()
				if len(moves) == 0 {
					fmt.Fprintln(out, "balanced: nothing to move")
					return nil
				}
				for _, m := range moves {
					from := m.From
					if from == "" {
						from = "(new)"
					}
					fmt.Fprintf(out, "move %s shard %d: %s -> %s (%s)\n", m.Volume, m.Shard, from, m.To, m.Reason)
				}
				if dryRun {
					return nil
				}
				// One record for each volume whose replicas move, with
				// its moves, after they are done (or with the error).
				var vols []string
				byVol := map[string][]string{}
				for _, m := range moves {
					if byVol[m.Volume] == nil {
						vols = append(vols, m.Volume)
					}
					from := m.From
					if from == "" {
						from = "new"
					}
					byVol[m.Volume] = append(byVol[m.Volume], fmt.Sprintf("%d:%s->%s", m.Shard, from, m.To))
				}
				params := func(v string) audit.Params {
					p := volumeParams(ctx, st, v)
					p["moves"] = strings.Join(byVol[v], ",")
					return p
				}
				applied := st.Apply(ctx, moves)
				for _, v := range vols {
					err := auditLog.Action(ctx, audit.ShardRebalance, command.VolumeObj(v), params(v), func() error {
						if applied != nil {
							return applied
						}
						return repairWithBar(ctx, st, v, "rebalancing "+v, "rayvmm shard rebalance")
					})
					if err != nil {
						return err
					}
				}
				fmt.Fprintf(out, "rebalanced: %d replicas moved\n", len(moves))
				return nil
			})
		},
	}
	rebalance.Flags().BoolVar(&dryRun, "dry-run", false, "print the moves, change nothing")

	var readyFD int
	var clientURLs []string
	etcdCmd := &cobra.Command{
		Use:   "etcd",
		Short: "Run the state directory's embedded single-node etcd (in the foreground)",
		Long: `Run the single-node etcd that holds sharded-volume metadata when no
--etcd-endpoints are given. Its data is in STATE/shards/etcd and it serves
clients on the unix socket STATE/shards/etcd.sock (only the state directory's
owner can reach it). rayvmm commands start it in the background when they
need it; run it yourself (e.g. under systemd) to control its life, with
--listen-client-urls http://ADDR:2379 to let nodes on other machines in.`,
		Args: command.Args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer cancel()
			return shards.RunEmbedded(ctx, stateDir, clientURLs, func() {
				if readyFD > 0 {
					f := os.NewFile(uintptr(readyFD), "ready")
					f.WriteString("ready\n")
					f.Close()
					return
				}
				fmt.Fprintf(cmd.OutOrStdout(), "embedded etcd serving on %s\n", shards.EmbeddedEndpoint(stateDir))
			})
		},
	}
	etcdCmd.Flags().IntVar(&readyFD, "ready-fd", 0, "write a line to this file descriptor once serving (used when rayvmm starts it)")
	etcdCmd.Flags().MarkHidden("ready-fd")
	etcdCmd.Flags().StringSliceVar(&clientURLs, "listen-client-urls", nil, "more client URLs to serve besides the unix socket")
	etcdStop := &cobra.Command{
		Use:   "stop",
		Short: "Stop the embedded etcd started in the background",
		Args:  command.Args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			stopped, err := shards.StopEmbedded(stateDir)
			if err != nil {
				return err
			}
			if !stopped {
				fmt.Fprintln(cmd.OutOrStdout(), "embedded etcd is not running")
				return nil
			}
			fmt.Fprintln(cmd.OutOrStdout(), "embedded etcd stopped")
			return nil
		},
	}
	etcdCmd.AddCommand(etcdStop)

	shardCmd.AddCommand(serve, nodes, rebalance, etcdCmd)
	rootCmd.AddCommand(shardCmd)
}

// repairWithBar runs shards.Repair for a volume with a progress bar on a
// terminal (replicas still to rebuild or move).
func repairWithBar(ctx context.Context, st *shards.Store, name, what, holder string) error {
	var bar *progressbar.ProgressBar
	total := -1
	err := st.Repair(ctx, name, holder, func(pending int) {
		if total < 0 {
			total = pending
			if term.IsTerminal(int(os.Stderr.Fd())) && pending > 0 {
				bar = progressbar.NewOptions(total, progressbar.OptionSetWriter(os.Stderr),
					progressbar.OptionSetDescription(what+": replicas"),
					progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionClearOnFinish())
			}
		}
		if bar != nil {
			bar.Set(max(0, total-pending))
		}
	})
	if bar != nil {
		bar.Finish()
	}
	return err
}
