// Package control is the control plane's side of a VM: it resolves the
// names and state a spec refers to — volumes (locked for the VM), networks
// (bridges, VLAN ports, NAT; TAPs created), generated MACs, the API and
// vsock sockets (made by ListenSocket, removed when the VM is gone), the
// metrics file — opens every resource, and
// hands them to a VM process (rayvmm-vm) through package vmproc. It also
// reads specs from YAML or JSON files.
//
// rayvmm boot uses it to run one VM in the foreground (Foreground); the
// pods daemon will use Open and vmproc.Launch's detached mode.
package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/network"
	"github.com/rayvmm/rayvmm/seccap"
	"github.com/rayvmm/rayvmm/seccap/report"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage"
	"github.com/rayvmm/rayvmm/storage/volume"
	"github.com/rayvmm/rayvmm/vmproc"
)

// Options say where the host's resources are.
type Options struct {
	// StateDir holds volumes and networks.
	StateDir string
	// KVMDevice is the KVM device to open (default /dev/kvm).
	KVMDevice string
	// BuiltinKernel is the kernel used when the spec names none (rayguest).
	BuiltinKernel []byte
	// Sharded attaches sharded volumes: a disk's volume that is not a
	// local volume is looked up there when it is set (a cluster is
	// configured). Nil: volumes are local only.
	Sharded ShardedVolumes
	Log     *slog.Logger
	// OutcomeFile, if set, is the file the VM process writes its outcome
	// to (vmproc.WriteOutcome) instead of a pipe: for a detached VM process,
	// whose outcome must outlive its launcher (the pods daemon reads it
	// back from the path, also after a restart). The caller keeps it.
	OutcomeFile *os.File
	// SandboxReport, if set, is the path of the file strict mode's SIGSYS
	// report goes to instead of a pipe (report.NewFile), for the same
	// reason: a daemon that re-adopted the VM process reads it with
	// report.ReadFile to name the call the sandbox refused.
	SandboxReport string
}

// ShardedVolumes attaches sharded volumes for VM processes: rayvmm starts
// a rayvmmd agent per disk (shards/cluster.Agents), a control plane that
// links etcd runs the agent in-process (shards.VMs).
type ShardedVolumes interface {
	// Attach owns the sharded volume name for the VM vm and returns the
	// VM process's end of its link (package shards/link), and a function
	// to call once the VM process has exited and the end is closed here.
	Attach(ctx context.Context, name, vm string) (link *os.File, detach func() error, err error)
}

// Resources are a VM's opened resources, ready to hand over. Close them
// once the VM process has exited: that releases volume locks and the hold
// on networks, removes the API socket and puts the metrics file in place.
type Resources struct {
	// Handoff is the table for the VM process (its Spec is the effective
	// spec: defaulted, named, every MAC resolved).
	Handoff *vmproc.Handoff
	// Files are the descriptors it refers to.
	Files *vmproc.Files

	handedOver []func() error // close this process's copies once launched
	afterExit  []func() error // in reverse order once the VM process is gone
	detach     []func() error // close, without releasing, what a detached VM process holds
	metricsTmp string
	metricsDst string
	outcome    *os.File     // the read end of Handoff.Outcome
	report     *report.Pipe // strict mode's SIGSYS report
}

