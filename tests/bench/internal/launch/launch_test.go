package launch

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// readLate makes every read of the console wait until wait4 has returned:
// the order a loaded machine produces now and then (on a pseudo-terminal
// the kernel hands the child's output to the master from a work queue).
func readLate() *hooks {
	reaped := make(chan struct{})
	return &hooks{reaped: func() { close(reaped) }, beforeRead: func() { <-reaped }}
}

// readAfterGrace reads the console only once the launcher has given up
// waiting for the output to end and looked for processes holding it (as a
// machine too loaded to run the reader for a while would).
func readAfterGrace() *hooks {
	over := make(chan struct{})
	return &hooks{grace: time.Millisecond, graceOver: func() { close(over) }, beforeRead: func() { <-over }}
}

func TestRun(t *testing.T) {
	sh := requireSh(t)
	tests := []struct {
		name      string
		req       Request
		wantReady bool
		wantCode  int
		wantErr   string
		wantOut   string
		// wantLate: the line was read after wait4 returned (readLate).
		wantLate bool
		// wantHolders: processes named as holding the output (and killed).
		wantHolders int
	}{
		{
			name:      "line found, then exit status",
			req:       Request{Argv: []string{sh, "-c", "echo booting; sleep 0.05; echo 'rayguest: ready'; sleep 0.05; exit 3"}, Wait: "rayguest: ready"},
			wantReady: true, wantCode: 3, wantOut: "booting\nrayguest: ready\n",
		},
		{
			name:     "line never printed",
			req:      Request{Argv: []string{sh, "-c", "echo nothing here"}, Wait: "rayguest: ready"},
			wantCode: 0, wantOut: "nothing here\n",
		},
		{
			name:      "on a terminal",
			req:       Request{Argv: []string{sh, "-c", "test -t 0 && test -t 1 && echo 'rayguest: ready'"}, Wait: "rayguest: ready", TTY: true},
			wantReady: true, wantCode: 0, wantOut: "rayguest: ready",
		},
		{
			name:      "read after the exit",
			req:       Request{Argv: []string{sh, "-c", "echo 'rayguest: ready'"}, Wait: "rayguest: ready", hooks: readLate()},
			wantReady: true, wantCode: 0, wantOut: "rayguest: ready", wantLate: true,
		},
		{
			name:      "read after the exit, on a terminal",
			req:       Request{Argv: []string{sh, "-c", "echo 'rayguest: ready'"}, Wait: "rayguest: ready", TTY: true, hooks: readLate()},
			wantReady: true, wantCode: 0, wantOut: "rayguest: ready", wantLate: true,
		},
		{
			name: "read after the exit and after the grace, nothing holding the output",
			req: Request{Argv: []string{sh, "-c", "echo 'rayguest: ready'"}, Wait: "rayguest: ready",
				hooks: readAfterGrace()},
			wantReady: true, wantCode: 0, wantOut: "rayguest: ready", wantLate: true,
		},
		{
			name: "output held by processes it started",
			req: Request{Argv: []string{sh, "-c", "sleep 600 & setsid sleep 600 & echo 'rayguest: ready'"}, Wait: "rayguest: ready",
				hooks: &hooks{grace: time.Millisecond}},
			wantReady: true, wantCode: 0, wantOut: "rayguest: ready", wantErr: "output held by ", wantHolders: 2,
		},
		{
			name:     "killed at the timeout",
			req:      Request{Argv: []string{sh, "-c", "sleep 5"}, Timeout: 100 * time.Millisecond},
			wantCode: -1, wantErr: "killed after 100ms",
		},
		{
			name:     "binary missing",
			req:      Request{Argv: []string{"/nonexistent/vmm"}},
			wantCode: -1, wantErr: "start /nonexistent/vmm",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := Run(context.Background(), tt.req)
			if len(resp.Outcomes) != 1 {
				t.Fatalf("%d outcomes, want 1", len(resp.Outcomes))
			}
			o := resp.Outcomes[0]
			if (o.Ready > 0) != tt.wantReady {
				t.Errorf("ready at %v, want ready=%v (output %q)", o.Ready, tt.wantReady, o.Output)
			}
			// What the stamps mean (see the package comment): exit is
			// when the process was reaped and its output had ended, so
			// it is never before the ready line was read, nor before
			// wait4 returned.
			if o.Ready > o.Exit {
				t.Errorf("ready at %v after exit at %v", o.Ready, o.Exit)
			}
			if o.Err == "" && o.Reaped > o.Exit {
				t.Errorf("reaped at %v after exit at %v", o.Reaped, o.Exit)
			}
			if late := o.Ready > o.Reaped; tt.wantLate && !late {
				t.Errorf("ready at %v, reaped at %v: the line was not read after wait4, nothing was tested", o.Ready, o.Reaped)
			}
			if o.Code != tt.wantCode {
				t.Errorf("exit status %d, want %d", o.Code, tt.wantCode)
			}
			if n := strings.Count(o.Err, "(pid "); n != tt.wantHolders {
				t.Errorf("error %q names %d processes, want %d", o.Err, n, tt.wantHolders)
			}
			if !strings.Contains(o.Err, tt.wantErr) || (tt.wantErr == "") != (o.Err == "") {
				t.Errorf("error %q, want %q", o.Err, tt.wantErr)
			}
			if got := strings.ReplaceAll(o.Output, "\r", ""); !strings.Contains(got, tt.wantOut) {
				t.Errorf("output %q, want it to contain %q", got, tt.wantOut)
			}
			if o.Code != -1 && o.MaxRSSKiB <= 0 {
				t.Errorf("no peak RSS from wait4")
			}
			if o.ParentHWMKiB <= 0 {
				t.Errorf("launcher peak RSS not reported")
			}
		})
	}
}

