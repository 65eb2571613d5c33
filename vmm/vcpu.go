package vmm

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/vmm/boot"
	"github.com/rayvmm/rayvmm/vmm/cpuid"
	"github.com/rayvmm/rayvmm/vmm/kvm"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

type vcpu struct {
	vm    *VM
	id    int
	cpu   *kvm.VCPU
	exits [numExitKinds]atomic.Uint64

	mu  sync.Mutex // guards tid against a kick racing the thread's exit
	tid int
}

// kick makes the vCPU leave KVM_RUN and see that the VM is stopping:
// immediate_exit covers a vCPU about to enter, the signal one inside.
func (c *vcpu) kick() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cpu == nil || c.tid == 0 {
		return
	}
	c.cpu.SetImmediateExit(true)
	// SIGURG: the Go runtime already handles it (async preemption) and
	// it interrupts KVM_RUN with EINTR.
	unix.Tgkill(unix.Getpid(), c.tid, unix.SIGURG)
}

// loop runs on its own locked OS thread: create and set up the vCPU, report
// on ready, wait for start, then run until the VM stops.
func (c *vcpu) loop(ready chan<- error, start <-chan struct{}) {
	runtime.LockOSThread()
	// The thread stays locked: when this goroutine ends the runtime
	// discards it, so no other goroutine ever inherits its signal state.
	err := c.setup()
	if err == nil && c.vm.cfg.VCPUThread != nil {
		if err = c.vm.cfg.VCPUThread(c.id, c.cpu.FD(), c.vm.vm.FD()); err != nil {
			err = fmt.Errorf("vcpu %d: %w", c.id, err)
		}
	}
	c.mu.Lock()
	c.tid = unix.Gettid()
	c.mu.Unlock()
	ready <- err
	<-start
	if err != nil || c.vm.stopping.Load() {
		c.exitThread()
		return
	}
	c.run()
	c.exitThread()
}

func (c *vcpu) exitThread() {
	c.mu.Lock()
	c.tid = 0
	c.mu.Unlock()
}

func (c *vcpu) setup() error {
	v := c.vm
	cpu, err := v.vm.CreateVCPU(c.id)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.cpu = cpu
	c.mu.Unlock()
	tsc, err := cpu.TSCKHz()
	if err != nil {
		tsc = 0 // the guest calibrates against the PIT instead
	}
	if err := cpu.SetCPUID(cpuid.Apply(v.cpuid, v.template, cpuid.Topology{CPU: c.id, CPUs: v.cfg.CPUs, TSCKHz: tsc})); err != nil {
		return err
	}
	if c.id != 0 {
		// APs wait in KVM_MP_STATE_UNINITIALIZED for INIT/SIPI from the
		// guest, which is KVM's default with an in-kernel LAPIC.
		return nil
	}
	if err := cpu.SetMSRs([]kvm.MSR{{Index: 0x1a0, Data: 1}}); err != nil { // IA32_MISC_ENABLE: fast strings
		return err
	}
	sregs, err := cpu.Sregs()
	if err != nil {
		return err
	}
	boot.LongModeSregs(sregs)
	if err := cpu.SetSregs(sregs); err != nil {
		return err
	}
	return cpu.SetRegs(boot.EntryRegs(v.kernel.Entry))
}

func (c *vcpu) run() {
	v := c.vm
	cpu := c.cpu
	v.inLoop.Add(1)
	defer func() {
		v.inLoop.Add(-1)
		v.wakeParked() // a Pause waiting for this vCPU to park
	}()
	for !v.stopping.Load() {
		if v.pausing() {
			c.park()
			continue
		}
		if c.id == 0 {
			v.firstRun.Do(func() {
				v.btMu.Lock()
				defer v.btMu.Unlock()
				v.bootTimes.FirstRunWall = timeSince(v.cfg.Started)
				v.bootTimes.FirstRunCPUSelf = cpuTime()
				v.bootTimes.FirstRunCPU = v.cfg.CPUBefore + v.bootTimes.FirstRunCPUSelf
			})
		}
		err := cpu.Run()
		switch {
		case err == nil:
		case errors.Is(err, unix.EINTR):
			c.count(exitKick) // a kick or the Go runtime's preemption signal
			continue
		case errors.Is(err, unix.EAGAIN):
			continue // an AP received INIT
		default:
			v.finish(&Exit{Reason: ExitHostError, VCPU: c.id, Detail: fmt.Sprintf("KVM_RUN: %v", err)})
			return
		}
		if e := c.handleExit(); e != nil {
			v.finish(e)
			return
		}
	}
}

// handleExit services one exit; a non-nil Exit ends the VM.
func (c *vcpu) handleExit() *Exit {
	v, cpu := c.vm, c.cpu
	r := cpu.ExitReason()
	c.count(exitKindOf(r))
	switch r {
	case kvm.ExitIO:
		io, err := cpu.IO()
		if err != nil {
			return c.fault(ExitHostError, err.Error())
		}
		for i := 0; i < io.Count; i++ {
			d := io.Data[i*io.Size : (i+1)*io.Size]
			if io.Out {
				v.pio.Write(uint64(io.Port), d)
			} else {
				v.pio.Read(uint64(io.Port), d)
			}
		}
	case kvm.ExitMMIO:
		m, err := cpu.MMIO()
		if err != nil {
			return c.fault(ExitHostError, err.Error())
		}
		if m.Write {
			v.mmio.Write(m.Addr, m.Data)
		} else {
			v.mmio.Read(m.Addr, m.Data)
		}
	case kvm.ExitIntr, kvm.ExitHLT, kvm.ExitIRQWindowOpen:
	case kvm.ExitShutdown:
		return c.fault(ExitShutdown, "")
	case kvm.ExitInternalError:
		sub, data, insn := cpu.InternalError()
		e := c.fault(ExitInternalError, fmt.Sprintf("suberror %d, data %#x", sub, data))
		if sub == kvm.InternalErrorEmulation {
			e.Reason = ExitEmulationFailure
			e.Detail = ""
		}
		if len(insn) > 0 {
			e.Insn = insn
		}
		return e
	case kvm.ExitFailEntry:
		return c.fault(ExitFailEntry, fmt.Sprintf("hardware entry failure reason %#x", cpu.FailEntry()))
	case kvm.ExitSystemEvent:
		switch cpu.SystemEvent() {
		case kvm.SystemEventShutdown, kvm.SystemEventReset:
			return &Exit{Reason: ExitPoweroff, VCPU: c.id}
		default:
			return c.fault(ExitCrash, fmt.Sprintf("system event %d", cpu.SystemEvent()))
		}
	default:
		return c.fault(ExitHostError, fmt.Sprintf("unexpected KVM exit reason %d", r))
	}
	return nil
}

// fault builds an Exit with the vCPU's RIP and the bytes there.
func (c *vcpu) fault(r ExitReason, detail string) *Exit {
	e := &Exit{Reason: r, VCPU: c.id, Detail: detail}
	regs, err := c.cpu.Regs()
	if err != nil {
		return e
	}
	e.RIP = regs.RIP
	sregs, err := c.cpu.Sregs()
	if err != nil {
		return e
	}
	va := regs.RIP
	if sregs.CR0&boot.CR0PE == 0 || sregs.CS.L == 0 {
		va += sregs.CS.Base
	}
	gpa, ok, err := c.cpu.Translate(va)
	if err != nil || !ok {
		return e
	}
	for n := uint64(15); n > 0; n-- {
		if b, err := c.vm.mem.Slice(memory.GuestAddr(gpa), n); err == nil {
			e.Insn = append([]byte(nil), b...)
			break
		}
	}
	return e
}
