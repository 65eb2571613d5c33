package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/network"
	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/pods/cgroup"
	"github.com/rayvmm/rayvmm/seccap/report"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage/volume"
	"github.com/rayvmm/rayvmm/vmproc"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// pod is a pod the daemon knows. Everything in it is guarded by the
// daemon's mutex.
type pod struct {
	d   *Daemon
	rec *record
	vms []*vm
	// stopping: a stop or rm is under way; nothing restarts.
	stopping bool
	removed  bool
	// grace overrides the spec's grace period for the stop under way.
	grace *time.Duration
}

// vm is one VM of a pod.
type vm struct {
	p    *pod
	i    int
	spec *pods.VM
	rec  *vmRecord
	// kill asks the supervisor to end the running process (the reason
	// goes into its Terminated message); buffered, never blocks.
	kill chan string
	// sup is closed when the supervisor goroutine returns; nil when none
	// was started.
	sup chan struct{}
	cur *instance
	// restartRecorded is closed once the pending restart's pod.restart
	// record is written (nil: none pending): the restarted run's records
	// come after it.
	restartRecorded chan struct{}
	// launching: launch is making a run (its cgroup, resources and
	// process may exist before its pid is recorded); a pod that fails
	// meanwhile leaves its state to the run's end.
	launching bool
}

// instance is one run of a VM process.
type instance struct {
	pid       int
	startTime uint64
	child     *vmproc.Process // nil when adopted from an earlier daemon
	done      <-chan struct{}
	started   time.Time
	eff       *spec.VM
	group     *cgroup.Group
	oomBase   uint64
	// res is what this daemon opened for the run (nil when adopted): the
	// sandbox's SIGSYS report is read from it when the process ends.
	res         *control.Resources
	sandboxKill error
	// attaches are the run's volume and network attaches, whose
	// detaches are recorded when it ends.
	attaches []audit.Entry
}

func newPod(d *Daemon, r *record) *pod {
	p := &pod{d: d, rec: r}
	for i := range r.Pod.Spec.VMs {
		p.vms = append(p.vms, &vm{p: p, i: i, spec: &r.Pod.Spec.VMs[i], rec: r.VMs[i], kill: make(chan string, 1)})
	}
	return p
}

func (p *pod) name() string { return p.rec.Pod.Metadata.Name }

// event records a transition (aggregating a repeat of the last one of the
// same VM) and wakes waiters. d.mu must be held.
func (p *pod) event(vm, typ, reason, format string, args ...any) {
	msg := pods.OneLine(fmt.Sprintf(format, args...))
	now := time.Now().UTC()
	ev := p.rec.Events
	for i := len(ev) - 1; i >= 0; i-- {
		if ev[i].VM != vm {
			continue
		}
		if ev[i].Reason == reason && ev[i].Message == msg && ev[i].Type == typ {
			e := ev[i]
			e.Time, e.Count = now, max(e.Count, 1)+1
			p.rec.Events = append(slices.Delete(ev, i, i+1), e)
			p.d.notify()
			return
		}
		break
	}
	p.rec.Events = append(ev, pods.Event{Time: now, Type: typ, Reason: reason, VM: vm, Message: msg})
	if n := len(p.rec.Events); n > maxEvents {
		p.rec.Events = slices.Delete(p.rec.Events, 0, n-maxEvents)
	}
	p.d.log.Debug("event", "pod", p.name(), "vm", vm, "reason", reason, "message", msg)
	p.d.notify()
}

// save queues the record for the state store and returns the commit's
// result channel. d.mu must be held.
func (p *pod) save() <-chan error {
	if p.removed {
		ch := make(chan error, 1)
		ch <- nil
		return ch
	}
	return p.d.persist.mark(p.name(), p.rec.clone())
}

