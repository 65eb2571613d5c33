// Package vmm builds and runs a microVM on KVM: it opens the KVM device,
// maps guest memory, creates the in-kernel irqchip and PIT, loads the kernel
// through the Linux 64-bit boot protocol, wires the legacy devices (8250
// UART, i8042) and the virtio-mmio devices onto the port and MMIO buses, and
// runs one OS thread per vCPU until the guest powers off, crashes or is
// stopped.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/vmm/boot"
	"github.com/rayvmm/rayvmm/vmm/bus"
	"github.com/rayvmm/rayvmm/vmm/cpuid"
	"github.com/rayvmm/rayvmm/vmm/i8042"
	"github.com/rayvmm/rayvmm/vmm/kvm"
	"github.com/rayvmm/rayvmm/vmm/memory"
	"github.com/rayvmm/rayvmm/vmm/serial"
)

// Legacy device placement.
const (
	COM1Port      = 0x3f8
	COM1IRQ       = 4
	BootTimerPort = 0x440
	// BootTimerMagic is the value the guest writes to BootTimerPort when
	// it is ready (Firecracker uses the same number).
	BootTimerMagic = 123
)

// Config describes a microVM (see Build for making one from a spec).
type Config struct {
	// KVM is the open KVM device; the VM takes it over (and closes it,
	// also when New fails).
	KVM         *os.File
	MemoryBytes uint64
	CPUs        int
	CPUTemplate string // auto, host or emulated
	Kernel      []byte
	Initrd      []byte
	Cmdline     string
	Console     io.Writer // guest serial output
	Log         *slog.Logger
	// Started is the process start time the boot timer measures from.
	Started time.Time
	// CPUBefore is CPU time spent for this VM before this process started
	// (by the control plane that launched it), added to the boot timer's
	// CPU readings.
	CPUBefore time.Duration
	// BootTimer logs the time to first KVM_RUN and to the guest's ready
	// write on BootTimerPort.
	BootTimer bool
	// VCPUThread, if set, is called on each vCPU's locked OS thread once
	// the vCPU is set up and before its first KVM_RUN, with its id and
	// the vCPU's and the VM's descriptors: where the VM process stacks
	// the sandbox's per-vCPU filter. An error fails the VM's start.
	VCPUThread func(id, vcpuFD, vmFD int) error
}

// ErrConfig is the category of errors in a Config.
var ErrConfig = errors.New("invalid VM configuration")

// VM is a built microVM, ready to Run.
type VM struct {
	cfg       Config
	log       *slog.Logger
	sys       *kvm.System
	vm        *kvm.VM
	mem       *memory.Memory
	kernel    *boot.Kernel
	cpuid     []kvm.CPUIDEntry
	template  string
	pio, mmio bus.Bus
	uart      *serial.Serial
	cmdline   string

	virtio   []*VirtioSlot
	disks    []*Disk
	nics     []*NIC
	vsock    *Vsock
	vcpus    []*vcpu
	stopping atomic.Bool
	exitOnce sync.Once
	exit     *Exit
	done     chan struct{}

	firstRun  sync.Once
	readyOnce sync.Once
	btMu      sync.Mutex // guards bootTimes
	bootTimes BootTimes
	closers   []func() error
	closeOnce sync.Once
	closeErr  error

	pause   pauser
	started time.Time    // when Run started the vCPUs
	vcpuMu  sync.Mutex   // guards vcpus while Run appends to it
	inLoop  atomic.Int32 // vCPU threads in their run loop
}

