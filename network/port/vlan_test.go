package port

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
)

func frameHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVLANOf(t *testing.T) {
	const macs = "ffffffffffff020000000001"
	tests := []struct {
		name    string
		frame   string
		want    uint16
		wantErr error
	}{
		{name: "tagged 10", frame: macs + "8100000a0800" + "45", want: 10},
		{name: "tagged with priority", frame: macs + "8100e0140806", want: 20},
		{name: "4094", frame: macs + "81000ffe0800", want: 4094},
		{name: "untagged", frame: macs + "0800" + "4500", wantErr: ErrUntagged},
		{name: "priority tag only", frame: macs + "810060000800", wantErr: ErrUntagged},
		{name: "vid 4095", frame: macs + "81000fff0800", wantErr: ErrUntagged},
		{name: "short", frame: "ffffffffffff", wantErr: ErrShortFrame},
		{name: "tag cut", frame: macs + "8100000a", wantErr: ErrShortFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := VLANOf(frameHex(t, tt.frame))
			if !errors.Is(err, tt.wantErr) || got != tt.want {
				t.Fatalf("VLANOf = %d, %v; want %d, %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestTagUntag(t *testing.T) {
	frame := frameHex(t, "ffffffffffff0200000000010806"+"0001080006040001")
	dst := make([]byte, 64)
	n, err := Tag(dst, frame, 300)
	if err != nil {
		t.Fatal(err)
	}
	want := frameHex(t, "ffffffffffff020000000001"+"8100012c"+"0806"+"0001080006040001")
	if !bytes.Equal(dst[:n], want) {
		t.Fatalf("Tag = %x, want %x", dst[:n], want)
	}
	back := make([]byte, 64)
	vlan, m, err := Untag(back, dst[:n])
	if err != nil || vlan != 300 || !bytes.Equal(back[:m], frame) {
		t.Fatalf("Untag = %d, %x, %v; want 300, %x", vlan, back[:m], err, frame)
	}
	if _, err := Tag(make([]byte, len(frame)+3), frame, 1); err == nil {
		t.Fatal("Tag into a too small buffer succeeded")
	}
	if _, _, err := Untag(make([]byte, 4), dst[:n]); err == nil {
		t.Fatal("Untag into a too small buffer succeeded")
	}
}

// FuzzVLAN feeds guest-made frames to the trunk's framing: no panic, and
// tagging then untagging gives back the frame.
func FuzzVLAN(f *testing.F) {
	f.Add(frameHex(f, "ffffffffffff0200000000018100000a08004500"), uint16(10))
	f.Add(frameHex(f, "ffffffffffff020000000001"), uint16(1))
	f.Add([]byte{0x81, 0x00}, uint16(4094))
	f.Fuzz(func(t *testing.T, frame []byte, vlan uint16) {
		buf := make([]byte, len(frame)+vlanTagLen)
		if v, n, err := Untag(buf, frame); err == nil {
			if v == 0 || v >= 4095 || n != len(frame)-vlanTagLen {
				t.Fatalf("Untag(%x) = %d, %d", frame, v, n)
			}
		}
		vlan = vlan%4094 + 1
		n, err := Tag(buf, frame, vlan)
		if len(frame) < ethHeaderLen {
			if err == nil {
				t.Fatalf("Tag accepted a %d-byte frame", len(frame))
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		back := make([]byte, len(frame))
		v, m, err := Untag(back, buf[:n])
		if err != nil || v != vlan || !bytes.Equal(back[:m], frame) {
			t.Fatalf("Untag(Tag(%x, %d)) = %d, %x, %v", frame, vlan, v, back[:m], err)
		}
	})
}
