package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync/atomic"

	"github.com/rayvmm/rayvmm/pods/daemon"
	"github.com/rayvmm/rayvmm/seccap/policy"
)

// DefaultPolicy is the access policy file the daemon reads unless
// --policy names another.
const DefaultPolicy = "/etc/rayvmm/policy.yaml"

// authorizer decides the daemon's requests with the access policy
// (seccap/policy): the caller the kernel named (SO_PEERCRED and
// SO_PEERGROUPS), with the names the system's user database gives its
// ids. A pod's VMs attach and join at the clearance of its owner, who is
// the caller of its apply.
//
// Without a policy file (no --policy and no default file) the policy in
// force is the empty one: root may do everything and everyone else
// nothing (the policy's default deny), and every decision is still
// recorded. Reload (SIGHUP) reads the file again and swaps it in only
// once all of it parsed.
type authorizer struct {
	path  string
	given bool // --policy was given: the file must exist
	cur   atomic.Pointer[loaded]
}

// loaded is a policy in force and where it came from.
type loaded struct {
	p      *policy.Policy
	noFile bool // the empty policy: the default file does not exist
}

// openPolicy reads the policy file. A file named by --policy must exist
// and parse, and so must the default file if it exists: the daemon
// refuses to start otherwise.
func openPolicy(path string, given bool) (*authorizer, error) {
	a := &authorizer{path: path, given: given}
	l, err := a.load()
	if err != nil {
		return nil, fmt.Errorf("--policy: %w", err)
	}
	a.cur.Store(l)
	return a, nil
}

func (a *authorizer) load() (*loaded, error) {
	if !a.given {
		if _, err := os.Stat(a.path); errors.Is(err, os.ErrNotExist) {
			return &loaded{p: &policy.Policy{}, noFile: true}, nil
		}
	}
	p, err := policy.Load(a.path)
	if err != nil {
		return nil, err
	}
	return &loaded{p: p}, nil
}

// Reload reads the policy file again. A file that does not parse leaves
// the policy in force unchanged, and the error says so.
func (a *authorizer) Reload() error {
	l, err := a.load()
	if err != nil {
		return fmt.Errorf("policy reload: %w; the policy in force is unchanged", err)
	}
	a.cur.Store(l)
	return nil
}

// Describe names the policy in force, for the daemon's log lines.
func (a *authorizer) Describe() string {
	l := a.cur.Load()
	if l.noFile {
		return fmt.Sprintf("no policy file (%s does not exist): root may do everything, others nothing", a.path)
	}
	return fmt.Sprintf("policy %s: %d rules", a.path, len(l.p.Rules))
}

// Decide implements daemon.Authorizer.
func (a *authorizer) Decide(c daemon.Caller, action string, o daemon.Object) (daemon.Decision, error) {
	act, err := policy.ParseAction(action)
	if err != nil {
		return daemon.Decision{}, err
	}
	kind, err := policy.ParseKind(o.Kind)
	if err != nil {
		return daemon.Decision{}, err
	}
	l := a.cur.Load()
	sub := policy.Caller{PID: c.PID, UID: c.UID, GID: c.GID, Groups: c.Groups}.Subject()
	d, err := l.p.Decide(sub, act, policy.Object{Kind: kind, Name: o.Name, Labels: o.Labels})
	if err != nil {
		return daemon.Decision{}, err
	}
	reason := d.String()
	if l.noFile && d.By == policy.ByDefault {
		reason += fmt.Sprintf(" (the daemon has no policy: %s does not exist; see --policy)", a.path)
	}
	params := map[string]string{
		"rule":          decidedBy(d),
		"subject_level": d.Clearance.String(),
		"object_level":  d.Classification.String(),
	}
	if d.By == policy.ByRoot {
		// Root is exempt from the levels and has no clearance: a level
		// recorded for it would read as a cross-level attach in audit
		// report.
		delete(params, "subject_level")
	}
	return daemon.Decision{Allow: d.Allow, Reason: reason, Params: params}, nil
}

// decidedBy names what made a decision, shortly, for the audit record's
// rule parameter (the full line is in the 403).
func decidedBy(d policy.Decision) string {
	switch d.By {
	case policy.ByRoot:
		return "root"
	case policy.ByLevel:
		return "level check " + strconv.Quote(d.Check)
	case policy.ByRule:
		return fmt.Sprintf("rule %q (rules[%d])", d.Rule.Name, d.Rule.Index)
	}
	return "default deny"
}
