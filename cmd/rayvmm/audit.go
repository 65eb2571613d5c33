package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/user"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/cmd/internal/command"
	"github.com/rayvmm/rayvmm/network"
	"github.com/rayvmm/rayvmm/state"
	"github.com/rayvmm/rayvmm/storage/volume"
)

// The audit log of this process's actions, opened on first use and
// sealed and closed by main at a clean stop.
var auditLog = command.AuditLog{StateDir: &stateDir}

func openAudit() (*audit.Log, error) { return auditLog.Open() }
func closeAudit() error              { return auditLog.Close() }

// auditAction runs fn, the action a command exists for, and records it
// with its result (command.AuditLog.Action): on disk and sealed before the
// command reports success.
func auditAction(ctx context.Context, action string, obj audit.Object, params audit.Params, fn func() error) error {
	return auditLog.Action(ctx, action, obj, params, fn)
}

func volumeObj(name string) audit.Object { return command.VolumeObj(name) }
func netObj(name string) audit.Object    { return audit.Object{Kind: audit.KindNetwork, Name: name} }

func init() {
	auditCmd := &cobra.Command{
		Use:   "audit",
		Short: "Query, verify, export and report on the audit log",
		Long: `Every state-changing command (volume create, import, snapshot, clone and rm,
sharded volumes' too, volume rebuild, shard rebalance, shard nodes add/rm;
net create and rm; boot, with its attaches, exit or crash) and the pods
daemon (pods, access decisions, its VMs' runs) append a record to the
audit log under <state-dir>/audit before they report success. Records
are JSON lines chained by SHA-256 and sealed with a forward-secure HMAC key
kept under <state-dir>/keys (see audit/README.md).

"audit verify" checks the whole log and names the first bad seq and why;
"audit report" runs the compliance checks.`,
	}

	var lf listFilter
	var asJSON, seals bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List audit records (a table, or JSON lines with --json)",
		Example: `  rayvmm audit list --object volume/data
  rayvmm audit list --since 24h --result error
  rayvmm audit list --actor alice --action 'volume.*' --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			match, err := lf.compile()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			var rs []*audit.Record
			err = audit.Read(audit.Dir(stateDir), func(r *audit.Record) error {
				if (seals || r.Seal == nil) && match(r) {
					if asJSON {
						_, err := out.Write(audit.Encode(r))
						return err
					}
					rs = append(rs, r)
				}
				return nil
			}, warnBadLine(cmd.ErrOrStderr()))
			if err != nil || asJSON {
				return err
			}
			return writeTable(out, rs)
		},
	}
	fl := list.Flags()
	fl.StringVar(&lf.since, "since", "", "records from this time on: RFC 3339, YYYY-MM-DD[ HH:MM[:SS]] (local time), or a duration ago such as 24h")
	fl.StringVar(&lf.until, "until", "", "records before this time (same forms as --since)")
	fl.StringVar(&lf.actor, "actor", "", "records by this user: a uid or a user name")
	fl.StringVar(&lf.action, "action", "", "records of this action, e.g. volume.create; a glob such as 'volume.*' works")
	fl.StringVar(&lf.object, "object", "", "records about KIND/NAME (e.g. volume/data): the object itself, and records whose params name it (snapshots of a volume, clones of a snapshot, a VM's attaches)")
	fl.StringVar(&lf.result, "result", "", "ok or error")
	fl.StringVar(&lf.level, "level", "", "records at this level or above: info, warning or critical")
	fl.BoolVar(&asJSON, "json", false, "print the records as JSON lines, exactly as stored")
	fl.BoolVar(&seals, "seals", false, "include the seal records")

	var keyFile string
	verify := &cobra.Command{
		Use:   "verify [--key FILE]",
		Short: "Check the whole log: exit 0 when it is intact, else name the first bad seq and why",
		Long: `Check every record's hash and its link to the one before, that seqs run
1, 2, 3, ... with no gap, every seal's MAC and epoch, and that the log still
has every seal the sealing key has made. On failure it names the first bad
seq and why: edited, deleted, reordered, truncated, bad seal or torn.

The verification key is <state-dir>/keys/audit-verify.key unless --key
names a copy (keep one off the host).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts, err := verifyOptions(keyFile)
			if err != nil {
				return err
			}
			s, err := audit.Verify(audit.Dir(stateDir), opts)
			if err != nil {
				return fmt.Errorf("audit verify: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "audit log intact: %d records and %d seals in %d file(s), seq 1 to %d\n", s.Records, s.Seals, s.Files, s.LastSeq)
			if s.Seals > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "sealed through seq %d (epoch %d)", s.LastSeal, s.Epoch)
				if s.Unsealed > 0 {
					fmt.Fprintf(cmd.OutOrStdout(), "; %d record(s) after it are not sealed yet", s.Unsealed)
				}
				fmt.Fprintln(cmd.OutOrStdout())
			}
			if s.Repairs > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "%d torn line(s) left by killed writers were repaired (audit.repair records)\n", s.Repairs)
			}
			return nil
		},
	}
	verify.Flags().StringVar(&keyFile, "key", "", "verification key file (default <state-dir>/keys/audit-verify.key)")

	var format string
	export := &cobra.Command{
		Use:   "export [--format jsonl|csv]",
		Short: "Write every record to stdout as JSON lines (as stored) or CSV",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			switch format {
			case "jsonl":
				return audit.Read(audit.Dir(stateDir), func(r *audit.Record) error {
					_, err := out.Write(audit.Encode(r))
					return err
				}, warnBadLine(cmd.ErrOrStderr()))
			case "csv":
				w := csv.NewWriter(out)
				w.Write([]string{"seq", "time", "uid", "gid", "pid", "command", "action", "object_kind", "object_name", "params", "decision", "result", "level", "prev", "hash", "seal_epoch", "seal_mac"})
				err := audit.Read(audit.Dir(stateDir), func(r *audit.Record) error {
					params, _ := json.Marshal(r.Params)
					if r.Params == nil {
						params = []byte("{}")
					}
					epoch, mac := "", ""
					if r.Seal != nil {
						epoch, mac = strconv.FormatUint(r.Seal.Epoch, 10), r.Seal.MAC.String()
					}
					return w.Write([]string{strconv.FormatUint(r.Seq, 10), r.Time.UTC().Format(time.RFC3339Nano),
						strconv.FormatUint(uint64(r.Actor.UID), 10), strconv.FormatUint(uint64(r.Actor.GID), 10), strconv.FormatUint(uint64(r.Actor.PID), 10),
						r.Actor.Command, r.Action, r.Object.Kind, r.Object.Name, string(params), string(r.Decision), r.Result, string(r.Level),
						r.Prev.String(), r.Hash.String(), epoch, mac})
				}, warnBadLine(cmd.ErrOrStderr()))
				w.Flush()
				return errors.Join(err, w.Error())
			}
			return fmt.Errorf("--format %q: want jsonl or csv", format)
		},
	}
	export.Flags().StringVar(&format, "format", "jsonl", "jsonl or csv")

	var ro audit.ReportOptions
	var reportKey string
	var reportJSON bool
	report := &cobra.Command{
		Use:   "report",
		Short: "Run the compliance checks; exit non-zero when one fails",
		Long: `Run the compliance checks on the audit log:

  integrity   the log verifies (as "audit verify")
  sandbox     no VM ran with the sandbox off (--sandbox off); runs in log
              mode and the sandbox's kills are listed
  denials     denied attempts per user (fails past --max-denied)
  levels      no read-write attach across security levels
  snapshots   every volume had a snapshot in the last --snapshot-days days
              (volumes younger than that are not due yet)
  seals       no more than 256 records in a row without a seal

It exits 1 when any check fails.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if ro.VerifyOptions, err = verifyOptions(reportKey); err != nil {
				return err
			}
			if ro.Volumes, err = liveVolumes(); err != nil {
				return err
			}
			rep, err := audit.Compliance(audit.Dir(stateDir), ro)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if reportJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "audit report: %d records\n", rep.Records)
				for _, c := range rep.Checks {
					mark := "ok  "
					if !c.OK {
						mark = "FAIL"
					}
					fmt.Fprintf(out, "%s  %-32s %s\n", mark, c.Name, c.Summary)
					for _, f := range c.Findings {
						fmt.Fprintf(out, "      %s\n", f)
					}
				}
			}
			if !rep.OK() {
				var failed []string
				for _, c := range rep.Checks {
					if !c.OK {
						failed = append(failed, c.Name)
					}
				}
				return &exitError{code: 1, err: fmt.Errorf("audit report: failed: %s", strings.Join(failed, ", "))}
			}
			return nil
		},
	}
	rf := report.Flags()
	rf.IntVar(&ro.SnapshotDays, "snapshot-days", 7, "flag volumes without a snapshot in this many days")
	rf.IntVar(&ro.MaxDenied, "max-denied", 0, "fail when a user has more denied attempts than this (0: list them only)")
	rf.StringVar(&reportKey, "key", "", "verification key file (default <state-dir>/keys/audit-verify.key)")
	rf.BoolVar(&reportJSON, "json", false, "print the report as JSON")

	auditCmd.AddCommand(list, verify, export, report)
	rootCmd.AddCommand(auditCmd)
}

// verifyOptions reads --key, if given.
func verifyOptions(keyFile string) (audit.VerifyOptions, error) {
	opts := audit.VerifyOptions{KeyDir: audit.KeyDir(stateDir)}
	if keyFile != "" {
		k, err := audit.ReadVerifyKey(keyFile)
		if err != nil {
			return opts, fmt.Errorf("--key: %w", err)
		}
		opts.Key = &k
	}
	return opts, nil
}

// liveVolumes lists the volume store's volumes for the snapshot check;
// nil (the log's own view) when there is no store.
func liveVolumes() ([]audit.VolumeInfo, error) {
	exists := func(p string) bool { _, err := os.Stat(p); return !errors.Is(err, fs.ErrNotExist) }
	if !exists(filepath.Join(stateDir, state.DBName)) && !exists(filepath.Join(stateDir, "volumes", "volumes.db")) {
		return nil, nil // no store yet (volumes.db: one from before state.db, upgraded on open)
	}
	s, err := volume.Open(stateDir)
	if err != nil {
		return nil, err
	}
	vs, err := s.List()
	if err != nil {
		return nil, err
	}
	out := []audit.VolumeInfo{}
	for _, v := range vs {
		out = append(out, audit.VolumeInfo{Name: v.Name, Created: v.Created, ReadOnly: v.ReadOnly})
	}
	return out, nil
}

func warnBadLine(w io.Writer) func(string, int, error) {
	return func(file string, line int, err error) {
		fmt.Fprintf(w, "rayvmm: warning: audit log %s line %d skipped: %v (run rayvmm audit verify)\n", file, line, err)
	}
}

// listFilter holds audit list's filter flags.
type listFilter struct {
	since, until, actor, action, object, result, level string
}

// compile checks the flags and returns the filter.
func (f *listFilter) compile() (func(*audit.Record) bool, error) {
	var tests []func(*audit.Record) bool
	for _, t := range []struct {
		flag, v string
		after   bool
	}{{"--since", f.since, true}, {"--until", f.until, false}} {
		if t.v == "" {
			continue
		}
		at, err := parseWhen(t.v)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", t.flag, err)
		}
		after := t.after
		tests = append(tests, func(r *audit.Record) bool { return r.Time.Before(at) != after })
	}
	if f.actor != "" {
		uid, err := parseActor(f.actor)
		if err != nil {
			return nil, fmt.Errorf("--actor: %w", err)
		}
		tests = append(tests, func(r *audit.Record) bool { return r.Actor.UID == uid })
	}
	if f.action != "" {
		if _, err := path.Match(f.action, ""); err != nil {
			return nil, fmt.Errorf("--action %q: %w", f.action, err)
		}
		tests = append(tests, func(r *audit.Record) bool { ok, _ := path.Match(f.action, r.Action); return ok })
	}
	if f.object != "" {
		o, err := audit.ParseObject(f.object)
		if err != nil {
			return nil, fmt.Errorf("--object: %w", err)
		}
		tests = append(tests, func(r *audit.Record) bool { return r.Refers(o) })
	}
	switch f.result {
	case "":
	case "ok", "error":
		want := f.result == "ok"
		tests = append(tests, func(r *audit.Record) bool { return r.OK() == want })
	default:
		return nil, fmt.Errorf("--result %q: want ok or error", f.result)
	}
	if f.level != "" {
		l, err := audit.ParseLevel(f.level)
		if err != nil {
			return nil, fmt.Errorf("--level: %w", err)
		}
		tests = append(tests, func(r *audit.Record) bool { return r.Level.Rank() >= l.Rank() })
	}
	return func(r *audit.Record) bool {
		for _, t := range tests {
			if !t(r) {
				return false
			}
		}
		return true
	}, nil
}

// parseWhen reads a --since/--until time: RFC 3339, a local date or date
// and time, or a duration before now.
func parseWhen(s string) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("%q: a duration ago must not be negative", s)
		}
		return time.Now().Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	for _, layout := range []string{"2006-01-02", "2006-01-02 15:04", "2006-01-02 15:04:05", "2006-01-02T15:04", "2006-01-02T15:04:05"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("%q: want RFC 3339, YYYY-MM-DD[ HH:MM[:SS]] or a duration such as 24h", s)
}

// parseActor reads a uid or a user name.
func parseActor(s string) (uint32, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return uint32(n), nil
	}
	u, err := user.Lookup(s)
	if err != nil {
		return 0, fmt.Errorf("%q is neither a uid nor a user name", s)
	}
	n, err := strconv.ParseUint(u.Uid, 10, 32)
	return uint32(n), err
}

// userName names a uid, or returns it as a number.
var userNames = map[uint32]string{}

func userName(uid uint32) string {
	if n, ok := userNames[uid]; ok {
		return n
	}
	n := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(n); err == nil {
		n = u.Username
	}
	userNames[uid] = n
	return n
}

var oneLine = strings.NewReplacer("\n", " ", "\t", " ", "\r", " ")

// writeTable prints records as audit list's table.
func writeTable(out io.Writer, rs []*audit.Record) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "SEQ\tTIME\tUSER\tACTION\tOBJECT\tRESULT\tLEVEL\tDETAILS")
	for _, r := range rs {
		var details []string
		for _, k := range slices.Sorted(maps.Keys(r.Params)) {
			details = append(details, k+"="+strconv.Quote(r.Params[k]))
		}
		if r.Decision != audit.NoDecision {
			details = append([]string{"decision=" + string(r.Decision)}, details...)
		}
		result := r.Result
		if !r.OK() {
			result = "error: " + oneLine.Replace(result)
			if len(result) > 72 {
				result = strings.ToValidUTF8(result[:69], "") + "..."
			}
		}
		d := strings.Join(details, " ")
		if d == "" {
			d = "-"
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Seq, r.Time.Local().Format("2006-01-02 15:04:05"), userName(r.Actor.UID),
			r.Action, r.Object, result, r.Level, d)
	}
	return w.Flush()
}

// netParams records net create's options.
func netParams(o network.CreateOptions) audit.Params {
	return audit.Params{"subnet": o.Subnet, "isolated": strconv.FormatBool(o.Isolated), "nat": strconv.FormatBool(o.NAT),
		"overlay": o.Overlay, "mtu": strconv.Itoa(o.MTU)}
}
