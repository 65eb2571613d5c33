package audit

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"
)

// Sandbox modes recorded in a VMBoot's ParamSandbox.
const (
	SandboxOff    = "off"
	SandboxLog    = "log"
	SandboxStrict = "strict"
)

// Policy request names (ParamRequest) the report looks at.
const RequestAttachRW = "attach-rw"

// Attach modes (ParamMode).
const (
	ModeRW = "rw"
	ModeRO = "ro"
)

// VolumeInfo is a live volume as the volume store knows it.
type VolumeInfo struct {
	Name     string
	Created  time.Time
	ReadOnly bool // a snapshot: it needs no snapshot of its own
}

// ReportOptions are the report's inputs besides the log.
type ReportOptions struct {
	VerifyOptions
	// SnapshotDays: a volume is flagged when it has had no snapshot for
	// this many days (and is older than that). Default 7.
	SnapshotDays int
	// MaxDenied fails the denials check when a user has more denied
	// attempts; 0 lists them without failing.
	MaxDenied int
	// Volumes are the live volumes; nil derives them from the log.
	Volumes []VolumeInfo
	// Now is the report's time (time.Now()).
	Now time.Time
}

// Check is one compliance check's outcome.
type Check struct {
	Name     string   `json:"name"`
	OK       bool     `json:"ok"`
	Summary  string   `json:"summary"`
	Findings []string `json:"findings,omitempty"`
}

// Report is the outcome of every check.
type Report struct {
	Records int      `json:"records"`
	Summary *Summary `json:"verify,omitempty"`
	Checks  []Check  `json:"checks"`
}

// OK reports whether every check passed.
func (r *Report) OK() bool {
	for _, c := range r.Checks {
		if !c.OK {
			return false
		}
	}
	return true
}

// Compliance verifies the log in dir and runs the compliance checks on
// its records: the log is intact; no VM ran with the sandbox off; denied
// attempts per user (failing past MaxDenied); no read-write attach across
// security levels; every volume had a snapshot in the last SnapshotDays;
// no stretch of records went unsealed for longer than SealEvery.
func Compliance(dir string, opts ReportOptions) (*Report, error) {
	if opts.SnapshotDays <= 0 {
		opts.SnapshotDays = 7
	}
	if opts.SealEvery <= 0 {
		opts.SealEvery = DefaultSealEvery
	}
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	sum, verr := Verify(dir, opts.VerifyOptions)
	var rs []*Record
	if err := Read(dir, func(r *Record) error { rs = append(rs, r); return nil }, nil); err != nil {
		return nil, err
	}
	rep := &Report{Summary: sum}
	integrity := Check{Name: "integrity", OK: verr == nil}
	if verr != nil {
		integrity.Summary = "verify failed: " + verr.Error()
	} else {
		integrity.Summary = fmt.Sprintf("intact: %d records, %d seals, sealed through seq %d", sum.Records, sum.Seals, sum.LastSeal)
	}
	for _, r := range rs {
		if r.Seal == nil {
			rep.Records++
		}
	}
	rep.Checks = []Check{
		integrity,
		sandboxCheck(rs),
		denialCheck(rs, opts.MaxDenied),
		levelCheck(rs),
		snapshotCheck(rs, opts),
		sealCheck(sum, verr, opts.SealEvery),
	}
	return rep, nil
}

// where names a record in a finding.
func where(r *Record) string {
	return fmt.Sprintf("seq %d %s uid %d pid %d", r.Seq, r.Time.UTC().Format(time.RFC3339), r.Actor.UID, r.Actor.PID)
}

func sandboxCheck(rs []*Record) Check {
	c := Check{Name: "sandbox", OK: true}
	runs, off := 0, 0
	for _, r := range rs {
		switch {
		case r.Action == VMBoot && r.OK():
			runs++
			switch mode := r.Params[ParamSandbox]; mode {
			case SandboxStrict:
			case SandboxLog:
				c.Findings = append(c.Findings, fmt.Sprintf("%s: VM %s ran with the sandbox in log mode (nothing enforced)", where(r), r.Object.Name))
			default:
				off++
				if mode == "" {
					mode = "not recorded"
				}
				c.Findings = append(c.Findings, fmt.Sprintf("%s: VM %s ran with the sandbox off (sandbox=%s)", where(r), r.Object.Name, mode))
			}
		case r.Action == VMSandboxKill:
			c.Findings = append(c.Findings, fmt.Sprintf("%s: VM %s was killed by the sandbox: %s", where(r), r.Object.Name, r.Params[ParamReason]))
		}
	}
	c.OK = off == 0
	c.Summary = fmt.Sprintf("%d of %d VM runs with the sandbox off", off, runs)
	return c
}

