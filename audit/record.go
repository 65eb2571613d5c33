package audit

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Action names. The CLI (rayvmm, and rayvmmd's sharded-volume commands)
// and `rayvmm boot` write the volume, shard, net and vm ones; the pods
// daemon the pod, policy and daemon ones and its VMs' vm, volume and net
// ones. `audit report` checks records with these names.
const (
	VolumeCreate   = "volume.create"
	VolumeImport   = "volume.import"
	VolumeSnapshot = "volume.snapshot" // object: the volume; params[ParamSnapshot]: the new snapshot
	VolumeClone    = "volume.clone"    // object: the new volume; params[ParamFrom]: the snapshot
	VolumeRemove   = "volume.rm"
	VolumeAttach   = "volume.attach" // params: ParamVM, ParamMode, and the levels when a policy decided
	VolumeDetach   = "volume.detach"
	VolumeRebuild  = "volume.rebuild" // a sharded volume's failed replicas rebuilt

	// Sharded volumes' storage nodes (rayvmmd's shard commands).
	ShardRebalance  = "shard.rebalance" // object: the volume whose replicas moved; params: moves
	ShardNodeAdd    = "shard.node-add"  // object: the node; params: address
	ShardNodeRemove = "shard.node-rm"   // object: the node

	NetCreate = "net.create"
	NetRemove = "net.rm"
	NetAttach = "net.attach" // object: the network; params: ParamVM, ParamTAP, ParamMAC
	NetDetach = "net.detach"

	VMBoot        = "vm.boot"  // params[ParamSandbox]: off, log or strict
	VMExit        = "vm.exit"  // params[ParamStatus], params[ParamReason]
	VMCrash       = "vm.crash" // result: the reason
	VMSandboxKill = "vm.sandbox-kill"

	PodApply        = "pod.apply"
	PodRestart      = "pod.restart"
	PodProbeFailure = "pod.probe-failure"
	PodStop         = "pod.stop"
	PodRemove       = "pod.rm"

	PolicyAllow = "policy.allow" // decision allow; params[ParamRequest]: the action asked for
	PolicyDeny  = "policy.deny"  // decision deny; params[ParamRule]: what decided

	DaemonStart  = "daemon.start"
	DaemonStop   = "daemon.stop"
	DaemonReload = "daemon.reload" // the policy file was reloaded (SIGHUP)

	// AuditSeal and AuditRepair are written by the log itself.
	AuditSeal   = "audit.seal"
	AuditRepair = "audit.repair"
)

// Object kinds.
const (
	KindVolume  = "volume"
	KindNetwork = "network"
	KindVM      = "vm"
	KindNode    = "node" // a sharded volumes' storage node
	KindPod     = "pod"
	KindDaemon  = "daemon"
	KindPolicy  = "policy"
	KindAudit   = "audit"
)

// Param keys with a meaning to `audit list --object` (they name related
// objects, see Record.Refers) or to `audit report`.
const (
	ParamVM           = "vm"            // a VM the record concerns (attach, detach)
	ParamPod          = "pod"           // a pod the record concerns
	ParamSnapshot     = "snapshot"      // a volume snapshot made by VolumeSnapshot
	ParamFrom         = "from"          // the snapshot a clone was made from
	ParamNetwork      = "network"       // a network the record concerns
	ParamVolume       = "volume"        // a volume the record concerns
	ParamMode         = "mode"          // rw or ro, of an attach
	ParamSandbox      = "sandbox"       // off, log or strict, of a VM boot
	ParamStatus       = "status"        // a VM's exit status
	ParamReason       = "reason"        // why a VM ended
	ParamTAP          = "tap"           // the host interface of a NIC
	ParamMAC          = "mac"           // a NIC's MAC address
	ParamRequest      = "request"       // the access-policy action asked for (attach-rw, ...)
	ParamRule         = "rule"          // the policy rule or level check that decided
	ParamSubjectLevel = "subject_level" // the caller's (or pod owner's) clearance
	ParamObjectLevel  = "object_level"  // the object's classification
)

// Level is a record's severity.
type Level string

// Levels, in increasing severity.
const (
	Info     Level = "info"
	Warning  Level = "warning"
	Critical Level = "critical"
)

// Rank orders levels: 0 info, 1 warning, 2 critical, -1 for anything else.
func (l Level) Rank() int {
	switch l {
	case Info:
		return 0
	case Warning:
		return 1
	case Critical:
		return 2
	}
	return -1
}

// ParseLevel checks a level name.
func ParseLevel(s string) (Level, error) {
	if l := Level(s); l.Rank() >= 0 {
		return l, nil
	}
	return "", fmt.Errorf("level %q: want info, warning or critical", s)
}

// Decision is what an access policy decided; empty when none was asked
// (the CLI acting with its caller's own rights).
type Decision string

// Decisions.
const (
	NoDecision Decision = ""
	Allow      Decision = "allow"
	Deny       Decision = "deny"
)

// ResultOK is the result of an action that succeeded; any other result is
// the error's text.
const ResultOK = "ok"

// Hash is a SHA-256 value; it is written as 64 lower-case hex digits.
type Hash [32]byte

func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// Actor is who did something: the process, or the caller a daemon
// identified by SO_PEERCRED.
type Actor struct {
	UID     uint32
	GID     uint32
	PID     uint32
	Command string // the command line, at most MaxCommand bytes
}

// Self is the actor for this process: its real uid and gid, its pid and
// its command line.
func Self() Actor {
	var b strings.Builder
	for i, a := range os.Args {
		if i > 0 {
			b.WriteByte(' ')
		}
		if a == "" || strings.ContainsAny(a, " \t\n\"'\\") || !utf8.ValidString(a) {
			a = strconv.Quote(a)
		}
		b.WriteString(a)
	}
	return Actor{UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), PID: uint32(os.Getpid()), Command: truncate(b.String(), MaxCommand)}
}

// truncate cuts s to at most n bytes at a rune boundary, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const mark = "..."
	s = s[:n-len(mark)]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s + mark
}

// Object is what an action was done to.
type Object struct {
	Kind string // volume, network, vm, pod, daemon, policy, audit
	Name string
}

func (o Object) String() string { return o.Kind + "/" + o.Name }

// ParseObject parses "KIND/NAME".
func ParseObject(s string) (Object, error) {
	kind, name, ok := strings.Cut(s, "/")
	if !ok || kind == "" || name == "" {
		return Object{}, fmt.Errorf("object %q: want KIND/NAME, e.g. volume/data", s)
	}
	return Object{Kind: kind, Name: name}, nil
}

// Params are an action's parameters: short keys (lower case letters,
// digits, '_', '.', '-') and string values.
type Params map[string]string

// Seal is the part only seal records have: the sealing key's epoch and
// the MAC (see the package doc).
type Seal struct {
	Epoch uint64
	MAC   Hash
}

// Record is one line of the log.
type Record struct {
	Seq      uint64 // 1, 2, 3, ... with no gap, across files
	Time     time.Time
	Actor    Actor
	Action   string
	Object   Object
	Params   Params
	Decision Decision
	Result   string // ResultOK or the error text
	Level    Level
	Prev     Hash  // the previous record's Hash; zero for seq 1
	Hash     Hash  // SHA-256(Prev ‖ canonical JSON of the record without "hash")
	Seal     *Seal // set exactly on Seal records
}

// OK reports whether the action succeeded.
func (r *Record) OK() bool { return r.Result == ResultOK }

// Refers reports whether the record concerns o: it is the record's object,
// or a param names it (ParamSnapshot, ParamFrom and ParamVolume name
// volumes, ParamVM a VM, ParamNetwork a network, ParamPod a pod). So a
// volume's history includes the snapshots made of it, a snapshot's the
// clones made from it, and a VM's its attaches.
func (r *Record) Refers(o Object) bool {
	if r.Object == o {
		return true
	}
	for k, v := range r.Params {
		if v != o.Name {
			continue
		}
		switch k {
		case ParamSnapshot, ParamFrom, ParamVolume:
			if o.Kind == KindVolume {
				return true
			}
		case ParamVM:
			if o.Kind == KindVM {
				return true
			}
		case ParamNetwork:
			if o.Kind == KindNetwork {
				return true
			}
		case ParamPod:
			if o.Kind == KindPod {
				return true
			}
		}
	}
	return false
}

// Limits on a record's fields; a longer value is refused (Command is
// truncated by Self).
const (
	MaxLine    = 64 << 10 // bytes in one line, newline included
	MaxCommand = 4096
	MaxName    = 256
	MaxValue   = 4096 // a param value, the result text
	MaxParams  = 64
	maxToken   = 64 // action, kind, param key
)

// ErrInvalid is wrapped by every error about a record's content.
var ErrInvalid = errors.New("invalid audit record")

func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
}

// token reports whether s is 1..64 bytes of [a-z0-9.-], and '_' when
// underscore is set.
func token(s string, underscore bool) bool { return tokenBytes([]byte(s), underscore) }

func tokenBytes(s []byte, underscore bool) bool {
	if len(s) == 0 || len(s) > maxToken {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '-' || underscore && c == '_') {
			return false
		}
	}
	return true
}

// validText checks a free-text field: valid UTF-8, at most max bytes,
// non-empty unless empty is allowed.
func validText(field, s string, max int, empty bool) error {
	switch {
	case !empty && s == "":
		return invalid("%s is empty", field)
	case len(s) > max:
		return invalid("%s is %d bytes, more than %d", field, len(s), max)
	case !utf8.ValidString(s):
		return invalid("%s is not valid UTF-8", field)
	}
	return nil
}

// validate checks what a writer can get wrong; the parser checks the
// same through the encoding.
func (r *Record) validate() error {
	if !token(r.Action, false) {
		return invalid("action %q: want 1 to 64 of a-z 0-9 . -", r.Action)
	}
	if !token(r.Object.Kind, false) {
		return invalid("object kind %q: want 1 to 64 of a-z 0-9 . -", r.Object.Kind)
	}
	if err := validText("object name", r.Object.Name, MaxName, false); err != nil {
		return err
	}
	if err := validText("command", r.Actor.Command, MaxCommand, true); err != nil {
		return err
	}
	if err := validText("result", r.Result, MaxValue, false); err != nil {
		return err
	}
	if r.Level.Rank() < 0 {
		return invalid("level %q", r.Level)
	}
	if r.Decision != NoDecision && r.Decision != Allow && r.Decision != Deny {
		return invalid("decision %q: want allow, deny or none", r.Decision)
	}
	if len(r.Params) > MaxParams {
		return invalid("%d params, more than %d", len(r.Params), MaxParams)
	}
	for k, v := range r.Params {
		if !token(k, true) {
			return invalid("param key %q: want 1 to 64 of a-z 0-9 _ . -", k)
		}
		if err := validText("param "+k, v, MaxValue, true); err != nil {
			return err
		}
	}
	if (r.Action == AuditSeal) != (r.Seal != nil) {
		return invalid("a seal record must be action %s and only it", AuditSeal)
	}
	if y := r.Time.UTC().Year(); y < 0 || y > 9999 {
		return invalid("time %v: year out of range", r.Time)
	}
	if r.Seq == 0 || r.Seq > maxSeq {
		return invalid("seq %d out of range", r.Seq)
	}
	return nil
}

// maxSeq keeps every number exact in an IEEE double (RFC 8785 numbers).
const maxSeq = 1<<53 - 1