// resume starts the supervisors of a pod read from the state store, or
// just applied: VMs whose process runs are re-adopted, VMs waiting to
// start or restart start, ended ones stay ended. d.mu must be held.
func (p *pod) resume() {
	needVolumes := len(p.rec.Pod.Spec.Volumes) > 0
	var start []*vm
	for _, v := range p.vms {
		switch {
		case v.rec.PID != 0:
			p.superviseVM(v, true, nil)
			if p.rec.Stopped {
				// A stop the last daemon did not see through.
				v.kill <- reasonStop
			}
		case p.rec.Stopped || v.rec.State.Terminated != nil:
		default:
			start = append(start, v)
		}
	}
	if len(start) == 0 {
		return
	}
	if !needVolumes {
		for _, v := range start {
			p.superviseVM(v, false, nil)
		}
		return
	}
	// Pod volumes first, then the VMs that use them.
	gate := make(chan struct{})
	for _, v := range start {
		p.superviseVM(v, false, gate)
	}
	p.d.wg.Add(1)
	go func() {
		defer p.d.wg.Done()
		if err := p.ensureVolumes(); err != nil {
			p.d.mu.Lock()
			reason := pods.ReasonStartError
			if errors.Is(err, volume.ErrNotFound) {
				reason = "VolumeNotFound"
			}
			p.failed(nil, reason, err)
			p.d.mu.Unlock()
		}
		close(gate)
	}()
}

// ensureVolumes clones the pod's volumes that do not exist yet. Each is
// recorded as the pod's before it is made, so a daemon killed meanwhile
// finds it on its list and rm removes it.
func (p *pod) ensureVolumes() error {
	d := p.d
	st, err := volume.Open(d.st.Dir())
	if err != nil {
		return err
	}
	d.mu.Lock()
	name, specVols, have := p.name(), p.rec.Pod.Spec.Volumes, slices.Clone(p.rec.Volumes)
	d.mu.Unlock()
	for _, v := range specVols {
		vn := pods.VolumeName(name, v.Name)
		_, err := st.Get(vn)
		switch {
		case err == nil && slices.Contains(have, vn):
			continue
		case err == nil:
			return fmt.Errorf("spec.volumes: volume %s exists and is not this pod's: remove it or rename the pod's volume", vn)
		case !errors.Is(err, volume.ErrNotFound):
			return err
		}
		d.mu.Lock()
		if !slices.Contains(p.rec.Volumes, vn) {
			p.rec.Volumes = append(p.rec.Volumes, vn)
		}
		ch := p.save()
		d.mu.Unlock()
		if err := <-ch; err != nil {
			return err
		}
		if _, err := st.Clone(v.From, vn); err != nil {
			d.mu.Lock()
			p.rec.Volumes = slices.DeleteFunc(p.rec.Volumes, func(s string) bool { return s == vn })
			p.save()
			d.mu.Unlock()
			return fmt.Errorf("pod volume %s from snapshot %s: %w", v.Name, v.From, err)
		}
		d.mu.Lock()
		p.event("", pods.Normal, "VolumeCreated", "volume %s cloned from snapshot %s", vn, v.From)
		d.mu.Unlock()
	}
	return nil
}

// superviseVM starts v's supervisor; gate, if not nil, holds a start
// back until closed. d.mu must be held.
func (p *pod) superviseVM(v *vm, adopt bool, gate <-chan struct{}) {
	if v.sup != nil {
		select {
		case <-v.sup:
		default:
			return // one is running
		}
	}
	// A stop asked of the previous supervisor must not stop this one.
	select {
	case <-v.kill:
	default:
	}
	v.sup = make(chan struct{})
	p.d.wg.Add(1)
	go v.supervise(adopt, gate, v.sup)
}

// supervise runs v: it starts (or adopts) its process, probes it, and
// when it ends restarts it by the pod's restart policy with back-off,
// until the policy says no, the pod is stopped, or the daemon stops (the
// process then keeps running).
func (v *vm) supervise(adopt bool, gate <-chan struct{}, sup chan struct{}) {
	d := v.p.d
	defer d.wg.Done()
	// A supervisor that ends changes what the API answers (a pod whose
	// supervisors all ended may have Ended): wake the waiters, or a wait
	// that checked just before the close sleeps until its deadline.
	defer func() {
		d.mu.Lock()
		close(sup)
		d.notify()
		d.mu.Unlock()
	}()
	if gate != nil {
		select {
		case <-gate:
		case <-d.ctx.Done():
			return
		}
	}
	var in *instance
	if adopt {
		if in = d.adopt(v); in == nil {
			if !d.endedAway(v) {
				return
			}
		}
	}
	for {
		if in == nil {
			if !d.waitToStart(v) {
				return
			}
			var err error
			if in, err = d.launch(v); err != nil {
				if d.ctx.Err() != nil {
					return // the daemon stops: the next one starts it
				}
				d.startFailed(v, err)
				return
			}
		}
		ctx, cancel := context.WithCancel(d.ctx)
		d.wg.Add(1)
		go d.probe(ctx, v, in)
		var reason string
		select {
		case <-in.done:
		case reason = <-v.kill:
			if !d.terminate(v, in, reason) {
				cancel()
				return // the daemon stops; the VM goes on without it
			}
		case <-d.ctx.Done():
			cancel()
			return
		}
		cancel()
		if !d.ended(v, in, reason) {
			return
		}
		in = nil
	}
}

