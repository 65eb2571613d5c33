package control

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/vmproc"
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
}

// Foreground runs the VM process for r as rayvmm boot does: its console is
// this process's stdin and stdout, SIGINT, SIGTERM and SIGHUP are passed on
// to it, and it cannot outlive this process (see package vmproc). It
// returns the VM process's exit status; the VM process reports how the VM
// ended itself, on stderr. A VM process killed by a signal is an error
// wrapping vmproc.ErrKilled, and the terminal is restored for it. r is closed
// once the VM process is gone.
func Foreground(r *Resources, o ForegroundOptions) (code int, err error) {
	defer func() {
		if cerr := r.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
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

	p, err := vmproc.Launch(h, r.Files, vmproc.Options{
		Binary: o.Binary, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr,
		Env: passEnv(),
	})
	if err != nil {
		return 1, err
	}
	r.Launched()
	for {
		select {
		case s := <-sigs:
			p.Signal(s)
			continue
		case <-p.Done():
		}
		break
	}
	st, err := p.Wait()
	if err != nil {
		return 1, fmt.Errorf("wait for VM process: %w", err)
	}
	if kerr := vmproc.KilledError(st); kerr != nil {
		if tty != nil {
			unix.IoctlSetTermios(int(os.Stdin.Fd()), unix.TCSETS, tty)
		}
		return 1, kerr
	}
	return st.ExitCode(), nil
}

// passEnv is the environment the VM process keeps: nothing but what the
// Go runtime reads.
func passEnv() []string {
	var env []string
	for _, k := range []string{"GODEBUG", "GOTRACEBACK", "GOMAXPROCS", "GOGC", "GOMEMLIMIT"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	return env
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
