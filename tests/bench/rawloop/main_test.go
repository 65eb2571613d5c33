package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/rayvmm/rayvmm/guestkernel"
	"github.com/rayvmm/rayvmm/internal/testenv"
)

func requireKVM(t *testing.T) { t.Helper(); testenv.RequireKVM(t) }

// TestPIO runs rayguest's pio job in the raw loop: every port write must
// come back as one exit, and the guest must get to its last line.
func TestPIO(t *testing.T) {
	requireKVM(t)
	tests := []struct {
		name string
		n    int
	}{
		{"no writes", 0},
		{"some writes", 300},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, out, err := run(tt.n, 16<<20, guestkernel.ELF)
			if err != nil {
				t.Fatalf("%v (output %q)", err, out)
			}
			if st.PIOExits != uint64(tt.n) {
				t.Errorf("%d exits on port 0x441, want %d", st.PIOExits, tt.n)
			}
			for _, want := range []string{"rayguest: ready\n", fmt.Sprintf("rayguest: pio %d done\n", tt.n)} {
				if !strings.Contains(string(out), want) {
					t.Errorf("output %q lacks %q", out, want)
				}
			}
			if st.RunNS <= 0 || st.Exits < st.PIOExits {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

func TestBadInput(t *testing.T) {
	tests := []struct {
		name string
		n    int
		mem  uint64
		img  []byte
		want string
	}{
		{"negative count", -1, 16 << 20, guestkernel.ELF, "-n -1"},
		{"too little memory", 1, 1 << 20, guestkernel.ELF, "-memory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := run(tt.n, tt.mem, tt.img); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want one naming %q", err, tt.want)
			}
		})
	}
}
