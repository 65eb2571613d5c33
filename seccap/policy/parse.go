package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"slices"
	"strings"
	"sync"

	"go.yaml.in/yaml/v3"
)

// A policy file, every field shown:
//
//	subjects:
//	  users:                  # name (or uid) -> clearance
//	    alice: confidential
//	  groups:                 # name (or gid) -> clearance
//	    ops: secret
//	objects:                  # first match classifies; default internal
//	  - kind: volume          # volume, network, pod or "*"
//	    name: "payroll-*"     # glob (path.Match); default every name
//	    labels: {team: hr}    # all must match
//	    classification: secret
//	rules:
//	  - name: ops-volumes     # default rules[N]
//	    effect: allow         # allow or deny
//	    subjects: ["group:ops", "user:alice", "*"]
//	    actions: [create, delete, inspect, attach-ro, attach-rw, snapshot, clone]   # or ["*"]
//	    objects:
//	      - {kind: volume, name: "*"}
//
// Parsing is strict: an unknown or repeated key, a value of the wrong
// type, an unknown level, kind or action, a malformed glob, an alias, or a
// second document is an error naming its line and path, such as
// "line 9: rules[0].actions[2]: unknown action "attach" (want create,
// ...)".

// maxPolicy bounds a policy file.
const maxPolicy = 1 << 20

// ParseError is a bad policy document, at a line and path.
type ParseError struct {
	Line int    // 0 when the document as a whole is bad
	Path string // rules[2].actions[1]; "" for the document
	Msg  string
}

func (e *ParseError) Error() string {
	var b strings.Builder
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Path != "" {
		b.WriteString(e.Path + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// ErrParse is the category of every ParseError.
var ErrParse = errors.New("invalid policy")

// Is makes every ParseError match ErrParse.
func (e *ParseError) Is(target error) bool { return target == ErrParse }

func bad(n *yaml.Node, p, format string, args ...any) error {
	e := &ParseError{Path: p, Msg: fmt.Sprintf(format, args...)}
	if n != nil {
		e.Line = n.Line
	}
	return e
}

// Load reads and parses a policy file; its errors start with the path.
func Load(file string) (*Policy, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPolicy+1))
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", file, err)
	}
	p, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", file, err)
	}
	return p, nil
}

// Parse reads a policy document strictly.
func Parse(data []byte) (*Policy, error) {
	if len(data) > maxPolicy {
		return nil, bad(nil, "", "document of %d bytes is larger than %d", len(data), maxPolicy)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if err == io.EOF {
			return nil, bad(nil, "", "empty document: a policy needs subjects, objects or rules")
		}
		return nil, bad(nil, "", "not valid YAML: %s", yamlMsg(err))
	}
	var more yaml.Node
	if err := dec.Decode(&more); err != io.EOF {
		return nil, bad(&more, "", "a policy file holds one YAML document")
	}
	if len(doc.Content) != 1 {
		return nil, bad(&doc, "", "empty document")
	}
	if err := noAliases(doc.Content[0], ""); err != nil {
		return nil, err
	}
	return parsePolicy(doc.Content[0])
}

func yamlMsg(err error) string {
	return strings.ReplaceAll(strings.TrimPrefix(err.Error(), "yaml: "), "\n", "; ")
}

// noAliases refuses YAML aliases: a policy is read as written.
func noAliases(n *yaml.Node, p string) error {
	if n.Kind == yaml.AliasNode {
		return bad(n, p, "aliases (*%s) are not allowed in a policy", n.Value)
	}
	for _, c := range n.Content {
		if err := noAliases(c, p); err != nil {
			return err
		}
	}
	return nil
}