// Open resolves and opens everything s names. s must be defaulted and
// valid; Open does not change it. On error nothing it made is left
// behind: no TAP, volume lock, socket or temporary file.
func Open(ctx context.Context, s *spec.VM, o Options) (_ *Resources, err error) {
	if o.KVMDevice == "" {
		o.KVMDevice = "/dev/kvm"
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	eff := s.Clone()
	eff.Name = VMName(s)
	if eff.Vsock != nil && !filepath.IsAbs(eff.Vsock.UDS) {
		// The VM process connects guest connections to UDS_P by path.
		if eff.Vsock.UDS, err = filepath.Abs(eff.Vsock.UDS); err != nil {
			return nil, fmt.Errorf("vsock.uds: %w", err)
		}
		if err := eff.Validate(); err != nil { // its length, now
			return nil, err
		}
	}
	r := &Resources{Handoff: &vmproc.Handoff{Spec: eff}, Files: &vmproc.Files{}}
	defer func() {
		if err != nil {
			r.abandon()
		}
	}()
	h := r.Handoff

	// How the VM ended comes back on a pipe (for the audit log), or in
	// the file the caller gives.
	if o.OutcomeFile != nil {
		ref := r.Files.Ref(o.OutcomeFile, "outcome file")
		h.Outcome = &ref
	} else {
		or, ow, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("outcome pipe: %w", err)
		}
		r.outcome = or
		r.afterExit = append(r.afterExit, or.Close)
		r.own(ow)
		ref := r.Files.Ref(ow, "outcome pipe")
		h.Outcome = &ref
	}

	kvm, err := os.OpenFile(o.KVMDevice, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM device: %w", err)
	}
	r.own(kvm)
	h.KVM = r.Files.Ref(kvm, o.KVMDevice)

	if h.Kernel, err = r.openKernel(eff.Kernel, o.BuiltinKernel); err != nil {
		return nil, err
	}
	if eff.Initrd != "" {
		f, err := openRegular(eff.Initrd)
		if err != nil {
			return nil, fmt.Errorf("initrd: %w", err)
		}
		r.own(f)
		ref := r.Files.Ref(f, eff.Initrd)
		h.Initrd = &ref
	}
	if eff.APISocket != "" {
		if h.API, err = r.listen(eff.APISocket); err != nil {
			return nil, fmt.Errorf("apiSocket: %w", err)
		}
	}
	if eff.Vsock != nil {
		if h.Vsock, err = r.listen(eff.Vsock.UDS); err != nil {
			return nil, fmt.Errorf("vsock.uds: %w", err)
		}
	}
	if err := r.openSandbox(eff, o.SandboxReport); err != nil {
		return nil, err
	}
	if eff.MetricsFile != "" {
		f, err := os.CreateTemp(filepath.Dir(eff.MetricsFile), ".metrics-*")
		if err != nil {
			return nil, fmt.Errorf("metricsFile: %w", err)
		}
		r.own(f)
		r.metricsTmp, r.metricsDst = f.Name(), eff.MetricsFile
		ref := r.Files.Ref(f, eff.MetricsFile)
		h.Metrics = &ref
	}
	for i := range eff.Disks {
		d, err := r.openDisk(ctx, eff.Disks[i], eff.Name, o)
		if err != nil {
			return nil, fmt.Errorf("disks[%d]: %w", i, err)
		}
		h.Disks = append(h.Disks, d)
	}
	if len(eff.Nets) > 0 {
		nics, err := network.AttachAll(ctx, o.StateDir, eff.Name, eff.Nets)
		if err != nil {
			return nil, err
		}
		for i, n := range nics {
			r.handedOver = append(r.handedOver, n.CloseTAPs)
			r.afterExit = append(r.afterExit, n.Close)
			r.detach = append(r.detach, n.Detach)
			if hold := n.HoldFile(); hold != nil {
				h.Holds = append(h.Holds, r.Files.Ref(hold, "network "+eff.Nets[i].Network+" hold"))
			}
			eff.Nets[i].MAC = n.MAC.String()
			hn := vmproc.NIC{MTU: n.MTU, Trunk: n.VLANs != nil}
			for j, t := range n.TAPs {
				tap := vmproc.TAP{File: r.Files.Ref(t.File(), t.Name())}
				if hn.Trunk {
					tap.VLAN = n.VLANs[j]
				}
				hn.TAPs = append(hn.TAPs, tap)
			}
			h.NICs = append(h.NICs, hn)
		}
	}
	return r, nil
}

// listen makes a listening socket at path (see ListenSocket) for the VM
// process; the control plane removes the file once the VM is gone.
func (r *Resources) listen(path string) (*vmproc.File, error) {
	l, remove, err := ListenSocket(path)
	if err != nil {
		return nil, err
	}
	f, err := l.File()
	l.Close() // the path stays: the VM process listens on f
	if err != nil {
		remove()
		return nil, err
	}
	r.own(f)
	r.afterExit = append(r.afterExit, func() error {
		if err := remove(); err != nil {
			return fmt.Errorf("remove socket: %w", err)
		}
		return nil
	})
	ref := r.Files.Ref(f, path)
	return &ref, nil
}

// own makes f one of this process's copies, closed once launched.
func (r *Resources) own(f *os.File) { r.handedOver = append(r.handedOver, f.Close) }

