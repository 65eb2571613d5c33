package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/guestkernel"
	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/pods/cgroup"
	"github.com/rayvmm/rayvmm/pods/daemon"
)

type daemonFlags struct {
	socket, socketGroup     string
	cgroupParent, kvmDevice string
	policy                  string
	backoffScale            float64
	verbose                 bool
}

func init() {
	var f daemonFlags
	cmd := &cobra.Command{
		Use:   "daemon",
		Short: "Run the pods daemon in the foreground",
		Long: `Run the rayvmm daemon in the foreground. It serves the pods API (HTTP/JSON) on a
Unix socket (mode 0660: root and --socket-group may use it; "rayvmm pod" is
its client), runs each pod VM as a rayvmm-vm process of its own in the cgroup
rayvmm/<pod>/<vm> with the pod's limits, restarts VMs by their restart policy
with Kubernetes' back-off, probes them, keeps pods, events and logs under the
state directory, and serves Prometheus metrics at GET /metrics.

SIGTERM or SIGINT stops the daemon and leaves every VM running, as stopping
containerd leaves containers to their shims: the next daemon on the state
directory re-adopts them (pid, process start time and API socket), resumes
their probes and restart policies, and reports VMs that ended meanwhile with
the status their VM process recorded. A kill -9 of the daemon does the same.
To stop VMs, "rayvmm pod stop" them.

Every request is decided by the access policy (--policy FILE, default
/etc/rayvmm/policy.yaml; see seccap/policy/README.md) for the caller the
kernel names (SO_PEERCRED: uid, gid and groups): root may do everything,
anyone else what a rule allows and the mandatory levels permit. Without a
policy file only root may act. A denial is a 403 naming the rule or level
check that decided, and makes nothing. SIGHUP reloads the file; one that
does not parse is refused and the old policy stays in force. Every
decision, pod action, and the daemon's start, stop and policy reload go to
the audit log under the state directory.

Under systemd use KillMode=process (as
containerd.service does), so that systemd does not kill the VMs with it;
readiness is reported with sd_notify (Type=notify). Only one daemon serves a
state directory.`,
		Example: `  rayvmm daemon
  rayvmm daemon --socket /run/rayvmm/rayvmm.sock --socket-group rayvmm
  RAYVMM_HOST=unix:///run/rayvmm/rayvmm.sock rayvmm pod ps`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runDaemon(cmd, &f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.socket, "socket", daemon.DefaultSocket, "the API's Unix socket")
	fl.StringVar(&f.socketGroup, "socket-group", "", "group (name or gid) that may use the socket (default: the daemon's)")
	fl.StringVar(&f.cgroupParent, "cgroup-parent", cgroup.DefaultParent, "cgroup directory the pods' groups go under")
	fl.StringVar(&f.kvmDevice, "kvm-device", "/dev/kvm", "KVM device")
	fl.Float64Var(&f.backoffScale, "backoff-scale", 1, "multiply the restart back-off (10s doubling to 300s, reset after 10m) by this, for tests")
	fl.StringVar(&f.policy, "policy", DefaultPolicy, "the access policy file (YAML; see seccap/policy/README.md), reloaded on SIGHUP; if the default file does not exist only root may act")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log what the daemon does to stderr")
	rootCmd.AddCommand(cmd)
}

// lookupGroup reads a group name or gid.
func lookupGroup(g string) (int, error) {
	if g == "" {
		return -1, nil
	}
	if n, err := strconv.Atoi(g); err == nil && n >= 0 {
		return n, nil
	}
	gr, err := user.LookupGroup(g)
	if err != nil {
		return -1, fmt.Errorf("--socket-group %s: %w", g, err)
	}
	return strconv.Atoi(gr.Gid)
}

func runDaemon(cmd *cobra.Command, f *daemonFlags) (err error) {
	gid, err := lookupGroup(f.socketGroup)
	if err != nil {
		return err
	}
	if f.backoffScale <= 0 || f.backoffScale > 1000 {
		return fmt.Errorf("--backoff-scale %v: want a number above 0 (1 is Kubernetes' times)", f.backoffScale)
	}
	level := slog.LevelWarn
	if f.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cg, err := cgroup.Detect(f.cgroupParent)
	if err != nil {
		return err
	}
	authz, err := openPolicy(f.policy, cmd.Flags().Changed("policy"))
	if err != nil {
		return err
	}
	aud, err := openAuditor(stateDir)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := aud.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("audit log: %w", cerr)
		}
	}()
	d, err := daemon.New(daemon.Config{
		Authorizer: authz,
		StateDir:   stateDir, Socket: f.socket, SocketGID: gid, BackoffScale: f.backoffScale,
		Cgroups: cg, Kernel: guestkernel.ELF, KVMDevice: f.kvmDevice, Version: version, Log: log,
		Auditor: aud,
		Ready: func() {
			fmt.Fprintf(os.Stderr, "rayvmmd: %s\n", authz.Describe())
			fmt.Fprintf(os.Stderr, "rayvmmd: serving pods on %s (state directory %s)\n", f.socket, stateDir)
			sdNotify("READY=1")
		},
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			// A file that does not parse leaves the old policy in force.
			err := authz.Reload()
			if err != nil {
				fmt.Fprintf(os.Stderr, "rayvmmd: %s\n", pods.OneLine(err.Error()))
			} else {
				fmt.Fprintf(os.Stderr, "rayvmmd: policy reloaded: %s\n", authz.Describe())
			}
			d.Reload(authz.path, err)
		}
	}()
	err = d.Serve(ctx)
	sdNotify("STOPPING=1")
	return err
}

// sdNotify tells systemd (Type=notify) about the daemon's state, if it
// runs under systemd.
func sdNotify(state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte(state))
}
