package main

import (
	"bytes"
	"debug/elf"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/guestkernel"
)

// memoryImage is what a conforming loader puts in memory for each PT_LOAD
// segment: the file bytes, then zeros up to p_memsz.
func memoryImage(t *testing.T, img []byte) map[uint64][]byte {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64][]byte{}
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD {
			continue
		}
		b := make([]byte, p.Memsz)
		copy(b, img[p.Off:p.Off+p.Filesz])
		out[p.Paddr] = b
	}
	return out
}

func TestWithZeroedBSS(t *testing.T) {
	got, err := withZeroedBSS(guestkernel.ELF)
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(got))
	if err != nil {
		t.Fatalf("result is not an ELF file: %v", err)
	}
	orig, _ := elf.NewFile(bytes.NewReader(guestkernel.ELF))
	if f.Entry != orig.Entry || len(f.Progs) != len(orig.Progs) {
		t.Errorf("entry %#x with %d segments, want %#x with %d", f.Entry, len(f.Progs), orig.Entry, len(orig.Progs))
	}
	hadBSS := false
	for i, p := range f.Progs {
		o := orig.Progs[i]
		if p.Type == elf.PT_LOAD {
			hadBSS = hadBSS || o.Memsz > o.Filesz
			if p.Filesz != p.Memsz {
				t.Errorf("PT_LOAD %d: p_filesz %#x, p_memsz %#x: BSS still not in the file", i, p.Filesz, p.Memsz)
			}
		}
		if p.Off != o.Off || p.Paddr != o.Paddr || p.Memsz != o.Memsz {
			t.Errorf("segment %d moved: %+v, was %+v", i, p.ProgHeader, o.ProgHeader)
		}
	}
	if !hadBSS {
		t.Error("rayguest.elf has no BSS: the test checks nothing")
	}
	want, have := memoryImage(t, guestkernel.ELF), memoryImage(t, got)
	for addr, w := range want {
		if !bytes.Equal(have[addr], w) {
			t.Errorf("memory image at %#x differs", addr)
		}
	}
	// The PVH note gokvm reads must be where it was.
	for i, p := range orig.Progs {
		if p.Type == elf.PT_NOTE && !bytes.Equal(got[p.Off:p.Off+p.Filesz], guestkernel.ELF[p.Off:p.Off+p.Filesz]) {
			t.Errorf("note segment %d changed", i)
		}
	}
}

func TestWithZeroedBSSRejects(t *testing.T) {
	tests := []struct {
		name string
		img  []byte
	}{
		{"empty", nil},
		{"not ELF", []byte("MZ this is not an ELF file at all, not even close........................")},
		{"truncated", guestkernel.ELF[:100]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := withZeroedBSS(tt.img); err == nil {
				t.Error("accepted")
			}
		})
	}
}

func TestParseBenchOutput(t *testing.T) {
	out := `goos: linux
BenchmarkRandRead4K/qd1-2         	    2000	      4340 ns/op	    334260 iops	         0.4505 ratio	    742038 raw-iops
BenchmarkTx/1500B-2       	   20000	      4854 ns/op	 560.46 MB/s	    373642 frames/s	         0.8100 ratio	       688.9 raw-MB/s	    459276 raw-frames/s
BenchmarkBroken-2 	 10 	 abc ns/op
--- FAIL: BenchmarkRx/64B
PASS
`
	got := parseBenchOutput(out)
	want := []DeviceBench{
		{Name: "RandRead4K/qd1", Ratio: 0.4505, Metrics: map[string]float64{"ns/op": 4340, "iops": 334260, "ratio": 0.4505, "raw-iops": 742038}},
		{Name: "Tx/1500B", Ratio: 0.81, Metrics: map[string]float64{"ns/op": 4854, "MB/s": 560.46, "frames/s": 373642, "ratio": 0.81, "raw-MB/s": 688.9, "raw-frames/s": 459276}},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d results %+v, want %d", len(got), got, len(want))
	}
	for i := range want {
		if got[i].Name != want[i].Name || got[i].Ratio != want[i].Ratio || len(got[i].Metrics) != len(want[i].Metrics) {
			t.Errorf("result %d: %+v, want %+v", i, got[i], want[i])
			continue
		}
		for k, v := range want[i].Metrics {
			if got[i].Metrics[k] != v {
				t.Errorf("%s %s = %v, want %v", want[i].Name, k, got[i].Metrics[k], v)
			}
		}
	}
}

