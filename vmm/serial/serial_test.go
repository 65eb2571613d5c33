package serial

import (
	"bytes"
	"testing"
)

func rd(s *Serial, off uint64) byte {
	b := []byte{0}
	s.Read(off, b)
	return b[0]
}

func wr(s *Serial, off uint64, v byte) { s.Write(off, []byte{v}) }

func TestTransmitAndReceive(t *testing.T) {
	var out bytes.Buffer
	irqs := 0
	s := New(&out, func() { irqs++ })
	for _, c := range []byte("hi\n") {
		wr(s, regData, c)
	}
	if out.String() != "hi\n" {
		t.Fatalf("output %q", out.String())
	}
	if irqs != 0 {
		t.Fatalf("%d interrupts with IER clear", irqs)
	}
	if rd(s, regLSR)&lsrDR != 0 {
		t.Fatal("data ready with empty FIFO")
	}
	wr(s, regIER, ierRDA)
	s.Input([]byte("ab"))
	if irqs == 0 {
		t.Fatal("no interrupt for received data")
	}
	if got := rd(s, regIIR) & 0x0f; got != iirRDA {
		t.Fatalf("IIR = %#x, want RDA", got)
	}
	if rd(s, regData) != 'a' || rd(s, regData) != 'b' {
		t.Fatal("FIFO order")
	}
	if rd(s, regLSR)&lsrDR != 0 || rd(s, regIIR)&0x0f != iirNone {
		t.Fatal("still pending after draining")
	}
}

func TestTHREInterruptAndDLAB(t *testing.T) {
	var out bytes.Buffer
	irqs := 0
	s := New(&out, func() { irqs++ })
	wr(s, regIER, ierTHRE)
	if irqs != 1 || rd(s, regIIR)&0x0f != iirTHRE {
		t.Fatal("enabling THRE interrupt did not raise it")
	}
	if rd(s, regIIR)&0x0f != iirNone {
		t.Fatal("reading IIR did not clear THRE")
	}
	wr(s, regLCR, lcrDLAB)
	wr(s, regData, 3)
	wr(s, regIER, 0)
	wr(s, regLCR, 3)
	if out.Len() != 0 {
		t.Fatal("divisor write went to output")
	}
	wr(s, regLCR, lcrDLAB)
	if rd(s, regData) != 3 {
		t.Fatal("DLL lost")
	}
	s.Read(regData, make([]byte, 4)) // wrong width: ignored
}
