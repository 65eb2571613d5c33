package network

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzLoadRecord: any bytes in a network record file either are refused
// with an error or load to a network that Create could have made, which
// saves and loads back unchanged. Never a panic.
func FuzzLoadRecord(f *testing.F) {
	f.Add([]byte(`{"name":"lan","subnet":"192.0.2.0/24","bridge":"rv-lan","host_addr":"192.0.2.1/24","mtu":1500,"created":"2025-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"name":"ov","subnet":"198.51.100.0/24","bridge":"rv-ov","isolated":true,"mtu":1450,"overlay":{"vni":42,"remote":"203.0.113.2","local":"203.0.113.1","port":4789,"device":"rvx-ov"},"created":"2025-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"name":"lan","subnet":"192.0.2.0/24","bridge":"br0","mtu":1500}`))
	f.Add([]byte(`{"name":"lan","overlay":{}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		s := &store{dir: dir}
		if err := os.WriteFile(filepath.Join(dir, "lan.json"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		n, err := s.load("lan")
		if err != nil {
			return
		}
		if n.Bridge != BridgeName("lan") || (n.Overlay != nil && n.Overlay.Device != VXLANName("lan")) {
			t.Fatalf("loaded a record naming foreign interfaces: %+v", n)
		}
		if err := s.save(n); err != nil {
			t.Fatal(err)
		}
		again, err := s.load("lan")
		if err != nil || again.Subnet != n.Subnet || again.HostAddr != n.HostAddr || again.MTU != n.MTU {
			t.Fatalf("record %+v saved and loaded back as %+v, %v", n, again, err)
		}
	})
}
