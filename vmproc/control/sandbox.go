package control

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rayvmm/rayvmm/seccap"
	"github.com/rayvmm/rayvmm/seccap/report"
	"github.com/rayvmm/rayvmm/spec"
)

// SandboxMode is the sandbox mode s runs with: its own, or strict where
// the kernel has seccomp filters (else off).
func SandboxMode(s *spec.VM) seccap.Mode {
	if s.Sandbox.Mode != "" {
		return seccap.Mode(s.Sandbox.Mode)
	}
	return seccap.DefaultMode()
}

// ErrSandbox is the category of a sandbox the host cannot give.
var ErrSandbox = errors.New("sandbox")

// openSandbox prepares the VM process's sandbox for the effective spec:
// the SIGSYS report pipe of strict mode (its write end handed over), the
// directory of the vsock device's <uds>_<PORT> sockets as the one place it
// may connect to, and the jail (made here, removed once the VM is gone).
// reportPath, if set, is the file the SIGSYS report goes to instead of a
// pipe (Options.SandboxReport).
func (r *Resources) openSandbox(eff *spec.VM, reportPath string) error {
	mode := SandboxMode(eff)
	eff.Sandbox.Mode = string(mode)
	if mode == seccap.ModeOff {
		return nil
	}
	if err := seccap.Supported(); err != nil {
		return fmt.Errorf("%w: mode %s: %w (--sandbox off runs without it)", ErrSandbox, mode, err)
	}
	c := &seccap.Config{Mode: mode, ReportFD: -1}
	var binds []seccap.Bind
	if eff.Vsock != nil {
		dir := filepath.Dir(eff.Vsock.UDS)
		c.DialUnix = []string{dir}
		c.Vsock = true
		binds = append(binds, seccap.Bind{Path: dir, ReadOnly: true})
	}
	if mode == seccap.ModeStrict {
		newReport := report.NewPipe
		if reportPath != "" {
			newReport = func() (*report.Pipe, error) { return report.NewFile(reportPath) }
		}
		rp, err := newReport()
		if err != nil {
			return err
		}
		r.report = rp
		r.handedOver = append(r.handedOver, rp.Launched)
		r.afterExit = append(r.afterExit, rp.Close)
		c.ReportFD = r.Files.Add(rp.Writer())
	}
	if j := eff.Sandbox.Jail; j != nil {
		if os.Geteuid() != 0 {
			return fmt.Errorf("%w: jail: needs root (it makes namespaces, mounts and changes the uid)", ErrSandbox)
		}
		jail, err := seccap.PrepareJail(j.Dir, eff.Name, j.UID, j.GID, binds)
		if err != nil {
			return fmt.Errorf("sandbox.jail: %w", err)
		}
		r.afterExit = append(r.afterExit, jail.Remove)
		c.Jail = jail
	}
	r.Handoff.Sandbox = c
	return nil
}
