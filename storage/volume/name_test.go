package volume

import (
	"regexp"
	"strings"
	"testing"
)

// nameRE is the rule ValidName implements by hand.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

func TestValidName(t *testing.T) {
	for _, name := range []string{
		"", "a", "Z", "0", "data", "my-vol_1.img", "-a", "_a", ".a", "a-", "a b", "a/b", "..", "ä", "a\x00",
		strings.Repeat("x", 62), strings.Repeat("x", 63), strings.Repeat("x", 64), "a" + strings.Repeat("-", 62),
	} {
		got, want := ValidName(name) == nil, nameRE.MatchString(name)
		if got != want {
			t.Errorf("ValidName(%q) accepts: %v, want %v", name, got, want)
		}
	}
}

func FuzzValidName(f *testing.F) {
	for _, s := range []string{"", "a", "a-b", "-a", strings.Repeat("x", 64)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if got, want := ValidName(name) == nil, nameRE.MatchString(name); got != want {
			t.Fatalf("ValidName(%q) accepts: %v, want %v", name, got, want)
		}
	})
}
