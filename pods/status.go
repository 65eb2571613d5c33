package pods

import (
	"fmt"
	"strings"
	"time"
)

// Pod phases, as in Kubernetes.
const (
	Pending   = "Pending"   // accepted; not every VM has started yet
	Running   = "Running"   // every VM started once; at least one runs or restarts
	Succeeded = "Succeeded" // every VM ended with status 0 and none will restart
	Failed    = "Failed"    // every VM ended, at least one in failure, none will restart; or the pod could not start
	Unknown   = "Unknown"   // the daemon cannot tell (it is re-adopting the pod's VMs)
)

// Phases lists the phases in display order (metrics label every one).
var Phases = []string{Pending, Running, Succeeded, Failed, Unknown}

// Reasons of VM states, pods and events. They use Kubernetes' words where
// Kubernetes has one.
const (
	ReasonCreating         = "ContainerCreating" // Waiting: being started
	ReasonCrashLoopBackOff = "CrashLoopBackOff"  // Waiting: restart back-off
	ReasonCompleted        = "Completed"         // Terminated with status 0
	ReasonError            = "Error"             // Terminated with another status, or by a signal
	ReasonOOMKilled        = "OOMKilled"         // Terminated by the memory cgroup's OOM killer
	ReasonUnknown          = "Unknown"           // Terminated while the daemon was down, status lost
	ReasonStartError       = "StartError"        // could not be started
	ReasonStopped          = "Stopped"           // pod: stopped by pod stop
)

// Status is a pod's observed state.
type Status struct {
	Phase string `json:"phase"`
	// Reason and Message say why, for a pod that failed to start or was
	// stopped.
	Reason     string      `json:"reason,omitempty"`
	Message    string      `json:"message,omitempty"`
	Conditions []Condition `json:"conditions"`
	// StartTime is when the pod was applied.
	StartTime time.Time  `json:"startTime"`
	VMs       []VMStatus `json:"vmStatuses"`
}

// Condition is a Kubernetes pod condition (this API has Ready).
type Condition struct {
	Type               string    `json:"type"`
	Status             string    `json:"status"` // "True" or "False"
	LastTransitionTime time.Time `json:"lastTransitionTime"`
	Reason             string    `json:"reason,omitempty"`
}

// Ready reports the Ready condition.
func (s *Status) Ready() bool {
	for _, c := range s.Conditions {
		if c.Type == "Ready" {
			return c.Status == "True"
		}
	}
	return false
}

// VMStatus is one VM's observed state.
type VMStatus struct {
	Name  string  `json:"name"`
	State VMState `json:"state"`
	// LastState is the state before the last restart.
	LastState    VMState `json:"lastState,omitzero"`
	Ready        bool    `json:"ready"`
	Started      bool    `json:"started"` // the startup probe passed (or there is none)
	RestartCount int32   `json:"restartCount"`
	// PID is the VM process while it runs.
	PID int `json:"pid,omitempty"`
	// APISocket is the VM's control API (rayvmm vm status --api-socket),
	// VsockSocket its hybrid vsock socket, Cgroup its cgroup.
	APISocket   string `json:"apiSocket,omitempty"`
	VsockSocket string `json:"vsockSocket,omitempty"`
	Cgroup      string `json:"cgroup,omitempty"`
}

// VMState holds exactly one of its members, as a Kubernetes
// ContainerState.
type VMState struct {
	Waiting    *Waiting    `json:"waiting,omitempty"`
	Running    *RunningVM  `json:"running,omitempty"`
	Terminated *Terminated `json:"terminated,omitempty"`
}

// IsZero reports an empty state (no last state yet).
func (s VMState) IsZero() bool { return s.Waiting == nil && s.Running == nil && s.Terminated == nil }

// String is the state as pod ps shows it.
func (s VMState) String() string {
	switch {
	case s.Waiting != nil:
		return "Waiting(" + s.Waiting.Reason + ")"
	case s.Running != nil:
		return "Running"
	case s.Terminated != nil:
		return "Terminated(" + s.Terminated.Reason + ")"
	}
	return ""
}

