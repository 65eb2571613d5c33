package daemon

import (
	"context"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/vmm/api/client"
	"github.com/rayvmm/rayvmm/vmproc"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// adopt takes over a VM process an earlier daemon started, found by the
// pid and process start time in its record; its API socket must answer
// as that VM. It returns nil when that process is gone.
func (d *Daemon) adopt(v *vm) *instance {
	d.mu.Lock()
	pid, st := v.rec.PID, v.rec.StartTime
	started := time.Now().UTC()
	if r := v.rec.State.Running; r != nil {
		started = r.StartedAt
	}
	oom := v.rec.OOMKills
	pod := v.p.name()
	d.mu.Unlock()
	if !vmproc.Alive(pid, st) {
		return nil
	}
	done, err := watchExit(pid, st)
	if err != nil {
		d.log.Warn("watch VM process", "pod", pod, "vm", v.spec.Name, "pid", pid, "err", err)
		return nil
	}
	eff := d.effective(v)
	in := &instance{pid: pid, startTime: st, done: done, started: started, eff: eff, oomBase: oom,
		attaches: control.AttachEntries(eff.Name, eff, nil)}
	if g, err := d.cg.Load(pod, v.spec.Name); err == nil {
		in.group = g
	}
	msg := fmt.Sprintf("adopted VM %s (pid %d)", v.spec.Name, pid)
	ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
	defer cancel()
	c := client.New(eff.APISocket)
	info, err := c.Info(ctx)
	c.Close()
	switch {
	case err != nil:
		msg += fmt.Sprintf("; its API does not answer (%v)", err)
	case info.ID != eff.Name:
		msg += fmt.Sprintf("; its API answers as %q, not %q", info.ID, eff.Name)
	default:
		msg += "; API state " + info.State
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v.cur = in
	v.rec.State = pods.VMState{Running: &pods.RunningVM{StartedAt: started}}
	v.p.event(v.spec.Name, pods.Normal, "Adopted", "%s", msg)
	v.p.save()
	return in
}

// watchExit returns a channel closed when process pid (started at
// startTime) exits, for a process that is not this one's child: a pidfd
// polled for readability.
func watchExit(pid int, startTime uint64) (<-chan struct{}, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	// The pid might have been reused between the check and the open.
	if !vmproc.Alive(pid, startTime) {
		unix.Close(fd)
		return nil, fmt.Errorf("process %d is gone", pid)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, -1)
			if err == unix.EINTR {
				continue
			}
			if err != nil || n > 0 {
				return
			}
		}
	}()
	return done, nil
}
