// Package runner is the VM process (rayvmm-vm): from a handoff it takes
// over the handed-over descriptors — the KVM device, the kernel, the disk
// images, the TAPs, the API and vsock sockets, the metrics file — builds
// the VM (vmm.Build), serves its API, connects the console and runs the
// guest until it powers off, crashes or is stopped (a signal, Ctrl-A x,
// the API's Shutdown, or the control plane going away). It opens nothing
// by path; the one thing it connects to by path is what a guest vsock
// connection to host port P asks for, the Unix socket <vsock.uds>_P.
//
// Before the guest's first instruction the process sandboxes itself
// (package seccap, the handoff's Sandbox: prepared while the VM is built,
// applied once it is, a tighter filter on each vCPU thread) and waits for
// the control plane's go (the boot is in the audit log).
//
// How the VM ended is reported as rayvmm boot always did: one line on
// stderr ("rayvmm: ...") and the exit status (0 for a power off, a reset or
// a requested stop; 1 for a crash, an error, or a final disk flush that
// failed).
package runner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/network/port"
	"github.com/rayvmm/rayvmm/seccap"
	"github.com/rayvmm/rayvmm/seccap/forbidden"
	"github.com/rayvmm/rayvmm/shards/engine"
	"github.com/rayvmm/rayvmm/shards/link"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/vmm"
	"github.com/rayvmm/rayvmm/vmm/api"
	"github.com/rayvmm/rayvmm/vmproc"
)

// Run runs the VM r describes and returns the process's exit status,
// having printed how the VM ended and reported it on the outcome pipe.
func Run(r *vmproc.Received) int {
	h := r.Handoff
	var report *os.File
	if h.Outcome != nil {
		// First: every way out reports through it.
		f, err := h.Outcome.Open()
		if err != nil {
			fmt.Fprintf(os.Stderr, "rayvmm: outcome pipe: %v\n", err)
			return 1
		}
		report = f
		defer report.Close()
	}
	o := run(r)
	if report != nil {
		if err := vmproc.WriteOutcome(report, o); err != nil {
			fmt.Fprintf(os.Stderr, "rayvmm: outcome pipe: %v\n", err)
		}
	}
	return o.Status
}

