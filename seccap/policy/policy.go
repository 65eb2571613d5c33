// Package policy is the rayvmm daemon's access policy: who may do what to
// which volume, network or pod, with mandatory security levels on top.
//
// A policy file (YAML; see Parse and README.md) gives subjects, users and
// groups, a clearance each; objects, matched by kind and name glob or
// labels, a classification each (internal when none matches); and rules
// that allow or deny actions to subjects on objects. The levels, lowest
// first, are public, internal, confidential and secret.
//
// Decide answers one request, in this order:
//
//  1. root (uid 0) is allowed everything (the decision still names it,
//     for the audit log);
//  2. the mandatory levels, which no rule overrides: a pod runs at its
//     owner's clearance, and its VMs may attach a volume read-only only at
//     or below it (no read up), read-write only at exactly it (no write
//     down, and no read up), and join a network only at exactly it;
//  3. a deny rule that matches wins over any allow rule;
//  4. an allow rule that matches allows;
//  5. anything else is denied (default deny).
//
// Every Decision names what decided it: root, a level check, a rule (by
// name and position) or the default, so a 403 and the audit log can say
// why.
//
// The policy is for the control plane only; the VM process never links
// it.
package policy

import (
	"errors"
	"fmt"
	"maps"
	"path"
	"slices"
	"strconv"
	"strings"
)

// Level is a clearance or classification.
type Level int

// Levels, lowest first.
const (
	Public Level = iota
	Internal
	Confidential
	Secret
)

var levelNames = []string{"public", "internal", "confidential", "secret"}

func (l Level) String() string {
	if l < 0 || int(l) >= len(levelNames) {
		return "level(" + strconv.Itoa(int(l)) + ")"
	}
	return levelNames[l]
}

// ParseLevel reads a level's name.
func ParseLevel(s string) (Level, error) {
	if i := slices.Index(levelNames, s); i >= 0 {
		return Level(i), nil
	}
	return 0, fmt.Errorf("unknown level %q (want %s)", s, strings.Join(levelNames, ", "))
}

// DefaultClassification is an object's level when no objects entry
// matches it.
const DefaultClassification = Internal

// Kind is a kind of object.
type Kind string

// Kinds.
const (
	Volume  Kind = "volume"
	Network Kind = "network"
	Pod     Kind = "pod"
)

// Kinds lists the kinds of objects.
var Kinds = []Kind{Volume, Network, Pod}

// Action is something a subject does to an object.
type Action string

// Actions.
const (
	Create   Action = "create"
	Delete   Action = "delete"
	Inspect  Action = "inspect"
	AttachRO Action = "attach-ro"
	AttachRW Action = "attach-rw"
	Snapshot Action = "snapshot"
	Clone    Action = "clone"
	Run      Action = "run"
	Join     Action = "join"
)

// Actions lists every action.
var Actions = []Action{Create, Delete, Inspect, AttachRO, AttachRW, Snapshot, Clone, Run, Join}

// actionKinds says which kinds each action applies to.
var actionKinds = map[Action][]Kind{
	Create: Kinds, Delete: Kinds, Inspect: Kinds,
	AttachRO: {Volume}, AttachRW: {Volume}, Snapshot: {Volume}, Clone: {Volume},
	Run:  {Pod},
	Join: {Network},
}

// AppliesTo reports whether action a makes sense on kind k.
func (a Action) AppliesTo(k Kind) bool { return slices.Contains(actionKinds[a], k) }

// ParseAction reads an action's name.
func ParseAction(s string) (Action, error) {
	if a := Action(s); slices.Contains(Actions, a) {
		return a, nil
	}
	return "", fmt.Errorf("unknown action %q (want %s)", s, joinAll(Actions))
}

// ParseKind reads a kind's name.
func ParseKind(s string) (Kind, error) {
	if k := Kind(s); slices.Contains(Kinds, k) {
		return k, nil
	}
	return "", fmt.Errorf("unknown kind %q (want %s)", s, joinAll(Kinds))
}

func joinAll[T ~string](xs []T) string {
	ss := make([]string, len(xs))
	for i, x := range xs {
		ss[i] = string(x)
	}
	return strings.Join(ss, ", ")
}

// Subject is who asks: a user, by uid and name, and their groups.
type Subject struct {
	UID  uint32
	Name string // "" when the uid has no name
	// Groups are the user's groups, the primary one first.
	Groups []Group
}

// Group is a group, by gid and name.
type Group struct {
	GID  uint32
	Name string // "" when the gid has no name
}

