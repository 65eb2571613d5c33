package daemon

import (
	"time"

	"github.com/rayvmm/rayvmm/pods"
)

// phase derives the pod's phase from its VMs, as the kubelet does. d.mu
// must be held.
func (p *pod) phase() string {
	if p.rec.Stopped && p.rec.Reason != "" && p.rec.Reason != pods.ReasonStopped {
		return pods.Failed // it could not start
	}
	allEnded, anyFailed, anyNew := true, false, false
	for _, v := range p.vms {
		st := v.rec.State
		switch {
		case st.Terminated != nil:
			if !st.Terminated.Succeeded() {
				anyFailed = true
			}
		case st.Running != nil:
			allEnded = false
		default:
			allEnded = false
			if v.rec.Instance == 0 {
				anyNew = true
			}
		}
	}
	switch {
	case allEnded && anyFailed:
		return pods.Failed
	case allEnded:
		return pods.Succeeded
	case anyNew:
		return pods.Pending
	}
	return pods.Running
}

// ended reports a pod that ended: Succeeded or Failed, with nothing to
// restart. d.mu must be held.
func (p *pod) ended() bool {
	ph := p.phase()
	return (ph == pods.Succeeded || ph == pods.Failed) && !p.active()
}

// ready reports the Ready condition. d.mu must be held.
func (p *pod) ready() bool {
	if p.phase() != pods.Running {
		return false
	}
	for _, v := range p.vms {
		if !v.rec.Ready || v.rec.State.Running == nil {
			return false
		}
	}
	return true
}

// info is the pod as the API shows it. d.mu must be held.
func (p *pod) info() *pods.Info {
	r := p.rec.clone()
	i := &pods.Info{Pod: *r.Pod, UID: r.UID, Owner: r.Owner}
	s := &i.Status
	s.Phase, s.Reason, s.Message, s.StartTime = p.phase(), r.Reason, r.Message, r.Created
	ready := "False"
	if p.ready() {
		ready = "True"
	}
	s.Conditions = []pods.Condition{{Type: "Ready", Status: ready, LastTransitionTime: p.readySince()}}
	for k, v := range p.vms {
		vr := r.VMs[k]
		vs := pods.VMStatus{
			Name: vr.Name, State: vr.State, LastState: vr.LastState, Ready: vr.Ready && vr.State.Running != nil,
			Started: vr.Started, RestartCount: vr.RestartCount, PID: vr.PID,
		}
		if v.cur != nil {
			vs.APISocket = v.cur.eff.APISocket
			if v.cur.eff.Vsock != nil {
				vs.VsockSocket = v.cur.eff.Vsock.UDS
			}
			if v.cur.group != nil {
				vs.Cgroup = v.cur.group.Path()
			}
		}
		s.VMs = append(s.VMs, vs)
	}
	return i
}

// readySince is when the Ready condition last changed, from the events.
func (p *pod) readySince() time.Time {
	for i := len(p.rec.Events) - 1; i >= 0; i-- {
		e := p.rec.Events[i]
		switch e.Reason {
		case "Ready", "NotReady", "Started", "Terminated", "Adopted":
			return e.Time
		}
	}
	return p.rec.Created
}
