package policy

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// FuzzParse: any bytes either parse to a policy, which then answers every
// request with a decision that names what decided it, or are refused with
// a one-line ParseError. Never a panic, never a hang. The seed corpus is
// testdata/fuzz/FuzzParse plus the example policy.
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	subjects := []Subject{alice, bob, carol, dave, anon, root}
	objects := []Object{
		obj(Volume, "dev-1"), obj(Volume, "payroll-1", "tier", "secret"), obj(Network, "hr-net"),
		obj(Network, "dmz"), obj(Pod, "dev-web"), obj(Volume, "base", "golden", "yes"),
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b)
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q is not a one-line ParseError", err)
			}
			return
		}
		for _, s := range subjects {
			for _, o := range objects {
				for _, a := range Actions {
					if !a.AppliesTo(o.Kind) {
						continue
					}
					d, err := p.Decide(s, a, o)
					if err != nil {
						t.Fatalf("%s %s %s: %v", s, a, o, err)
					}
					if d.By == "" || d.String() == "" || (d.By == ByRule && d.Rule == nil) || (d.By == ByLevel && d.Allow) {
						t.Fatalf("decision %+v does not say what decided it", d)
					}
					if s.UID != 0 && d.Allow && levelCheck(a, d.Clearance, d.Classification) != "" {
						t.Fatalf("%s: allowed past a level check", d)
					}
				}
			}
		}
	})
}
