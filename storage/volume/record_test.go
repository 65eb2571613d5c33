package volume

import (
	"path/filepath"
	"reflect"
	"testing"
)

// Records as rayvmm 5e23d5e stored them (state/testdata/schema0), and
// edited or damaged ones.
var recordSeeds = []struct{ key, raw string }{
	{"copy", `{"name":"copy","format":"qcow2","virtual_size":67108864,"path":"copy-eb152dc8.qcow2","state":"available","parent":"monday","read_only":false,"created":"2026-12-02T01:06:27Z","allocated_bytes":0}`},
	{"monday", `{"name":"monday","format":"qcow2","virtual_size":67108864,"path":"data-2bc7eead.qcow2","state":"available","read_only":true,"created":"2026-12-02T01:06:27Z","allocated_bytes":0}`},
	{"scratch", `{"name":"scratch","format":"raw","virtual_size":8388608,"path":"scratch-b41fd60c.raw","state":"available","read_only":false,"created":"2026-12-02T01:06:27Z","allocated_bytes":0}`},
	{"half", `{"name":"half","format":"qcow2","virtual_size":1048576,"path":"","state":"created","created":"2026-12-02T01:06:27Z"}`},
	{"evil", `{"name":"evil","format":"raw","virtual_size":512,"path":"../../etc/shadow","state":"available"}`},
	{"evil", `{"name":"evil","format":"raw","virtual_size":512,"path":"/etc/shadow","state":"available"}`},
	{"evil", `{"name":"other","format":"raw","virtual_size":512,"path":"x.raw","state":"available"}`},
	{"evil", `{"name":"evil","format":"raw","virtual_size":512,"path":"x.raw","state":"attached","attached_by_pid":1}`},
	{"evil", `{"name":"evil","format":"vmdk","virtual_size":0,"path":"x.raw","state":"available","parent":"../p"}`},
	{"evil", `{"name":"evil"`},
}

// FuzzVolumeRecord: any bytes stored as a volume record are refused with
// an error, or decode to a record whose image is a file in the volume
// directory and which stores and decodes back unchanged. Never a panic.
func FuzzVolumeRecord(f *testing.F) {
	for _, s := range recordSeeds {
		f.Add(s.key, []byte(s.raw))
	}
	f.Fuzz(func(t *testing.T, key string, raw []byte) {
		v, err := records.Decode(key, raw)
		if err != nil {
			return
		}
		if v.Name != key || v.Path != "" && filepath.Dir(filepath.Join("/vol", v.Path)) != "/vol" || v.State == Attached {
			t.Fatalf("accepted record %+v under key %q", v, key)
		}
		again, err := records.Encode(v)
		if err != nil {
			t.Fatal(err)
		}
		back, err := records.Decode(key, again)
		if err != nil || !reflect.DeepEqual(back, v) {
			t.Fatalf("record %+v stored and decoded back as %+v, %v", v, back, err)
		}
	})
}

// TestRecordSeeds: the fixture's records are accepted, the edited ones
// refused.
func TestRecordSeeds(t *testing.T) {
	for i, s := range recordSeeds {
		_, err := records.Decode(s.key, []byte(s.raw))
		if ok := i < 4; (err == nil) != ok {
			t.Errorf("seed %d (%s): %v, want accepted %v", i, s.raw, err, ok)
		}
	}
}
