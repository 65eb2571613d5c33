package daemon

import (
	"context"
	"fmt"
	"net"

	"github.com/rayvmm/rayvmm/seccap/policy"
)

// The daemon's two hooks for the access policy (seccap/policy) and the
// audit log (audit): every request is decided by Authorizer.Decide on
// each object it touches before anything is made, a denial answers 403
// with the decision's reason (which names the rule) and leaves nothing
// behind, and every decision and every pod action (apply, each restart,
// probe failures, stop, rm; daemon start, stop and reload) goes to
// Auditor.Record. The daemon wires both in cmd/rayvmmd; without them it
// allows every caller who can reach its socket (mode 0660: root and the
// socket's group) and records nothing.

// Caller is who sent a request, from the kernel (SO_PEERCRED) at
// connect time; nothing the caller sends can change it.
type Caller struct {
	PID int32
	UID uint32
	GID uint32
	// Groups are its supplementary groups.
	Groups []uint32
}

func (c Caller) String() string { return fmt.Sprintf("uid %d (pid %d)", c.UID, c.PID) }

// Object is what an action is done to.
type Object struct {
	Kind   string // pod, volume, network
	Name   string
	Labels map[string]string
}

func (o Object) String() string { return o.Kind + "/" + o.Name }

// Actions, as the access policy names them.
const (
	ActCreate   = "create"
	ActDelete   = "delete"
	ActInspect  = "inspect"
	ActAttachRO = "attach-ro"
	ActAttachRW = "attach-rw"
	ActClone    = "clone"
	ActRun      = "run"
	ActJoin     = "join"
)

// Decision is an access decision and what made it.
type Decision struct {
	Allow bool
	// Reason names the rule or check that decided, for the 403 and the
	// audit log.
	Reason string
	// Params go into the decision's audit record (the rule, the levels).
	Params map[string]string
}

// Authorizer decides requests. owner is the pod's owner, whose clearance
// the pod runs at (the caller, for an apply).
type Authorizer interface {
	Decide(c Caller, action string, o Object) (Decision, error)
}

// Entry is one audit record.
type Entry struct {
	Caller *Caller // nil: the daemon itself
	Action string  // pod.apply, pod.restart, policy.allow, daemon.start, ...
	Object Object
	Params map[string]string
	// Decision is "allow", "deny" or "" (no policy decided).
	Decision string
	Err      error
}

// Audit actions, as package audit names them.
const (
	AuditPodApply        = "pod.apply"
	AuditPodRestart      = "pod.restart"
	AuditPodProbeFailure = "pod.probe-failure"
	AuditPodStop         = "pod.stop"
	AuditPodRm           = "pod.rm"
	AuditPolicyAllow     = "policy.allow"
	AuditPolicyDeny      = "policy.deny"
	AuditDaemonStart     = "daemon.start"
	AuditDaemonStop      = "daemon.stop"
	AuditDaemonReload    = "daemon.reload"
	AuditVMSandboxKill   = "vm.sandbox-kill"
)

// Auditor appends records, in order; the records of one call are
// committed together. An error fails the request they describe (fail
// closed).
type Auditor interface {
	Record(ctx context.Context, es ...Entry) error
}

type callerKey struct{}

// peerCred reads the caller of a Unix socket connection from the kernel
// (SO_PEERCRED and SO_PEERGROUPS, as the access policy reads them).
func peerCred(c net.Conn) (Caller, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Caller{}, fmt.Errorf("peer credentials: %T is not a Unix socket", c)
	}
	pc, err := policy.PeerCred(uc)
	if err != nil {
		return Caller{}, err
	}
	return Caller{PID: pc.PID, UID: pc.UID, GID: pc.GID, Groups: pc.Groups}, nil
}

// callerOf is the request's caller, set by the server's ConnContext.
func callerOf(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}