// String names the subject as a rule would: the user's name, else its uid.
func (s Subject) String() string {
	if s.Name != "" {
		return s.Name
	}
	return strconv.FormatUint(uint64(s.UID), 10)
}

// isUser reports whether key (a name or a decimal uid) names s.
func (s Subject) isUser(key string) bool {
	return key == strconv.FormatUint(uint64(s.UID), 10) || (s.Name != "" && key == s.Name)
}

// inGroup reports whether key (a name or a decimal gid) names one of s's
// groups.
func (s Subject) inGroup(key string) bool {
	for _, g := range s.Groups {
		if key == strconv.FormatUint(uint64(g.GID), 10) || (g.Name != "" && key == g.Name) {
			return true
		}
	}
	return false
}

// Object is what a request is about.
type Object struct {
	Kind   Kind
	Name   string
	Labels map[string]string
}

func (o Object) String() string { return string(o.Kind) + "/" + o.Name }

// ParseObject reads KIND/NAME.
func ParseObject(s string) (Object, error) {
	k, n, ok := strings.Cut(s, "/")
	if !ok || n == "" {
		return Object{}, fmt.Errorf("object %q: want KIND/NAME, e.g. volume/data", s)
	}
	kind, err := ParseKind(k)
	if err != nil {
		return Object{}, fmt.Errorf("object %q: %w", s, err)
	}
	return Object{Kind: kind, Name: n}, nil
}

// Match selects objects: of a kind ("" for every kind), whose name
// matches a glob (path.Match) and which carry every label given.
type Match struct {
	Kind   Kind
	Name   string // glob; "" matches every name
	Labels map[string]string
}