// run runs the VM and says how it ended.
func run(r *vmproc.Received) vmproc.Outcome {
	h := r.Handoff
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level(h.LogLevel)}))
	ran := false
	fail := func(err error) vmproc.Outcome {
		msg := oneLine(err)
		fmt.Fprintf(os.Stderr, "rayvmm: %s\n", msg)
		return vmproc.Outcome{Status: 1, Reason: msg, Ran: ran}
	}
	// Half of the sandbox needs nothing the VM is built from: prepare it
	// while the VM is built (seccap.Prepare).
	type prepared struct {
		p   *seccap.Prepared
		err error
	}
	preparing := make(chan prepared, 1)
	// Sharded disks' links first: the sandbox allows recvmsg on their
	// descriptors only.
	links, err := openLinks(h)
	if err != nil {
		return fail(err)
	}
	if h.Sandbox != nil {
		c := *h.Sandbox
		for _, l := range links {
			c.RecvFDSockets = append(c.RecvFDSockets, l.FD())
		}
		go func() {
			p, err := seccap.Prepare(c)
			preparing <- prepared{p, err}
		}()
	}
	// Everything the control plane handed over, so that whatever is not
	// taken over by the VM is closed if building it fails.
	holds, err := openHolds(h.Holds)
	if err != nil {
		for _, l := range links {
			l.Close()
		}
		return fail(err)
	}
	defer closeAll(holds)
	b, apiL, metrics, unmap, err := takeOver(h, links, log)
	if err != nil {
		return fail(err)
	}
	if metrics != nil {
		defer metrics.Close()
	}
	var stdout io.Writer = io.Discard
	if h.Console {
		stdout = os.Stdout
	}
	// The sandbox is applied after the VM is built; each vCPU thread,
	// made when the VM runs, stacks its own filter then.
	var sandbox *seccap.Applied
	v, err := vmm.Build(h.Spec, b, vmm.Options{
		Console: stdout, Log: log, Started: h.Started, CPUBefore: h.CPUBefore, BootTimer: h.BootTimer,
		VCPUThread: func(id, vcpuFD, vmFD int) error {
			if err := sandbox.VCPUFilter(vcpuFD, vmFD); err != nil {
				return err
			}
			forbidden.OnVCPU(id)
			return nil
		},
	})
	unmap() // the guest is loaded (or will not be)
	if err != nil {
		if apiL != nil {
			apiL.Close()
		}
		return fail(err)
	}
	if h.BootTimer {
		log.Info("boot timer: VM process",
			"launched", h.LaunchedAt.Sub(h.Started), "handoff", r.At.Sub(h.Started), "split", r.At.Sub(h.ReadyAt),
			"control_plane_cpu", h.CPUBefore)
	}
	log.Info("booting", "name", h.Spec.Name, "memory", h.Spec.Memory, "cpus", h.Spec.CPUs,
		"cpu_template", v.CPUTemplate(), "cmdline", v.Cmdline())

	ctx, stop := context.WithCancelCause(context.Background())
	defer stop(nil)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	lifeline := r.Lifeline()
	go func() {
		select {
		case s := <-sigs:
			stop(fmt.Errorf("received %v", s))
		case <-lifeline:
			stop(errors.New("the control plane exited"))
		case <-ctx.Done():
		}
	}()

	var srv *api.Server
	if apiL != nil {
		srv = api.NewServer(v, h.Spec, api.Info{Version: h.RayvmmVersion}, log)
		go srv.Serve(apiL)
	}
	restore := func() {}
	if h.Console {
		c := &console{in: os.Stdin}
		if restore, err = c.start(v.Serial(), func() { stop(errors.New("Ctrl-A x pressed")) }); err != nil {
			if srv != nil {
				srv.Close()
			}
			v.Close()
			return fail(err)
		}
	}
	// Everything is open: from here on the process can do almost
	// nothing (package seccap).
	if h.Sandbox != nil {
		pr := <-preparing
		err := pr.err
		if err == nil {
			sandbox, err = pr.p.Apply()
		}
		if err != nil {
			restore()
			if srv != nil {
				srv.Close()
			}
			v.Close()
			return fail(err)
		}
		log.Info(sandbox.String())
		forbidden.AfterSandbox()
	}
	// The guest's first instruction waits for the control plane's go,
	// which comes once the boot is in the audit log (see Handoff.Gate).
	select {
	case <-r.Go():
	case <-ctx.Done():
	case <-r.Refused():
		// A detached VM process's descriptor closes right after the go
		// (Process.Go): EOF refuses only when no go came before it.
		select {
		case <-r.Go():
		default:
			stop(errors.New("the control plane did not let the guest run"))
		}
	}
	var exit *vmm.Exit
	if ctx.Err() == nil {
		ran = true
		exit, err = v.Run(ctx)
	}
	restore()
	if srv != nil {
		srv.Close()
	}
	closeErr := v.Close()
	if !ran {
		// Nothing ran; whoever stopped it (a signal, the control plane)
		// says why.
		log.Info("stopped before the guest ran", "cause", context.Cause(ctx))
		if closeErr != nil {
			return fail(closeErr)
		}
		return vmproc.Outcome{Reason: "stopped before the guest ran: " + context.Cause(ctx).Error()}
	}
	if err != nil {
		return fail(err)
	}
	if metrics != nil {
		if err := writeMetrics(metrics, v); err != nil {
			log.Warn("metrics file", "err", err)
		}
	}
	if exit.Reason == vmm.ExitStopped {
		log.Warn(exit.String())
	} else {
		log.Info(exit.String())
	}
	switch {
	case !exit.OK():
		return fail(errors.New(exit.String()))
	case closeErr != nil:
		return fail(closeErr)
	}
	return vmproc.Outcome{Reason: exit.String(), Ran: true}
}

