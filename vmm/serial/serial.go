// Package serial emulates a 16550A-compatible UART (the PC's COM1 at port
// 0x3f8, IRQ 4) as far as a kernel console needs: transmit to a writer,
// receive from the host with a bounded FIFO and interrupts, divisor latch,
// scratch, line and modem status.
package serial

import (
	"bufio"
	"io"
	"sync"
	"time"
)

// Register offsets.
const (
	regData = 0 // RBR (read) / THR (write); DLL when DLAB
	regIER  = 1 // DLM when DLAB
	regIIR  = 2 // IIR (read) / FCR (write)
	regLCR  = 3
	regMCR  = 4
	regLSR  = 5
	regMSR  = 6
	regSCR  = 7
)

const (
	ierRDA  = 1 << 0
	ierTHRE = 1 << 1

	iirNone = 0x01
	iirTHRE = 0x02
	iirRDA  = 0x04
	iirFIFO = 0xc0

	lcrDLAB = 1 << 7

	mcrLoop = 1 << 4

	lsrDR   = 1 << 0
	lsrTHRE = 1 << 5
	lsrTEMT = 1 << 6

	msrDefault = 0xb0 // DCD, DSR, CTS

	fifoSize = 4096
)

// Serial is one UART. Read and Write are called on vCPU threads; Input on
// the host's input goroutine.
type Serial struct {
	mu       sync.Mutex
	space    *sync.Cond
	ier, lcr uint8
	mcr, scr uint8
	dll, dlm uint8
	thrIntr  bool // a THR-empty interrupt is pending
	rx       []byte
	closed   bool

	out     *bufio.Writer
	flushAt *time.Timer
	irq     func() // pulses the interrupt line
}

// New returns a UART writing transmitted bytes to out and calling irq to
// pulse its interrupt line.
func New(out io.Writer, irq func()) *Serial {
	s := &Serial{out: bufio.NewWriterSize(out, 4096), irq: irq, dll: 12}
	s.space = sync.NewCond(&s.mu)
	return s
}

// pending reports whether an interrupt condition exists.
func (s *Serial) pending() bool {
	return s.ier&ierRDA != 0 && len(s.rx) > 0 || s.ier&ierTHRE != 0 && s.thrIntr
}

func (s *Serial) signal() {
	if s.pending() && s.irq != nil {
		s.irq()
	}
}

// Read implements bus.Device.
func (s *Serial) Read(off uint64, data []byte) {
	if len(data) != 1 {
		for i := range data {
			data[i] = 0xff
		}
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var v uint8
	switch off {
	case regData:
		if s.lcr&lcrDLAB != 0 {
			v = s.dll
		} else if len(s.rx) > 0 {
			v = s.rx[0]
			s.rx = s.rx[1:]
			if len(s.rx) == 0 {
				s.rx = nil
			}
			s.space.Broadcast()
		}
	case regIER:
		if s.lcr&lcrDLAB != 0 {
			v = s.dlm
		} else {
			v = s.ier
		}
	case regIIR:
		switch {
		case s.ier&ierRDA != 0 && len(s.rx) > 0:
			v = iirRDA
		case s.ier&ierTHRE != 0 && s.thrIntr:
			v = iirTHRE
			s.thrIntr = false // reading IIR clears a THRE interrupt
		default:
			v = iirNone
		}
		v |= iirFIFO
	case regLCR:
		v = s.lcr
	case regMCR:
		v = s.mcr
	case regLSR:
		v = lsrTHRE | lsrTEMT
		if len(s.rx) > 0 {
			v |= lsrDR
		}
	case regMSR:
		if s.mcr&mcrLoop != 0 {
			// Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
			v = (s.mcr&0x1)<<5 | (s.mcr&0x2)<<3 | (s.mcr&0x4)<<4 | (s.mcr&0x8)<<4
		} else {
			v = msrDefault
		}
	case regSCR:
		v = s.scr
	}
	data[0] = v
}

// Write implements bus.Device.
func (s *Serial) Write(off uint64, data []byte) {
	if len(data) != 1 {
		return
	}
	v := data[0]
	s.mu.Lock()
	defer s.mu.Unlock()
	switch off {
	case regData:
		if s.lcr&lcrDLAB != 0 {
			s.dll = v
			return
		}
		if s.mcr&mcrLoop != 0 {
			if len(s.rx) < fifoSize {
				s.rx = append(s.rx, v)
			}
		} else {
			s.emit(v)
		}
		s.thrIntr = true
		s.signal()
	case regIER:
		if s.lcr&lcrDLAB != 0 {
			s.dlm = v
			return
		}
		s.ier = v & 0x0f
		if s.ier&ierTHRE != 0 {
			s.thrIntr = true // the transmitter is always empty
		}
		s.signal()
	case regIIR: // FCR
		if v&0x02 != 0 {
			s.rx = nil
			s.space.Broadcast()
		}
	case regLCR:
		s.lcr = v
	case regMCR:
		s.mcr = v & 0x1f
	case regSCR:
		s.scr = v
	}
}

// emit buffers an output byte; lines are flushed at once, partial output
// (a prompt) shortly after.
func (s *Serial) emit(b byte) {
	s.out.WriteByte(b)
	if b == '\n' || s.out.Available() == 0 {
		s.out.Flush()
		return
	}
	if s.flushAt == nil {
		s.flushAt = time.AfterFunc(10*time.Millisecond, func() {
			s.mu.Lock()
			s.out.Flush()
			s.flushAt = nil
			s.mu.Unlock()
		})
	}
}

// Flush writes out any buffered output.
func (s *Serial) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.Flush()
}

// Input queues bytes for the guest to receive, waiting while the FIFO is
// full. It returns false once the UART is closed.
func (s *Serial) Input(p []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(p) > 0 {
		for len(s.rx) >= fifoSize && !s.closed {
			s.space.Wait()
		}
		if s.closed {
			return false
		}
		n := min(len(p), fifoSize-len(s.rx))
		s.rx = append(s.rx, p[:n]...)
		p = p[n:]
		s.signal()
	}
	return true
}

// Close wakes a blocked Input and flushes output.
func (s *Serial) Close() error {
	s.mu.Lock()
	s.closed = true
	s.space.Broadcast()
	if s.flushAt != nil {
		s.flushAt.Stop()
		s.flushAt = nil
	}
	err := s.out.Flush()
	s.mu.Unlock()
	return err
}
