package i8042

import "testing"

func TestResetOnce(t *testing.T) {
	n := 0
	c := &Controller{Reset: func() { n++ }}
	c.Write(4, []byte{0xd1}) // another command: ignored
	c.Write(0, []byte{0xfe}) // 0xfe on the data port is not a reset
	if n != 0 {
		t.Fatal("reset on a non-reset write")
	}
	c.Write(4, []byte{0xfe})
	c.Write(4, []byte{0xfe})
	if n != 1 {
		t.Fatalf("reset called %d times, want once", n)
	}
	b := []byte{0xff}
	c.Read(4, b)
	if b[0] != 0 {
		t.Fatalf("status %#x, want 0 (no data, input buffer empty)", b[0])
	}
}