// effective is the spec v's VM process runs with: names, sockets and pod
// volumes resolved. It is the same for every run, so that a restarted
// daemon can clean up after a run it did not start.
func (d *Daemon) effective(v *vm) *spec.VM {
	d.mu.Lock()
	uid, name := v.p.rec.UID, v.p.name()
	d.mu.Unlock()
	eff := v.spec.VM.Clone()
	eff.Name = pods.VMName(name, v.spec.Name)
	eff.APISocket = d.apiSocket(uid, v.i)
	if eff.Vsock != nil {
		eff.Vsock.UDS = d.vsockSocket(uid, v.i)
	}
	for i := range eff.Disks {
		dv := eff.Disks[i].Volume
		if dv != "" && slices.ContainsFunc(v.p.rec.Pod.Spec.Volumes, func(pv pods.Volume) bool { return pv.Name == dv }) {
			eff.Disks[i].Volume = pods.VolumeName(name, dv)
		}
	}
	return eff
}

// waitToStart waits out v's back-off. It returns false when v must not
// start: the pod is stopping or the daemon stops.
func (d *Daemon) waitToStart(v *vm) bool {
	d.mu.Lock()
	if v.p.stopping || v.p.rec.Stopped {
		d.mu.Unlock()
		return false
	}
	wait := time.Until(v.rec.NextStart)
	d.mu.Unlock()
	if wait <= 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
	case <-v.kill:
		return false
	case <-d.ctx.Done():
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return !v.p.stopping && !v.p.rec.Stopped
}

// startError classifies why a VM could not start, in Kubernetes' manner.
func startError(err error) string {
	switch {
	case errors.Is(err, network.ErrNotFound):
		return "NetworkNotFound"
	case errors.Is(err, volume.ErrNotFound):
		return "VolumeNotFound"
	case errors.Is(err, cgroup.ErrUnwritable):
		return "CgroupError"
	}
	return pods.ReasonStartError
}

