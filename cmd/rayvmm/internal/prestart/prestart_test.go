package prestart

import (
	"testing"

	"github.com/rayvmm/rayvmm/seccap"
)

func TestBootSandbox(t *testing.T) {
	def := seccap.DefaultMode()
	tests := []struct {
		name string
		args []string
		mode seccap.Mode
		ok   bool
	}{
		{"boot", []string{"boot"}, def, true},
		{"boot with flags", []string{"boot", "--memory", "64M", "--cmdline", "rayguest.run=echo"}, def, true},
		{"state dir before", []string{"--state-dir", "/tmp/x", "boot"}, def, true},
		{"state dir= before", []string{"--state-dir=/tmp/x", "boot", "-v"}, def, true},
		{"sandbox off", []string{"boot", "--sandbox", "off"}, seccap.ModeOff, true},
		{"sandbox=log", []string{"boot", "--sandbox=log"}, seccap.ModeLog, true},
		{"sandbox junk", []string{"boot", "--sandbox", "loose"}, "", false},
		{"sandbox without value", []string{"boot", "--sandbox"}, "", false},
		{"not boot", []string{"volume", "list"}, "", false},
		{"no command", nil, "", false},
		{"unknown global flag", []string{"--verbose", "boot"}, "", false},
		{"help", []string{"boot", "--help"}, "", false},
		{"-h", []string{"boot", "-h"}, "", false},
		{"print config", []string{"boot", "--print-config"}, "", false},
		{"jail", []string{"boot", "--jail", "/srv/jail", "--uid", "1", "--gid", "1"}, "", false},
		{"vsock", []string{"boot", "--vsock=cid=3,uds=/tmp/v.sock"}, "", false},
		{"after --", []string{"boot", "--", "x"}, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mode, ok := bootSandbox(tc.args)
			if mode != tc.mode || ok != tc.ok {
				t.Fatalf("bootSandbox(%q) = %q, %v; want %q, %v", tc.args, mode, ok, tc.mode, tc.ok)
			}
		})
	}
}