func requireSh(t *testing.T) string {
	t.Helper()
	const sh = "/bin/sh"
	if _, err := os.Stat(sh); err != nil {
		testenv.Need(t, fmt.Sprintf("needs %s: %v", sh, err))
	}
	return sh
}

func TestRunCopiesAtOnce(t *testing.T) {
	sh := requireSh(t)
	// Each copy registers in a file and waits until all four have: a copy
	// exits 0 only if the others started while it ran. The wait has its
	// own deadline (exit 7 after about a minute).
	const n = 4
	reg := filepath.Join(t.TempDir(), "started")
	script := fmt.Sprintf(`echo $$ >> %s; i=0; while [ "$(wc -l < %s)" -lt %d ]; do i=$((i+1)); [ $i -gt 6000 ] && exit 7; sleep 0.01; done`, reg, reg, n)
	resp := Run(context.Background(), Request{Argv: []string{sh, "-c", script}, Copies: n, Timeout: 5 * time.Minute})
	if len(resp.Outcomes) != n {
		t.Fatalf("%d outcomes, want %d", len(resp.Outcomes), n)
	}
	for i, o := range resp.Outcomes {
		switch {
		case o.Code == 7:
			t.Errorf("copy %d waited a minute for the other copies to start: not started at once", i)
		case o.Code != 0 || o.Err != "":
			t.Errorf("copy %d: status %d, error %q", i, o.Code, o.Err)
		}
		if o.Exit > resp.Wall {
			t.Errorf("copy %d exited at %v, after the whole batch (%v)", i, o.Exit, resp.Wall)
		}
	}
}

func TestSampling(t *testing.T) {
	sh := requireSh(t)
	// A guest-memory-sized mapping cannot be made from a shell, so sample
	// for a size no mapping has: every sample is taken and none matches.
	o := Run(context.Background(), Request{Argv: []string{sh, "-c", "sleep 0.05"}, SampleEvery: time.Millisecond, GuestKiB: 1 << 40}).Outcomes[0]
	if o.Sample != nil {
		t.Errorf("a sample matched a mapping of 1 PiB: %+v", o.Sample)
	}
	self, err := ReadSmaps(os.Getpid(), 1<<40)
	if err != nil {
		t.Fatal(err)
	}
	if self.TotalRSS <= 0 || self.OtherFileRSS <= 0 || self.OtherAnonRSS <= 0 {
		t.Errorf("own smaps: %+v, want resident file-backed and anonymous memory", self)
	}
}

func TestParseSmaps(t *testing.T) {
	const smaps = `00400000-006ee000 r-xp 00000000 fe:00 10002678                           /work/main/bin/rayvmm
Size:               3000 kB
Rss:                2672 kB
Pss:                2672 kB
VmFlags: rd ex mr mw me sd 
24e4db800000-24e4dc000000 rw-p 00000000 00:00 0 
Size:               8192 kB
Rss:                1152 kB
7f0102800000-7f010a800000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                 428 kB
7f010a800000-7f0112800000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
Size:             131072 kB
Rss:              131072 kB
7ffd1c2a1000-7ffd1c2c2000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
`
	tests := []struct {
		name     string
		guestKiB int64
		want     MemSample
	}{
		{"first guest-sized mapping", 131072, MemSample{GuestFound: true, GuestRSS: 428, OtherFileRSS: 2672, OtherAnonRSS: 1152 + 131072 + 16, TotalRSS: 2672 + 1152 + 428 + 131072 + 16}},
		{"no such mapping", 65536, MemSample{OtherFileRSS: 2672, OtherAnonRSS: 1152 + 428 + 131072 + 16, TotalRSS: 2672 + 1152 + 428 + 131072 + 16}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSmaps(strings.NewReader(smaps), tt.guestKiB)
			if err != nil {
				t.Fatal(err)
			}
			if *got != tt.want {
				t.Errorf("got %+v, want %+v", *got, tt.want)
			}
		})
	}
	if _, err := parseSmaps(strings.NewReader("00400000-006ee000 r-xp 0 0 0\nRss: lots kB\n"), 1); err == nil {
		t.Error("a malformed Rss line parsed")
	}
}
