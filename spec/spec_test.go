package spec

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// parseValid decodes, defaults and validates a document, as the control
// plane does.
func parseValid(doc string) (*VM, error) {
	v, err := Parse([]byte(doc))
	if err != nil {
		return nil, err
	}
	v.Defaults()
	return v, v.Validate()
}

func TestDecodeErrorsNamePaths(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"unknown top-level field", `{"cpu": 2}`, `cpu: unknown field`},
		{"unknown nested field", `{"nets": [{"network": "lan", "colour": "red"}]}`, `nets[0].colour: unknown field`},
		{"negative iops", `{"disks": [{"path": "a"}, {"path": "b", "rateLimit": {"iops": -1}}]}`, `disks[1].rateLimit.iops: must not be negative`},
		{"negative tx rate", `{"nets": [{"tap": "t0", "rateLimit": {"txBps": -5}}]}`, `nets[0].rateLimit.txBps: must not be negative`},
		{"wrong type", `{"cpus": "two"}`, `cpus: want a whole number, got a string ("two")`},
		{"fraction", `{"cpus": 1.5}`, `cpus: 1.5 is not a whole number in range`},
		{"bool as string", `{"disks": [{"path": "a", "readOnly": "yes"}]}`, `disks[0].readOnly: want true or false`},
		{"list expected", `{"disks": {"path": "a"}}`, `disks: want a list, got an object`},
		{"object expected", `{"disks": ["a"]}`, `disks[0]: want an object, got a string`},
		{"repeated field", `{"cpus": 1, "cpus": 2}`, `cpus: given twice`},
		{"bad memory", `{"memory": "lots"}`, `memory: invalid size "lots"`},
		{"zero memory", `{"memory": 0}`, `memory: invalid size "0": must be greater than zero`},
		{"memory fraction", `{"memory": 1.5e9}`, `memory: 1.5e9 is not a whole number of bytes`},
		{"trailing data", `{"cpus": 1} {}`, `trailing data`},
		{"not JSON", `{"cpus": }`, `not valid JSON`},
		{"not an object", `[1]`, `want an object, got a list`},
		{"vsock cid range", `{"vsock": {"cid": 4294967296, "uds": "v.sock"}}`, `vsock.cid: 4294967296 is not a whole number in range`},
		{"vsock unknown", `{"vsock": {"cid": 3, "port": 1}}`, `vsock.port: unknown field`},
		{"cpus zero", `{"cpus": -1}`, `cpus: -1: need at least 1`},
		{"template", `{"cpuTemplate": "fast"}`, `cpuTemplate: unknown CPU template "fast"`},
		{"no source", `{"disks": [{"readOnly": true}]}`, `disks[0]: needs path or volume`},
		{"two sources", `{"disks": [{"path": "a", "volume": "b"}]}`, `disks[0]: give path or volume, not both`},
		{"format", `{"disks": [{"path": "a", "format": "vmdk"}]}`, `disks[0].format: "vmdk": want raw or qcow2`},
		{"serial", `{"disks": [{"path": "a", "serial": "123456789012345678901"}]}`, `disks[0].serial: "123456789012345678901" is longer than 20 bytes`},
		{"burst alone", `{"disks": [{"path": "a", "rateLimit": {"burst": 5}}]}`, `disks[0].rateLimit.burst: needs iops or bps`},
		{"duplicate id", `{"disks": [{"path": "a"}, {"path": "b", "id": "vda"}]}`, `disks[1].id: "vda" is also the id of disks[0]`},
		{"bad id", `{"disks": [{"path": "a", "id": "a/b"}]}`, `disks[0].id: "a/b": use 1 to 64 letters`},
		{"nic no source", `{"nets": [{"mac": "02:00:00:00:00:01"}]}`, `nets[0]: needs network or tap`},
		{"nic mac", `{"nets": [{"tap": "t0", "mac": "01:00:5e:00:00:01"}]}`, `nets[0].mac: 01:00:5e:00:00:01 is a multicast address`},
		{"nic vlan", `{"nets": [{"network": "lan", "vlan": 4095}]}`, `nets[0].vlan: VLAN 4095 out of range 1..4094`},
		{"nic trunk dup", `{"nets": [{"network": "lan", "trunk": [10, 20, 10]}]}`, `nets[0].trunk[2]: VLAN 10 listed twice`},
		{"nic vlan on tap", `{"nets": [{"tap": "t0", "vlan": 10}]}`, `nets[0]: vlan and trunk need network`},
		{"nic network name", `{"nets": [{"network": "Lan!"}]}`, `nets[0].network: network name "Lan!"`},
		{"nic tap name", `{"nets": [{"tap": "abcdefghijklmnop"}]}`, `nets[0].tap: tap name "abcdefghijklmnop" is 16 bytes`},
		{"nic burst", `{"nets": [{"tap": "t0", "rateLimit": {"txBurst": 10}}]}`, `nets[0].rateLimit.txBurst: needs txBps`},
		{"id shared by disk and nic", `{"disks": [{"path": "a", "id": "x"}], "nets": [{"tap": "t0", "id": "x"}]}`, `nets[0].id: "x" is also the id of disks[0]`},
		{"vsock low cid", `{"vsock": {"cid": 2, "uds": "v.sock"}}`, `vsock.cid: 2: want 3 to`},
		{"api socket too long", `{"apiSocket": "/` + strings.Repeat("a", 120) + `"}`, `apiSocket: "`},
		{"name", `{"name": "web server"}`, `name: "web server": use 1 to 64`},
		{"sandbox mode", `{"sandbox": {"mode": "lax"}}`, `sandbox.mode: "lax": want strict, log or off`},
		{"sandbox unknown", `{"sandbox": {"seccomp": true}}`, `sandbox.seccomp: unknown field`},
		{"jail with sandbox off", `{"sandbox": {"mode": "off", "jail": {"dir": "/j", "uid": 1, "gid": 1}}}`, `sandbox.jail: needs mode strict or log`},
		{"jail dir", `{"sandbox": {"jail": {"dir": "j", "uid": 1, "gid": 1}}}`, `sandbox.jail.dir: "j" is not an absolute path`},
		{"jail no dir", `{"sandbox": {"jail": {"uid": 1, "gid": 1}}}`, `sandbox.jail.dir: a directory is required`},
		{"jail root", `{"sandbox": {"jail": {"dir": "/j", "uid": 0, "gid": 1}}}`, `sandbox.jail.uid: 0: want an unprivileged uid`},
		{"jail gid", `{"sandbox": {"jail": {"dir": "/j", "uid": 1000}}}`, `sandbox.jail.gid: 0: want an unprivileged gid`},
		{"jail uid range", `{"sandbox": {"jail": {"dir": "/j", "uid": 4294967295, "gid": 1}}}`, `sandbox.jail.uid: 4294967295: want an unprivileged uid`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseValid(tt.doc)
			if err == nil {
				t.Fatalf("%s: no error, want %q", tt.doc, tt.want)
			}
			if !strings.HasPrefix(err.Error(), tt.want) && !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("%s:\n got %q\nwant %q", tt.doc, err, tt.want)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("%v does not wrap ErrInvalid", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error is more than one line: %q", err)
			}
		})
	}
}