// takeOver opens the handed-over descriptors as the VM's backends.
// The kernel and initrd mappings are undone by unmap, once the guest is
// loaded.
func takeOver(h *vmproc.Handoff, links map[int]*link.VM, log *slog.Logger) (b vmm.Backends, apiL net.Listener, metrics *os.File, unmap func(), err error) {
	var undo []io.Closer
	defer func() {
		if err != nil {
			for _, l := range links {
				l.Close() // those not opened as disks (Close is idempotent)
			}
			closeAll(undo)
		}
	}()
	if b.KVM, err = h.KVM.Open(); err != nil {
		return b, nil, nil, nil, fmt.Errorf("KVM device: %w", err)
	}
	undo = append(undo, b.KVM)
	var maps []func()
	unmap = func() {
		for _, u := range maps {
			u()
		}
	}
	undo = append(undo, closer(unmap))
	var um func()
	if b.Kernel, um, err = mapFile(h.Kernel); err != nil {
		return b, nil, nil, nil, fmt.Errorf("kernel: %w", err)
	}
	maps = append(maps, um)
	if h.Initrd != nil {
		if b.Initrd, um, err = mapFile(*h.Initrd); err != nil {
			return b, nil, nil, nil, fmt.Errorf("initrd: %w", err)
		}
		maps = append(maps, um)
	}
	for i, d := range h.Disks {
		if d.Link != nil {
			disk, err := openSharded(links[i], log)
			delete(links, i)
			if err != nil {
				return b, nil, nil, nil, fmt.Errorf("disk %s (%s): %w", h.Spec.Disks[i].ID, d.Source, err)
			}
			undo = append(undo, disk)
			b.Disks = append(b.Disks, vmm.DiskBackend{Disk: disk, Source: d.Source})
			continue
		}
		files := make([]storage.ImageFile, len(d.Files))
		for j, f := range d.Files {
			of, err := f.Open()
			if err != nil {
				closeImageFiles(files[:j])
				return b, nil, nil, nil, fmt.Errorf("disk %s: %w", h.Spec.Disks[i].ID, err)
			}
			files[j] = storage.ImageFile{File: of, Name: f.BackingName, Format: f.Format, Path: f.Name}
		}
		disk, err := storage.FromFiles(files, d.ReadOnly, d.Probed)
		if err != nil {
			return b, nil, nil, nil, fmt.Errorf("disk %s (%s): %w", h.Spec.Disks[i].ID, d.Source, err)
		}
		undo = append(undo, disk)
		b.Disks = append(b.Disks, vmm.DiskBackend{Disk: disk, Source: d.Source})
	}
	for i, n := range h.NICs {
		p, names, err := openNIC(n)
		if err != nil {
			return b, nil, nil, nil, fmt.Errorf("nic %s: %w", h.Spec.Nets[i].ID, err)
		}
		undo = append(undo, p)
		b.NICs = append(b.NICs, vmm.NICBackend{Port: p, MTU: n.MTU, TAPs: names})
	}
	if h.API != nil {
		f, err := h.API.Open()
		if err != nil {
			return b, nil, nil, nil, fmt.Errorf("API socket: %w", err)
		}
		apiL, err = net.FileListener(f)
		f.Close() // FileListener made its own descriptor
		if err != nil {
			return b, nil, nil, nil, fmt.Errorf("API socket %s: %w", h.API.Name, err)
		}
		undo = append(undo, apiL)
	}
	if h.Vsock != nil {
		if b.Vsock, err = h.Vsock.Open(); err != nil {
			return b, nil, nil, nil, fmt.Errorf("vsock socket: %w", err)
		}
		undo = append(undo, b.Vsock)
	}
	if h.Metrics != nil {
		if metrics, err = h.Metrics.Open(); err != nil {
			return b, nil, nil, nil, fmt.Errorf("metrics file: %w", err)
		}
	}
	return b, apiL, metrics, unmap, nil
}

// shardedOpenWait bounds opening a sharded disk: the layout from its
// agent, and a connection to every replica it reads (each dial bounded by
// the engine's request timeout).
const shardedOpenWait = time.Minute

// openLinks starts the VM process's end of each sharded disk's link to
// its agent, by disk index.
func openLinks(h *vmproc.Handoff) (map[int]*link.VM, error) {
	links := map[int]*link.VM{}
	for i, d := range h.Disks {
		if d.Link == nil {
			continue
		}
		f, err := d.Link.Open()
		if err == nil {
			links[i], err = link.NewVM(f)
		}
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			return nil, fmt.Errorf("disk %d (%s): %w", i, d.Source, err)
		}
	}
	return links, nil
}

// openSharded opens a sharded volume's engine on its link to the agent.
func openSharded(l *link.VM, log *slog.Logger) (storage.Disk, error) {
	ctx, cancel := context.WithTimeout(context.Background(), shardedOpenWait)
	defer cancel()
	return l.Open(ctx, engine.Config{Log: log})
}

// openNIC makes a NIC's port from its TAP descriptors: the TAP itself, or
// a trunk multiplexer over one TAP per VLAN.
func openNIC(n vmproc.NIC) (port.Port, []string, error) {
	var taps []*port.TAP
	var names []string
	fail := func(err error) (port.Port, []string, error) {
		for _, t := range taps {
			t.Close()
		}
		return nil, nil, err
	}
	for _, t := range n.TAPs {
		f, err := t.Open()
		if err != nil {
			return fail(err)
		}
		tap, err := port.NewTAP(f, t.Name)
		if err != nil {
			return fail(err)
		}
		taps = append(taps, tap)
		names = append(names, t.Name)
	}
	if !n.Trunk {
		return taps[0], names, nil
	}
	byVLAN := map[uint16]*port.TAP{}
	for i, t := range n.TAPs {
		if t.VLAN < 1 || t.VLAN > 4094 || byVLAN[t.VLAN] != nil {
			return fail(fmt.Errorf("trunk TAP %s: bad or repeated VLAN %d", t.Name, t.VLAN))
		}
		byVLAN[t.VLAN] = taps[i]
	}
	return port.NewTrunk(byVLAN), names, nil
}

// mapFile maps a kernel or initrd from its descriptor (a file, or the
// control plane's memfd) read-only, and closes the descriptor. The pages
// are the file's, not this process's heap; unmap once the guest is loaded.
func mapFile(ref vmproc.File) (b []byte, unmap func(), err error) {
	f, err := ref.Open()
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	switch {
	case !st.Mode().IsRegular():
		return nil, nil, fmt.Errorf("%s: not a regular file", ref.Name)
	case st.Size() == 0:
		return nil, nil, fmt.Errorf("%s: empty file", ref.Name)
	case st.Size() > maxImage:
		return nil, nil, fmt.Errorf("%s: %d bytes, larger than %d", ref.Name, st.Size(), maxImage)
	}
	b, err = unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: mmap: %w", ref.Name, err)
	}
	return b, func() { unix.Munmap(b) }, nil
}

// maxImage bounds a kernel or initrd (no guest could hold more).
const maxImage = 1 << 40

func openHolds(refs []vmproc.File) ([]io.Closer, error) {
	var out []io.Closer
	for _, ref := range refs {
		f, err := ref.Open()
		if err != nil {
			closeAll(out)
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}

// closer makes a cleanup function an io.Closer.
type closer func()

func (c closer) Close() error { c(); return nil }

func closeAll(cs []io.Closer) {
	for _, c := range cs {
		c.Close()
	}
}

func closeImageFiles(fs []storage.ImageFile) {
	for _, f := range fs {
		f.File.Close()
	}
}

func level(s string) slog.Level {
	var l slog.Level
	if l.UnmarshalText([]byte(s)) != nil {
		return slog.LevelWarn
	}
	return l
}

// oneLine keeps an error message on one line.
func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }
