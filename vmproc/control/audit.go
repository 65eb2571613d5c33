package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/seccap/report"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmproc"
)

// BootAudit records one VM's life in the audit log: vm.boot with the
// volumes and networks it attached and the sandbox mode, durable before
// the guest's first instruction; then how it ended (vm.exit; vm.crash
// with the reason, also for a VM process killed by a signal;
// vm.sandbox-kill, critical, naming the refused system call) and the
// detaches, once they have happened, sealed. A boot that fails before its VM process starts is
// one vm.boot record with the error.
//
// The boot record is appended while the VM process builds the VM (its
// fdatasync, ~0.7 ms and more when the disk is busy, overlaps the VM
// process's start instead of adding to it), and the guest runs only once
// it is on disk: the VM process waits for the control plane's go before
// its first KVM_RUN (vmproc.Options.Gate). A VM process that fails to
// build the VM after the boot record was written ends with vm.crash, whose
// reason is the error and whose ran param is false.
//
// Fail closed, except for users without the rights to the log: when the
// log cannot be opened or written and the error is one of permissions (or
// a read-only file system), a user who is not root gets one warning line
// and the boot goes on unrecorded (rayvmm boot needs only /dev/kvm; the
// log is the host's, kept by root). For root, and for any other error
// (a damaged log, a key directory open to others), the boot fails.
type BootAudit struct {
	open     func() (*audit.Log, error)
	warn     io.Writer
	vm       audit.Object
	params   audit.Params
	off      bool // not recorded (warned once)
	booted   bool
	attached []audit.Entry
}

// NewBootAudit prepares the records of booting s. open opens the log (the
// process's, shared with its other records); warn gets the one warning
// line of an unrecorded boot.
func NewBootAudit(open func() (*audit.Log, error), s *spec.VM, warn io.Writer) *BootAudit {
	return &BootAudit{open: open, warn: warn, vm: audit.Object{Kind: audit.KindVM, Name: VMName(s)}, params: BootParams(s)}
}

// BootParams are the params of the vm.boot record of s (the daemon's
// pod VMs have the same).
func BootParams(s *spec.VM) audit.Params {
	kernel := s.Kernel
	if kernel == "" {
		kernel = "builtin"
	}
	p := audit.Params{"kernel": kernel, "cmdline": s.Cmdline, "memory": s.Memory.String(), "cpus": strconv.Itoa(s.CPUs),
		"cpu_template": s.CPUTemplate,
		// The mode it runs with: `audit report` flags the runs with it
		// off (and lists those in log mode).
		audit.ParamSandbox: string(SandboxMode(s))}
	if j := s.Sandbox.Jail; j != nil {
		p["jail"] = fmt.Sprintf("%s uid=%d gid=%d", j.Dir, j.UID, j.GID)
	}
	for i, d := range s.Disks {
		p["disk."+strconv.Itoa(i)] = d.String()
	}
	for i, n := range s.Nets {
		p["net."+strconv.Itoa(i)] = n.String()
	}
	if s.Vsock != nil {
		p["vsock"] = s.Vsock.String()
	}
	return p
}

// AttachEntries are the volume.attach and net.attach records of VM vm
// run with spec s: one for each named volume (its mode) and network (the
// TAPs of nics, the NICs handed to the VM process, when known: a VM
// adopted by a restarted daemon has none).
func AttachEntries(vm string, s *spec.VM, nics []vmproc.NIC) []audit.Entry {
	var es []audit.Entry
	for _, d := range s.Disks {
		if d.Volume == "" {
			continue
		}
		mode := audit.ModeRW
		if d.ReadOnly {
			mode = audit.ModeRO
		}
		es = append(es, audit.Entry{Action: audit.VolumeAttach, Object: audit.Object{Kind: audit.KindVolume, Name: d.Volume},
			Params: audit.Params{audit.ParamVM: vm, audit.ParamMode: mode}})
	}
	for i, n := range s.Nets {
		if n.Network == "" {
			continue
		}
		p := audit.Params{audit.ParamVM: vm, audit.ParamMAC: n.MAC}
		if i < len(nics) {
			var taps []string
			for _, t := range nics[i].TAPs {
				taps = append(taps, t.Name)
			}
			p[audit.ParamTAP] = strings.Join(taps, ",")
		}
		if n.VLAN != 0 {
			p["vlan"] = strconv.Itoa(n.VLAN)
		}
		for _, v := range n.Trunk {
			p["trunk"] = strings.TrimPrefix(p["trunk"]+":"+strconv.Itoa(v), ":")
		}
		es = append(es, audit.Entry{Action: audit.NetAttach, Object: audit.Object{Kind: audit.KindNetwork, Name: n.Network}, Params: p})
	}
	return es
}

// DetachEntries are the detaches of attaches (AttachEntries), once the
// VM has let its volumes and networks go.
func DetachEntries(attaches []audit.Entry) []audit.Entry {
	es := make([]audit.Entry, 0, len(attaches))
	for _, a := range attaches {
		a.Action = map[string]string{audit.VolumeAttach: audit.VolumeDetach, audit.NetAttach: audit.NetDetach}[a.Action]
		es = append(es, a)
	}
	return es
}

