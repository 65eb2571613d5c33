package runner

import (
	"fmt"
	"os"

	"golang.org/x/term"
)

// console connects stdin/stdout to the guest's UART. On a terminal, stdin
// goes raw (keys reach the guest) and Ctrl-A x quits; the terminal is
// restored when the VM ends.
type console struct {
	in *os.File
}

// start puts a terminal stdin in raw mode and starts forwarding input. It
// returns the function that restores the terminal.
func (c *console) start(uart interface{ Input([]byte) bool }, quit func()) (func(), error) {
	fd := int(c.in.Fd())
	restore := func() {}
	isTerm := term.IsTerminal(fd)
	if isTerm {
		old, err := term.MakeRaw(fd)
		if err != nil {
			return nil, fmt.Errorf("stdin: raw mode: %w", err)
		}
		restore = func() { term.Restore(fd, old) }
	}
	go func() {
		buf := make([]byte, 1024)
		escape := false
		for {
			n, err := c.in.Read(buf)
			if n > 0 {
				p := buf[:n]
				if isTerm {
					var out []byte
					out, escape = filterEscape(p, escape, quit)
					p = out
				}
				if len(p) > 0 && !uart.Input(p) {
					return
				}
			}
			if err != nil {
				return // EOF on a pipe: the guest just gets no more input
			}
		}
	}()
	return restore, nil
}

// filterEscape handles Ctrl-A sequences: Ctrl-A x quits, Ctrl-A Ctrl-A sends
// one Ctrl-A, Ctrl-A followed by anything else sends both.
func filterEscape(p []byte, escape bool, quit func()) ([]byte, bool) {
	out := make([]byte, 0, len(p))
	for _, b := range p {
		if escape {
			escape = false
			switch b {
			case 'x', 'X':
				quit()
				return out, false
			case 0x01:
				out = append(out, 0x01)
			default:
				out = append(out, 0x01, b)
			}
			continue
		}
		if b == 0x01 {
			escape = true
			continue
		}
		out = append(out, b)
	}
	return out, escape
}
