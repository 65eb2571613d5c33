package network

import (
	"strings"
	"testing"
)

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
		{name: "long name", opts: CreateOptions{Name: "averylongname", Subnet: "192.0.2.0/24"}, wantErr: "at most 12 characters"},
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
