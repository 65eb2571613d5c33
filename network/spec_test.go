package network

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestParseNICSpec(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    string // NICSpec.String() of the result
		wantErr string // substring of the error
	}{
		{name: "network", in: "network=lan", want: "network=lan"},
		{name: "tap", in: "tap=tap0", want: "tap=tap0"},
		{name: "all keys", in: "network=lan,mac=02:00:00:00:00:01,vlan=10,rx-bps=1M,tx-bps=2Mi,rx-pps=100,tx-pps=200,rx-burst=10K,tx-pps-burst=5",
			want: "network=lan,mac=02:00:00:00:00:01,vlan=10,rx-bps=1000000,rx-pps=100,rx-burst=10000,tx-bps=2097152,tx-pps=200,tx-pps-burst=5"},
		{name: "trunk sorted", in: "network=lan,trunk=20:10:4094", want: "network=lan,trunk=10:20:4094"},
		{name: "vlan 1 and 4094", in: "network=lan,vlan=4094", want: "network=lan,vlan=4094"},
		{name: "empty", in: "", wantErr: "empty"},
		{name: "neither", in: "mac=02:00:00:00:00:01", wantErr: "need network=NAME or tap=IFNAME"},
		{name: "both", in: "network=lan,tap=tap0", wantErr: "exclusive"},
		{name: "bad mac", in: "network=lan,mac=zz:00:00:00:00:01", wantErr: "not a MAC address"},
		{name: "short mac", in: "network=lan,mac=02:00:00:00:01", wantErr: "not a MAC address"},
		{name: "multicast mac", in: "network=lan,mac=01:00:5e:00:00:01", wantErr: "multicast"},
		{name: "zero mac", in: "network=lan,mac=00:00:00:00:00:00", wantErr: "zero address"},
		{name: "vlan 0", in: "network=lan,vlan=0", wantErr: "out of range 1..4094"},
		{name: "vlan 4095", in: "network=lan,vlan=4095", wantErr: "out of range 1..4094"},
		{name: "vlan junk", in: "network=lan,vlan=ten", wantErr: "out of range 1..4094"},
		{name: "trunk dup", in: "network=lan,trunk=10:10", wantErr: "listed twice"},
		{name: "trunk 0", in: "network=lan,trunk=0:10", wantErr: "out of range"},
		{name: "vlan and trunk", in: "network=lan,vlan=10,trunk=10:20", wantErr: "exclusive"},
		{name: "vlan on tap", in: "tap=tap0,vlan=10", wantErr: "need network="},
		{name: "unknown key", in: "network=lan,speed=10", wantErr: `unknown key "speed"`},
		{name: "no value", in: "network=lan,mac", wantErr: "not key=value"},
		{name: "twice", in: "network=lan,network=wan", wantErr: "given twice"},
		{name: "bad network name", in: "network=Lan!", wantErr: "network name"},
		{name: "long network name", in: "network=abcdefghijklm", wantErr: "longer than Linux's limit"},
		{name: "long tap name", in: "tap=abcdefghijklmnop", wantErr: "longer than Linux's limit"},
		{name: "zero rate", in: "network=lan,tx-bps=0", wantErr: "positive byte count"},
		{name: "overflow rate", in: "network=lan,tx-bps=99999999999999Gi", wantErr: "overflows"},
		{name: "burst without rate", in: "network=lan,tx-burst=1M", wantErr: "burst needs its rate"},
		{name: "rate beyond int64", in: "network=lan,rx-bps=10000000000Gi", wantErr: "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseNICSpec(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrInvalidSpec) {
					t.Fatalf("ParseNICSpec(%q) error = %v, want one containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseNICSpec(%q): %v", tt.in, err)
			}
			if got.String() != tt.want {
				t.Fatalf("ParseNICSpec(%q) = %q, want %q", tt.in, got.String(), tt.want)
			}
			again, err := ParseNICSpec(got.String())
			if err != nil || again.String() != got.String() {
				t.Fatalf("round trip of %q: %q, %v", got.String(), again.String(), err)
			}
		})
	}
}