// launch starts a run of v: its cgroup, its resources (control.Open),
// its outcome file and log, and a detached VM process, whose pid is on
// disk before it runs guest code. On error nothing is left.
func (d *Daemon) launch(v *vm) (_ *instance, err error) {
	p := v.p
	eff := d.effective(v)
	pod, name := p.name(), v.spec.Name
	// What an earlier run left was cleaned up when it ended (ended,
	// endedAway); a stale API socket is reclaimed by control.Open.
	if err := os.MkdirAll(d.podDir+"/"+pod, 0o700); err != nil {
		return nil, err
	}
	d.mu.Lock()
	v.rec.State = pods.VMState{Waiting: &pods.Waiting{Reason: pods.ReasonCreating}}
	v.launching = true
	p.event(name, pods.Normal, "Creating", "creating VM %s", name)
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		v.launching = false
		d.mu.Unlock()
	}()
	// The VM process reports how it ended in a file (not control's pipe),
	// which outlives this daemon. So is the sandbox's report (strict mode
	// makes it anew); a run in another mode must not leave an earlier
	// run's report to be read. Both come before the cgroup, so that a
	// failure here leaves no cgroup behind.
	outf, oerr := os.OpenFile(d.exitPath(pod, name), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if oerr != nil {
		return nil, fmt.Errorf("outcome file: %w", oerr)
	}
	defer outf.Close()
	reportPath := d.reportPath(pod, name)
	if err := os.Remove(reportPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("sandbox report file: %w", err)
	}
	// The cgroup is made while the resources are opened.
	type made struct {
		g   *cgroup.Group
		oom uint64
		err error
	}
	cgc := make(chan made, 1)
	go func() {
		l := v.spec.Resources.Limits
		g, err := d.cg.Create(pod, name, cgroup.Limits{MilliCPU: int64(l.CPU), Memory: int64(l.Memory), Pids: l.Pids})
		m := made{g: g, err: err}
		if err == nil {
			m.oom, _ = g.OOMKills()
		}
		cgc <- m
	}()
	res, err := control.Open(d.ctx, eff, control.Options{StateDir: d.st.Dir(), KVMDevice: d.cfg.KVMDevice, BuiltinKernel: d.cfg.Kernel, Log: d.log, OutcomeFile: outf, SandboxReport: reportPath})
	cg := <-cgc
	if cg.err == nil {
		defer func() {
			if err != nil {
				cg.g.Delete()
			}
		}()
	}
	if err == nil {
		defer func() {
			if err != nil {
				res.Close()
			}
		}()
	}
	switch {
	case cg.err != nil:
		return nil, cg.err
	case err != nil:
		return nil, err
	}
	group, oomBase := cg.g, cg.oom
	if _, err := os.Stat(d.logPath(pod, name)); err == nil {
		os.Rename(d.logPath(pod, name), d.prevLogPath(pod, name))
	}
	logf, err := os.OpenFile(d.logPath(pod, name), os.O_WRONLY|os.O_CREATE|os.O_APPEND|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("log: %w", err)
	}
	defer logf.Close()
	h := res.Handoff
	h.Console = true // the guest's serial console goes to the log (stdin is /dev/null)
	h.Started = time.Now()
	h.LogLevel = "WARN"
	h.RayvmmVersion = d.cfg.Version
	in := &instance{eff: eff, group: group, oomBase: oomBase}
	// v2: the VM process starts in its cgroup; v1: it is moved in.
	cgDir, err := group.OpenDir()
	if err != nil {
		return nil, err
	}
	if cgDir != nil {
		defer cgDir.Close()
	}
	// The VM process is in its cgroup before it is handed anything (v1:
	// moved in by BeforeHandoff); its pid is committed while it builds
	// the VM, and the guest's first instruction waits for that (the gate):
	// a daemon killed before the go leaves a VM process that reads EOF
	// and exits, never an unrecorded guest.
	proc, err := vmproc.Launch(h, res.Files, vmproc.Options{
		Binary: d.cfg.VMBinary, Env: control.PassEnv(), Stdout: logf, Stderr: logf, Detached: true, CgroupDir: cgDir, Gate: true,
		BeforeHandoff: func(pr *vmproc.Process) error {
			if cgDir == nil {
				return group.Add(pr.Pid)
			}
			return nil
		},
	})
	if err != nil {
		return nil, err
	}
	// The run's boot and attach records are committed with its pid,
	// before the go.
	boot, attaches := bootEntries(pod, eff, h.NICs)
	in.attaches = attaches
	d.mu.Lock()
	if rr := v.restartRecorded; rr != nil {
		v.restartRecorded = nil
		d.mu.Unlock()
		<-rr
		d.mu.Lock()
	}
	v.rec.PID, v.rec.StartTime, v.rec.OOMKills = proc.Pid, proc.StartTime, oomBase
	v.rec.Instance++
	ch := p.save()
	d.mu.Unlock()
	err = errors.Join(d.audit(d.ctx, boot...), <-ch)
	if err == nil {
		if err = proc.Go(); err != nil && exitedBeforeGo(proc) {
			// It ended before its go (the sandbox killed it, say): a
			// run that ended, which ended reports (with the sandbox's
			// line) and the restart policy handles.
			err = nil
		}
	}
	if err != nil {
		proc.Signal(syscall.SIGKILL)
		proc.Wait()
		d.mu.Lock()
		v.rec.PID, v.rec.StartTime = 0, 0
		d.mu.Unlock()
		return nil, fmt.Errorf("record the VM process: %w", err)
	}
	if err := res.Detached(); err != nil {
		d.log.Warn("close handed-over descriptors", "pod", pod, "vm", name, "err", err)
	}
	in.pid, in.startTime, in.child, in.done, in.started = proc.Pid, proc.StartTime, proc, proc.Done(), time.Now().UTC()
	in.res = res
	d.mu.Lock()
	d.running(v, in, fmt.Sprintf("started VM %s (pid %d)", name, proc.Pid))
	d.mu.Unlock()
	return in, nil
}

