package policy

import (
	"errors"
	"strings"
	"testing"
)

var (
	devs  = Group{GID: 2001, Name: "devs"}
	hr    = Group{GID: 2002, Name: "hr"}
	alice = Subject{UID: 1001, Name: "alice", Groups: []Group{hr, devs}}
	bob   = Subject{UID: 1002, Name: "bob", Groups: []Group{devs}}
	carol = Subject{UID: 1003, Name: "carol", Groups: []Group{devs, hr}}
	dave  = Subject{UID: 1004, Name: "dave", Groups: []Group{{GID: 1004, Name: "dave"}}}
	anon  = Subject{UID: 64031, Groups: []Group{{GID: 64031}}}
	root  = Subject{UID: 0, Name: "root", Groups: []Group{{GID: 0, Name: "root"}}}
)

func obj(k Kind, name string, labels ...string) Object {
	o := Object{Kind: k, Name: name, Labels: map[string]string{}}
	for i := 0; i+1 < len(labels); i += 2 {
		o.Labels[labels[i]] = labels[i+1]
	}
	return o
}

func TestDecide(t *testing.T) {
	p, err := Load("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		s      Subject
		a      Action
		o      Object
		allow  bool
		by     Decided
		detail string // rule name or level check
		line   string // what String says
	}{
		{"allowed by a rule", bob, AttachRW, obj(Volume, "dev-1"), true, ByRule, "devs-work",
			`allow: bob attach-rw volume/dev-1: rule "devs-work" (rules[1]) allows it`},
		{"read up", bob, AttachRO, obj(Volume, "payroll-2024"), false, ByLevel, CheckNoReadUp,
			`deny: bob attach-ro volume/payroll-2024: level check "no read up": volume/payroll-2024 is confidential (objects[0]), bob's clearance is internal (user bob); a read-only attach needs internal or lower`},
		{"read up by label", bob, AttachRO, obj(Volume, "dev-x", "tier", "secret"), false, ByLevel, CheckNoReadUp, ""},
		{"read down", alice, AttachRO, obj(Volume, "dev-1"), true, ByRule, "devs-work", ""},
		{"write down", alice, AttachRW, obj(Volume, "dev-1"), false, ByLevel, CheckNoWriteDown,
			`deny: alice attach-rw volume/dev-1: level check "no write down": volume/dev-1 is internal (default), alice's clearance is confidential (user alice); a read-write attach needs exactly confidential`},
		{"write at the level", alice, AttachRW, obj(Volume, "payroll-1"), true, ByRule, "hr-payroll", ""},
		{"read-write up", bob, AttachRW, obj(Volume, "payroll-1"), false, ByLevel, CheckNoReadUp, ""},
		{"clearance from the highest group", carol, AttachRW, obj(Volume, "payroll-1"), true, ByRule, "hr-payroll", ""},
		{"network at the level", bob, Join, obj(Network, "lab"), true, ByRule, "devs-work", ""},
		{"network above", bob, Join, obj(Network, "hr-net"), false, ByLevel, CheckNetworkLevel,
			`deny: bob join network/hr-net: level check "network at the pod's level": network/hr-net is confidential (objects[3]), bob's clearance is internal (user bob); a pod joins networks at exactly internal`},
		{"network below", anon, Join, obj(Network, "dmz-1"), false, ByLevel, CheckNetworkLevel, ""},
		{"deny beats an earlier allow", bob, Join, obj(Network, "lab-b"), false, ByRule, "no-devs-on-lab-b",
			`deny: bob join network/lab-b: rule "no-devs-on-lab-b" (rules[2]) denies it`},
		{"deny beats a later allow", bob, Delete, obj(Volume, "base", "golden", "yes"), false, ByRule, "never-delete-golden", ""},
		{"no level check on delete", bob, Delete, obj(Volume, "dev-1"), true, ByRule, "devs-work", ""},
		{"default deny", dave, Inspect, obj(Volume, "dev-1"), false, ByDefault, "",
			`deny: dave inspect volume/dev-1: no rule allows it (default deny)`},
		{"default deny for a known user", bob, Inspect, obj(Pod, "web"), false, ByDefault, "", ""},
		{"uid without a name", anon, AttachRW, obj(Volume, "x", "tier", "secret"), true, ByRule, "ops-everything",
			`allow: 64031 attach-rw volume/x: rule "ops-everything" (rules[5]) allows it`},
		{"root", root, Delete, obj(Volume, "base", "golden", "yes"), true, ByRoot, "",
			`allow: root delete volume/base: root (uid 0) is allowed everything`},
		{"root ignores levels", root, AttachRW, obj(Volume, "payroll-1"), true, ByRoot, "", ""},
		{"run a pod", bob, Run, obj(Pod, "dev-web"), true, ByRule, "devs-work", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := p.Decide(tt.s, tt.a, tt.o)
			if err != nil {
				t.Fatal(err)
			}
			if d.Allow != tt.allow || d.By != tt.by {
				t.Fatalf("%s: allow %v by %s, want allow %v by %s", d, d.Allow, d.By, tt.allow, tt.by)
			}
			switch tt.by {
			case ByRule:
				if d.Rule.Name != tt.detail {
					t.Errorf("%s: decided by rule %q, want %q", d, d.Rule.Name, tt.detail)
				}
			case ByLevel:
				if d.Check != tt.detail {
					t.Errorf("%s: check %q, want %q", d, d.Check, tt.detail)
				}
			}
			if tt.line != "" && d.String() != tt.line {
				t.Errorf("String:\n got %s\nwant %s", d, tt.line)
			}
			err = d.Err()
			if tt.allow != (err == nil) || (err != nil && !errors.Is(err, ErrDenied)) {
				t.Errorf("Err() = %v", err)
			}
		})
	}
}

func TestDecideInvalid(t *testing.T) {
	p, err := Load("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		a Action
		o Object
	}{
		{Join, obj(Volume, "x")},
		{AttachRW, obj(Network, "x")},
		{Run, obj(Volume, "x")},
		{"fly", obj(Volume, "x")},
	} {
		if _, err := p.Decide(bob, tt.a, tt.o); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s %s: %v, want ErrInvalid", tt.a, tt.o, err)
		}
	}
}

func TestParseObject(t *testing.T) {
	if o, err := ParseObject("volume/data-1"); err != nil || o.Kind != Volume || o.Name != "data-1" {
		t.Errorf("volume/data-1: %v %v", o, err)
	}
	for _, s := range []string{"volume", "volume/", "disk/x", "/x"} {
		if _, err := ParseObject(s); err == nil || !strings.Contains(err.Error(), "object") {
			t.Errorf("%q: %v, want an error", s, err)
		}
	}
}
