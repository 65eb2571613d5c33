package vmm

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// pauser parks the vCPUs: a paused VM runs no guest instruction. Pause
// sets the flag and kicks every vCPU out of KVM_RUN (immediate_exit and a
// signal); each vCPU thread, seeing the flag at the top of its loop, parks
// on the condition until Resume (or the VM stopping) wakes it. Pause
// returns once every running vCPU is parked.
type pauser struct {
	mu     sync.Mutex
	cond   *sync.Cond
	paused bool        // requested
	flag   atomic.Bool // paused, for the vCPU loop's lock-free check
	parked int         // vCPU threads waiting in park
	since  time.Time
}

func (p *pauser) init() { p.cond = sync.NewCond(&p.mu) }

// State is the VM's run state as the API reports it.
type State string

// States.
const (
	StateNotStarted State = "Not started"
	StateRunning    State = "Running"
	StatePaused     State = "Paused"
	StateStopped    State = "Stopped"
)

// State reports whether the VM runs, is paused or has stopped.
func (v *VM) State() State {
	select {
	case <-v.done:
		return StateStopped
	default:
	}
	v.pause.mu.Lock()
	defer v.pause.mu.Unlock()
	switch {
	case v.pause.paused:
		return StatePaused
	case v.started.IsZero():
		return StateNotStarted
	}
	return StateRunning
}

// ErrStopped is returned by Pause and Resume once the VM has stopped.
var ErrStopped = fmt.Errorf("the VM has stopped")

// Pause stops every vCPU and returns once none runs guest code. Pausing a
// paused VM does nothing. A VM paused before Run starts with its vCPUs
// parked.
func (v *VM) Pause(ctx context.Context) error {
	p := &v.pause
	p.mu.Lock()
	if !p.paused {
		p.paused = true
		p.flag.Store(true)
		p.since = time.Now()
	}
	p.mu.Unlock()
	for _, c := range v.vcpuList() {
		c.kick()
	}
	// Wait for every vCPU thread that runs to park. The condition is
	// broadcast by parking threads and when the VM stops; a context
	// deadline is turned into a broadcast too.
	stop := context.AfterFunc(ctx, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.parked < v.runningVCPUs() {
		if v.stopping.Load() {
			return ErrStopped
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("pause: %d of %d vCPUs parked: %w", p.parked, v.runningVCPUs(), err)
		}
		p.cond.Wait()
	}
	return nil
}

// Resume lets parked vCPUs run again. Resuming a running VM does nothing.
func (v *VM) Resume() error {
	if v.stopping.Load() {
		return ErrStopped
	}
	p := &v.pause
	p.mu.Lock()
	p.paused = false
	p.flag.Store(false)
	p.cond.Broadcast()
	p.mu.Unlock()
	return nil
}

// park holds vCPU c while the VM is paused. It clears the vCPU's
// immediate_exit under the lock before it returns, so a Pause that comes
// after is never lost (Pause sets the flag under the same lock, then kicks).
func (c *vcpu) park() {
	v := c.vm
	p := &v.pause
	p.mu.Lock()
	p.parked++
	p.cond.Broadcast()
	for p.paused && !v.stopping.Load() {
		p.cond.Wait()
	}
	p.parked--
	c.cpu.SetImmediateExit(false)
	p.mu.Unlock()
}

// pausing reports whether a pause was asked for.
func (v *VM) pausing() bool { return v.pause.flag.Load() }

// wakeParked wakes parked vCPUs and waiting Pause calls when the VM stops.
func (v *VM) wakeParked() {
	v.pause.mu.Lock()
	v.pause.cond.Broadcast()
	v.pause.mu.Unlock()
}

// vcpuList is the vCPUs Run made so far.
func (v *VM) vcpuList() []*vcpu {
	v.vcpuMu.Lock()
	defer v.vcpuMu.Unlock()
	return append([]*vcpu(nil), v.vcpus...)
}

// runningVCPUs is how many vCPU threads run their loop (and so must park).
// Called with pause.mu held.
func (v *VM) runningVCPUs() int { return int(v.inLoop.Load()) }
