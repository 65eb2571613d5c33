package tests

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// TestSpecFileAndFlags: a spec file (YAML, and the same as JSON) and the
// equivalent flags give the same effective spec (rayvmm boot
// --print-config), flags given with a file override it, and each bad
// field is refused with an error naming its path, the same for both file
// forms. None of this needs KVM: --print-config opens nothing.
func TestSpecFileAndFlags(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// asJSON writes the YAML document as JSON too.
	asJSON := func(name, y string) string {
		j, err := yaml.YAMLToJSON([]byte(y))
		if err != nil {
			t.Fatal(err)
		}
		return write(name, string(j))
	}
	printConfig := func(t *testing.T, args ...string) result {
		t.Helper()
		return run(t, nil, time.Minute, append([]string{"boot", "--print-config"}, args...)...)
	}
	same := []struct {
		name  string
		yaml  string
		flags []string
	}{
		{"defaults", "{}\n", nil},
		{"machine", "name: web\ncpus: 2\nmemory: 256M\ncpuTemplate: emulated\ncmdline: rayguest.run=echo\nkernel: /boot/k\ninitrd: /boot/i\n",
			[]string{"--name", "web", "--cpus", "2", "--memory", "256M", "--cpu-template", "emulated", "--cmdline", "rayguest.run=echo", "--kernel", "/boot/k", "--initrd", "/boot/i"}},
		{"memory in bytes", "memory: 268435456\n", []string{"--memory", "256M"}},
		{"disks", "disks:\n- path: /img/a.qcow2\n  readOnly: true\n  format: qcow2\n  serial: s1\n- volume: data\n  id: data\n  rateLimit: {iops: 100, bps: 1000000, burst: 10}\n",
			[]string{"--disk", "path=/img/a.qcow2,readonly,format=qcow2,serial=s1", "--disk", "volume=data,id=data,iops=100,bps=1000000,burst=10"}},
		{"nets", "nets:\n- network: lan\n  mac: 02:00:00:00:00:01\n  trunk: [10, 20]\n  rateLimit: {txBps: 1000000, txBurst: 65536, rxPps: 100}\n- tap: tap0\n  id: uplink\n- network: lan\n  vlan: 30\n",
			[]string{"--net", "network=lan,mac=02:00:00:00:00:01,trunk=10:20,tx-bps=1M,tx-burst=64Ki,rx-pps=100", "--net", "tap=tap0,id=uplink", "--net", "network=lan,vlan=30"}},
		{"sockets and files", "apiSocket: /run/vm.sock\nmetricsFile: /tmp/m.json\nvsock: {cid: 3, uds: /run/v.sock}\n",
			[]string{"--api-socket", "/run/vm.sock", "--metrics-file", "/tmp/m.json", "--vsock", "cid=3,uds=/run/v.sock"}},
	}
	for _, tt := range same {
		t.Run(tt.name, func(t *testing.T) {
			fromYAML := printConfig(t, "--config", write(tt.name+".yaml", tt.yaml))
			fromJSON := printConfig(t, "--config", asJSON(tt.name+".json", tt.yaml))
			fromFlags := printConfig(t, tt.flags...)
			for _, r := range []result{fromYAML, fromJSON, fromFlags} {
				if r.code != 0 {
					t.Fatalf("exit %d: %s", r.code, r.stderr)
				}
			}
			if fromYAML.stdout != fromFlags.stdout || fromJSON.stdout != fromFlags.stdout {
				t.Fatalf("file and flags differ:\nYAML file:\n%s\nJSON file:\n%s\nflags:\n%s", fromYAML.stdout, fromJSON.stdout, fromFlags.stdout)
			}
			// The printed spec is itself a spec file that gives the same.
			again := printConfig(t, "--config", write(tt.name+"-printed.yaml", fromFlags.stdout))
			if again.stdout != fromFlags.stdout {
				t.Fatalf("--print-config output read back differs:\n%s\n%s", fromFlags.stdout, again.stdout)
			}
		})
	}

	// Flags override the file; a --disk or --net replaces its list.
	base := write("base.yaml", "cpus: 2\nmemory: 64M\ncmdline: a\ndisks: [{path: /a}, {path: /b}]\nnets: [{network: lan}]\n")
	over := printConfig(t, "--config", base, "--memory", "256M", "--disk", "path=/c")
	want := printConfig(t, "--cpus", "2", "--memory", "256M", "--cmdline", "a", "--disk", "path=/c", "--net", "network=lan")
	if over.code != 0 || over.stdout != want.stdout {
		t.Fatalf("flags over a file:\n%s%s\nwant:\n%s", over.stdout, over.stderr, want.stdout)
	}
	var eff map[string]any
	if err := yaml.Unmarshal([]byte(over.stdout), &eff); err != nil || eff["memory"] != "256M" {
		t.Fatalf("effective spec %v, %v", eff, err)
	}

	bad := []struct {
		name, yaml string
		flags      []string
		want       string // in the file error; the flags' error names the flag's field too
		json       string // the JSON form, when it is not the YAML converted
	}{
		{"unknown field", "nets:\n- network: lan\n  colour: red\n", nil, "nets[0].colour: unknown field", ""},
		{"negative iops", "disks:\n- path: /a\n- path: /b\n  rateLimit: {iops: -1}\n",
			[]string{"--disk", "path=/a", "--disk", "path=/b,iops=-1"}, "disks[1].rateLimit.iops: must not be negative", ""},
		{"negative rate", "nets:\n- tap: t0\n  rateLimit: {txBps: -5}\n", []string{"--net", "tap=t0,tx-bps=-5"}, "nets[0].rateLimit.txBps: must not be negative", ""},
		{"burst without rate", "nets:\n- tap: t0\n  rateLimit: {txBurst: 5}\n", []string{"--net", "tap=t0,tx-burst=5"}, "nets[0].rateLimit.txBurst: needs txBps", ""},
		{"vlan range", "nets:\n- network: lan\n  vlan: 4095\n", []string{"--net", "network=lan,vlan=4095"}, "nets[0].vlan: VLAN 4095 out of range 1..4094", ""},
		{"trunk twice", "nets:\n- network: lan\n  trunk: [10, 10]\n", []string{"--net", "network=lan,trunk=10:10"}, "nets[0].trunk[1]: VLAN 10 listed twice", ""},
		{"two sources", "disks:\n- path: /a\n  volume: v\n", []string{"--disk", "path=/a,volume=v"}, "disks[0]: give path or volume, not both", ""},
		{"format", "disks:\n- path: /a\n  format: vmdk\n", []string{"--disk", "path=/a,format=vmdk"}, `disks[0].format: "vmdk": want raw or qcow2`, ""},
		{"duplicate id", "disks:\n- path: /a\n  id: x\n- path: /b\n  id: x\n", []string{"--disk", "path=/a,id=x", "--disk", "path=/b,id=x"}, `disks[1].id: "x" is also the id of disks[0]`, ""},
		{"mac", "nets:\n- tap: t0\n  mac: 01:00:5e:00:00:01\n", []string{"--net", "tap=t0,mac=01:00:5e:00:00:01"}, "nets[0].mac: 01:00:5e:00:00:01 is a multicast address", ""},
		{"template", "cpuTemplate: fast\n", []string{"--cpu-template", "fast"}, `cpuTemplate: unknown CPU template "fast"`, ""},
		{"memory", "memory: lots\n", nil, `memory: invalid size "lots"`, ""},
		{"cpus type", "cpus: two\n", nil, "cpus: want a whole number", ""},
		{"vsock cid", "vsock: {cid: 2, uds: /run/v.sock}\n", []string{"--vsock", "cid=2,uds=/run/v.sock"}, "vsock.cid: 2: want 3 to", ""},
		{"vsock uds", "vsock: {cid: 3}\n", nil, "vsock.uds: a Unix socket path is required", ""},
		{"repeated key", "cpus: 1\ncpus: 2\n", nil, `key "cpus" already set`, `{"cpus": 1, "cpus": 2}`},
	}
	for _, tt := range bad {
		t.Run("bad "+tt.name, func(t *testing.T) {
			var msgs []string
			jsonFile := write(tt.name+".json", tt.json)
			if tt.json == "" {
				jsonFile = asJSON(tt.name+".json", tt.yaml)
			}
			for _, f := range []string{write(tt.name+".yaml", tt.yaml), jsonFile} {
				r := printConfig(t, "--config", f)
				msg := strings.TrimSpace(r.stderr)
				if r.code == 0 || strings.Contains(msg, "\n") || !strings.Contains(msg, tt.want) {
					t.Fatalf("--config %s: exit %d, stderr %q; want one line containing %q", f, r.code, r.stderr, tt.want)
				}
				msg = strings.TrimPrefix(msg, "rayvmm: --config "+f+": ")
				msgs = append(msgs, regexp.MustCompile(`line \d+: `).ReplaceAllString(msg, "line N: "))
			}
			if msgs[0] != msgs[1] {
				t.Fatalf("YAML and JSON give different errors:\n%s\n%s", msgs[0], msgs[1])
			}
			if tt.flags != nil {
				r := printConfig(t, tt.flags...)
				if r.code == 0 || !strings.Contains(r.stderr, tt.want) {
					t.Fatalf("flags %v: exit %d, stderr %q; want %q", tt.flags, r.code, r.stderr, tt.want)
				}
			}
		})
	}
}
