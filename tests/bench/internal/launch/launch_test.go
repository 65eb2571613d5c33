package launch

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

func TestRun(t *testing.T) {
	sh := "/bin/sh"
	if _, err := os.Stat(sh); err != nil {
		t.Skipf("needs %s: %v", sh, err)
	}
	tests := []struct {
		name      string
		req       Request
		wantReady bool
		wantCode  int
		wantErr   string
		wantOut   string
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
			if o.Ready > o.Exit {
				t.Errorf("ready at %v after exit at %v", o.Ready, o.Exit)
			}
			if o.Code != tt.wantCode {
				t.Errorf("exit status %d, want %d", o.Code, tt.wantCode)
			}
			if !strings.Contains(o.Err, tt.wantErr) || (tt.wantErr == "") != (o.Err == "") {
				t.Errorf("error %q, want %q", o.Err, tt.wantErr)
			}
			if got := strings.ReplaceAll(o.Output, "\r", ""); !strings.Contains(got, tt.wantOut) {
				t.Errorf("output %q, want it to contain %q", got, tt.wantOut)
			}
			if o.Err == "" && o.MaxRSSKiB <= 0 {
				t.Errorf("no peak RSS from wait4")
			}
			if o.ParentHWMKiB <= 0 {
				t.Errorf("launcher peak RSS not reported")
			}
		})
	}
}

func TestRunCopiesAtOnce(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skipf("needs /bin/sh: %v", err)
	}
	// Four copies that each sleep 200 ms finish in well under 4 x 200 ms
	// only if they ran at the same time.
	resp := Run(context.Background(), Request{Argv: []string{"/bin/sh", "-c", "sleep 0.2"}, Copies: 4})
	if len(resp.Outcomes) != 4 {
		t.Fatalf("%d outcomes, want 4", len(resp.Outcomes))
	}
	for i, o := range resp.Outcomes {
		if o.Code != 0 || o.Err != "" {
			t.Errorf("copy %d: status %d, error %q", i, o.Code, o.Err)
		}
		if o.Exit > resp.Wall {
			t.Errorf("copy %d exited at %v, after the whole batch (%v)", i, o.Exit, resp.Wall)
		}
	}
	if resp.Wall >= 800*time.Millisecond {
		t.Errorf("4 copies of a 200 ms sleep took %v: not started at once", resp.Wall)
	}
}

func TestSampling(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skipf("needs /bin/sh: %v", err)
	}
	// A guest-memory-sized mapping cannot be made from a shell, so sample
	// for a size no mapping has: every sample is taken and none matches.
	o := Run(context.Background(), Request{Argv: []string{"/bin/sh", "-c", "sleep 0.05"}, SampleEvery: time.Millisecond, GuestKiB: 1 << 40}).Outcomes[0]
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
