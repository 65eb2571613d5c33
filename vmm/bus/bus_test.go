package bus

import "testing"

type rec struct{ last uint64 }

func (r *rec) Read(off uint64, d []byte)  { d[0] = byte(off) }
func (r *rec) Write(off uint64, d []byte) { r.last = off }

func TestDispatch(t *testing.T) {
	var b Bus
	a, c := &rec{}, &rec{}
	if err := b.Register("a", 0x3f8, 8, a); err != nil {
		t.Fatal(err)
	}
	if err := b.Register("c", 0x60, 1, c); err != nil {
		t.Fatal(err)
	}
	if err := b.Register("overlap", 0x3fc, 8, a); err == nil {
		t.Fatal("overlapping registration accepted")
	}
	d := []byte{0}
	if !b.Read(0x3fd, d) || d[0] != 5 {
		t.Fatalf("read at 0x3fd: %v", d)
	}
	if b.Read(0x3ff, make([]byte, 2)) {
		t.Fatal("access straddling the end was dispatched")
	}
	if b.Write(0x61, d) {
		t.Fatal("write to a hole was dispatched")
	}
	if !b.Write(0x60, d) || c.last != 0 {
		t.Fatal("write to c lost")
	}
	if got := b.Unhandled.Load(); got != 2 {
		t.Fatalf("unhandled = %d, want 2", got)
	}
	b.Read(0xffff_ffff_ffff_fff0, make([]byte, 4))
}