func TestSummarize(t *testing.T) {
	tests := []struct {
		name string
		xs   []float64
		want Summary
	}{
		{"none", nil, Summary{}},
		{"odd", []float64{5, 1, 3}, Summary{N: 3, Median: 3, Min: 1, Max: 5}},
		{"even", []float64{4, 1, 3, 10}, Summary{N: 4, Median: 3.5, Min: 1, Max: 10}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := summarize(tt.xs); got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseBootTimer(t *testing.T) {
	tests := []struct {
		name   string
		stderr string
		want   *BootTimer
	}{
		{
			name: "rayvmm's lines",
			stderr: `time=2026-12-02T01:41:43.181Z level=INFO msg="boot timer: VM process" launched=3.166956ms handoff=8.909295ms split=5.742339ms control_plane_cpu=4.934ms` + "\n" +
				"time=2026-11-26T18:30:44.127Z level=INFO msg=booting memory=134217728\n" +
				`time=2026-11-26T18:30:44.128Z level=INFO msg="boot timer: guest ready" wall=9.471377ms cpu=5.649ms first_kvm_run_wall=8.904577ms first_kvm_run_cpu=5.038ms vm_process_first_kvm_run_cpu=2.5ms vm_process_cpu=3ms` + "\n",
			want: &BootTimer{FirstRunWall: 8.904577, FirstRunCPU: 5.038, FirstRunCPUVM: 2.5, ReadyWall: 9.471377, ReadyCPU: 5.649, Split: 5.742339},
		},
		{name: "no line", stderr: "level=INFO msg=booting\n"},
		{name: "a field missing", stderr: `msg="boot timer: guest ready" wall=9ms cpu=5ms first_kvm_run_wall=8ms` + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseBootTimer(tt.stderr)
			if (got == nil) != (tt.want == nil) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if got == nil {
				return
			}
			for _, f := range [][2]float64{{got.FirstRunWall, tt.want.FirstRunWall}, {got.FirstRunCPU, tt.want.FirstRunCPU}, {got.ReadyWall, tt.want.ReadyWall}, {got.ReadyCPU, tt.want.ReadyCPU},
				{got.FirstRunCPUVM, tt.want.FirstRunCPUVM}, {got.Split, tt.want.Split}} {
				if math.Abs(f[0]-f[1]) > 1e-9 {
					t.Errorf("got %+v, want %+v", got, tt.want)
					break
				}
			}
		})
	}
}

func TestChecks(t *testing.T) {
	tests := []struct {
		name  string
		check func(outcome) (bool, string)
		o     outcome
		ok    bool
	}{
		{"powered off", poweredOff, outcome{Code: 0, Output: "rayguest: ready\nrayguest: poweroff\n"}, true},
		{"crashed", poweredOff, outcome{Code: 1, Output: "rayguest: ready\n"}, false},
		{"status 0 but no poweroff line", poweredOff, outcome{Code: 0, Output: "rayguest: ready\n"}, false},
		{"timed out", poweredOff, outcome{Code: -1, Err: "killed after 1m0s", Output: "rayguest: poweroff\n"}, false},
		{"gokvm error line", gokvmExit, outcome{Code: 0, Output: "rayguest: ready\r\nerr: unexpected kvm exit reason: unexpected io port 0x440\r\n"}, false},
		{"gokvm powered off", gokvmExit, outcome{Code: 0, Output: "rayguest: ready\r\nrayguest: poweroff\r\n"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ok, why := tt.check(tt.o)
			if ok != tt.ok || (!ok && why == "") {
				t.Errorf("got %v %q, want %v with a reason when false", ok, why, tt.ok)
			}
		})
	}
	if why := pioFailure(outcome{Output: "rayguest: pio 20000 done\n"}, 20000); why != "" {
		t.Errorf("a good pio run failed: %s", why)
	}
	if why := pioFailure(outcome{Output: "rayguest: pio 2000 done\n"}, 20000); why == "" {
		t.Error("a pio run with the wrong count passed")
	}
}

// TestBootRunStamps: a run counts as ready with the launcher's ready time,
// and a run whose ready stamp is later than its exit is never published
// as ready.
func TestBootRunStamps(t *testing.T) {
	v := vmmUnderTest{name: "qemu", cleanExit: poweredOff}
	ms := time.Millisecond
	out := "rayguest: ready\nrayguest: poweroff\n"
	tests := []struct {
		name      string
		o         outcome
		wantReady bool
		wantWhy   string
	}{
		{"ready before exit", outcome{Ready: 40 * ms, Exit: 50 * ms, Output: out}, true, ""},
		{"ready at exit", outcome{Ready: 50 * ms, Exit: 50 * ms, Output: out}, true, ""},
		{"ready after exit", outcome{Ready: 51 * ms, Exit: 50 * ms, Output: out}, false, "after the exit"},
		{"never ready", outcome{Exit: 50 * ms, Output: "rayguest: poweroff\n"}, false, "no \"rayguest: ready\" line"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br := v.bootRun(tt.o)
			if br.Ready != tt.wantReady || !strings.Contains(br.Why, tt.wantWhy) || (tt.wantWhy == "") != (br.Why == "") {
				t.Fatalf("ready %v (%.1f ms), why %q; want ready %v, why containing %q", br.Ready, br.ReadyMS, br.Why, tt.wantReady, tt.wantWhy)
			}
			if br.ReadyMS > br.ExitMS {
				t.Fatalf("published ready %.1f ms after exit %.1f ms", br.ReadyMS, br.ExitMS)
			}
			if br.Ready != br.CleanExit {
				t.Fatalf("clean exit %v for a run that was ready=%v and powered off", br.CleanExit, br.Ready)
			}
		})
	}
}