func parsePolicy(n *yaml.Node) (*Policy, error) {
	f, err := fields(n, "", "subjects", "objects", "rules")
	if err != nil {
		return nil, err
	}
	if len(f) == 0 {
		return nil, bad(n, "", "empty policy: a policy needs subjects, objects or rules")
	}
	p := &Policy{Users: map[string]Level{}, Groups: map[string]Level{}}
	if s := f["subjects"]; s != nil {
		sf, err := fields(s, "subjects", "users", "groups")
		if err != nil {
			return nil, err
		}
		if p.Users, err = clearances(sf["users"], "subjects.users"); err != nil {
			return nil, err
		}
		if p.Groups, err = clearances(sf["groups"], "subjects.groups"); err != nil {
			return nil, err
		}
	}
	if o := f["objects"]; o != nil {
		items, err := sequence(o, "objects")
		if err != nil {
			return nil, err
		}
		for i, item := range items {
			ip := fmt.Sprintf("objects[%d]", i)
			of, err := fields(item, ip, "kind", "name", "labels", "classification")
			if err != nil {
				return nil, err
			}
			m, err := match(item, of, ip)
			if err != nil {
				return nil, err
			}
			cl, err := required(item, of, ip, "classification")
			if err != nil {
				return nil, err
			}
			lv, err := level(cl, ip+".classification")
			if err != nil {
				return nil, err
			}
			p.Objects = append(p.Objects, Classification{Match: m, Level: lv, Where: ip})
		}
	}
	if r := f["rules"]; r != nil {
		items, err := sequence(r, "rules")
		if err != nil {
			return nil, err
		}
		names := map[string]string{}
		for i, item := range items {
			rule, err := parseRule(item, i)
			if err != nil {
				return nil, err
			}
			if prev, ok := names[rule.Name]; ok {
				return nil, bad(item, fmt.Sprintf("rules[%d].name", i), "%q is also the name of %s", rule.Name, prev)
			}
			names[rule.Name] = fmt.Sprintf("rules[%d]", i)
			p.Rules = append(p.Rules, rule)
		}
	}
	return p, nil
}

