package pods

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/spec"
)

func TestLoadExample(t *testing.T) {
	b, err := os.ReadFile("testdata/web.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Load(b)
	if err != nil {
		t.Fatal(err)
	}
	v := p.Spec.VMs[0]
	if v.Name != "front" || v.Memory != 64<<20 || v.CPUs != 1 || v.Vsock.CID != 3 {
		t.Errorf("vm: %+v", v.VM)
	}
	if got := v.Resources.Limits; got.CPU != 500 || got.Memory != 96<<20 || got.Pids != 64 {
		t.Errorf("limits: %+v", got)
	}
	// Kubernetes' defaults for what the probes leave out.
	if r := v.ReadinessProbe; r.TimeoutSeconds != 1 || r.SuccessThreshold != 1 || r.FailureThreshold != 3 || r.InitialDelaySeconds != 0 || r.PeriodSeconds != 2 {
		t.Errorf("readiness probe: %+v", r)
	}
	if s := v.StartupProbe; s.FailureThreshold != 30 || s.PeriodSeconds != 1 {
		t.Errorf("startup probe: %+v", s)
	}
	if p.Spec.RestartPolicy != RestartAlways || p.Spec.GracePeriod().Seconds() != 30 {
		t.Errorf("pod defaults: %s %v", p.Spec.RestartPolicy, p.Spec.GracePeriod())
	}
	if p.Spec.Volumes[0].From != "base-snap" || VolumeName(p.Metadata.Name, "web-data") != "web-web-data" {
		t.Errorf("volumes: %+v", p.Spec.Volumes)
	}
	// The JSON form reads back to the same pod.
	j, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	q, err := Load(j)
	if err != nil {
		t.Fatalf("the pod's own JSON: %v\n%s", err, j)
	}
	j2, _ := json.Marshal(q)
	if string(j) != string(j2) {
		t.Errorf("JSON round trip differs:\n%s\n%s", j, j2)
	}
}

func TestDefaults(t *testing.T) {
	p, err := Load([]byte(`{"apiVersion":"rayvmm/v1","kind":"Pod","metadata":{"name":"a"},"spec":{"vms":[{"name":"x","nets":[{"network":"lab"}],"cmdline":"rayguest.ip=192.0.2.9/24","livenessProbe":{"udp":{"port":7}}}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	l := p.Spec.VMs[0].LivenessProbe
	want := Probe{UDP: &UDPProbe{Port: 7, Payload: "ping"}, PeriodSeconds: 10, TimeoutSeconds: 1, SuccessThreshold: 1, FailureThreshold: 3}
	if l.PeriodSeconds != want.PeriodSeconds || l.TimeoutSeconds != want.TimeoutSeconds || l.SuccessThreshold != 1 || l.FailureThreshold != 3 || l.InitialDelaySeconds != 0 || l.UDP.Payload != "ping" {
		t.Errorf("probe defaults: %+v, want %+v", l, want)
	}
	v := p.Spec.VMs[0]
	if v.CPUs != spec.DefaultCPUs || v.Memory != spec.DefaultMemory || v.Nets[0].ID != "net0" {
		t.Errorf("VM defaults: %+v", v.VM)
	}
	if GuestAddr(v.Cmdline) != "192.0.2.9" {
		t.Errorf("GuestAddr = %q", GuestAddr(v.Cmdline))
	}
}

// base is a valid pod; each bad spec changes one thing in it.
const base = `apiVersion: rayvmm/v1
kind: Pod
metadata: {name: web}
spec:
  vms:
  - name: front
    memory: 64M
    cmdline: rayguest.run=serve rayguest.ip=192.0.2.10/24
    vsock: {cid: 3}
    nets: [{network: lab}]
    resources: {limits: {cpu: 500m, memory: 96M, pids: 64}}
    livenessProbe: {vsock: {port: 52}}
    readinessProbe: {udp: {port: 7}}
`

func TestBadSpecs(t *testing.T) {
	if _, err := Load([]byte(base)); err != nil {
		t.Fatalf("the base spec: %v", err)
	}
	tests := []struct {
		name      string
		old, new  string // replace old with new in base ("" old: use new as the document)
		wantField string
		wantMsg   string
	}{
		{"unknown field", "memory: 64M", "memory: 64M\n    colour: red", "spec.vms[0].colour", "unknown field"},
		{"unknown top-level field", "kind: Pod", "kind: Pod\nstatus: {}", "status", "unknown field"},
		{"repeated key", "memory: 64M", "memory: 64M\n    memory: 32M", "", "not valid YAML"},
		{"wrong apiVersion", "rayvmm/v1", "v1", "apiVersion", `want rayvmm/v1`},
		{"wrong kind", "kind: Pod", "kind: Deployment", "kind", "want Pod"},
		{"no name", "metadata: {name: web}", "metadata: {}", "metadata.name", "lower-case"},
		{"upper-case name", "name: web", "name: Web", "metadata.name", "lower-case"},
		{"name too long", "name: web", "name: " + strings.Repeat("w", 64), "metadata.name", "63"},
		{"bad label", "metadata: {name: web}", "metadata: {name: web, labels: {app: 'a b'}}", "metadata.labels.app", "without spaces"},
		{"restart policy", "spec:\n", "spec:\n  restartPolicy: Sometimes\n", "spec.restartPolicy", "Always, OnFailure, Never"},
		{"grace period", "spec:\n", "spec:\n  terminationGracePeriodSeconds: -1\n", "spec.terminationGracePeriodSeconds", "want 0 to 3600"},
		{"no VMs", "", "apiVersion: rayvmm/v1\nkind: Pod\nmetadata: {name: web}\nspec: {vms: []}\n", "spec.vms", "at least one VM"},
		{"VM without name", "  - name: front\n", "  - cpus: 1\n", "spec.vms[0].name", "needs a name"},
		{"VM name", "name: front", "name: front_end", "spec.vms[0].name", "lower-case"},
		{"pod.vm too long", "name: front", "name: " + strings.Repeat("f", 62), "spec.vms[0].name", "longer than 64"},
		{"duplicate VM", "    readinessProbe: {udp: {port: 7}}\n", "    readinessProbe: {udp: {port: 7}}\n  - name: front\n", "spec.vms[1].name", "another VM"},
		{"memory type", "memory: 64M", "memory: [64]", "spec.vms[0].memory", "want a size"},
		{"memory unit", "memory: 64M", "memory: 64Q", "spec.vms[0].memory", "unknown unit"},
		{"cpus", "memory: 64M", "memory: 64M\n    cpus: -1", "spec.vms[0].cpus", "at least 1"},
		{"cpus type", "memory: 64M", "memory: 64M\n    cpus: two", "spec.vms[0].cpus", "whole number"},
		{"api socket", "memory: 64M", "memory: 64M\n    apiSocket: /tmp/x.sock", "spec.vms[0].apiSocket", "set by the daemon"},
		{"metrics file", "memory: 64M", "memory: 64M\n    metricsFile: /tmp/m", "spec.vms[0].metricsFile", "daemon's /metrics"},
		{"vsock uds", "vsock: {cid: 3}", "vsock: {cid: 3, uds: /tmp/v}", "spec.vms[0].vsock.uds", "set by the daemon"},
		{"vsock cid", "vsock: {cid: 3}", "vsock: {cid: 2}", "spec.vms[0].vsock.cid", "reserved"},
		{"relative kernel", "memory: 64M", "memory: 64M\n    kernel: vmlinux", "spec.vms[0].kernel", "absolute path"},
		{"relative disk", "nets: [{network: lab}]", "nets: [{network: lab}]\n    disks: [{path: disk.img}]", "spec.vms[0].disks[0].path", "absolute path"},
		{"disk without source", "nets: [{network: lab}]", "nets: [{network: lab}]\n    disks: [{readOnly: true}]", "spec.vms[0].disks[0]", "needs path or volume"},
		{"network name", "network: lab", "network: Lab!", "spec.vms[0].nets[0].network", "lower-case"},
		{"nic rate limit", "network: lab", "network: lab, rateLimit: {rxBps: -1}", "spec.vms[0].nets[0].rateLimit.rxBps", "negative"},
		{"cpu quantity", "cpu: 500m", "cpu: lots", "spec.vms[0].resources.limits.cpu", "not a CPU quantity"},
		{"cpu zero", "cpu: 500m", "cpu: 0m", "spec.vms[0].resources.limits.cpu", "greater than zero"},
		{"cpu decimals", "cpu: 500m", "cpu: '0.0001'", "spec.vms[0].resources.limits.cpu", "three decimals"},
		{"memory below guest", "memory: 96M, pids", "memory: 32M, pids", "spec.vms[0].resources.limits.memory", "less than the VM needs: guest memory 64M"},
		{"memory below guest plus overhead", "memory: 96M, pids", "memory: 70M, pids", "spec.vms[0].resources.limits.memory", "at least 80M"},
		{"pids", "pids: 64", "pids: 3", "spec.vms[0].resources.limits.pids", "at least 13"},
		{"requests", "limits: {", "requests: {cpu: 1}, limits: {", "spec.vms[0].resources.requests", "unknown field"},
		{"exec probe", "livenessProbe: {vsock: {port: 52}}", "livenessProbe: {exec: {command: [cat, /ok]}}", "spec.vms[0].livenessProbe.exec", "not supported"},
		{"httpGet probe", "livenessProbe: {vsock: {port: 52}}", "livenessProbe: {httpGet: {port: 80}}", "spec.vms[0].livenessProbe.httpGet", "use vsock or udp"},
		{"no handler", "livenessProbe: {vsock: {port: 52}}", "livenessProbe: {periodSeconds: 2}", "spec.vms[0].livenessProbe", "needs a handler"},
		{"two handlers", "livenessProbe: {vsock: {port: 52}}", "livenessProbe: {vsock: {port: 52}, udp: {port: 7}}", "spec.vms[0].livenessProbe", "not both"},
		{"vsock probe without vsock", "    vsock: {cid: 3}\n", "", "spec.vms[0].livenessProbe.vsock", "no vsock device"},
		{"vsock port", "vsock: {port: 52}", "vsock: {port: 0}", "spec.vms[0].livenessProbe.vsock.port", "required"},
		{"vsock port negative", "vsock: {port: 52}", "vsock: {port: -1}", "spec.vms[0].livenessProbe.vsock.port", "negative"},
		{"udp port", "udp: {port: 7}", "udp: {port: 70000}", "spec.vms[0].readinessProbe.udp.port", "1 to 65535"},
		{"udp host", "udp: {port: 7}", "udp: {port: 7, host: guest}", "spec.vms[0].readinessProbe.udp.host", "not an IPv4"},
		{"udp without address", "rayguest.ip=192.0.2.10/24", "rayguest.debug=1", "spec.vms[0].readinessProbe.udp.host", "no rayguest.ip="},
		{"udp without NIC", "    nets: [{network: lab}]\n", "", "spec.vms[0].readinessProbe.udp", "no NIC"},
		{"period", "vsock: {port: 52}}", "vsock: {port: 52}, periodSeconds: -2}", "spec.vms[0].livenessProbe.periodSeconds", "at least 1"},
		{"timeout", "vsock: {port: 52}}", "vsock: {port: 52}, timeoutSeconds: -1}", "spec.vms[0].livenessProbe.timeoutSeconds", "at least 1"},
		{"initial delay", "vsock: {port: 52}}", "vsock: {port: 52}, initialDelaySeconds: -1}", "spec.vms[0].livenessProbe.initialDelaySeconds", "at least 0"},
		{"failure threshold", "vsock: {port: 52}}", "vsock: {port: 52}, failureThreshold: 100000}", "spec.vms[0].livenessProbe.failureThreshold", "at most 86400"},
		{"liveness success threshold", "vsock: {port: 52}}", "vsock: {port: 52}, successThreshold: 2}", "spec.vms[0].livenessProbe.successThreshold", "must be 1 for a liveness probe"},
		{"startup success threshold", "    livenessProbe", "    startupProbe: {vsock: {port: 52}, successThreshold: 3}\n    livenessProbe", "spec.vms[0].startupProbe.successThreshold", "must be 1 for a startup probe"},
		{"probe field type", "vsock: {port: 52}}", "vsock: {port: 52}, periodSeconds: '2'}", "spec.vms[0].livenessProbe.periodSeconds", "whole number"},
		{"duplicate CID", "    readinessProbe: {udp: {port: 7}}\n", "    readinessProbe: {udp: {port: 7}}\n  - {name: back, vsock: {cid: 3}}\n", "spec.vms[1].vsock.cid", "also the CID"},
		{"volume without from", "spec:\n", "spec:\n  volumes: [{name: data}]\n", "spec.volumes[0].from", "required"},
		{"volume name", "spec:\n", "spec:\n  volumes: [{name: Data, from: snap}]\n", "spec.volumes[0].name", "lower-case"},
		{"duplicate volume", "spec:\n", "spec:\n  volumes: [{name: d, from: s}, {name: d, from: s}]\n", "spec.volumes[1].name", "another volume"},
		{"volume retain type", "spec:\n", "spec:\n  volumes: [{name: d, from: s, retain: 'yes'}]\n", "spec.volumes[0].retain", "true or false"},
		{"two documents", "", base + "---\n" + base, "", "2 YAML documents"},
		{"not YAML", "", "{{{", "", "not valid YAML"},
		{"empty", "", "", "", "empty document"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := tt.new
			if tt.old != "" {
				if !strings.Contains(base, tt.old) {
					t.Fatalf("base has no %q", tt.old)
				}
				doc = strings.Replace(base, tt.old, tt.new, 1)
			}
			_, err := Load([]byte(doc))
			if err == nil {
				t.Fatalf("accepted:\n%s", doc)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%v is not ErrInvalid", err)
			}
			var fe *spec.FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("%v (%T) is not a FieldError", err, err)
			}
			if fe.Path != tt.wantField {
				t.Errorf("field %q, want %q (%v)", fe.Path, tt.wantField, err)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("%q does not say %q", err, tt.wantMsg)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("message spans lines: %q", err)
			}
		})
	}
}

func TestParseCPU(t *testing.T) {
	for in, want := range map[string]CPU{"500m": 500, "1": 1000, "1.5": 1500, "0.25": 250, "2m": 2, ".5": 500, "1024": 1024000} {
		got, err := ParseCPU(in)
		if err != nil || got != want {
			t.Errorf("ParseCPU(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "m", "-1", "0", "1e3", "1.0001", "x", "+5m", "1025", "9999999999999999999m", "1.2.3"} {
		if got, err := ParseCPU(in); err == nil {
			t.Errorf("ParseCPU(%q) = %d, want an error", in, got)
		}
	}
	if CPU(1500).String() != "1500m" || CPU(2000).String() != "2" {
		t.Errorf("String: %s %s", CPU(1500), CPU(2000))
	}
}