func TestDefaults(t *testing.T) {
	v, err := parseValid(`{"disks": [{"path": "a"}, {"path": "b", "id": "data"}, {"volume": "c"}],
		"nets": [{"network": "lan", "mac": "02:AA:bb:cc:dd:ee", "trunk": [20, 10]}, {"tap": "t0"}]}`)
	if err != nil {
		t.Fatal(err)
	}
	if v.CPUs != 1 || v.Memory != 128<<20 || v.CPUTemplate != "auto" {
		t.Fatalf("cpus %d memory %d template %q", v.CPUs, v.Memory, v.CPUTemplate)
	}
	var ids []string
	for _, d := range v.Disks {
		ids = append(ids, d.ID)
	}
	for _, n := range v.Nets {
		ids = append(ids, n.ID)
	}
	if got := strings.Join(ids, " "); got != "vda data vdc net0 net1" {
		t.Fatalf("ids %q", got)
	}
	if v.Nets[0].MAC != "02:aa:bb:cc:dd:ee" || !reflect.DeepEqual(v.Nets[0].Trunk, []int{20, 10}) {
		t.Fatalf("nets[0] not canonical: %+v", v.Nets[0])
	}
}

func TestDiskID(t *testing.T) {
	for i, want := range map[int]string{0: "vda", 1: "vdb", 25: "vdz", 26: "vdaa", 27: "vdab", 701: "vdzz", 702: "vdaaa"} {
		if got := DiskID(i); got != want {
			t.Errorf("DiskID(%d) = %q, want %q", i, got, want)
		}
	}
}