// VMName is the name of the VM s describes: its own, or rayvmm-PID.
func VMName(s *spec.VM) string {
	if s.Name != "" {
		return s.Name
	}
	return fmt.Sprintf("rayvmm-%d", os.Getpid())
}

// Check opens the log before anything is made for the VM, so that a boot
// that cannot be recorded fails (or, for a user without the rights to the
// log, warns) before it creates TAPs or takes locks.
func (b *BootAudit) Check() error {
	_, err := b.log()
	return err
}

// log opens the log, or returns nil when the boot goes unrecorded.
func (b *BootAudit) log() (*audit.Log, error) {
	if b.off {
		return nil, nil
	}
	l, err := b.open()
	if err != nil {
		return nil, b.unrecorded(err)
	}
	return l, nil
}

// unrecorded decides on an error of the log: a user without the rights
// to it is warned once and the boot goes on; otherwise it is the error.
func (b *BootAudit) unrecorded(err error) error {
	if os.Geteuid() == 0 || !(errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS)) {
		return err
	}
	if !b.off {
		b.off = true
		fmt.Fprintf(b.warn, "rayvmm: warning: this boot is not recorded in the audit log (%v; as root it would not start)\n", oneLine(err))
	}
	return nil
}

// Failed records a boot that failed before its VM process started, and
// returns err (or err with the log's own error).
func (b *BootAudit) Failed(ctx context.Context, err error) error {
	l, aerr := b.log()
	if aerr == nil && l != nil {
		_, aerr = l.AppendSealed(context.WithoutCancel(ctx), audit.Entry{Action: audit.VMBoot, Object: b.vm, Params: b.params, Err: err})
	}
	if aerr != nil {
		return fmt.Errorf("%w (not recorded in the audit log: %v)", err, aerr)
	}
	return err
}

// boot records the boot and its attaches (Foreground calls it while the
// VM process builds the VM).
func (b *BootAudit) boot(ctx context.Context, r *Resources) error {
	l, err := b.log()
	if err != nil || l == nil {
		return err
	}
	h := r.Handoff
	es := append([]audit.Entry{{Action: audit.VMBoot, Object: b.vm, Params: b.params}}, AttachEntries(b.vm.Name, h.Spec, h.NICs)...)
	if _, err := l.Append(ctx, es...); err != nil {
		if err := b.unrecorded(err); err != nil {
			return fmt.Errorf("audit log: %w", err)
		}
		return nil
	}
	b.booted, b.attached = true, es[1:]
	return nil
}

// ending is how a VM ended, as Foreground saw it.
type ending struct {
	outcome *vmproc.Outcome // the VM process's report; nil if it made none
	killed  error           // the VM process was killed by a signal
	// sandboxKill: the sandbox killed it (a *report.KilledError)
	sandboxKill error
	err         error // Foreground's error (the audit log's, a wait's)
	code        int   // rayvmm boot's exit status
}

// end records how the VM ended and the detaches, once the VM process is
// gone and its resources released.
func (b *BootAudit) end(ctx context.Context, e ending) error {
	if !b.booted {
		return nil // unrecorded, or the boot record failed (Foreground said so)
	}
	status := strconv.Itoa(e.code)
	var es []audit.Entry
	switch o := e.outcome; {
	case e.sandboxKill != nil:
		p := audit.Params{audit.ParamStatus: status, audit.ParamReason: e.sandboxKill.Error()}
		var k *report.KilledError
		if errors.As(e.sandboxKill, &k) && k.Syscall >= 0 {
			p["syscall"] = strconv.Itoa(k.Syscall)
			if k.Name != "" {
				p["syscall_name"] = k.Name
			}
		}
		es = append(es, audit.Entry{Action: audit.VMSandboxKill, Object: b.vm, Err: e.sandboxKill, Params: p, Level: audit.Critical})
	case e.killed != nil:
		es = append(es, audit.Entry{Action: audit.VMCrash, Object: b.vm, Err: e.killed,
			Params: audit.Params{audit.ParamStatus: status, audit.ParamReason: e.killed.Error()}})
	case o != nil && o.Status == 0:
		es = append(es, audit.Entry{Action: audit.VMExit, Object: b.vm,
			Params: audit.Params{audit.ParamStatus: status, audit.ParamReason: o.Reason, "ran": strconv.FormatBool(o.Ran)}})
	case o != nil:
		es = append(es, audit.Entry{Action: audit.VMCrash, Object: b.vm, Err: errors.New(o.Reason),
			Params: audit.Params{audit.ParamStatus: status, audit.ParamReason: o.Reason, "ran": strconv.FormatBool(o.Ran)}})
	default:
		err := e.err
		if err == nil {
			err = fmt.Errorf("the VM process exited with status %d and did not say why", e.code)
		}
		es = append(es, audit.Entry{Action: audit.VMCrash, Object: b.vm, Err: err,
			Params: audit.Params{audit.ParamStatus: status, audit.ParamReason: oneLine(err)}})
	}
	es = append(es, DetachEntries(b.attached)...)
	l, err := b.log()
	if err == nil && l != nil {
		_, err = l.AppendSealed(context.WithoutCancel(ctx), es...)
	}
	if err != nil {
		return fmt.Errorf("VM %s ended, but that is not recorded in the audit log: %w", b.vm.Name, err)
	}
	return nil
}

func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }
