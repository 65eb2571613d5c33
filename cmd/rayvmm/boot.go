package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/rayvmm/rayvmm/internal/starttime"
	"github.com/rayvmm/rayvmm/network"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/vmm"
)

// started is as close to process start as Go code gets; the boot timer
// measures from it.
var started = starttime.T

type bootFlags struct {
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
}

func init() {
	var f bootFlags
	cmd := &cobra.Command{
		Use:   "boot",
		Short: "Boot a microVM and connect its serial console to this terminal",
		Long: `Boot a microVM on KVM and connect its serial console (COM1) to stdin and
stdout. With no --kernel, rayvmm boots rayguest, its built-in minimal guest
kernel; --kernel takes a Linux ELF vmlinux or a bzImage.

The VM ends when the guest powers off or resets (exit status 0), when it
crashes (non-zero, with the reason, RIP and instruction bytes), or on
SIGINT/SIGTERM. On a terminal, stdin is in raw mode: keys go to the guest, and
Ctrl-A x quits (Ctrl-A Ctrl-A sends one Ctrl-A).

rayguest reads its job from the command line: rayguest.run=poweroff (default),
echo, crash, pio:N, blktest, blksum, blkwrite (virtio-blk; rayguest.seed=,
rayguest.blocks=), serve and ping:ADDR (virtio-net; rayguest.ip=A.B.C.D/N,
rayguest.gw=). The full list is in guestkernel/README.md.`,
		Example: `  rayvmm boot
  rayvmm boot --cpus 2 --memory 256M
  rayvmm boot --cmdline rayguest.run=echo
  rayvmm boot --kernel vmlinux --cmdline "console=ttyS0 earlyprintk=serial"
  rayvmm boot --disk path=disk.img --cmdline "rayguest.run=blktest rayguest.seed=7"
  rayvmm boot --disk volume=data,iops=100 --disk path=base.qcow2,readonly`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runBoot(cmd.Context(), &f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.kernel, "kernel", "", "kernel image: ELF (vmlinux, rayguest) or bzImage (default: the built-in rayguest)")
	fl.StringVar(&f.initrd, "initrd", "", "initial ramdisk to load for the kernel")
	fl.StringVar(&f.cmdline, "cmdline", "", "kernel command line (rayvmm appends its device announcements)")
	fl.StringVar(&f.memory, "memory", "128M", "guest memory size, e.g. 256M or 2G")
	fl.IntVar(&f.cpus, "cpus", 1, "number of vCPUs")
	fl.StringVar(&f.cpuTemplate, "cpu-template", "auto", "CPUID template: auto, host or emulated (auto = emulated when KVM is PVM-backed)")
	fl.StringVar(&f.kvmDevice, "kvm-device", "/dev/kvm", "KVM device to use")
	fl.BoolVar(&f.bootTimer, "boot-timer", false, "log wall and CPU time to the first KVM_RUN and to the guest's ready signal")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log what rayvmm does to stderr")
	fl.StringArrayVar(&f.disks, "disk", nil, "attach a virtio-blk disk (repeatable, in guest order vda, vdb, ...):\n"+
		"path=FILE or volume=NAME, then optional ,readonly ,format=raw|qcow2 ,iops=N ,bps=N ,burst=N ,serial=ID")
	fl.StringArrayVar(&f.nets, "net", nil, "attach a virtio-net NIC (repeatable): network=NAME or tap=IFNAME, then optional\n"+
		",mac=MAC ,vlan=N ,trunk=N1:N2 ,rx-bps=N ,tx-bps=N ,rx-pps=N ,tx-pps=N")
	fl.StringVar(&f.name, "name", "", "VM name; generated MACs are derived from it, so a name keeps them stable (default: rayvmm-PID)")
	fl.StringVar(&f.metricsFile, "metrics-file", "", "write device metrics (JSON) to this file when the VM exits")
	rootCmd.AddCommand(cmd)
}

func runBoot(ctx context.Context, f *bootFlags) error {
	level := slog.LevelWarn
	if f.verbose || f.bootTimer {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	mem, err := storage.ParseSize(f.memory)
	if err != nil {
		return fmt.Errorf("--memory: %w", err)
	}
	if f.cpus < 1 {
		return fmt.Errorf("--cpus %d: need at least 1", f.cpus)
	}
	kernel, err := readKernel(f.kernel)
	if err != nil {
		return err
	}
	var initrd []byte
	if f.initrd != "" {
		if initrd, err = os.ReadFile(f.initrd); err != nil {
			return fmt.Errorf("--initrd: %w", err)
		}
	}
	if _, err := os.Stat(f.kvmDevice); err != nil {
		return fmt.Errorf("--kvm-device: %w", err)
	}
	if f.name == "" {
		f.name = fmt.Sprintf("rayvmm-%d", os.Getpid())
	}
	var nicSpecs []network.NICSpec
	for _, s := range f.nets {
		n, err := network.ParseNICSpec(s)
		if err != nil {
			return fmt.Errorf("--net: %w", err)
		}
		nicSpecs = append(nicSpecs, n)
	}
	var diskSpecs []storage.DiskSpec
	for _, s := range f.disks {
		d, err := storage.ParseDiskSpec(s)
		if err != nil {
			return fmt.Errorf("--disk: %w", err)
		}
		diskSpecs = append(diskSpecs, d)
	}

	console := newConsole(os.Stdin, os.Stdout)
	v, err := vmm.New(vmm.Config{
		KVMDevice:   f.kvmDevice,
		MemoryBytes: uint64(mem),
		CPUs:        f.cpus,
		CPUTemplate: f.cpuTemplate,
		Kernel:      kernel,
		Initrd:      initrd,
		Cmdline:     f.cmdline,
		Console:     console.out,
		Log:         log,
		Started:     started,
		BootTimer:   f.bootTimer,
	})
	if err != nil {
		return err
	}
	defer v.Close()
	for _, d := range diskSpecs {
		if err := attachDisk(ctx, v, d, log); err != nil {
			return fmt.Errorf("--disk: %w", err)
		}
	}
	if len(nicSpecs) > 0 {
		nics, err := network.AttachAll(ctx, stateDir, f.name, nicSpecs)
		if err != nil {
			return fmt.Errorf("--net: %w", err)
		}
		for i, n := range nics {
			if _, err := v.AttachNIC(n); err != nil {
				network.CloseAll(nics[i+1:])
				return fmt.Errorf("--net: %w", err)
			}
		}
	}
	if err := v.Prepare(); err != nil {
		return err
	}
	log.Info("booting", "memory", mem, "cpus", f.cpus, "cpu_template", v.CPUTemplate(), "cmdline", v.Cmdline())

	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	go func() {
		select {
		case s := <-sigs:
			stop(fmt.Errorf("received %v", s))
		case <-ctx.Done():
		}
	}()

	restore, err := console.start(v.Serial(), func() { stop(errors.New("Ctrl-A x pressed")) })
	if err != nil {
		return err
	}
	exit, err := v.Run(ctx)
	restore()
	if err != nil {
		return err
	}
	if f.metricsFile != "" {
		if err := writeMetrics(f.metricsFile, v); err != nil {
			return err
		}
	}
	if exit.Reason == vmm.ExitStopped {
		log.Warn(exit.String())
	} else {
		log.Info(exit.String())
	}
	if !exit.OK() {
		return &exitError{code: 1, err: errors.New(exit.String())}
	}
	return nil
}

// readKernel reads --kernel, or returns the built-in rayguest.
func readKernel(path string) ([]byte, error) {
	if path == "" {
		return builtinKernel()
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--kernel: %w", err)
	}
	return b, nil
}

// console connects stdin/stdout to the guest's UART.
type console struct {
	in  *os.File
	out io.Writer
}

func newConsole(in, out *os.File) *console { return &console{in: in, out: out} }

// start puts a terminal stdin in raw mode and starts forwarding input. It
// returns the function that restores the terminal.
func (c *console) start(uart interface{ Input([]byte) bool }, quit func()) (func(), error) {
	fd := int(c.in.Fd())
	restore := func() {}
	isTerm := term.IsTerminal(fd)
	if isTerm {
		old, err := term.MakeRaw(fd)
		if err != nil {
			return nil, fmt.Errorf("stdin: raw mode: %w", err)
		}
		restore = func() { term.Restore(fd, old) }
	}
	go func() {
		buf := make([]byte, 1024)
		escape := false
		for {
			n, err := c.in.Read(buf)
			if n > 0 {
				p := buf[:n]
				if isTerm {
					var out []byte
					out, escape = filterEscape(p, escape, quit)
					p = out
				}
				if len(p) > 0 && !uart.Input(p) {
					return
				}
			}
			if err != nil {
				return // EOF on a pipe: the guest just gets no more input
			}
		}
	}()
	return restore, nil
}

// filterEscape handles Ctrl-A sequences: Ctrl-A x quits, Ctrl-A Ctrl-A sends
// one Ctrl-A, Ctrl-A followed by anything else sends both.
func filterEscape(p []byte, escape bool, quit func()) ([]byte, bool) {
	out := make([]byte, 0, len(p))
	for _, b := range p {
		if escape {
			escape = false
			switch b {
			case 'x', 'X':
				quit()
				return out, false
			case 0x01:
				out = append(out, 0x01)
			default:
				out = append(out, 0x01, b)
			}
			continue
		}
		if b == 0x01 {
			escape = true
			continue
		}
		out = append(out, b)
	}
	return out, escape
}
