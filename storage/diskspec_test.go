package storage

import (
	"strings"
	"testing"
)

func TestParseDiskSpec(t *testing.T) {
	tests := []struct {
		name string
		spec string
		want string // error substring, "" = ok
		chk  func(DiskSpec) bool
	}{
		{"path", "path=/tmp/a.img", "", func(d DiskSpec) bool { return d.Path == "/tmp/a.img" && !d.ReadOnly }},
		{"volume ro", "volume=data,readonly", "", func(d DiskSpec) bool { return d.Volume == "data" && d.ReadOnly }},
		{"qos", "path=x,iops=100,bps=1000000,burst=50", "", func(d DiskSpec) bool {
			return d.Limits.Ops.Size == 100 && d.Limits.Ops.OneTimeBurst == 50 && d.Limits.Bandwidth.Size == 1000000 && d.Limits.Bandwidth.OneTimeBurst == 0
		}},
		{"bps burst", "path=x,bps=4096,burst=8192", "", func(d DiskSpec) bool { return d.Limits.Bandwidth.OneTimeBurst == 8192 }},
		{"format", "path=x,format=qcow2", "", func(d DiskSpec) bool { return d.Format == "qcow2" }},
		{"empty", "", "empty spec", nil},
		{"unknown option", "path=x,fast", "unknown option \"fast\"", nil},
		{"no source", "readonly", "no path= or volume=", nil},
		{"both sources", "path=x,volume=y", "not both", nil},
		{"bad format", "path=x,format=vmdk", "want raw or qcow2", nil},
		{"zero iops", "path=x,iops=0", "not a positive", nil},
		{"junk bps", "path=x,bps=fast", "not a positive", nil},
		{"burst alone", "path=x,burst=5", "burst= needs", nil},
		{"duplicate", "path=x,path=y", "twice", nil},
		{"empty path", "path=", "needs a value", nil},
		{"readonly value", "path=x,readonly=yes", "takes no value", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := ParseDiskSpec(tc.spec)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("err = %v, want %q", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.chk(d) {
				t.Fatalf("parsed %+v", d)
			}
		})
	}
}