// Waiting is a VM not running yet, or between runs.
type Waiting struct {
	Reason  string `json:"reason"`
	Message string `json:"message,omitempty"`
}

// RunningVM is a running VM.
type RunningVM struct {
	StartedAt time.Time `json:"startedAt"`
}

// Terminated is a VM that ended.
type Terminated struct {
	// ExitCode is the VM process's status (128+N when killed by signal N,
	// as Kubernetes reports it); absent when it is not known.
	ExitCode   *int      `json:"exitCode,omitempty"`
	Signal     int       `json:"signal,omitempty"`
	Reason     string    `json:"reason"`
	Message    string    `json:"message,omitempty"`
	StartedAt  time.Time `json:"startedAt,omitzero"`
	FinishedAt time.Time `json:"finishedAt"`
}

// Succeeded reports a clean end (status 0).
func (t *Terminated) Succeeded() bool { return t.ExitCode != nil && *t.ExitCode == 0 }

// Event is one transition, as kubectl describe shows them.
type Event struct {
	Time time.Time `json:"time"`
	// Type is Normal or Warning.
	Type   string `json:"type"`
	Reason string `json:"reason"`
	// VM is the VM it is about, "" for the pod.
	VM      string `json:"vm,omitempty"`
	Message string `json:"message"`
	// Count is how many times it happened in a row (the same event again
	// is counted, not repeated, as Kubernetes aggregates events); Time is
	// the last time.
	Count int `json:"count,omitempty"`
}

// Event types.
const (
	Normal  = "Normal"
	Warning = "Warning"
)

// Info is a pod as the API returns it: its spec, status and owner.
type Info struct {
	Pod
	Status Status `json:"status"`
	// UID identifies this pod (it changes when a pod of the same name is
	// applied again after rm).
	UID   string `json:"uid"`
	Owner Owner  `json:"owner"`
}

// Owner is who applied a pod (from SO_PEERCRED): the pod runs at this
// user's clearance.
type Owner struct {
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
}

// ReadyCount is "ready/total" as pod ps shows it.
func (i *Info) ReadyCount() string {
	n := 0
	for _, v := range i.Status.VMs {
		if v.Ready {
			n++
		}
	}
	return fmt.Sprintf("%d/%d", n, len(i.Spec.VMs))
}

// Restarts is the pod's restart count, summed over its VMs.
func (i *Info) Restarts() int32 {
	var n int32
	for _, v := range i.Status.VMs {
		n += v.RestartCount
	}
	return n
}

// StatusWord is pod ps's STATUS column, as kubectl get pods shows it: a
// VM's waiting or terminated reason when one explains more than the
// phase, else the phase.
func (i *Info) StatusWord() string {
	if i.Status.Reason != "" {
		return i.Status.Reason
	}
	for _, v := range i.Status.VMs {
		if w := v.State.Waiting; w != nil && w.Reason != ReasonCreating {
			return w.Reason
		}
	}
	for _, v := range i.Status.VMs {
		if t := v.State.Terminated; t != nil && !t.Succeeded() {
			return t.Reason
		}
	}
	return i.Status.Phase
}

// APIError is the body of every error answer: {"message": "..."}; a spec
// error also names the field's path.
type APIError struct {
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

// ApplyResult is the answer to an apply.
type ApplyResult struct {
	Name string `json:"name"`
	UID  string `json:"uid"`
	// Result is "created", "unchanged" or "started" (a stopped pod applied
	// again).
	Result string `json:"result"`
}

// FormatAge renders a duration as kubectl does: 5s, 3m, 2h, 4d.
func FormatAge(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < 2*time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < 2*time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

// OneLine keeps a message on one line.
func OneLine(s string) string { return strings.ReplaceAll(strings.TrimSpace(s), "\n", "; ") }