// TestRoundTrip: a spec written as JSON reads back to the same spec, and
// memory comes out in its canonical form.
func TestRoundTrip(t *testing.T) {
	v, err := parseValid(`{"name": "web", "memory": 268435456, "cpus": 2, "cmdline": "rayguest.run=serve",
		"disks": [{"path": "/img/a.qcow2", "readOnly": true, "format": "qcow2", "serial": "abc", "rateLimit": {"iops": 100, "burst": 10}}],
		"nets": [{"network": "lan", "vlan": 10, "rateLimit": {"txBps": 1000000}}],
		"vsock": {"cid": 3, "uds": "/run/v.sock"}, "apiSocket": "/run/api.sock"}`)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"memory":"256M"`) {
		t.Fatalf("memory not canonical: %s", b)
	}
	if strings.Contains(string(b), `"rateLimit":{}`) {
		t.Fatalf("empty rate limit written: %s", b)
	}
	again, err := parseValid(string(b))
	if err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	if !reflect.DeepEqual(v, again) {
		t.Fatalf("round trip changed the spec:\n%+v\n%+v", v, again)
	}
}

// TestEmbedded: a type that embeds VM (a pod's VM entry) decodes the VM's
// fields inline with the same rules and paths.
func TestEmbedded(t *testing.T) {
	type podVM struct {
		VM
		Resources struct {
			Limits map[string]string `json:"limits"`
		} `json:"resources"`
	}
	var p podVM
	if err := Decode([]byte(`{"name": "front", "cpus": 2, "resources": {"limits": {"cpu": "500m"}}}`), &p); err != nil {
		t.Fatal(err)
	}
	if p.Name != "front" || p.CPUs != 2 || p.Resources.Limits["cpu"] != "500m" {
		t.Fatalf("%+v", p)
	}
	err := Decode([]byte(`{"name": "front", "nets": [{"tap": "t", "speed": 1}]}`), &p)
	if err == nil || err.Error() != "nets[0].speed: unknown field" {
		t.Fatalf("embedded error: %v", err)
	}
}

func TestParseNICFlags(t *testing.T) {
	tests := []struct {
		name, in string
		want     string // NIC.String() once defaulted, or the error
		wantErr  bool
	}{
		{name: "network", in: "network=lan", want: "network=lan,id=net0"},
		{name: "tap", in: "tap=tap0", want: "tap=tap0,id=net0"},
		{name: "all keys", in: "network=lan,mac=02:00:00:00:00:01,vlan=10,rx-bps=1M,tx-bps=2Mi,rx-pps=100,tx-pps=200,rx-burst=10K,tx-pps-burst=5",
			want: "network=lan,id=net0,mac=02:00:00:00:00:01,vlan=10,rx-bps=1000000,rx-pps=100,rx-burst=10000,tx-bps=2097152,tx-pps=200,tx-pps-burst=5"},
		{name: "trunk", in: "network=lan,trunk=20:10:4094", want: "network=lan,id=net0,trunk=20:10:4094"},
		{name: "id", in: "network=lan,id=uplink", want: "network=lan,id=uplink"},
		{name: "empty", in: "", want: "empty", wantErr: true},
		{name: "neither", in: "mac=02:00:00:00:00:01", want: "nets[0]: needs network or tap", wantErr: true},
		{name: "both", in: "network=lan,tap=tap0", want: "not both", wantErr: true},
		{name: "bad mac", in: "network=lan,mac=zz:00:00:00:00:01", want: "not a MAC address", wantErr: true},
		{name: "zero mac", in: "network=lan,mac=00:00:00:00:00:00", want: "zero address", wantErr: true},
		{name: "vlan 0", in: "network=lan,vlan=0", want: "VLAN 0 out of range 1..4094", wantErr: true},
		{name: "vlan 4095", in: "network=lan,vlan=4095", want: "nets[0].vlan: VLAN 4095 out of range 1..4094", wantErr: true},
		{name: "vlan junk", in: "network=lan,vlan=ten", want: "vlan:", wantErr: true},
		{name: "trunk dup", in: "network=lan,trunk=10:10", want: "listed twice", wantErr: true},
		{name: "trunk junk", in: "network=lan,trunk=10:x", want: `VLAN "x" is not a number`, wantErr: true},
		{name: "vlan and trunk", in: "network=lan,vlan=10,trunk=10:20", want: "exclusive", wantErr: true},
		{name: "vlan on tap", in: "tap=tap0,vlan=10", want: "need network", wantErr: true},
		{name: "unknown key", in: "network=lan,speed=10", want: `unknown key "speed"`, wantErr: true},
		{name: "no value", in: "network=lan,mac", want: "not key=value", wantErr: true},
		{name: "twice", in: "network=lan,network=wan", want: "given twice", wantErr: true},
		{name: "long network name", in: "network=abcdefghijklm", want: "at most 12 characters", wantErr: true},
		{name: "negative rate", in: "network=lan,tx-bps=-1", want: "nets[0].rateLimit.txBps: must not be negative", wantErr: true},
		{name: "overflow rate", in: "network=lan,tx-bps=99999999999999Gi", want: "overflows", wantErr: true},
		{name: "burst without rate", in: "network=lan,tx-burst=1M", want: "txBurst: needs txBps", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := nicEntry(tt.in)
			if tt.wantErr {
				if err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, ErrInvalid) {
					t.Fatalf("ParseNIC(%q) error = %v, want one containing %q", tt.in, err, tt.want)
				}
				return
			}
			if err != nil || got.String() != tt.want {
				t.Fatalf("ParseNIC(%q) = %q, %v; want %q", tt.in, got.String(), err, tt.want)
			}
			again, err := nicEntry(got.String())
			if err != nil || again.String() != got.String() {
				t.Fatalf("round trip of %q: %q, %v", got.String(), again.String(), err)
			}
		})
	}
}

// nicEntry parses a --net value into a defaulted, validated entry.
func nicEntry(s string) (NIC, error) {
	n, err := ParseNIC(s)
	if err != nil {
		return NIC{}, err
	}
	v := VM{Nets: []NIC{n}}
	v.Defaults()
	return v.Nets[0], v.Validate()
}

// diskEntry parses a --disk value into a defaulted, validated entry.
func diskEntry(s string) (Disk, error) {
	d, err := ParseDisk(s)
	if err != nil {
		return Disk{}, err
	}
	v := VM{Disks: []Disk{d}}
	v.Defaults()
	return v.Disks[0], v.Validate()
}

func TestParseDiskFlags(t *testing.T) {
	tests := []struct {
		name, in, want string
		wantErr        bool
	}{
		{name: "path", in: "path=/tmp/a.img", want: "path=/tmp/a.img,id=vda"},
		{name: "volume ro", in: "volume=data,readonly", want: "volume=data,id=vda,readonly"},
		{name: "ro", in: "volume=data,ro", want: "volume=data,id=vda,readonly"},
		{name: "qos", in: "path=x,iops=100,bps=1000000,burst=50", want: "path=x,id=vda,iops=100,bps=1000000,burst=50"},
		{name: "format serial id", in: "path=x,format=qcow2,serial=S1,id=root", want: "path=x,id=root,format=qcow2,serial=S1"},
		{name: "empty", in: "", want: "empty", wantErr: true},
		{name: "unknown option", in: "path=x,fast", want: `unknown option "fast"`, wantErr: true},
		{name: "no source", in: "readonly", want: "disks[0]: needs path or volume", wantErr: true},
		{name: "both sources", in: "path=x,volume=y", want: "not both", wantErr: true},
		{name: "bad format", in: "path=x,format=vmdk", want: "want raw or qcow2", wantErr: true},
		{name: "negative iops", in: "path=x,iops=-1", want: "disks[0].rateLimit.iops: must not be negative", wantErr: true},
		{name: "junk bps", in: "path=x,bps=fast", want: "not a whole number", wantErr: true},
		{name: "burst alone", in: "path=x,burst=5", want: "burst: needs iops or bps", wantErr: true},
		{name: "duplicate", in: "path=x,path=y", want: "twice", wantErr: true},
		{name: "empty path", in: "path=", want: "needs a value", wantErr: true},
		{name: "readonly value", in: "path=x,readonly=yes", want: "takes no value", wantErr: true},
		{name: "long serial", in: "path=x,serial=123456789012345678901", want: "longer than 20 bytes", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := diskEntry(tt.in)
			if tt.wantErr {
				if err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, ErrInvalid) {
					t.Fatalf("ParseDisk(%q) error = %v, want one containing %q", tt.in, err, tt.want)
				}
				return
			}
			if err != nil || got.String() != tt.want {
				t.Fatalf("ParseDisk(%q) = %q, %v; want %q", tt.in, got.String(), err, tt.want)
			}
			again, err := diskEntry(got.String())
			if err != nil || again.String() != got.String() {
				t.Fatalf("round trip of %q: %q, %v", got.String(), again.String(), err)
			}
		})
	}
}

func TestParseVsockFlags(t *testing.T) {
	tests := []struct {
		name, in, want string // want: Vsock.String(), or the error
		wantErr        bool
	}{
		{name: "ok", in: "cid=3,uds=/run/v.sock", want: "cid=3,uds=/run/v.sock"},
		{name: "order", in: "uds=/run/v.sock,cid=4294967294", want: "cid=4294967294,uds=/run/v.sock"},
		{name: "relative", in: "cid=7,uds=v.sock", want: "cid=7,uds=v.sock"},
		{name: "cid 2", in: "cid=2,uds=/v", want: "vsock.cid: 2: want 3 to 4294967294", wantErr: true},
		{name: "cid any", in: "cid=4294967295,uds=/v", want: "vsock.cid: 4294967295: want 3 to", wantErr: true},
		{name: "cid past 32 bits", in: "cid=4294967296,uds=/v", want: "not a guest CID", wantErr: true},
		{name: "cid text", in: "cid=three,uds=/v", want: `cid: "three" is not a guest CID`, wantErr: true},
		{name: "no cid", in: "uds=/v", want: "cid=N is missing", wantErr: true},
		{name: "no uds", in: "cid=3", want: "uds=PATH is missing", wantErr: true},
		{name: "twice", in: "cid=3,cid=4,uds=/v", want: "cid given twice", wantErr: true},
		{name: "unknown key", in: "cid=3,uds=/v,port=5", want: `unknown key "port"`, wantErr: true},
		{name: "empty value", in: "cid=,uds=/v", want: "not key=value", wantErr: true},
		{name: "no equals", in: "cid3", want: "not key=value", wantErr: true},
		{name: "empty", in: "", want: "not key=value", wantErr: true},
		{name: "too long", in: "cid=3,uds=/" + strings.Repeat("x", 96), want: "with _4294967295 behind it", wantErr: true},
		{name: "longest", in: "cid=3,uds=/" + strings.Repeat("x", 95), want: "cid=3,uds=/" + strings.Repeat("x", 95)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := vsockEntry(tt.in)
			if tt.wantErr {
				if err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, ErrInvalid) {
					t.Fatalf("ParseVsock(%q) error = %v, want one containing %q", tt.in, err, tt.want)
				}
				return
			}
			if err != nil || got.String() != tt.want {
				t.Fatalf("ParseVsock(%q) = %q, %v; want %q", tt.in, got.String(), err, tt.want)
			}
		})
	}
}

// vsockEntry parses a --vsock value into a validated entry.
func vsockEntry(s string) (Vsock, error) {
	vs, err := ParseVsock(s)
	if err != nil {
		return Vsock{}, err
	}
	v := VM{Vsock: &vs}
	v.Defaults()
	return vs, v.Validate()
}

// FuzzParseVsock: as FuzzParseNIC for --vsock.
func FuzzParseVsock(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		vs, err := vsockEntry(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseVsock(%q) error %v has no category", s, err)
			}
			return
		}
		again, err := vsockEntry(vs.String())
		if err != nil || vs != again {
			t.Fatalf("ParseVsock(%q) = %q, which reads back as %q, %v", s, vs.String(), again.String(), err)
		}
	})
}

// FuzzParse: any document either fails with an ErrInvalid error of one
// line, or is a spec whose JSON form reads back to the same spec.
func FuzzParse(f *testing.F) {
	f.Fuzz(func(t *testing.T, doc []byte) {
		v, err := parseValid(string(doc))
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrInvalidSize) {
				t.Fatalf("error %v has no category", err)
			}
			return
		}
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		again, err := parseValid(string(b))
		if err != nil || !reflect.DeepEqual(v, again) {
			t.Fatalf("%s -> %s -> %+v, %v", doc, b, again, err)
		}
	})
}

// FuzzParseNIC: any --net value either fails with ErrInvalid or is an
// entry whose flag form reads back to the same entry.
func FuzzParseNIC(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		n, err := nicEntry(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseNIC(%q) error %v has no category", s, err)
			}
			return
		}
		again, err := nicEntry(n.String())
		if err != nil || !reflect.DeepEqual(n, again) {
			t.Fatalf("ParseNIC(%q) = %q, which reads back as %q, %v", s, n.String(), again.String(), err)
		}
	})
}

// FuzzParseDisk: as FuzzParseNIC for --disk.
func FuzzParseDisk(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		d, err := diskEntry(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseDisk(%q) error %v has no category", s, err)
			}
			return
		}
		again, err := diskEntry(d.String())
		if err != nil || !reflect.DeepEqual(d, again) {
			t.Fatalf("ParseDisk(%q) = %q, which reads back as %q, %v", s, d.String(), again.String(), err)
		}
	})
}

func TestNames(t *testing.T) {
	for _, tt := range []struct {
		name, in string
		check    func(string) error
		ok       bool
	}{
		{"network", "lan-1_a", CheckNetworkName, true},
		{"network upper", "Lan", CheckNetworkName, false},
		{"network leading dash", "-lan", CheckNetworkName, false},
		{"network empty", "", CheckNetworkName, false},
		{"network 12", "abcdefghijkl", CheckNetworkName, true},
		{"network 13", "abcdefghijklm", CheckNetworkName, false},
		{"vm", "Web.1_a-b", CheckVMName, true},
		{"vm leading dot", ".web", CheckVMName, false},
		{"vm space", "web 1", CheckVMName, false},
		{"vm 64", strings.Repeat("a", 64), CheckVMName, true},
		{"vm 65", strings.Repeat("a", 65), CheckVMName, false},
		{"vm non-ASCII", "wéb", CheckVMName, false},
		{"id", "vda", checkID, true},
		{"id slash", "a/b", checkID, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.check(tt.in); (err == nil) != tt.ok {
				t.Fatalf("%q: %v, want ok %v", tt.in, err, tt.ok)
			}
		})
	}
}