// The name patterns are compiled on first use, not at init: rayvmm links
// this package (rayvmm policy check), and compiling them cost every
// rayvmm start, rayvmm boot's included, 0.3 to 0.5 ms.
var (
	namePattern = lazyRegexp(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`)
	ruleName    = lazyRegexp(`^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$`)
	labelKey    = lazyRegexp(`^[A-Za-z0-9]([A-Za-z0-9_./-]{0,61}[A-Za-z0-9])?$`)
)

// lazyRegexp is a regexp compiled on first use.
type lazyRegexp string

var compiled sync.Map // lazyRegexp -> *regexp.Regexp

func (l lazyRegexp) MatchString(s string) bool {
	re, ok := compiled.Load(l)
	if !ok {
		re, _ = compiled.LoadOrStore(l, regexp.MustCompile(string(l)))
	}
	return re.(*regexp.Regexp).MatchString(s)
}

func parseRule(n *yaml.Node, i int) (Rule, error) {
	rp := fmt.Sprintf("rules[%d]", i)
	f, err := fields(n, rp, "name", "effect", "subjects", "actions", "objects")
	if err != nil {
		return Rule{}, err
	}
	r := Rule{Name: rp, Index: i}
	if nn := f["name"]; nn != nil {
		if r.Name, err = str(nn, rp+".name"); err != nil {
			return Rule{}, err
		}
		if !ruleName.MatchString(r.Name) {
			return Rule{}, bad(nn, rp+".name", "%q: want 1 to 128 letters, digits, '_', '.', ':' or '-'", r.Name)
		}
	}
	en, err := required(n, f, rp, "effect")
	if err != nil {
		return Rule{}, err
	}
	e, err := str(en, rp+".effect")
	if err != nil {
		return Rule{}, err
	}
	if r.Effect = Effect(e); r.Effect != Allow && r.Effect != Deny {
		return Rule{}, bad(en, rp+".effect", "%q: want allow or deny", e)
	}
	sn, err := required(n, f, rp, "subjects")
	if err != nil {
		return Rule{}, err
	}
	if r.Subjects, err = strList(sn, rp+".subjects"); err != nil {
		return Rule{}, err
	}
	for j, s := range r.Subjects {
		if err := checkSubject(s); err != nil {
			return Rule{}, bad(sn.Content[j], fmt.Sprintf("%s.subjects[%d]", rp, j), "%v", err)
		}
	}
	an, err := required(n, f, rp, "actions")
	if err != nil {
		return Rule{}, err
	}
	acts, err := strList(an, rp+".actions")
	if err != nil {
		return Rule{}, err
	}
	if slices.Contains(acts, "*") {
		if len(acts) != 1 {
			return Rule{}, bad(an, rp+".actions", `"*" stands for every action and comes alone`)
		}
	} else {
		for j, a := range acts {
			act, err := ParseAction(a)
			if err != nil {
				return Rule{}, bad(an.Content[j], fmt.Sprintf("%s.actions[%d]", rp, j), "%v", err)
			}
			if slices.Contains(r.Actions, act) {
				return Rule{}, bad(an.Content[j], fmt.Sprintf("%s.actions[%d]", rp, j), "%s is listed twice", act)
			}
			r.Actions = append(r.Actions, act)
		}
	}
	on, err := required(n, f, rp, "objects")
	if err != nil {
		return Rule{}, err
	}
	items, err := sequence(on, rp+".objects")
	if err != nil {
		return Rule{}, err
	}
	if len(items) == 0 {
		return Rule{}, bad(on, rp+".objects", "empty: a rule needs at least one object match")
	}
	for j, item := range items {
		mp := fmt.Sprintf("%s.objects[%d]", rp, j)
		mf, err := fields(item, mp, "kind", "name", "labels")
		if err != nil {
			return Rule{}, err
		}
		m, err := match(item, mf, mp)
		if err != nil {
			return Rule{}, err
		}
		r.Objects = append(r.Objects, m)
	}
	for j, a := range r.Actions {
		if !slices.ContainsFunc(r.Objects, func(m Match) bool { return m.Kind == "" || a.AppliesTo(m.Kind) }) {
			return Rule{}, bad(an.Content[j], fmt.Sprintf("%s.actions[%d]", rp, j), "%s does not apply to any of the rule's objects (it applies to %s)", a, joinAll(actionKinds[a]))
		}
	}
	return r, nil
}

func checkSubject(s string) error {
	if s == "*" {
		return nil
	}
	kind, name, ok := strings.Cut(s, ":")
	if !ok || (kind != "user" && kind != "group") {
		return fmt.Errorf("%q: want user:NAME, group:NAME or \"*\"", s)
	}
	if !namePattern.MatchString(name) {
		return fmt.Errorf("%q: %q is not a user or group name, uid or gid", s, name)
	}
	return nil
}

// match reads a Match's kind, name and labels from the fields of n.
func match(n *yaml.Node, f map[string]*yaml.Node, p string) (Match, error) {
	var m Match
	kn, err := required(n, f, p, "kind")
	if err != nil {
		return m, err
	}
	k, err := str(kn, p+".kind")
	if err != nil {
		return m, err
	}
	if k != "*" {
		if m.Kind, err = ParseKind(k); err != nil {
			return m, bad(kn, p+".kind", `%v, or "*"`, err)
		}
	}
	if nn := f["name"]; nn != nil {
		if m.Name, err = str(nn, p+".name"); err != nil {
			return m, err
		}
		if m.Name == "" {
			return m, bad(nn, p+".name", "empty: leave name out to match every name")
		}
		if _, err := path.Match(m.Name, ""); err != nil {
			return m, bad(nn, p+".name", "%q is not a valid glob: %v", m.Name, err)
		}
	}
	if ln := f["labels"]; ln != nil {
		if ln.Kind != yaml.MappingNode {
			return m, bad(ln, p+".labels", "want a mapping of label names to values")
		}
		m.Labels = map[string]string{}
		for i := 0; i+1 < len(ln.Content); i += 2 {
			kn, vn := ln.Content[i], ln.Content[i+1]
			key, err := str(kn, p+".labels")
			if err != nil {
				return m, err
			}
			lp := p + ".labels." + key
			if !labelKey.MatchString(key) {
				return m, bad(kn, lp, "%q is not a label name", key)
			}
			if _, dup := m.Labels[key]; dup {
				return m, bad(kn, lp, "repeated")
			}
			v, err := str(vn, lp)
			if err != nil {
				return m, err
			}
			m.Labels[key] = v
		}
	}
	return m, nil
}

// clearances reads a mapping of user or group names (or ids) to levels.
func clearances(n *yaml.Node, p string) (map[string]Level, error) {
	out := map[string]Level{}
	if n == nil {
		return out, nil
	}
	if n.Kind != yaml.MappingNode {
		return nil, bad(n, p, "want a mapping of names to levels")
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn, vn := n.Content[i], n.Content[i+1]
		if kn.Kind != yaml.ScalarNode || (kn.Tag != "!!str" && kn.Tag != "!!int") {
			return nil, bad(kn, p, "want a name, uid or gid as the key")
		}
		key := kn.Value
		kp := p + "." + key
		if !namePattern.MatchString(key) {
			return nil, bad(kn, kp, "%q is not a user or group name, uid or gid", key)
		}
		if _, dup := out[key]; dup {
			return nil, bad(kn, kp, "repeated")
		}
		l, err := level(vn, kp)
		if err != nil {
			return nil, err
		}
		out[key] = l
	}
	return out, nil
}

func level(n *yaml.Node, p string) (Level, error) {
	s, err := str(n, p)
	if err != nil {
		return 0, err
	}
	l, err := ParseLevel(s)
	if err != nil {
		return 0, bad(n, p, "%v", err)
	}
	return l, nil
}

// fields reads a mapping whose keys must be among allowed, each once.
func fields(n *yaml.Node, p string, allowed ...string) (map[string]*yaml.Node, error) {
	if n.Kind != yaml.MappingNode {
		return nil, bad(n, p, "want a mapping with %s", strings.Join(allowed, ", "))
	}
	out := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn := n.Content[i]
		if kn.Tag == "!!merge" {
			return nil, bad(kn, p, "merge keys (<<) are not allowed in a policy")
		}
		if kn.Kind != yaml.ScalarNode || kn.Tag != "!!str" {
			return nil, bad(kn, p, "want field names as keys")
		}
		fp := kn.Value
		if p != "" {
			fp = p + "." + kn.Value
		}
		if !slices.Contains(allowed, kn.Value) {
			return nil, bad(kn, fp, "unknown field (want %s)", strings.Join(allowed, ", "))
		}
		if _, dup := out[kn.Value]; dup {
			return nil, bad(kn, fp, "repeated")
		}
		out[kn.Value] = n.Content[i+1]
	}
	return out, nil
}

func required(n *yaml.Node, f map[string]*yaml.Node, p, name string) (*yaml.Node, error) {
	if v := f[name]; v != nil {
		return v, nil
	}
	fp := name
	if p != "" {
		fp = p + "." + name
	}
	return nil, bad(n, fp, "missing")
}

func sequence(n *yaml.Node, p string) ([]*yaml.Node, error) {
	if n.Kind != yaml.SequenceNode {
		return nil, bad(n, p, "want a list")
	}
	return n.Content, nil
}

func str(n *yaml.Node, p string) (string, error) {
	if n.Kind != yaml.ScalarNode {
		return "", bad(n, p, "want a string")
	}
	if n.Tag != "!!str" {
		return "", bad(n, p, "want a string, not %s (quote it: %q)", strings.TrimPrefix(n.Tag, "!!"), n.Value)
	}
	return n.Value, nil
}

func strList(n *yaml.Node, p string) ([]string, error) {
	items, err := sequence(n, p)
	if err != nil {
		return nil, err
	}
	if len(items) == 0 {
		return nil, bad(n, p, "empty")
	}
	out := make([]string, len(items))
	for i, it := range items {
		if out[i], err = str(it, fmt.Sprintf("%s[%d]", p, i)); err != nil {
			return nil, err
		}
	}
	return out, nil
}
