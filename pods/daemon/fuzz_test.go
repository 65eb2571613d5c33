package daemon

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/pods"
)

// FuzzRecord feeds the pods bucket's decoder (what a daemon reads back
// from the state store, file input) arbitrary bytes: no panic, and a
// record it accepts encodes and decodes again to the same record.
func FuzzRecord(f *testing.F) {
	p, err := pods.Load([]byte(okPod))
	if err != nil {
		f.Fatal(err)
	}
	good := &record{UID: "0123456789abcdef", Pod: p, Created: time.Unix(1, 0).UTC(),
		VMs: []*vmRecord{{Name: "a", PID: 42, StartTime: 7, Instance: 1, RestartCount: 2, State: pods.VMState{Running: &pods.RunningVM{}}}}}
	b, _ := json.Marshal(good)
	f.Add("web", b)
	f.Add("web", []byte(`{"uid":"0123456789abcdef","pod":null}`))
	f.Add("other", b)
	f.Fuzz(func(t *testing.T, key string, raw []byte) {
		r, err := records.Decode(key, raw)
		if err != nil {
			return
		}
		enc, err := records.Encode(r)
		if err != nil {
			t.Fatalf("encode an accepted record: %v", err)
		}
		if _, err := records.Decode(key, enc); err != nil {
			t.Fatalf("an accepted record does not read back: %v\n%s", err, enc)
		}
	})
}
