package network

import (
	"testing"
)

// FuzzLoadRecord: any bytes stored as a network record (the state
// store's "networks" bucket, or a schema 0 NAME.json file it imported
// verbatim) either are refused with an error or decode to a network that
// Create could have made, which stores and decodes back unchanged. Never
// a panic.
func FuzzLoadRecord(f *testing.F) {
	// As rayvmm 5e23d5e wrote them (state/testdata/schema0/networks).
	f.Add([]byte("{\n  \"name\": \"lan\",\n  \"subnet\": \"192.0.2.0/24\",\n  \"bridge\": \"rv-lan\",\n  \"host_addr\": \"192.0.2.1/24\",\n  \"mtu\": 1500,\n  \"created\": \"2026-12-02T01:06:27Z\"\n}\n"))
	f.Add([]byte("{\n  \"name\": \"lan\",\n  \"subnet\": \"203.0.113.128/25\",\n  \"bridge\": \"rv-lan\",\n  \"isolated\": true,\n  \"mtu\": 1450,\n  \"overlay\": {\n    \"vni\": 42,\n    \"remote\": \"192.0.2.200\",\n    \"local\": \"192.0.2.100\",\n    \"port\": 4789,\n    \"device\": \"rvx-lan\"\n  },\n  \"created\": \"2026-12-02T01:06:27Z\"\n}\n"))
	// As the state store writes them.
	f.Add([]byte(`{"name":"lan","subnet":"192.0.2.0/24","bridge":"rv-lan","host_addr":"192.0.2.1/24","mtu":1500,"created":"2025-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"name":"lan","subnet":"198.51.100.0/24","bridge":"rv-lan","isolated":true,"mtu":1450,"overlay":{"vni":42,"remote":"203.0.113.2","local":"203.0.113.1","port":4789,"device":"rvx-lan"},"created":"2025-01-01T00:00:00Z"}`))
	// Edited or damaged.
	f.Add([]byte(`{"name":"lan","subnet":"192.0.2.0/24","bridge":"br0","mtu":1500}`))
	f.Add([]byte(`{"name":"other","subnet":"192.0.2.0/24","bridge":"rv-other","host_addr":"192.0.2.1/24","mtu":1500}`))
	f.Add([]byte(`{"name":"lan","overlay":{}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := records.Decode("lan", b)
		if err != nil {
			return
		}
		if n.Name != "lan" || n.Bridge != BridgeName("lan") || (n.Overlay != nil && n.Overlay.Device != VXLANName("lan")) {
			t.Fatalf("decoded a record naming foreign interfaces: %+v", n)
		}
		raw, err := records.Encode(n)
		if err != nil {
			t.Fatal(err)
		}
		again, err := records.Decode("lan", raw)
		if err != nil || again.Subnet != n.Subnet || again.HostAddr != n.HostAddr || again.MTU != n.MTU || !again.Created.Equal(n.Created) {
			t.Fatalf("record %+v stored and decoded back as %+v, %v", n, again, err)
		}
	})
}
