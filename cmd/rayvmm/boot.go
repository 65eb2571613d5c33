package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/cmd/rayvmm/internal/prestart"
	"github.com/rayvmm/rayvmm/guestkernel"
	"github.com/rayvmm/rayvmm/internal/starttime"
	"github.com/rayvmm/rayvmm/shards/cluster"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// started is as close to process start as Go code gets; the boot timer
// measures from it.
var started = starttime.T

type bootFlags struct {
	printConfig             bool
	configPath              string
	kernel, initrd, cmdline string
	memory                  string
	cpus                    int
	cpuTemplate             string
	kvmDevice               string
	bootTimer               bool
	verbose                 bool
	disks                   []string
	nets                    []string
	name                    string
	metricsFile             string
	apiSocket               string
	vsock                   string
	sandbox, jail           string
	uid, gid                int
}

func init() {
	var f bootFlags
	cmd := &cobra.Command{
		Use:   "boot",
		Short: "Boot a microVM and connect its serial console to this terminal",
		Long: `Boot a microVM on KVM and connect its serial console (COM1) to stdin and
stdout. With no --kernel, rayvmm boots rayguest, its built-in minimal guest
kernel; --kernel takes a Linux ELF vmlinux or a bzImage.

The VM is described by a spec: a YAML or JSON file (--config), the flags
below, or both, in which case each flag given overrides the file (a --disk
or --net flag replaces the file's whole disks or nets list).
--print-config prints the effective spec as YAML and exits. rayvmm resolves
volumes, networks and MACs, opens every image, TAP and socket, and runs the
guest in a VM process of its own (rayvmm-vm, next to the rayvmm binary),
which never outlives this command.

The VM process is sandboxed before the guest runs (--sandbox, default
strict): no capabilities, no_new_privs, landlock, and a seccomp allow-list
on every thread with a tighter one on each vCPU thread; a refused system
call kills it and rayvmm names the call. --jail DIR --uid N --gid N also
jails it, as Firecracker's jailer does (see seccap/README.md).

The VM ends when the guest powers off or resets (exit status 0), when it
crashes (non-zero, with the reason, RIP and instruction bytes), on
SIGINT/SIGTERM, or on the API's Shutdown. On a terminal, stdin is in raw
mode: keys go to the guest, and Ctrl-A x quits (Ctrl-A Ctrl-A sends one
Ctrl-A). With --api-socket, "rayvmm vm status|pause|resume|shutdown" and
curl --unix-socket control it while it runs.

--vsock adds a virtio-vsock device with Firecracker's hybrid vsock host side:
a host program connects to the Unix socket PATH and writes "CONNECT <port>\n";
when a guest program listens on that port it reads "OK <hostport>\n" and then
has a byte stream (else the socket is closed). A guest connection to CID 2
port P is connected to the Unix socket PATH_P (RST when nothing listens).
rayvmm makes PATH (mode 0600, a stale one left by a killed VM reclaimed, a
live one refused) and removes it when the VM is gone.

rayguest reads its job from the command line: rayguest.run=poweroff (default),
echo, crash, pio:N, blktest, blksum, blkwrite (virtio-blk; rayguest.seed=,
rayguest.blocks=), serve and ping:ADDR (virtio-net; rayguest.ip=A.B.C.D/N,
rayguest.gw=), vsock-echo (echoes on vsock port 52) and vsock-connect:PORT
(sends 64 KiB to host port PORT and checks the echo). rayguest.health=PORT
answers "ping" with "pong" on a vsock port beside any job
(rayguest.health.failafter=S: silent after S seconds). The full list is in
guestkernel/README.md.`,
		Example: `  rayvmm boot
  rayvmm boot --cpus 2 --memory 256M
  rayvmm boot --cmdline rayguest.run=echo --api-socket /tmp/vm.sock
  rayvmm boot --kernel vmlinux --cmdline "console=ttyS0 earlyprintk=serial"
  rayvmm boot --disk path=disk.img --cmdline "rayguest.run=blktest rayguest.seed=7"
  rayvmm boot --disk volume=data,iops=100 --disk path=base.qcow2,readonly
  rayvmm boot --config vm.yaml --memory 256M
  rayvmm boot --config vm.yaml --print-config
  rayvmm boot --jail /srv/jail --uid 10000 --gid 10000 --disk path=disk.img
  rayvmm boot --vsock cid=3,uds=/tmp/v.sock --cmdline rayguest.run=vsock-echo
      (then: socat - UNIX-CONNECT:/tmp/v.sock, type CONNECT 52, get OK 1073741824)`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runBoot(cmd, &f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.configPath, "config", "", "read the VM spec from this YAML or JSON file; flags given too override it")
	fl.BoolVar(&f.printConfig, "print-config", false, "print the effective VM spec as YAML and exit")
	fl.StringVar(&f.kernel, "kernel", "", "kernel image: ELF (vmlinux, rayguest) or bzImage (default: the built-in rayguest)")
	fl.StringVar(&f.initrd, "initrd", "", "initial ramdisk to load for the kernel")
	fl.StringVar(&f.cmdline, "cmdline", "", "kernel command line (rayvmm appends its device announcements)")
	fl.StringVar(&f.memory, "memory", spec.DefaultMemory.String(), "guest memory size, e.g. 256M or 2G")
	fl.IntVar(&f.cpus, "cpus", spec.DefaultCPUs, "number of vCPUs")
	fl.StringVar(&f.cpuTemplate, "cpu-template", spec.DefaultCPUTemplate, "CPUID template: auto, host or emulated (auto = emulated when KVM is PVM-backed)")
	fl.StringVar(&f.kvmDevice, "kvm-device", "/dev/kvm", "KVM device to use")
	fl.BoolVar(&f.bootTimer, "boot-timer", false, "log wall and CPU time to the first KVM_RUN and to the guest's ready signal")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log what rayvmm does to stderr")
	fl.StringArrayVar(&f.disks, "disk", nil, "attach a virtio-blk disk (repeatable, in guest order vda, vdb, ...):\n"+spec.DiskFlagHelp)
	fl.StringArrayVar(&f.nets, "net", nil, "attach a virtio-net NIC (repeatable, ids net0, net1, ...):\n"+spec.NICFlagHelp)
	fl.StringVar(&f.name, "name", "", "VM name; generated MACs are derived from it, so a name keeps them stable (default: rayvmm-PID)")
	fl.StringVar(&f.metricsFile, "metrics-file", "", "write device metrics (JSON) to this file when the VM exits")
	fl.StringVar(&f.apiSocket, "api-socket", "", "serve the VM's control API (HTTP/1.1, JSON) on this Unix socket")
	fl.StringVar(&f.sandbox, "sandbox", "", "confine the VM process: strict (refused system calls kill it), log (the kernel only logs them) or off\n"+
		"(default strict where the kernel has seccomp filters, else off)")
	fl.StringVar(&f.jail, "jail", "", "also jail the VM process, as Firecracker's jailer: a root of its own under DIR/NAME/root, new\n"+
		"namespaces, resource limits; needs root and --uid and --gid")
	fl.IntVar(&f.uid, "uid", 0, "with --jail: the unprivileged uid the VM process runs as")
	fl.IntVar(&f.gid, "gid", 0, "with --jail: the unprivileged gid the VM process runs as")
	fl.StringVar(&f.vsock, "vsock", "", "attach a virtio-vsock device: "+spec.VsockFlagHelp+" (Firecracker's hybrid vsock: host programs\n"+
		"connect to PATH and send \"CONNECT <port>\\n\"; guest connections to port P go to PATH_P)")
	rootCmd.AddCommand(cmd)
}

// bootSpec is the effective spec: the --config file, overridden by the
// flags given, defaulted and validated.
func bootSpec(cmd *cobra.Command, f *bootFlags) (*spec.VM, error) {
	s := &spec.VM{}
	if f.configPath != "" {
		var err error
		if s, err = control.LoadSpec(f.configPath); err != nil {
			return nil, fmt.Errorf("--config %w", err)
		}
	}
	fl := cmd.Flags()
	set := func(name string, apply func() error) error {
		if !fl.Changed(name) {
			return nil
		}
		if err := apply(); err != nil {
			if strings.HasPrefix(err.Error(), "--"+name+" ") {
				return err // it names the flag already
			}
			return fmt.Errorf("--%s: %w", name, err)
		}
		return nil
	}
	str := func(name string, dst *string, val string) error {
		return set(name, func() error { *dst = val; return nil })
	}
	for _, err := range []error{
		str("name", &s.Name, f.name),
		str("kernel", &s.Kernel, f.kernel),
		str("initrd", &s.Initrd, f.initrd),
		str("cmdline", &s.Cmdline, f.cmdline),
		str("cpu-template", &s.CPUTemplate, f.cpuTemplate),
		str("metrics-file", &s.MetricsFile, f.metricsFile),
		str("api-socket", &s.APISocket, f.apiSocket),
		set("memory", func() error {
			n, err := spec.ParseSize(f.memory)
			s.Memory = spec.Size(n)
			return err
		}),
		set("cpus", func() error {
			if f.cpus < 1 {
				return fmt.Errorf("%d: need at least 1", f.cpus)
			}
			s.CPUs = f.cpus
			return nil
		}),
		set("vsock", func() error {
			vs, err := spec.ParseVsock(f.vsock)
			s.Vsock = &vs
			return err
		}),
		str("sandbox", &s.Sandbox.Mode, f.sandbox),
		set("jail", func() error {
			if s.Sandbox.Jail == nil {
				s.Sandbox.Jail = &spec.Jail{}
			}
			s.Sandbox.Jail.Dir = f.jail
			return nil
		}),
		set("uid", func() error {
			if s.Sandbox.Jail == nil {
				return errors.New("needs --jail (or sandbox.jail in --config)")
			}
			s.Sandbox.Jail.UID = f.uid
			return nil
		}),
		set("gid", func() error {
			if s.Sandbox.Jail == nil {
				return errors.New("needs --jail (or sandbox.jail in --config)")
			}
			s.Sandbox.Jail.GID = f.gid
			return nil
		}),
		set("disk", func() error {
			s.Disks = nil
			for _, v := range f.disks {
				d, err := spec.ParseDisk(v)
				if err != nil {
					return err
				}
				s.Disks = append(s.Disks, d)
			}
			return nil
		}),
		set("net", func() error {
			s.Nets = nil
			for _, v := range f.nets {
				n, err := spec.ParseNIC(v)
				if err != nil {
					return err
				}
				s.Nets = append(s.Nets, n)
			}
			return nil
		}),
	} {
		if err != nil {
			return nil, err
		}
	}
	s.Defaults()
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return s, nil
}

func runBoot(cmd *cobra.Command, f *bootFlags) error {
	s, err := bootSpec(cmd, f)
	if err != nil {
		return err
	}
	if f.printConfig {
		y, err := control.SpecYAML(s)
		if err != nil {
			return err
		}
		_, err = cmd.OutOrStdout().Write(y)
		return err
	}
	level := slog.LevelWarn
	if f.verbose || f.bootTimer {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	ba := control.NewBootAudit(openAudit, s, os.Stderr)
	if err := ba.Check(); err != nil {
		return err
	}
	o := control.Options{StateDir: stateDir, KVMDevice: f.kvmDevice, BuiltinKernel: guestkernel.ELF, Log: log}
	if clusterConfigured() {
		// A volume that is not a local one may be a sharded volume: its
		// agent (rayvmmd shard attach) owns it while the VM runs.
		o.Sharded = &cluster.Agents{StateDir: stateDir, Endpoints: etcdEndpoints, Stderr: os.Stderr, Verbose: level <= slog.LevelInfo}
	}
	res, err := control.Open(ctx, s, o)
	if err != nil {
		return ba.Failed(ctx, err)
	}
	code, err := control.Foreground(ctx, res, control.ForegroundOptions{
		Started: started, BootTimer: f.bootTimer, LogLevel: level.String(), Version: version, Audit: ba,
		Ahead: prestart.Take(),
	})
	if err != nil {
		return err
	}
	if code != 0 {
		return &exitError{code: code} // the VM process said why
	}
	return nil
}
