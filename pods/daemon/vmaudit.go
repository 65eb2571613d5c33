package daemon

import (
	"errors"
	"maps"
	"strconv"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmproc"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// A pod VM's life in the audit log, recorded as `rayvmm boot` records a
// VM's (vmproc/control's BootAudit, whose records these are): each run's
// vm.boot with its volume.attach and net.attach records, on disk before
// the guest's first instruction (launch appends them while the VM
// process builds the VM, and gives the go only once they and the pid are
// committed); and when the run ends, once its volumes and TAPs are let
// go, vm.exit (status 0), vm.crash (with the reason, a kill by a probe or
// a signal included) or vm.sandbox-kill, then the detaches. Each record
// names the pod (param pod), so `audit list --object volume/NAME` shows a
// volume's attaches by pod VMs, each restart as a detach and an attach.

// Audit actions of a pod VM's run, as package audit names them.
const (
	AuditVMBoot  = audit.VMBoot
	AuditVMExit  = audit.VMExit
	AuditVMCrash = audit.VMCrash
)

// podEntries are es as the daemon records them for pod: with the pod
// named in their params.
func podEntries(pod string, es []audit.Entry) []Entry {
	out := make([]Entry, len(es))
	for i, e := range es {
		p := map[string]string{audit.ParamPod: pod}
		maps.Copy(p, e.Params)
		out[i] = Entry{Action: e.Action, Object: Object{Kind: e.Object.Kind, Name: e.Object.Name}, Params: p, Err: e.Err}
	}
	return out
}

// bootEntries are a run's vm.boot and attaches (nics: the NICs handed
// to its VM process).
func bootEntries(pod string, eff *spec.VM, nics []vmproc.NIC) (boot []Entry, attaches []audit.Entry) {
	attaches = control.AttachEntries(eff.Name, eff, nics)
	boot = podEntries(pod, append([]audit.Entry{{Action: AuditVMBoot, Object: audit.Object{Kind: audit.KindVM, Name: eff.Name}, Params: control.BootParams(eff)}}, attaches...))
	return boot, attaches
}

// endEntries are the records of a run's end: how it ended (t; a sandbox
// kill when sandboxKill is set) and the detaches of its attaches.
func endEntries(pod, name string, t *pods.Terminated, sandboxKill error, attaches []audit.Entry) []Entry {
	obj := audit.Object{Kind: audit.KindVM, Name: name}
	status := "unknown"
	if t.ExitCode != nil {
		status = strconv.Itoa(*t.ExitCode)
	}
	var e audit.Entry
	switch {
	case sandboxKill != nil:
		e = audit.Entry{Action: AuditVMSandboxKill, Object: obj, Err: sandboxKill,
			Params: audit.Params{audit.ParamStatus: status, audit.ParamReason: sandboxKill.Error()}}
	case t.Succeeded():
		e = audit.Entry{Action: AuditVMExit, Object: obj, Params: audit.Params{audit.ParamStatus: status, audit.ParamReason: describe(t)}}
	default:
		e = audit.Entry{Action: AuditVMCrash, Object: obj, Err: errors.New(describe(t)),
			Params: audit.Params{audit.ParamStatus: status, audit.ParamReason: describe(t)}}
	}
	return podEntries(pod, append([]audit.Entry{e}, control.DetachEntries(attaches)...))
}