// New validates cfg, takes over the KVM device and builds the VM: memory,
// irqchip, devices, kernel, initrd, boot structures. vCPUs are created
// when Run starts.
func New(cfg Config) (_ *VM, err error) {
	if cfg.KVM == nil {
		return nil, fmt.Errorf("%w: no KVM device", ErrConfig)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	if cfg.Started.IsZero() {
		cfg.Started = time.Now()
	}
	v := &VM{cfg: cfg, log: cfg.Log, done: make(chan struct{})}
	v.pause.init()
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	if v.sys, err = kvm.FromFile(cfg.KVM); err != nil {
		cfg.KVM.Close()
		return nil, err
	}
	if err := boot.CheckMemorySize(cfg.MemoryBytes); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if cfg.CPUs < 1 || cfg.CPUs > boot.MaxCPUs {
		return nil, fmt.Errorf("%w: %d vCPUs; rayvmm supports 1 to %d", ErrConfig, cfg.CPUs, boot.MaxCPUs)
	}
	if v.template, err = cpuid.Resolve(cfg.CPUTemplate); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if _, err := boot.DetectFormat(cfg.Kernel); err != nil {
		return nil, err
	}
	if err := checkHostMemory(cfg.MemoryBytes); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if max := v.sys.CheckExtension(kvm.CapMaxVCPUs); max > 0 && cfg.CPUs > max {
		return nil, fmt.Errorf("%w: %d vCPUs; this KVM allows at most %d", ErrConfig, cfg.CPUs, max)
	}
	for _, c := range []struct {
		cap  kvm.Capability
		name string
	}{{kvm.CapIRQChip, "in-kernel irqchip"}, {kvm.CapUserMemory, "user memory"}, {kvm.CapPIT2, "in-kernel PIT"}, {kvm.CapImmExit, "immediate_exit"}} {
		if v.sys.CheckExtension(c.cap) == 0 {
			return nil, fmt.Errorf("%s: %s: %w", v.sys.Path, c.name, kvm.ErrUnsupported)
		}
	}
	if v.vm, err = v.sys.CreateVM(); err != nil {
		return nil, err
	}
	// Guest RAM is registered before the irqchip and PIT exist: a memory
	// slot added afterwards costs KVM ~7 ms of grace-period waiting (the
	// slot update must synchronize with the in-kernel devices), before
	// them ~0.2 ms.
	if v.mem, err = memory.New(boot.RAMRanges(cfg.MemoryBytes)...); err != nil {
		return nil, fmt.Errorf("guest memory of %d MiB: %w", cfg.MemoryBytes>>20, err)
	}
	for _, r := range v.mem.Regions() {
		if err = v.vm.SetMemoryRegion(uint64(r.Base), r.Size, r.HostAddr()); err != nil {
			return nil, err
		}
	}
	if err = v.vm.SetTSSAddr(boot.TSSAddr); err != nil {
		return nil, err
	}
	if err = v.vm.SetIdentityMapAddr(boot.IdentityMap); err != nil {
		return nil, err
	}
	if err = v.vm.CreateIRQChip(); err != nil {
		return nil, err
	}
	if err = v.vm.CreatePIT2(); err != nil {
		return nil, err
	}
	sup, err := v.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	v.cpuid = sup
	if err = v.addLegacyDevices(); err != nil {
		return nil, err
	}
	v.cmdline = cfg.Cmdline
	return v, nil
}

// Memory is the guest's memory, for wiring devices.
func (v *VM) Memory() *memory.Memory { return v.mem }

// MMIOBus is where virtio-mmio transports are registered.
func (v *VM) MMIOBus() *bus.Bus { return &v.mmio }

// KVM is the VM's KVM handle, for irqfd and ioeventfd.
func (v *VM) KVM() *kvm.VM { return v.vm }

// CPUTemplate is the template in use (host or emulated).
func (v *VM) CPUTemplate() string { return v.template }

// AppendCmdline adds words to the kernel command line (virtio-mmio devices
// announce themselves this way). Call before Run.
func (v *VM) AppendCmdline(s string) {
	v.cmdline = strings.TrimSpace(v.cmdline + " " + s)
}

// OnClose registers cleanup to run when the VM is closed.
func (v *VM) OnClose(f func() error) { v.closers = append(v.closers, f) }

// Serial is the COM1 UART, for feeding it input.
func (v *VM) Serial() *serial.Serial { return v.uart }

func (v *VM) addLegacyDevices() error {
	v.uart = serial.New(v.cfg.Console, func() {
		// An ISA interrupt is an edge: pulse the line.
		if err := v.vm.IRQLine(COM1IRQ, true); err == nil {
			v.vm.IRQLine(COM1IRQ, false)
		}
	})
	if err := v.pio.Register("com1", COM1Port, 8, v.uart); err != nil {
		return err
	}
	kbd := &i8042.Controller{Reset: func() { v.finish(&Exit{Reason: ExitPoweroff, VCPU: -1}) }}
	if err := v.pio.Register("i8042", i8042.Base, i8042.Size, kbd); err != nil {
		return err
	}
	return v.pio.Register("boot-timer", BootTimerPort, 1, bootTimerDev{v})
}

// loadGuest loads kernel, initrd and writes the boot structures.
func (v *VM) loadGuest() error {
	k, err := boot.Load(v.mem, v.cfg.Kernel)
	if err != nil {
		return err
	}
	v.kernel = k
	if err := boot.CheckCmdline(k, v.cmdline); err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	rd, err := boot.PlaceInitrd(v.mem, k, v.cfg.Initrd)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if err := boot.WriteZeroPage(v.mem, k, v.cmdline, rd, boot.E820(v.cfg.MemoryBytes)); err != nil {
		return err
	}
	if err := boot.WriteGDT(v.mem); err != nil {
		return err
	}
	if err := boot.WritePageTables(v.mem); err != nil {
		return err
	}
	if err := boot.WriteMPTable(v.mem, v.cfg.CPUs); err != nil {
		return err
	}
	// The images are in guest memory now; drop them (they may be a
	// mapping the caller unmaps).
	v.cfg.Kernel, v.cfg.Initrd = nil, nil
	return nil
}

// Prepare loads the guest and checks the command line, so that bad input is
// reported before any vCPU runs. Run calls it if the caller did not.
func (v *VM) Prepare() error {
	if v.kernel != nil {
		return nil
	}
	return v.loadGuest()
}

// Cmdline is the final kernel command line.
func (v *VM) Cmdline() string { return v.cmdline }

// Run starts the vCPUs and blocks until the guest exits or ctx is done.
func (v *VM) Run(ctx context.Context) (*Exit, error) {
	if err := v.Prepare(); err != nil {
		return nil, err
	}
	ready := make(chan error, v.cfg.CPUs)
	start := make(chan struct{})
	var wg sync.WaitGroup
	v.pause.mu.Lock()
	v.started = time.Now()
	v.pause.mu.Unlock()
	for i := 0; i < v.cfg.CPUs; i++ {
		c := &vcpu{vm: v, id: i}
		v.vcpuMu.Lock()
		v.vcpus = append(v.vcpus, c)
		v.vcpuMu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.loop(ready, start)
		}()
	}
	var setupErr error
	for i := 0; i < v.cfg.CPUs; i++ {
		if err := <-ready; err != nil && setupErr == nil {
			setupErr = err
		}
	}
	if setupErr != nil {
		v.stopping.Store(true)
		close(start)
		wg.Wait()
		return nil, setupErr
	}
	close(start)
	select {
	case <-v.done:
	case <-ctx.Done():
		v.finish(&Exit{Reason: ExitStopped, VCPU: -1, Detail: context.Cause(ctx).Error()})
	}
	wg.Wait()
	v.uart.Flush()
	return v.exit, nil
}

