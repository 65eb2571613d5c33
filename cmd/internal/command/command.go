// Package command is what rayvmm's two commands, rayvmm (the CLI and
// foreground control plane) and rayvmmd (the daemon and everything that
// links etcd), share on the command line: the state directory's default,
// positional-argument checks, JSON and the volume table, so that a
// command rayvmm hands over to rayvmmd (syscall.Exec with the same
// arguments) reads and prints the same.
package command

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage/volume"
)

// DefaultStateDir is --state-dir's default: $RAYVMM_STATE_DIR if set,
// else /var/lib/rayvmm for root, else under $XDG_DATA_HOME or
// ~/.local/share.
func DefaultStateDir() string {
	if d := os.Getenv("RAYVMM_STATE_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/rayvmm"
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return d + "/rayvmm"
	}
	if h, err := os.UserHomeDir(); err == nil {
		return h + "/.local/share/rayvmm"
	}
	return ".rayvmm"
}

// Args makes cobra check for exactly the named positional arguments.
func Args(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if len(a) != len(names) {
			return fmt.Errorf("%s takes %s (got %d argument(s))", cmd.CommandPath(), strings.Join(names, " "), len(a))
		}
		return nil
	}
}

// PrintJSON prints v as indented JSON.
func PrintJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// VolumeRow is one line of `volume list`.
type VolumeRow struct {
	Name, Format, Size, Allocated, State, Parent string
}

// LocalRows are the rows of local volumes.
func LocalRows(vs []*volume.Volume) []VolumeRow {
	var out []VolumeRow
	for _, v := range vs {
		st := string(v.State)
		if v.ReadOnly {
			st += " (snapshot)"
		}
		parent := v.Parent
		if parent == "" {
			parent = "-"
		}
		out = append(out, VolumeRow{v.Name, v.Format, spec.FormatSize(v.Size), spec.FormatSize(v.Allocated), st, parent})
	}
	return out
}

// VolumeTable prints `volume list`'s table.
func VolumeTable(w io.Writer, rows []VolumeRow) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tFORMAT\tSIZE\tALLOCATED\tSTATE\tPARENT")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, r.Format, r.Size, r.Allocated, r.State, r.Parent)
	}
	return tw.Flush()
}
