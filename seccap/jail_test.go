package seccap

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPrepareJailRefuses(t *testing.T) {
	base := t.TempDir()
	dir := t.TempDir()
	for _, tt := range []struct {
		name, dir, id string
		uid, gid      int
		binds         []Bind
		want          string
	}{
		{"relative dir", "jail", "vm", 1000, 1000, nil, `jail directory "jail" is not an absolute path`},
		{"bad id", base, "../etc", 1000, 1000, nil, `VM id "../etc"`},
		{"empty id", base, "", 1000, 1000, nil, `VM id ""`},
		{"long id", base, strings.Repeat("a", 65), 1000, 1000, nil, "VM id"},
		{"root uid", base, "vm", 0, 1000, nil, "not root"},
		{"root gid", base, "vm", 1000, 0, nil, "not root"},
		{"relative bind", base, "vm", 1000, 1000, []Bind{{Path: "run"}}, `bind "run": want a clean absolute path`},
		{"unclean bind", base, "vm", 1000, 1000, []Bind{{Path: dir + "/../x"}}, "want a clean absolute path"},
		{"missing bind", base, "vm", 1000, 1000, []Bind{{Path: filepath.Join(dir, "none")}}, "not a directory"},
	} {
		_, err := PrepareJail(tt.dir, tt.id, tt.uid, tt.gid, tt.binds)
		if !errors.Is(err, ErrJail) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.want)
		}
	}
	if ents, _ := os.ReadDir(base); len(ents) != 0 {
		t.Errorf("refused jails left %v behind", ents)
	}
	j, err := PrepareJail(base, "vm-1", 1000, 1000, []Bind{{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareJail(base, "vm-1", 1000, 1000, nil); !errors.Is(err, ErrJail) || !strings.Contains(err.Error(), "jailed already") {
		t.Errorf("second jail with the same id: %v", err)
	}
	if st, err := os.Stat(filepath.Join(j.Root, dir)); err != nil || !st.IsDir() {
		t.Errorf("no mount point for the bind: %v", err)
	}
	if err := j.Remove(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(base); len(ents) != 0 {
		t.Errorf("Remove left %v behind", ents)
	}
}