// exitedBeforeGo reports whether a VM process whose go failed (its lifeline is
// closed: it is exiting, or gone) has ended, waiting a bounded time for
// its exit status.
func exitedBeforeGo(proc *vmproc.Process) bool {
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-proc.Done():
		return true
	case <-t.C:
		return false
	}
}

// running records v's process as running. d.mu must be held.
func (d *Daemon) running(v *vm, in *instance, msg string) {
	v.cur = in
	v.rec.State = pods.VMState{Running: &pods.RunningVM{StartedAt: in.started}}
	// Without probes a VM is started and ready once it runs.
	if !v.rec.Started && v.spec.StartupProbe == nil {
		v.rec.Started = true
	}
	if v.rec.Started && v.spec.ReadinessProbe == nil {
		v.rec.Ready = true
	}
	v.p.event(v.spec.Name, pods.Normal, "Started", "%s", msg)
	v.p.save()
}

// startFailed fails the pod: a VM that cannot start (a missing network,
// volume or kernel, an unwritable cgroup) does not start by trying again.
func (d *Daemon) startFailed(v *vm, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	reason := startError(err)
	v.rec.State = pods.VMState{Terminated: &pods.Terminated{Reason: reason, Message: pods.OneLine(err.Error()), FinishedAt: time.Now().UTC()}}
	v.rec.Ready, v.rec.Started = false, false
	v.p.failed(v, reason, err)
}

// failed marks the pod Failed for reason and stops its other VMs. d.mu
// must be held.
func (p *pod) failed(v *vm, reason string, err error) {
	who := ""
	if v != nil {
		who = v.spec.Name
	}
	p.rec.Stopped, p.rec.Reason, p.rec.Message = true, reason, pods.OneLine(err.Error())
	p.event(who, pods.Warning, "Failed", "%v", err)
	for _, o := range p.vms {
		if o.rec.State.Terminated == nil && o.rec.PID == 0 && !o.launching {
			o.rec.State = pods.VMState{Terminated: &pods.Terminated{Reason: reason, Message: "the pod failed to start", FinishedAt: time.Now().UTC()}}
		}
		select {
		case o.kill <- "the pod failed to start":
		default:
		}
	}
	p.save()
}

// terminate stops a run: SIGTERM (the VM process stops the guest and
// flushes its disks), then SIGKILL after the grace period. It returns
// false if the daemon stopped meanwhile.
func (d *Daemon) terminate(v *vm, in *instance, reason string) bool {
	d.mu.Lock()
	grace := v.p.rec.Pod.Spec.GracePeriod()
	if v.p.grace != nil {
		grace = *v.p.grace
	}
	v.p.event(v.spec.Name, pods.Normal, "Killing", "stopping VM %s: %s", v.spec.Name, reason)
	d.mu.Unlock()
	in.signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-in.done:
		return true
	case <-t.C:
	case <-d.ctx.Done():
		return false
	}
	in.signal(syscall.SIGKILL)
	select {
	case <-in.done:
		return true
	case <-d.ctx.Done():
		return false
	}
}

// signal sends sig to the run's process if it is still that process.
func (in *instance) signal(sig syscall.Signal) {
	if in.child != nil {
		in.child.Signal(sig)
		return
	}
	if vmproc.Alive(in.pid, in.startTime) {
		syscall.Kill(in.pid, sig)
	}
}

