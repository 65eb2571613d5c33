package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/pods/daemon"
)

// auditor records the daemon's entries (daemon.Auditor) in the audit log
// of its state directory: pod actions, access decisions and the daemon's
// own start, stop and reload, each with the caller the kernel named
// (SO_PEERCRED) as its actor, or the daemon for what it does itself
// (restarts, probe failures). The log group-commits concurrent appends:
// one write and one fdatasync for all the records waiting.
type auditor struct{ l *audit.Log }

func openAuditor(stateDir string) (*auditor, error) {
	l, err := audit.Open(audit.Config{Dir: audit.Dir(stateDir), KeyDir: audit.KeyDir(stateDir)})
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	return &auditor{l: l}, nil
}

// Record appends es, in order; the records are on disk when it returns.
func (a *auditor) Record(ctx context.Context, es ...daemon.Entry) error {
	aes := make([]audit.Entry, len(es))
	for i, e := range es {
		aes[i] = entry(e)
	}
	_, err := a.l.Append(context.WithoutCancel(ctx), aes...)
	return err
}

// entry is the audit log's record of e.
func entry(e daemon.Entry) audit.Entry {
	ae := audit.Entry{
		Action: e.Action,
		Object: audit.Object{Kind: e.Object.Kind, Name: e.Object.Name},
		Params: audit.Params(e.Params),
		Err:    e.Err,
	}
	switch e.Decision {
	case "allow":
		ae.Decision = audit.Allow
	case "deny":
		ae.Decision, ae.Level = audit.Deny, audit.Warning
	}
	switch e.Action {
	case audit.PodProbeFailure:
		ae.Level = audit.Warning
	case audit.VMSandboxKill:
		ae.Level = audit.Critical
	}
	if c := e.Caller; c != nil {
		ae.Actor = &audit.Actor{UID: c.UID, GID: c.GID, PID: uint32(c.PID), Command: commandOf(c.PID)}
	}
	return ae
}

// Close seals what the daemon recorded.
func (a *auditor) Close() error { return a.l.Close() }

// commandOf is a caller's command line, as /proc shows it while it is
// connected (best effort: "" once it is gone).
func commandOf(pid int32) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
}
