package control

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/seccap/forbidden"
	"github.com/rayvmm/rayvmm/vmproc"
	"github.com/rayvmm/rayvmm/vmproc/spawn"
)

// ForegroundOptions are Foreground's settings.
type ForegroundOptions struct {
	// Binary is rayvmm-vm's path ("" finds it, see vmproc.FindBinary).
	Binary string
	// Started is when this process started; the boot timer measures from
	// it.
	Started   time.Time
	BootTimer bool
	LogLevel  string
	Version   string
	// Audit records the boot, before the guest runs, and how it ended
	// (nil: nothing is recorded).
	Audit *BootAudit
	// Ahead is a VM process started before the VM was known (see package
	// spawn), to hand the VM to; nil starts one. One whose sandbox
	// preparation does not fit the VM's is discarded, and another one
	// started.
	Ahead *spawn.Child
}

// Foreground runs the VM process for r as rayvmm boot does: its console is
// this process's stdin and stdout, SIGINT, SIGTERM and SIGHUP are passed on
// to it, and it cannot outlive this process (see package vmproc). It
// returns the VM process's exit status; the VM process reports how the VM
// ended itself, on stderr. A VM process killed by a signal is an error
// wrapping vmproc.ErrKilled, and the terminal is restored for it. r is closed
// once the VM process is gone, and then the end is recorded (o.Audit).
func Foreground(ctx context.Context, r *Resources, o ForegroundOptions) (code int, err error) {
	var e ending
	code, err = foreground(ctx, r, o, &e)
	if cerr := r.Close(); cerr != nil && err == nil {
		err = cerr
	}
	if o.Audit != nil {
		e.code, e.err = code, err
		if aerr := o.Audit.end(ctx, e); aerr != nil && err == nil {
			code, err = 1, aerr
		}
	}
	return code, err
}

func foreground(ctx context.Context, r *Resources, o ForegroundOptions, e *ending) (int, error) {
	h := r.Handoff
	h.Console = true
	h.Started = o.Started
	h.CPUBefore = cpuTime()
	h.BootTimer = o.BootTimer
	h.LogLevel = o.LogLevel
	h.RayvmmVersion = o.Version

	// The terminal as it is now, to restore should the VM process die
	// without restoring it itself.
	tty, _ := unix.IoctlGetTermios(int(os.Stdin.Fd()), unix.TCGETS)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)

	var p *vmproc.Process
	err := vmproc.ErrUnfit
	if o.Ahead != nil {
		if p, err = vmproc.Hand(o.Ahead, h, r.Files, o.Audit != nil); errors.Is(err, vmproc.ErrUnfit) {
			o.Ahead.Discard()
		}
	}
	if errors.Is(err, vmproc.ErrUnfit) {
		p, err = vmproc.Launch(h, r.Files, vmproc.Options{
			Binary: o.Binary, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr,
			Env: PassEnv(), Gate: o.Audit != nil,
		})
	}
	if err != nil {
		return 1, err
	}
	r.Launched()
	// The boot record is written while the VM process builds the VM; the
	// guest runs once it is on disk.
	booted := make(chan error, 1)
	if o.Audit != nil {
		go func() { booted <- o.Audit.boot(ctx, r) }()
	}
	var auditErr error
	for waiting := o.Audit != nil; ; {
		select {
		case s := <-sigs:
			p.Signal(s)
			continue
		case err := <-booted:
			waiting = false
			if err != nil {
				auditErr = err
				p.CutLifeline() // the VM process stops before the guest runs
			} else {
				p.Go() // an error: it is gone already, and Wait says how
			}
			continue
		case <-p.Done():
		}
		if waiting {
			auditErr = <-booted
		}
		break
	}
	st, err := p.Wait()
	if err != nil {
		return 1, fmt.Errorf("wait for VM process: %w", err)
	}
	if e.sandboxKill = r.SandboxKill(st); e.sandboxKill != nil {
		if tty != nil {
			unix.IoctlSetTermios(int(os.Stdin.Fd()), unix.TCSETS, tty)
		}
		return 1, e.sandboxKill
	}
	if e.killed = vmproc.KilledError(st); e.killed != nil {
		if tty != nil {
			unix.IoctlSetTermios(int(os.Stdin.Fd()), unix.TCSETS, tty)
		}
		return 1, e.killed
	}
	e.outcome, err = r.Outcome()
	if auditErr != nil {
		return 1, auditErr
	}
	if err != nil {
		return 1, err
	}
	return st.ExitCode(), nil
}

// PassEnv is the environment a VM process keeps: nothing but what the
// Go runtime reads, and the sandbox tests' request (forbidden.Env: a
// seccaptest build of rayvmm-vm makes the forbidden call it names; other
// builds ignore it).
func PassEnv() []string { return spawn.PassEnv(forbidden.Env) }

func cpuTime() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