// ended records how a run ended, cleans up after it and decides on a
// restart; it returns whether v restarts.
func (d *Daemon) ended(v *vm, in *instance, killReason string) bool {
	t := d.exitState(v, in)
	if in.res != nil {
		in.res.CloseReport()
	}
	if killReason != "" {
		t.Message = pods.OneLine(killReason + "; " + t.Message)
	}
	if err := control.Cleanup(d.st.Dir(), in.eff); err != nil {
		d.log.Warn("clean up after VM", "pod", v.p.name(), "vm", v.spec.Name, "err", err)
	}
	// How it ended and the detaches, once its volumes and TAPs are let
	// go, before a restart attaches them again.
	d.audit(context.Background(), endEntries(v.p.name(), in.eff.Name, &t, in.sandboxKill, in.attaches)...)
	if in.group != nil {
		if err := in.group.Delete(); err != nil {
			d.log.Warn("remove cgroup", "pod", v.p.name(), "vm", v.spec.Name, "err", err)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v.cur = nil
	return d.decide(v, t, killReason != "" && killReason != reasonStop)
}

// backoff is Kubernetes' restart back-off, its times scaled: the delay
// before this restart and the one the next waits, given this one's
// (next, from the last restart) and how long the run that ended ran. The
// first restart is at once, then 10 s doubling to 300 s; a run of 10
// minutes resets it.
func backoff(next, ran time.Duration, scale float64) (delay, after time.Duration) {
	s := func(t time.Duration) time.Duration { return time.Duration(float64(t) * scale) }
	if ran >= s(BackoffReset) {
		next = 0
	}
	if next == 0 {
		return 0, s(BackoffInitial)
	}
	return next, min(2*next, s(BackoffMax))
}

// reasonStop is the kill reason of pod stop and rm.
const reasonStop = "the pod is being stopped"

// endedAway handles a VM whose process ended while no daemon watched it:
// its outcome file says how, if it wrote one. It returns whether v
// restarts.
func (d *Daemon) endedAway(v *vm) bool {
	eff := d.effective(v)
	t := pods.Terminated{FinishedAt: time.Now().UTC()}
	d.mu.Lock()
	if r := v.rec.State.Running; r != nil {
		t.StartedAt = r.StartedAt
	}
	pod := v.p.name()
	d.mu.Unlock()
	var sandboxKill error
	if rec := readOutcome(d.exitPath(pod, v.spec.Name)); rec != nil {
		code := rec.Status
		t.ExitCode, t.Message = &code, rec.Reason
		t.Reason = pods.ReasonCompleted
		if code != 0 {
			t.Reason = pods.ReasonError
		}
	} else if k := report.ReadFile(d.reportPath(pod, v.spec.Name)); k != nil {
		sandboxKilled(&t, k)
		t.Reason = pods.ReasonError
		sandboxKill = k
	} else {
		t.Reason = pods.ReasonUnknown
		t.Message = "the VM process ended while the daemon was down and left no outcome (killed by SIGKILL?): its status is lost"
	}
	control.Cleanup(d.st.Dir(), eff)
	if g, err := d.cg.Load(pod, v.spec.Name); err == nil {
		if n, err := g.OOMKills(); err == nil && n > v.rec.OOMKills {
			t.Reason = pods.ReasonOOMKilled
		}
		g.Delete()
	}
	d.audit(context.Background(), endEntries(pod, eff.Name, &t, sandboxKill, control.AttachEntries(eff.Name, eff, nil))...)
	d.mu.Lock()
	defer d.mu.Unlock()
	v.p.event(v.spec.Name, pods.Warning, "ExitedWhileAway", "VM %s ended while the daemon was down: %s", v.spec.Name, describe(&t))
	return d.decide(v, t, false)
}

// exitState is how a run ended: from the wait status for the daemon's
// own child, else from the outcome file or the sandbox's report file;
// its reason is the message.
func (d *Daemon) exitState(v *vm, in *instance) pods.Terminated {
	t := pods.Terminated{StartedAt: in.started, FinishedAt: time.Now().UTC()}
	rec := readOutcome(d.exitPath(v.p.name(), v.spec.Name))
	switch {
	case in.child != nil:
		st, _ := in.child.Wait()
		ws, _ := st.Sys().(syscall.WaitStatus)
		if ws.Signaled() {
			code := 128 + int(ws.Signal())
			t.ExitCode, t.Signal = &code, int(ws.Signal())
			t.Message = fmt.Sprintf("killed by signal %d (%v)", int(ws.Signal()), ws.Signal())
			if in.res != nil {
				if kerr := in.res.SandboxKill(st); kerr != nil {
					// "VM process killed by the sandbox (SIGSYS): syscall 59 (execve)"
					t.Message, in.sandboxKill = kerr.Error(), kerr
				}
			}
		} else {
			code := ws.ExitStatus()
			t.ExitCode = &code
		}
	case rec != nil:
		code := rec.Status
		t.ExitCode = &code
	default:
		// Not this daemon's child (it re-adopted the VM process) and no
		// outcome: the sandbox's report file tells whether it killed it.
		if k := report.ReadFile(d.reportPath(v.p.name(), v.spec.Name)); k != nil {
			sandboxKilled(&t, k)
			in.sandboxKill = k
		}
	}
	if rec != nil && rec.Reason != "" && t.Message == "" {
		t.Message = rec.Reason
	}
	switch {
	case t.ExitCode == nil:
		t.Reason = pods.ReasonUnknown
		t.Message = "the VM process was not this daemon's child and left no outcome (killed by SIGKILL?): its status is lost"
	case *t.ExitCode == 0:
		t.Reason = pods.ReasonCompleted
	default:
		t.Reason = pods.ReasonError
	}
	if in.group != nil {
		if n, err := in.group.OOMKills(); err == nil && n > in.oomBase {
			t.Reason = pods.ReasonOOMKilled
		}
	}
	return t
}

// sandboxKilled fills in a run the sandbox ended, known from its report
// file rather than a wait status: death by SIGSYS, as the handler dies.
func sandboxKilled(t *pods.Terminated, k *report.KilledError) {
	code := 128 + int(syscall.SIGSYS)
	t.ExitCode, t.Signal, t.Message = &code, int(syscall.SIGSYS), k.Error()
}

// readOutcome reads the outcome a VM process wrote to its file as it
// exited; nil when it wrote none (it was killed by SIGKILL, or never ran).
func readOutcome(path string) *vmproc.Outcome {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	o, err := vmproc.ReadOutcome(f)
	if err != nil {
		return nil
	}
	return o
}

func describe(t *pods.Terminated) string {
	s := t.Reason
	if t.ExitCode != nil {
		s += fmt.Sprintf(", exit code %d", *t.ExitCode)
	}
	if t.Message != "" {
		s += ": " + t.Message
	}
	return s
}

// decide records run end t and applies the restart policy with
// back-off; byProbe: a failed liveness or startup probe ended it, which
// restarts under OnFailure whatever the status (as in Kubernetes). It
// returns whether v restarts. d.mu must be held.
func (d *Daemon) decide(v *vm, t pods.Terminated, byProbe bool) bool {
	p := v.p
	v.rec.PID, v.rec.StartTime = 0, 0
	v.rec.Ready, v.rec.Started = false, false
	term := pods.VMState{Terminated: &t}
	v.rec.LastState = term
	typ := pods.Normal
	if !t.Succeeded() {
		typ = pods.Warning
	}
	p.event(v.spec.Name, typ, "Terminated", "VM %s ended: %s", v.spec.Name, describe(&t))
	restart := false
	switch p.rec.Pod.Spec.RestartPolicy {
	case pods.RestartAlways:
		restart = true
	case pods.RestartOnFailure:
		restart = !t.Succeeded() || byProbe
	}
	// A daemon that is stopping still records the restart: the next one
	// carries it out.
	if p.stopping || p.rec.Stopped {
		restart = false
	}
	if !restart {
		v.rec.State = term
		p.save()
		return false
	}
	ran := time.Duration(0)
	if !t.StartedAt.IsZero() {
		ran = t.FinishedAt.Sub(t.StartedAt)
	}
	var delay time.Duration
	delay, v.rec.Backoff = backoff(v.rec.Backoff, ran, d.cfg.BackoffScale)
	v.rec.NextStart = time.Now().Add(delay).UTC()
	v.rec.RestartCount++
	if delay > 0 {
		msg := fmt.Sprintf("back-off %v restarting failed VM %s", delay.Round(time.Millisecond), v.spec.Name)
		v.rec.State = pods.VMState{Waiting: &pods.Waiting{Reason: pods.ReasonCrashLoopBackOff, Message: msg}}
		p.event(v.spec.Name, pods.Warning, "BackOff", "%s", msg)
	} else {
		v.rec.State = pods.VMState{Waiting: &pods.Waiting{Reason: pods.ReasonCreating}}
	}
	p.event(v.spec.Name, pods.Normal, "Restarting", "restarting VM %s (restart %d, after %v)", v.spec.Name, v.rec.RestartCount, delay.Round(time.Millisecond))
	d.wg.Add(1)
	recorded := make(chan struct{})
	v.restartRecorded = recorded
	go func(ctx context.Context, e Entry) {
		defer d.wg.Done()
		defer close(recorded)
		d.audit(ctx, e)
	}(context.Background(), Entry{Action: AuditPodRestart, Object: Object{Kind: "pod", Name: p.name()},
		Params: map[string]string{"vm": pods.VMName(v.p.name(), v.spec.Name), "reason": describe(&t), "restart": fmt.Sprint(v.rec.RestartCount), "backoff": delay.String()}})
	p.save()
	return true
}