func TestGenerateMAC(t *testing.T) {
	tests := []struct {
		name  string
		vm    string
		index int
	}{
		{"first", "web", 0}, {"second", "web", 1}, {"other vm", "db", 0}, {"empty name", "", 0},
	}
	seen := map[string]string{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := GenerateMAC(tt.vm, tt.index)
			if len(m) != 6 || m[0]&1 != 0 || m[0]&2 == 0 {
				t.Fatalf("GenerateMAC = %s: want a locally administered unicast address", m)
			}
			if again := GenerateMAC(tt.vm, tt.index); again.String() != m.String() {
				t.Fatalf("GenerateMAC not stable: %s then %s", m, again)
			}
			if prev, ok := seen[m.String()]; ok {
				t.Fatalf("GenerateMAC(%q, %d) = %s, same as %s", tt.vm, tt.index, m, prev)
			}
			seen[m.String()] = tt.name
		})
	}
}

func TestParseOverlay(t *testing.T) {
	tests := []struct {
		name, in, want, wantErr string
	}{
		{name: "ok", in: "vxlan:42,remote=203.0.113.2,local=203.0.113.1", want: "vxlan:42,remote=203.0.113.2,local=203.0.113.1"},
		{name: "port", in: "vxlan:42,local=203.0.113.1,remote=203.0.113.2,port=8472", want: "vxlan:42,remote=203.0.113.2,local=203.0.113.1,port=8472"},
		{name: "not vxlan", in: "gre:42,remote=203.0.113.2,local=203.0.113.1", wantErr: "want vxlan:ID"},
		{name: "id 0", in: "vxlan:0,remote=203.0.113.2,local=203.0.113.1", wantErr: "out of range"},
		{name: "id too big", in: "vxlan:16777216,remote=203.0.113.2,local=203.0.113.1", wantErr: "out of range"},
		{name: "no remote", in: "vxlan:42,local=203.0.113.1", wantErr: "required"},
		{name: "ipv6", in: "vxlan:42,remote=2001:db8::1,local=203.0.113.1", wantErr: "unicast IPv4"},
		{name: "multicast", in: "vxlan:42,remote=239.1.1.1,local=203.0.113.1", wantErr: "unicast IPv4"},
		{name: "same", in: "vxlan:42,remote=203.0.113.1,local=203.0.113.1", wantErr: "same address"},
		{name: "unknown", in: "vxlan:42,remote=203.0.113.2,local=203.0.113.1,ttl=3", wantErr: "unknown key"},
		{name: "remote twice", in: "vxlan:42,remote=203.0.113.2,local=203.0.113.1,remote=203.0.113.3", wantErr: "remote given twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := ParseOverlay(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseOverlay(%q) error = %v, want %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil || o.String() != tt.want {
				t.Fatalf("ParseOverlay(%q) = %v, %v; want %q", tt.in, o, err, tt.want)
			}
		})
	}
}

