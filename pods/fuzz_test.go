package pods

import (
	"encoding/json"
	"errors"
	"os"
	"testing"
)

// FuzzLoad feeds the pod spec parser (YAML and JSON, defaults,
// validation) arbitrary documents: it must never panic, every error must
// be a spec error on one line, and a pod it accepts must read back the
// same from its own JSON. Seeds: testdata/fuzz/FuzzLoad and the example.
func FuzzLoad(f *testing.F) {
	if b, err := os.ReadFile("testdata/web.yaml"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(base))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Load(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %q (%T) is not ErrInvalid", err, err)
			}
			return
		}
		j, err := json.Marshal(p)
		if err != nil {
			t.Fatalf("marshal an accepted pod: %v", err)
		}
		q, err := Load(j)
		if err != nil {
			t.Fatalf("an accepted pod's JSON is refused: %v\n%s", err, j)
		}
		j2, _ := json.Marshal(q)
		if string(j) != string(j2) {
			t.Fatalf("JSON round trip differs:\n%s\n%s", j, j2)
		}
	})
}