// Matches reports whether m selects o.
func (m Match) Matches(o Object) bool {
	if m.Kind != "" && m.Kind != o.Kind {
		return false
	}
	if m.Name != "" {
		if ok, err := path.Match(m.Name, o.Name); err != nil || !ok {
			return false
		}
	}
	for k, v := range m.Labels {
		if got, ok := o.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Classification gives the objects a Match selects a level.
type Classification struct {
	Match Match
	Level Level
	Where string // its place in the file, for decisions: "objects[2]"
}

// Effect is what a rule does.
type Effect string

// Effects.
const (
	Allow Effect = "allow"
	Deny  Effect = "deny"
)

// Rule allows or denies actions to subjects on objects.
type Rule struct {
	Name   string // given, or "rules[N]"
	Index  int    // position in the file
	Effect Effect
	// Subjects: "user:NAME", "group:NAME" (a name, or a decimal uid or
	// gid) or "*" (any caller).
	Subjects []string
	Actions  []Action // nil: every action
	Objects  []Match
}

func (r Rule) matches(s Subject, a Action, o Object) bool {
	if r.Actions != nil && !slices.Contains(r.Actions, a) {
		return false
	}
	if !slices.ContainsFunc(r.Objects, func(m Match) bool { return m.Matches(o) }) {
		return false
	}
	return slices.ContainsFunc(r.Subjects, func(p string) bool {
		switch kind, name, _ := strings.Cut(p, ":"); kind {
		case "*":
			return true
		case "user":
			return s.isUser(name)
		case "group":
			return s.inGroup(name)
		}
		return false
	})
}

// Policy is a parsed policy file.
type Policy struct {
	// Users and Groups give clearances, keyed by name or decimal id.
	Users, Groups map[string]Level
	Objects       []Classification
	Rules         []Rule
}

// Clearance is a subject's level: its user entry, else the highest of its
// groups' entries, else public; and what set it, for decisions.
func (p *Policy) Clearance(s Subject) (Level, string) {
	for _, key := range slices.Sorted(maps.Keys(p.Users)) {
		if s.isUser(key) {
			return p.Users[key], "user " + key
		}
	}
	best, by := Public, ""
	for _, key := range slices.Sorted(maps.Keys(p.Groups)) {
		if s.inGroup(key) && (by == "" || p.Groups[key] > best) {
			best, by = p.Groups[key], "group "+key
		}
	}
	if by == "" {
		by = "no clearance given"
	}
	return best, by
}

// Classify is an object's level: the first objects entry that matches,
// else DefaultClassification.
func (p *Policy) Classify(o Object) (Level, string) {
	for _, c := range p.Objects {
		if c.Match.Matches(o) {
			return c.Level, c.Where
		}
	}
	return DefaultClassification, "default"
}

// Decided says what decided a Decision.
type Decided string

// What decides.
const (
	ByRoot    Decided = "root"
	ByLevel   Decided = "level"
	ByRule    Decided = "rule"
	ByDefault Decided = "default"
)

// Level checks.
const (
	CheckNoReadUp     = "no read up"
	CheckNoWriteDown  = "no write down"
	CheckNetworkLevel = "network at the pod's level"
)

// Decision is the answer to one request and what gave it.
type Decision struct {
	Allow   bool
	Subject Subject
	Action  Action
	Object  Object
	By      Decided
	// Rule is the deciding rule (By == ByRule).
	Rule *Rule
	// Check is the level check that denied (By == ByLevel).
	Check string
	// Clearance and Classification are the subject's and the object's
	// levels, and what set them.
	Clearance, Classification     Level
	ClearanceBy, ClassificationBy string
}

// ErrDenied is the category of denials.
var ErrDenied = errors.New("denied by the access policy")

// ErrInvalid is the category of requests that make no sense (an action on
// a kind it does not apply to).
var ErrInvalid = errors.New("invalid request")

// Decide answers subject s doing action a to object o (see the package
// comment for the order of checks).
func (p *Policy) Decide(s Subject, a Action, o Object) (Decision, error) {
	if !slices.Contains(Actions, a) {
		return Decision{}, fmt.Errorf("%w: unknown action %q", ErrInvalid, a)
	}
	if !a.AppliesTo(o.Kind) {
		return Decision{}, fmt.Errorf("%w: %s does not apply to a %s (it applies to %s)", ErrInvalid, a, o.Kind, joinAll(actionKinds[a]))
	}
	d := Decision{Subject: s, Action: a, Object: o}
	d.Clearance, d.ClearanceBy = p.Clearance(s)
	d.Classification, d.ClassificationBy = p.Classify(o)
	if s.UID == 0 {
		d.Allow, d.By = true, ByRoot
		return d, nil
	}
	if check := levelCheck(a, d.Clearance, d.Classification); check != "" {
		d.By, d.Check = ByLevel, check
		return d, nil
	}
	var allow *Rule
	for i := range p.Rules {
		r := &p.Rules[i]
		if !r.matches(s, a, o) {
			continue
		}
		if r.Effect == Deny {
			d.By, d.Rule = ByRule, r
			return d, nil
		}
		if allow == nil {
			allow = r
		}
	}
	if allow != nil {
		d.Allow, d.By, d.Rule = true, ByRule, allow
		return d, nil
	}
	d.By = ByDefault
	return d, nil
}

// levelCheck is the mandatory check an action fails, or "".
func levelCheck(a Action, clearance, class Level) string {
	switch a {
	case AttachRO:
		if class > clearance {
			return CheckNoReadUp
		}
	case AttachRW:
		switch {
		case class > clearance:
			return CheckNoReadUp
		case class < clearance:
			return CheckNoWriteDown
		}
	case Join:
		if class != clearance {
			return CheckNetworkLevel
		}
	}
	return ""
}

// String is the decision in one line, naming what decided it.
func (d Decision) String() string {
	verdict := "deny"
	if d.Allow {
		verdict = "allow"
	}
	req := fmt.Sprintf("%s %s %s", d.Subject, d.Action, d.Object)
	switch d.By {
	case ByRoot:
		return fmt.Sprintf("allow: %s: root (uid 0) is allowed everything", req)
	case ByLevel:
		return fmt.Sprintf("deny: %s: level check %q: %s is %s (%s), %s's clearance is %s (%s); %s",
			req, d.Check, d.Object, d.Classification, d.ClassificationBy, d.Subject, d.Clearance, d.ClearanceBy, levelWhy(d.Action, d.Clearance))
	case ByRule:
		return fmt.Sprintf("%s: %s: rule %q (rules[%d]) %s it", verdict, req, d.Rule.Name, d.Rule.Index, map[Effect]string{Allow: "allows", Deny: "denies"}[d.Rule.Effect])
	}
	return fmt.Sprintf("deny: %s: no rule allows it (default deny)", req)
}

func levelWhy(a Action, c Level) string {
	switch a {
	case AttachRO:
		return fmt.Sprintf("a read-only attach needs %s or lower", c)
	case AttachRW:
		return fmt.Sprintf("a read-write attach needs exactly %s", c)
	}
	return fmt.Sprintf("a pod joins networks at exactly %s", c)
}

// Err is nil for an allow, else a *DeniedError carrying the decision.
func (d Decision) Err() error {
	if d.Allow {
		return nil
	}
	return &DeniedError{Decision: d}
}

// DeniedError is a denial, for the daemon's 403.
type DeniedError struct{ Decision Decision }

func (e *DeniedError) Error() string { return e.Decision.String() }

// Is makes a DeniedError match ErrDenied.
func (e *DeniedError) Is(target error) bool { return target == ErrDenied }