// openKernel opens the kernel file, or puts the built-in kernel in a
// sealed memfd, so the VM process gets a descriptor either way.
func (r *Resources) openKernel(path string, builtin []byte) (vmproc.File, error) {
	if path != "" {
		f, err := openRegular(path)
		if err != nil {
			return vmproc.File{}, fmt.Errorf("kernel: %w", err)
		}
		r.own(f)
		return r.Files.Ref(f, path), nil
	}
	if len(builtin) == 0 {
		return vmproc.File{}, errors.New("no kernel given and no built-in kernel")
	}
	f, err := SealedMemfd("rayguest", builtin)
	if err != nil {
		return vmproc.File{}, fmt.Errorf("built-in kernel: %w", err)
	}
	r.own(f)
	return r.Files.Ref(f, "built-in rayguest"), nil
}

// SealedMemfd returns a memfd holding b, sealed against any change.
func SealedMemfd(name string, b []byte) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), name)
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, fmt.Errorf("memfd: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE); err != nil {
		f.Close()
		return nil, fmt.Errorf("memfd: seal: %w", err)
	}
	return f, nil
}

// openRegular opens a file read-only without blocking (a FIFO would wait
// for a writer) and refuses anything but a regular file.
func openRegular(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%s: not a regular file", path)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// openDisk opens a disk's image (and backing chain), for a volume with
// the volume's lock, whose descriptor goes to the VM process too. A
// volume that is not a local one is a sharded volume when a cluster is
// configured (o.Sharded): its agent attaches it, and the VM process gets
// the link to it.
func (r *Resources) openDisk(ctx context.Context, d spec.Disk, vm string, o Options) (vmproc.Disk, error) {
	var disk storage.Disk
	out := vmproc.Disk{ReadOnly: d.ReadOnly}
	if d.Volume != "" {
		st, err := volume.Open(o.StateDir)
		if err != nil {
			return out, fmt.Errorf("volume %q: %w", d.Volume, err)
		}
		a, err := st.Attach(d.Volume, d.ReadOnly)
		if errors.Is(err, volume.ErrNotFound) && o.Sharded != nil {
			return r.openSharded(ctx, d, vm, o.Sharded)
		}
		if err != nil {
			return out, err
		}
		if d.Format != "" && d.Format != a.Volume.Format {
			a.Close()
			return out, fmt.Errorf("volume %q is %s, not %s", d.Volume, a.Volume.Format, d.Format)
		}
		disk = a.Disk
		a.Disk = nil // handed over: Close only releases the lock
		r.afterExit = append(r.afterExit, a.Close)
		r.detach = append(r.detach, a.Detach)
		r.Handoff.Holds = append(r.Handoff.Holds, r.Files.Ref(a.LockFile(), "volume "+d.Volume+" lock"))
		out.Source = "volume:" + d.Volume
	} else {
		var err error
		if disk, err = storage.OpenDisk(d.Path, d.Format, d.ReadOnly); err != nil {
			return out, fmt.Errorf("disk %s: %w", d.Path, err)
		}
		out.Source = d.Path
	}
	r.handedOver = append(r.handedOver, func() error { return storage.Release(disk) })
	files, probed, err := storage.Files(disk)
	if err != nil {
		return out, err
	}
	out.Probed = probed
	for _, f := range files {
		out.Files = append(out.Files, vmproc.ImageFile{File: r.Files.Ref(f.File, f.Path), BackingName: f.Name, Format: f.Format})
	}
	return out, nil
}

// openSharded attaches a sharded volume: its agent owns it, and the VM
// process gets its end of the link.
func (r *Resources) openSharded(ctx context.Context, d spec.Disk, vm string, sv ShardedVolumes) (vmproc.Disk, error) {
	out := vmproc.Disk{ReadOnly: d.ReadOnly, Source: "sharded:" + d.Volume}
	if d.Format != "" {
		return out, fmt.Errorf("volume %q is a sharded volume: format=%s does not apply", d.Volume, d.Format)
	}
	end, detach, err := sv.Attach(ctx, d.Volume, vm)
	if err != nil {
		return out, fmt.Errorf("volume %q is no local volume; as a sharded volume: %w", d.Volume, err)
	}
	r.own(end)
	r.afterExit = append(r.afterExit, detach)
	ref := r.Files.Ref(end, "sharded volume "+d.Volume+" link")
	out.Link = &ref
	return out, nil
}

// Launched closes this process's copies of the handed-over descriptors,
// once the VM process has its own.
func (r *Resources) Launched() error {
	var errs []error
	for _, f := range r.handedOver {
		errs = append(errs, f())
	}
	r.handedOver = nil
	return errors.Join(errs...)
}

// Outcome reads how the VM ended, as its VM process reported it; call it
// once the process has exited. It is nil when the process reported
// nothing (it was killed).
func (r *Resources) Outcome() (*vmproc.Outcome, error) {
	if r.outcome == nil {
		return nil, errors.New("the outcome went to Options.OutcomeFile")
	}
	return vmproc.ReadOutcome(r.outcome)
}

// Detached closes this process's copies of everything handed to a
// detached VM process (vmproc.Options.Detached) once it is launched,
// without releasing what the VM process now holds on its own: its volume
// locks and its hold on each network stay held for as long as it runs,
// whatever happens to this process. Once it is gone, Cleanup removes what
// it leaves. After Detached, Close does nothing.
//
// The sandbox's SIGSYS report stays readable (SandboxKill) until
// CloseReport, for a launcher that sees its VM process exit.
func (r *Resources) Detached() error {
	errs := []error{r.Launched()}
	for _, d := range r.detach {
		errs = append(errs, d())
	}
	r.detach, r.afterExit = nil, nil
	return errors.Join(errs...)
}

// CloseReport closes the read end of the sandbox's SIGSYS report, once
// the detached VM process is gone and SandboxKill was asked.
func (r *Resources) CloseReport() error {
	if r.report == nil {
		return nil
	}
	err := r.report.Close()
	r.report = nil
	return err
}

// Cleanup removes what a detached VM process with effective spec s left
// once it is gone: its API and vsock sockets, the lock files of its
// volumes and networks that no one else holds, and its jail's
// directories. Its TAPs went with it.
func Cleanup(stateDir string, s *spec.VM) error {
	var errs []error
	rm := func(path string) {
		if path == "" {
			return
		}
		if st, err := os.Lstat(path); err == nil && st.Mode().Type() == os.ModeSocket {
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	rm(s.APISocket)
	if s.Vsock != nil {
		rm(s.Vsock.UDS)
	}
	for _, d := range s.Disks {
		if d.Volume == "" {
			continue
		}
		st, err := volume.Open(stateDir)
		if err == nil {
			err = st.Release(d.Volume)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("volume %q: %w", d.Volume, err))
		}
	}
	for _, n := range s.Nets {
		if n.Network != "" {
			errs = append(errs, network.Unhold(stateDir, n.Network))
		}
	}
	if j := s.Sandbox.Jail; j != nil {
		// What PrepareJail made for it (openSandbox's binds).
		jail := &seccap.Jail{Root: filepath.Join(j.Dir, s.Name, "root")}
		if s.Vsock != nil {
			jail.Binds = []seccap.Bind{{Path: filepath.Dir(s.Vsock.UDS), ReadOnly: true}}
		}
		errs = append(errs, jail.Remove())
	}
	return errors.Join(errs...)
}

// SandboxKill tells whether the sandbox killed the exited VM process: nil
// unless st is death by SIGSYS, else a *report.KilledError naming the
// refused call when the process reported it.
func (r *Resources) SandboxKill(st *os.ProcessState) error {
	if r.report == nil {
		return nil
	}
	return r.report.Explain(st)
}

// Close releases what the VM held once its process is gone: volume locks,
// the hold on networks, the API socket. It puts the metrics file in place
// if the VM process wrote it, and removes it otherwise.
func (r *Resources) Close() error {
	errs := []error{r.Launched()}
	for i := len(r.afterExit) - 1; i >= 0; i-- {
		errs = append(errs, r.afterExit[i]())
	}
	r.afterExit = nil
	if r.metricsTmp != "" {
		if st, err := os.Stat(r.metricsTmp); err == nil && st.Size() > 0 {
			if err := os.Rename(r.metricsTmp, r.metricsDst); err != nil {
				errs = append(errs, fmt.Errorf("metricsFile: %w", err))
			}
		}
		os.Remove(r.metricsTmp)
		r.metricsTmp = ""
	}
	return errors.Join(errs...)
}

// abandon undoes Open when it fails.
func (r *Resources) abandon() {
	r.Close()
}
