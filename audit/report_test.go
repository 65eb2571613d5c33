package audit

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

// The report's checks on records as the daemon and the policy engine will
// write them: each check fails on what it is for and passes otherwise.
func TestCompliance(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	days := func(n int) time.Time { return now.Add(-time.Duration(n) * 24 * time.Hour) }
	vm := func(name, sandbox string) Entry {
		p := Params{}
		if sandbox != "" {
			p[ParamSandbox] = sandbox
		}
		return Entry{Action: VMBoot, Object: Object{KindVM, name}, Params: p}
	}
	vol := func(action, name string, at time.Time, p Params) Entry {
		return Entry{Action: action, Object: Object{KindVolume, name}, Time: at, Params: p}
	}
	alice, bob := &Actor{UID: 1000}, &Actor{UID: 1001}
	deny := func(a *Actor, req, obj string) Entry {
		return Entry{Action: PolicyDeny, Actor: a, Decision: Deny, Object: Object{KindVolume, obj}, Err: errors.New("denied"),
			Params: Params{ParamRequest: req, ParamRule: "deny-interns"}}
	}
	attach := func(mode, sub, obj string) Entry {
		return Entry{Action: VolumeAttach, Object: Object{KindVolume, "v"}, Params: Params{ParamVM: "a", ParamMode: mode, ParamSubjectLevel: sub, ParamObjectLevel: obj}}
	}
	tests := []struct {
		name    string
		entries []Entry
		opts    ReportOptions
		failing []string // the checks that fail
		finding string   // a finding the report must have
	}{
		{"empty log", nil, ReportOptions{}, nil, ""},
		{"sandbox strict", []Entry{vm("a", SandboxStrict)}, ReportOptions{}, nil, ""},
		{"sandbox off", []Entry{vm("a", SandboxStrict), vm("b", SandboxOff)}, ReportOptions{}, []string{"sandbox"}, "VM b ran with the sandbox off"},
		{"sandbox not recorded", []Entry{vm("a", "")}, ReportOptions{}, []string{"sandbox"}, "sandbox=not recorded"},
		{"sandbox log mode is listed", []Entry{vm("a", SandboxLog)}, ReportOptions{}, nil, "log mode"},
		{"a failed boot is no run", []Entry{{Action: VMBoot, Object: Object{KindVM, "a"}, Params: Params{ParamSandbox: SandboxOff}, Err: errors.New("no such volume")}}, ReportOptions{}, nil, ""},
		{"sandbox kill listed", []Entry{vm("a", SandboxStrict), {Action: VMSandboxKill, Object: Object{KindVM, "a"}, Level: Critical, Params: Params{ParamReason: "SIGSYS: syscall 59 (execve)"}}}, ReportOptions{}, nil, "killed by the sandbox: SIGSYS"},
		{"denials per user", []Entry{deny(alice, RequestAttachRW, "x"), deny(alice, "delete", "y"), deny(bob, "create", "z")}, ReportOptions{}, nil, "uid 1000: 2 denied, the last delete volume/y (deny-interns)"},
		{"denials past the limit", []Entry{deny(alice, "delete", "x"), deny(alice, "delete", "y"), deny(bob, "create", "z")}, ReportOptions{MaxDenied: 1}, []string{"denials"}, "uid 1000: 2 denied"},
		{"rw attach at the same level", []Entry{attach(ModeRW, "secret", "secret"), attach(ModeRO, "secret", "public")}, ReportOptions{}, nil, ""},
		{"rw attach across levels", []Entry{attach(ModeRW, "secret", "public")}, ReportOptions{}, []string{"cross-level read-write attaches"}, "read-write at level public by a subject at level secret"},
		{"policy allowed attach-rw across levels", []Entry{{Action: PolicyAllow, Decision: Allow, Object: Object{KindVolume, "v"},
			Params: Params{ParamRequest: RequestAttachRW, ParamSubjectLevel: "internal", ParamObjectLevel: "confidential"}}}, ReportOptions{}, []string{"cross-level read-write attaches"}, "policy.allow volume/v"},
		{"root's attach-rw, exempt from the levels", []Entry{{Action: PolicyAllow, Decision: Allow, Object: Object{KindVolume, "v"},
			Params: Params{ParamRequest: RequestAttachRW, ParamRule: "root", ParamSubjectLevel: "public", ParamObjectLevel: "secret"}}}, ReportOptions{}, nil, ""},
		{"volumes snapshotted in time", []Entry{vol(VolumeCreate, "old", days(30), nil), vol(VolumeSnapshot, "old", days(2), Params{ParamSnapshot: "s"}), vol(VolumeCreate, "new", days(1), nil)},
			ReportOptions{}, nil, ""},
		{"a volume without a recent snapshot", []Entry{vol(VolumeCreate, "old", days(30), nil), vol(VolumeSnapshot, "old", days(9), Params{ParamSnapshot: "s"})},
			ReportOptions{}, []string{"snapshots"}, "volume old: last snapshot"},
		{"a volume never snapshotted", []Entry{vol(VolumeImport, "old", days(30), nil), vol(VolumeClone, "s", days(20), Params{ParamFrom: "x"})},
			ReportOptions{SnapshotDays: 14}, []string{"snapshots"}, "volume s: no snapshot since"},
		{"a removed volume is not due", []Entry{vol(VolumeCreate, "old", days(30), nil), vol(VolumeRemove, "old", days(1), nil)}, ReportOptions{}, nil, ""},
		{"the store's volumes", []Entry{vol(VolumeSnapshot, "data", days(1), Params{ParamSnapshot: "s"})},
			ReportOptions{Volumes: []VolumeInfo{{Name: "data", Created: days(100)}, {Name: "legacy", Created: days(100)}, {Name: "s", ReadOnly: true}}},
			[]string{"snapshots"}, "volume legacy: no snapshot since"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLog(t)
			l := tl.open(t, 0, 0)
			if len(tc.entries) == 0 {
				tc.entries = []Entry{{Action: DaemonStart, Object: Object{KindDaemon, "rayvmm"}}}
			}
			if _, err := l.AppendSealed(context.Background(), tc.entries...); err != nil {
				t.Fatal(err)
			}
			l.Close()
			tc.opts.KeyDir, tc.opts.Now = tl.keys, now
			rep, err := Compliance(tl.dir, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			var failing, findings []string
			for _, c := range rep.Checks {
				if !c.OK {
					failing = append(failing, c.Name)
				}
				findings = append(findings, c.Findings...)
			}
			if !slices.Equal(failing, tc.failing) || rep.OK() != (len(tc.failing) == 0) {
				t.Fatalf("failing checks %q, want %q: %+v", failing, tc.failing, rep.Checks)
			}
			if all := strings.Join(findings, "\n"); !strings.Contains(all, tc.finding) {
				t.Fatalf("findings do not say %q:\n%s", tc.finding, all)
			}
		})
	}
}

// A tampered log fails the integrity check, and gaps in seals fail the
// seals check.
func TestComplianceLogChecks(t *testing.T) {
	tl := newTestLog(t)
	tl.fill(t, 30, 8)
	ls := tl.lines(t, 1)
	tl.setLines(t, 1, ls[:len(ls)-2])
	rep, err := Compliance(tl.dir, ReportOptions{VerifyOptions: VerifyOptions{KeyDir: tl.keys}})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Checks[0].OK || !strings.Contains(rep.Checks[0].Summary, "truncated") || rep.Checks[5].OK {
		t.Fatalf("%+v", rep.Checks)
	}

	// Writers sealing every 40 records, checked against 8.
	tl = newTestLog(t)
	tl.fill(t, 100, 40)
	rep, err = Compliance(tl.dir, ReportOptions{VerifyOptions: VerifyOptions{KeyDir: tl.keys, SealEvery: 8}})
	if err != nil {
		t.Fatal(err)
	}
	if c := rep.Checks[5]; c.OK || len(c.Findings) != 3 || !strings.Contains(c.Findings[0], "seqs 1 to 40: 40 records without a seal") {
		t.Fatalf("%+v", c)
	}
}