// Stop ends the VM as a requested stop (exit status 0): Run returns, and
// Close flushes the disks. It may be called from any goroutine.
func (v *VM) Stop(reason string) {
	v.finish(&Exit{Reason: ExitStopped, VCPU: -1, Detail: reason})
}

// finish records the first exit and stops every vCPU.
func (v *VM) finish(e *Exit) {
	v.exitOnce.Do(func() {
		v.exit = e
		v.stopping.Store(true)
		for _, c := range v.vcpuList() {
			c.kick()
		}
		close(v.done)
		v.wakeParked()
	})
}

// Close releases everything New and Run made: it stops the devices (their
// I/O finishes), then runs the closers in reverse order (flushing and
// closing disks, closing NICs), then frees KVM and guest memory. It
// returns every error the closers met, a failed final disk flush among
// them, each naming its device. Only the first call does anything.
func (v *VM) Close() error {
	v.closeOnce.Do(func() { v.closeErr = v.close() })
	return v.closeErr
}

func (v *VM) close() error {
	if v.uart != nil {
		v.uart.Close()
	}
	for _, s := range v.virtio {
		s.Transport.Device().Reset() // stops device goroutines, lets I/O finish
	}
	for _, c := range v.vcpus {
		if c.cpu != nil {
			c.cpu.Close()
		}
	}
	var errs []error
	for i := len(v.closers) - 1; i >= 0; i-- {
		if err := v.closers[i](); err != nil {
			errs = append(errs, err)
		}
	}
	if v.vm != nil {
		v.vm.Close()
	}
	if v.mem != nil {
		v.mem.Close()
	}
	if v.sys != nil {
		v.sys.Close()
	}
	if len(errs) == 0 {
		return nil
	}
	return closeErrors(errs)
}

