package memory

import (
	"errors"
	"testing"
)

func TestBounds(t *testing.T) {
	m, err := New(Range{Base: 0, Size: 8192}, Range{Base: 0x10000, Size: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	tests := []struct {
		name string
		addr GuestAddr
		n    uint64
		ok   bool
	}{
		{"start", 0, 16, true},
		{"whole first", 0, 8192, true},
		{"end of first", 8190, 2, true},
		{"straddles end", 8190, 4, false},
		{"hole", 0x9000, 1, false},
		{"second", 0x10000, 4096, true},
		{"past second", 0x10000, 4097, false},
		{"wraps", 0x10, ^uint64(0) - 4, false},
		{"4 GiB length", 0, 1 << 32, false},
		{"far away", 1 << 40, 1, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.Slice(tc.addr, tc.n)
			if (err == nil) != tc.ok {
				t.Fatalf("Slice(%#x, %#x) err=%v, want ok=%v", uint64(tc.addr), tc.n, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("error %v is not ErrOutOfRange", err)
			}
		})
	}
}

func TestAccessorsAndAtomics(t *testing.T) {
	m, err := New(Range{Base: 0x1000, Size: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.PutUint64(0x1008, 0x1122334455667788); err != nil {
		t.Fatal(err)
	}
	if v, _ := m.Uint32(0x100c); v != 0x11223344 {
		t.Fatalf("Uint32 = %#x", v)
	}
	if err := m.StoreUint16(0x100a, 0xbeef); err != nil {
		t.Fatal(err)
	}
	if v, _ := m.Uint64(0x1008); v != 0x11223344beef7788 {
		t.Fatalf("after StoreUint16 = %#x", v)
	}
	if v, _ := m.LoadUint16(0x100a); v != 0xbeef {
		t.Fatalf("LoadUint16 = %#x", v)
	}
	if _, err := m.LoadUint16(0x1001); err == nil {
		t.Fatal("unaligned atomic load accepted")
	}
	if _, err := m.LoadUint16(0x2000); err == nil {
		t.Fatal("atomic load past the end accepted")
	}
	if err := m.PutUint16(0x1fff, 1); err == nil {
		t.Fatal("straddling write accepted")
	}
}

func TestNewRejects(t *testing.T) {
	for _, rs := range [][]Range{
		nil,
		{{Base: 0, Size: 0}},
		{{Base: 1, Size: 4096}},
		{{Base: 0, Size: 8192}, {Base: 4096, Size: 4096}},
	} {
		if m, err := New(rs...); err == nil {
			m.Close()
			t.Errorf("New(%v) succeeded", rs)
		}
	}
}