func denialCheck(rs []*Record, limit int) Check {
	c := Check{Name: "denials", OK: true}
	per := map[uint32][]*Record{}
	total := 0
	for _, r := range rs {
		if r.Decision == Deny {
			per[r.Actor.UID] = append(per[r.Actor.UID], r)
			total++
		}
	}
	for _, uid := range slices.Sorted(maps.Keys(per)) {
		ds := per[uid]
		last := ds[len(ds)-1]
		f := fmt.Sprintf("uid %d: %d denied, the last %s %s (%s)", uid, len(ds), last.Params[ParamRequest], last.Object, last.Params[ParamRule])
		if limit > 0 && len(ds) > limit {
			c.OK = false
			f += fmt.Sprintf(": more than %d", limit)
		}
		c.Findings = append(c.Findings, f)
	}
	c.Summary = fmt.Sprintf("%d denied attempts by %d users", total, len(per))
	return c
}

func levelCheck(rs []*Record) Check {
	c := Check{Name: "cross-level read-write attaches", OK: true}
	n := 0
	for _, r := range rs {
		rw := r.Action == VolumeAttach && r.OK() && r.Params[ParamMode] == ModeRW ||
			r.Decision == Allow && r.Params[ParamRequest] == RequestAttachRW
		sub, obj := r.Params[ParamSubjectLevel], r.Params[ParamObjectLevel]
		root := r.Params[ParamRule] == "root" // exempt from the levels; older daemons recorded a level for it
		if rw && !root && sub != "" && obj != "" && sub != obj {
			n++
			c.Findings = append(c.Findings, fmt.Sprintf("%s: %s %s read-write at level %s by a subject at level %s", where(r), r.Action, r.Object, obj, sub))
		}
	}
	c.OK = n == 0
	c.Summary = fmt.Sprintf("%d read-write attaches across levels (there must be none)", n)
	return c
}

func snapshotCheck(rs []*Record, opts ReportOptions) Check {
	c := Check{Name: "snapshots", OK: true}
	type vol struct {
		created, snap time.Time
		readOnly      bool
	}
	live := map[string]*vol{}
	snaps := map[string]time.Time{}
	for _, r := range rs {
		if !r.OK() || r.Object.Kind != KindVolume {
			continue
		}
		switch r.Action {
		case VolumeCreate, VolumeImport, VolumeClone:
			live[r.Object.Name] = &vol{created: r.Time}
		case VolumeSnapshot:
			snaps[r.Object.Name] = r.Time
			if s := r.Params[ParamSnapshot]; s != "" {
				live[s] = &vol{created: r.Time, readOnly: true}
			}
		case VolumeRemove:
			delete(live, r.Object.Name)
			delete(snaps, r.Object.Name)
		}
	}
	if opts.Volumes != nil {
		live = map[string]*vol{}
		for _, v := range opts.Volumes {
			live[v.Name] = &vol{created: v.Created, readOnly: v.ReadOnly}
		}
	}
	limit := opts.Now.Add(-time.Duration(opts.SnapshotDays) * 24 * time.Hour)
	checked := 0
	for _, name := range slices.Sorted(maps.Keys(live)) {
		v := live[name]
		if v.readOnly {
			continue
		}
		checked++
		last, ok := snaps[name]
		switch {
		case ok && last.Before(limit):
			c.Findings = append(c.Findings, fmt.Sprintf("volume %s: last snapshot %s, more than %d days ago", name, last.UTC().Format(time.RFC3339), opts.SnapshotDays))
		case !ok && v.created.Before(limit):
			c.Findings = append(c.Findings, fmt.Sprintf("volume %s: no snapshot since it was created %s", name, v.created.UTC().Format(time.RFC3339)))
		}
	}
	c.OK = len(c.Findings) == 0
	c.Summary = fmt.Sprintf("%d of %d volumes without a snapshot in the last %d days", len(c.Findings), checked, opts.SnapshotDays)
	return c
}

func sealCheck(sum *Summary, verr error, every int) Check {
	c := Check{Name: "seals", OK: true}
	if sum == nil {
		c.OK = false
		c.Summary = "cannot be checked: the log does not verify"
		if ve, ok := verr.(*VerifyError); ok && (ve.Kind == BadSeal || ve.Kind == Truncated) {
			c.Findings = append(c.Findings, ve.Error())
		}
		return c
	}
	for _, r := range sum.LongRuns {
		c.Findings = append(c.Findings, fmt.Sprintf("seqs %d to %d: %d records without a seal (at most %d)", r.From, r.To, r.To-r.From+1, every))
	}
	c.OK = len(sum.LongRuns) == 0
	c.Summary = strconv.Itoa(len(sum.LongRuns)) + " gaps in seals"
	if sum.Unsealed > 0 {
		c.Summary += fmt.Sprintf("; %d records after the last seal (seq %d)", sum.Unsealed, sum.LastSeal)
	}
	return c
}