// closeErrors are the errors of Close, on one line.
type closeErrors []error

func (e closeErrors) Error() string {
	s := make([]string, len(e))
	for i, err := range e {
		s[i] = err.Error()
	}
	return strings.Join(s, "; ")
}

func (e closeErrors) Unwrap() []error { return e }

// checkHostMemory refuses guest memory the host cannot back.
func checkHostMemory(size uint64) error {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return nil
	}
	host := (uint64(si.Totalram) + uint64(si.Totalswap)) * uint64(si.Unit)
	if size > host {
		return fmt.Errorf("guest memory of %d MiB is more than this host's %d MiB of RAM and swap", size>>20, host>>20)
	}
	return nil
}

// BootTimes are the boot timer's measurements. Wall times are from
// Config.Started (the control plane's start); CPU times are the control
// plane's CPU until it launched this process (Config.CPUBefore) plus this
// process's, and the *Self ones this process's alone.
type BootTimes struct {
	FirstRunWall    time.Duration `json:"first_kvm_run_wall_ns"`
	FirstRunCPU     time.Duration `json:"first_kvm_run_cpu_ns"`
	FirstRunCPUSelf time.Duration `json:"first_kvm_run_cpu_self_ns"`
	ReadyWall       time.Duration `json:"ready_wall_ns"`
	ReadyCPU        time.Duration `json:"ready_cpu_ns"`
	ReadyCPUSelf    time.Duration `json:"ready_cpu_self_ns"`
}

// BootTimes returns what the boot timer measured (zero if the guest never
// wrote the ready value).
func (v *VM) BootTimes() BootTimes {
	v.btMu.Lock()
	defer v.btMu.Unlock()
	return v.bootTimes
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type bootTimerDev struct{ v *VM }

func (d bootTimerDev) Read(off uint64, data []byte) {
	for i := range data {
		data[i] = 0
	}
}

// Write records the first ready write only; vCPUs other than the one that
// wrote first (a guest may write from several) are ignored.
func (d bootTimerDev) Write(off uint64, data []byte) {
	if len(data) == 0 || data[0] != BootTimerMagic {
		return
	}
	d.v.readyOnce.Do(func() {
		d.v.btMu.Lock()
		defer d.v.btMu.Unlock()
		bt := &d.v.bootTimes
		bt.ReadyWall = time.Since(d.v.cfg.Started)
		bt.ReadyCPUSelf = cpuTime()
		bt.ReadyCPU = d.v.cfg.CPUBefore + bt.ReadyCPUSelf
		if d.v.cfg.BootTimer {
			d.v.log.Info("boot timer: guest ready",
				"wall", bt.ReadyWall, "cpu", bt.ReadyCPU,
				"first_kvm_run_wall", bt.FirstRunWall, "first_kvm_run_cpu", bt.FirstRunCPU,
				"vm_process_first_kvm_run_cpu", bt.FirstRunCPUSelf, "vm_process_cpu", bt.ReadyCPUSelf)
		}
	})
}

func timeSince(t time.Time) time.Duration { return time.Since(t) }

// Uptime is how long the vCPUs have been started (0 before Run).
func (v *VM) Uptime() time.Duration {
	v.pause.mu.Lock()
	defer v.pause.mu.Unlock()
	if v.started.IsZero() {
		return 0
	}
	return time.Since(v.started)
}

// Config is the configuration the VM was built with.
func (v *VM) Config() Config { return v.cfg }

// Exit is how the VM ended, once Run returned.
func (v *VM) Exit() *Exit { return v.exit }