func TestNewNetworkValidation(t *testing.T) {
	tests := []struct {
		name    string
		opts    CreateOptions
		wantErr string
		check   func(*Network) string
	}{
		{name: "plain", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.0/24"}, check: func(n *Network) string {
			if n.Bridge != "rv-lan" || n.HostAddr.String() != "192.0.2.1/24" || n.MTU != 1500 {
				return "want bridge rv-lan, host 192.0.2.1/24, MTU 1500"
			}
			return ""
		}},
		{name: "isolated", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.0/24", Isolated: true}, check: func(n *Network) string {
			if n.HostAddr.IsValid() {
				return "isolated network has a host address"
			}
			return ""
		}},
		{name: "overlay mtu", opts: CreateOptions{Name: "ov", Subnet: "192.0.2.0/24", Overlay: "vxlan:7,remote=203.0.113.2,local=203.0.113.1"}, check: func(n *Network) string {
			if n.MTU != 1450 || n.Overlay.Device != "rvx-ov" {
				return "want MTU 1450 and device rvx-ov"
			}
			return ""
		}},
		{name: "host bits", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.5/24"}, wantErr: "did you mean 192.0.2.0/24"},
		{name: "not cidr", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.0"}, wantErr: "not an IPv4 CIDR"},
		{name: "ipv6", opts: CreateOptions{Name: "lan", Subnet: "2001:db8::/64"}, wantErr: "not an IPv4 CIDR"},
		{name: "too small", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.0/31"}, wantErr: "prefix length"},
		{name: "nat isolated", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.0/24", NAT: true, Isolated: true}, wantErr: "drop --isolated"},
		{name: "long name", opts: CreateOptions{Name: "averylongname", Subnet: "192.0.2.0/24"}, wantErr: `"rv-averylongname" is 16 bytes`},
		{name: "long vxlan name", opts: CreateOptions{Name: "twelve-chars", Subnet: "192.0.2.0/24", Overlay: "vxlan:7,remote=203.0.113.2,local=203.0.113.1"}, wantErr: "VXLAN device name"},
		{name: "bad mtu", opts: CreateOptions{Name: "lan", Subnet: "192.0.2.0/24", MTU: 100}, wantErr: "MTU 100"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := newNetwork(tt.opts)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if msg := tt.check(n); msg != "" {
				t.Fatalf("%+v: %s", n, msg)
			}
		})
	}
}

func TestLimitsRateLimit(t *testing.T) {
	tests := []struct {
		name       string
		spec       string
		rx, tx     string // fmt of the ratelimit.Config
		rxNil, tx0 bool
	}{
		{name: "none", spec: "network=lan", rx: "{{0 0 0} {0 0 0}}", tx: "{{0 0 0} {0 0 0}}"},
		{name: "bytes with burst", spec: "network=lan,tx-bps=1M,tx-burst=64Ki", rx: "{{0 0 0} {0 0 0}}", tx: "{{1000000 65536 1000} {0 0 0}}"},
		{name: "packets", spec: "network=lan,rx-pps=100,rx-pps-burst=10", rx: "{{0 0 0} {100 10 1000}}", tx: "{{0 0 0} {0 0 0}}"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := ParseNICSpec(tt.spec)
			if err != nil {
				t.Fatal(err)
			}
			if got := fmt.Sprint(s.RX.RateLimit()); got != tt.rx {
				t.Fatalf("rx = %s, want %s", got, tt.rx)
			}
			if got := fmt.Sprint(s.TX.RateLimit()); got != tt.tx {
				t.Fatalf("tx = %s, want %s", got, tt.tx)
			}
			lim, err := s.TX.Limiter()
			if err != nil || (lim == nil) != s.TX.Unlimited() {
				t.Fatalf("tx limiter %v, %v; unlimited %v", lim, err, s.TX.Unlimited())
			}
		})
	}
}

// FuzzParseNICSpec: any string either fails with ErrInvalidSpec or parses
// to a spec whose String form parses back to the same spec.
func FuzzParseNICSpec(f *testing.F) {
	for _, s := range []string{"network=lan", "tap=tap0,mac=02:00:00:00:00:01", "network=lan,trunk=10:20,tx-bps=1Mi,tx-burst=1K", "network=lan,vlan=4095", ",,=", "network=lan,rx-pps=1,rx-pps-burst=2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseNICSpec(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidSpec) && !errors.Is(err, ErrInvalidName) {
				t.Fatalf("ParseNICSpec(%q) error %v has no category", s, err)
			}
			return
		}
		again, err := ParseNICSpec(spec.String())
		if err != nil || again.String() != spec.String() {
			t.Fatalf("ParseNICSpec(%q) = %q, which parses to %q, %v", s, spec.String(), again.String(), err)
		}
	})
}
