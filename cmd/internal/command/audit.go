package command

import (
	"context"
	"fmt"
	"sync"

	"github.com/rayvmm/rayvmm/audit"
)

// AuditLog is a command's audit log in the state directory *StateDir (a
// flag's variable, read when the log is first used): opened on first
// use, sealed and closed by Close at the command's clean stop. rayvmm
// and rayvmmd record their state-changing commands with it, the same way.
type AuditLog struct {
	StateDir *string

	once sync.Once
	l    *audit.Log
	err  error
}

// Open opens the log once and returns it.
func (a *AuditLog) Open() (*audit.Log, error) {
	a.once.Do(func() {
		a.l, a.err = audit.Open(audit.Config{Dir: audit.Dir(*a.StateDir), KeyDir: audit.KeyDir(*a.StateDir)})
	})
	if a.err != nil {
		return nil, fmt.Errorf("audit log: %w", a.err)
	}
	return a.l, nil
}

// Close seals what this process recorded and is not sealed yet.
func (a *AuditLog) Close() error {
	if a.l == nil {
		return nil
	}
	if err := a.l.Close(); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	return nil
}

// Action runs fn, the action a command exists for, and records it with
// its result, also when ctx was cancelled during fn. The record is on
// disk, sealed (a command stops right after), before Action returns, so
// before the command reports success. The log is opened before fn runs:
// a log that cannot be opened stops the action.
func (a *AuditLog) Action(ctx context.Context, action string, obj audit.Object, params audit.Params, fn func() error) error {
	l, err := a.Open()
	if err != nil {
		return err
	}
	ferr := fn()
	if _, err := l.AppendSealed(context.WithoutCancel(ctx), audit.Entry{Action: action, Object: obj, Params: params, Err: ferr}); err != nil {
		if ferr != nil {
			return fmt.Errorf("%w (not recorded in the audit log: %v)", ferr, err)
		}
		return fmt.Errorf("%s %s done, but not recorded in the audit log: %w", action, obj, err)
	}
	return ferr
}

// VolumeObj is volume NAME, as the audit log names it.
func VolumeObj(name string) audit.Object { return audit.Object{Kind: audit.KindVolume, Name: name} }
