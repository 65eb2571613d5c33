package tests

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The block pattern and checksum rayguest's blk jobs use, computed here
// from guestkernel/README.md's definitions, independently of the guest.
func splitmix64(x uint64) uint64 {
	z := x + 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// pattern is what blktest with seed writes to block b.
func pattern(seed, b uint64) []byte {
	out := make([]byte, 4096)
	for i := uint64(0); i < 512; i++ {
		binary.LittleEndian.PutUint64(out[8*i:], splitmix64(seed*0x100000000+b)+i*0x9e3779b97f4a7c15)
	}
	return out
}

// guestSum is the sum blktest/blksum print over data read in order.
func guestSum(data []byte) string {
	h := uint64(0xcbf29ce484222325)
	for i := 0; i+8 <= len(data); i += 8 {
		h = (h ^ binary.LittleEndian.Uint64(data[i:])) * 0x100000001b3
	}
	return fmt.Sprintf("%016x", h)
}

var blkOK = regexp.MustCompile(`rayguest: blk (vd[a-z]) ok sectors=(\d+) sum=([0-9a-f]{16})`)

// blkSums returns the sum each disk reported, by name.
func blkSums(t *testing.T, out string) map[string]string {
	t.Helper()
	if strings.Contains(out, "FAIL") {
		t.Fatalf("guest reported a failure:\n%s", out)
	}
	m := map[string]string{}
	for _, s := range blkOK.FindAllStringSubmatch(out, -1) {
		m[s[1]] = s[3]
	}
	return m
}

// boot runs rayvmm boot with a state directory and expects exit 0.
func bootOK(t *testing.T, state string, args ...string) string {
	t.Helper()
	r := run(t, nil, 3*time.Minute, append([]string{"--state-dir", state, "boot"}, args...)...)
	if r.code != 0 {
		t.Fatalf("rayvmm boot %v: exit %d\nstdout:\n%s\nstderr:\n%s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// rayvmmOK runs a rayvmm subcommand that must succeed.
func rayvmmOK(t *testing.T, state string, args ...string) string {
	t.Helper()
	r := run(t, nil, time.Minute, append([]string{"--state-dir", state}, args...)...)
	if r.code != 0 {
		t.Fatalf("rayvmm %v: exit %d\n%s%s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

type volumeInfo struct {
	Path  string   `json:"path"`
	State string   `json:"state"`
	Chain []string `json:"backing_chain"`
}

func inspect(t *testing.T, state, name string) volumeInfo {
	t.Helper()
	var v volumeInfo
	if err := json.Unmarshal([]byte(rayvmmOK(t, state, "volume", "inspect", name)), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	requireTool(t, "qemu-img")
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// qemuCheckClean runs qemu-img check and fails on anything but leaks.
func qemuCheckClean(t *testing.T, img string) string {
	t.Helper()
	requireTool(t, "qemu-img")
	out, err := exec.Command("qemu-img", "check", img).CombinedOutput()
	// Exit 0: clean; 3: only leaked clusters; anything else: corruption.
	if err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
			t.Fatalf("qemu-img check %s: %v\n%s", img, err, out)
		}
	}
	if strings.Contains(string(out), "ERROR") || strings.Contains(string(out), "corrupt") {
		t.Fatalf("qemu-img check %s:\n%s", img, out)
	}
	return string(out)
}

// toRaw converts any image to raw bytes with qemu-img.
func toRaw(t *testing.T, img string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	qemuImg(t, "convert", "-O", "raw", img, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sparseFile(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	return p
}

// expectImage is a disk of size bytes whose first blocks hold seed's pattern.
func expectImage(size int64, seed uint64, blocks int) []byte {
	b := make([]byte, size)
	for i := 0; i < blocks; i++ {
		copy(b[i*4096:], pattern(seed, uint64(i)))
	}
	return b
}

const diskSize = 16 << 20

func TestBlkRawFile(t *testing.T) {
	requireKVM(t)
	img := sparseFile(t, diskSize)
	out := bootOK(t, t.TempDir(), "--disk", "path="+img+",format=raw", "--cmdline", "rayguest.run=blktest rayguest.seed=7 rayguest.blocks=32")
	got, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	want := expectImage(diskSize, 7, 32)
	if !bytes.Equal(got, want) {
		t.Fatal("the file does not hold exactly the pattern the guest wrote")
	}
	if s := blkSums(t, out)["vda"]; s != guestSum(want[:32*4096]) {
		t.Fatalf("guest sum %s, host computes %s\n%s", s, guestSum(want[:32*4096]), out)
	}
	if !strings.Contains(out, fmt.Sprintf("sectors=%d", diskSize/512)) {
		t.Fatalf("capacity not reported as %d sectors:\n%s", diskSize/512, out)
	}
}

func TestBlkQcow2Volume(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "data", "--size", "16M", "--format", "qcow2")
	out := bootOK(t, state, "--disk", "volume=data", "--cmdline", "rayguest.run=blktest rayguest.seed=7 rayguest.blocks=32")
	blkSums(t, out)
	v := inspect(t, state, "data")
	if v.State != "available" {
		t.Fatalf("volume state after the VM exited: %s", v.State)
	}
	check := qemuCheckClean(t, v.Path)
	if !strings.Contains(check, "No errors were found") {
		t.Fatalf("qemu-img check:\n%s", check)
	}
	if !bytes.Equal(toRaw(t, v.Path), expectImage(diskSize, 7, 32)) {
		t.Fatal("qemu-img convert -O raw of the volume differs from the raw-file result")
	}
}

// TestBlkSnapshotChain writes seed 1, snapshots, overwrites part with seed
// 2, snapshots again; each snapshot's clone reads back its point in time.
func TestBlkSnapshotChain(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "v", "--size", "16M", "--format", "qcow2")
	bootOK(t, state, "--disk", "volume=v", "--cmdline", "rayguest.run=blktest rayguest.seed=1 rayguest.blocks=16")
	rayvmmOK(t, state, "volume", "snapshot", "v", "s1")
	bootOK(t, state, "--disk", "volume=v", "--cmdline", "rayguest.run=blktest rayguest.seed=2 rayguest.blocks=4")
	rayvmmOK(t, state, "volume", "snapshot", "v", "s2")
	rayvmmOK(t, state, "volume", "clone", "s1", "c1")
	rayvmmOK(t, state, "volume", "clone", "s2", "c2")

	at1 := expectImage(16*4096, 1, 16)
	at2 := append([]byte(nil), at1...)
	for i := 0; i < 4; i++ {
		copy(at2[i*4096:], pattern(2, uint64(i)))
	}
	out := bootOK(t, state, "--disk", "volume=c1", "--disk", "volume=c2", "--cmdline", "rayguest.run=blksum rayguest.blocks=16")
	sums := blkSums(t, out)
	if sums["vda"] != guestSum(at1) || sums["vdb"] != guestSum(at2) {
		t.Fatalf("clone sums %v; want vda=%s (after seed 1) vdb=%s (after seed 2)\n%s", sums, guestSum(at1), guestSum(at2), out)
	}
	// A snapshot attached read-only reads the same state.
	out = bootOK(t, state, "--disk", "volume=s2,readonly", "--cmdline", "rayguest.run=blksum rayguest.blocks=16")
	if s := blkSums(t, out)["vda"]; s != guestSum(at2) {
		t.Fatalf("snapshot s2 sum %s, want %s", s, guestSum(at2))
	}
	// qemu-img sees the chain rayvmm recorded.
	c2 := inspect(t, state, "c2")
	info := qemuImg(t, "info", "--backing-chain", "--output=json", c2.Path)
	var chain []struct {
		Filename string `json:"filename"`
	}
	if err := json.Unmarshal([]byte(info), &chain); err != nil {
		t.Fatal(err)
	}
	if len(chain) != len(c2.Chain) || len(chain) != 3 {
		t.Fatalf("qemu-img chain %v, rayvmm recorded %v (want c2 -> s2 -> s1: 3 images)", chain, c2.Chain)
	}
	for i := range chain {
		if chain[i].Filename != c2.Chain[i] {
			t.Fatalf("chain[%d]: qemu-img %s, rayvmm %s", i, chain[i].Filename, c2.Chain[i])
		}
	}
	for _, img := range c2.Chain {
		qemuCheckClean(t, img)
	}
}

// TestBlkQemuOverlay boots a qcow2 overlay that qemu-img made over a base
// that qemu-io filled: the guest writes part of it, the base is untouched,
// and qemu-img check stays clean.
func TestBlkQemuOverlay(t *testing.T) {
	requireKVM(t)
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	base, over := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "over.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "16M")
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", base).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	baseBefore := toRaw(t, base)
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", over)
	bootOK(t, t.TempDir(), "--disk", "path="+over, "--cmdline", "rayguest.run=blktest rayguest.seed=3 rayguest.blocks=8")
	qemuCheckClean(t, over)
	if !bytes.Equal(toRaw(t, base), baseBefore) {
		t.Fatal("the backing file changed")
	}
	got := toRaw(t, over)
	want := append([]byte(nil), baseBefore...)
	copy(want, expectImage(8*4096, 3, 8))
	if !bytes.Equal(got, want) {
		t.Fatal("overlay does not read as the guest's blocks over the base")
	}
}

func TestBlkReadOnly(t *testing.T) {
	requireKVM(t)
	img := sparseFile(t, diskSize)
	f, _ := os.OpenFile(img, os.O_WRONLY, 0)
	f.WriteAt(bytes.Repeat([]byte{0xa5}, 64<<10), 0)
	f.Close()
	before, _ := os.ReadFile(img)
	out := bootOK(t, t.TempDir(), "--disk", "path="+img+",readonly", "--cmdline", "rayguest.run=blkwrite rayguest.blocks=4")
	if !strings.Contains(out, "rayguest: blk vda write status=1") {
		t.Fatalf("guest writes to a read-only disk did not fail with VIRTIO_BLK_S_IOERR:\n%s", out)
	}
	after, _ := os.ReadFile(img)
	if !bytes.Equal(before, after) {
		t.Fatal("read-only disk changed")
	}
	// blktest on a read-only disk only reads and sums.
	out = bootOK(t, t.TempDir(), "--disk", "path="+img+",readonly", "--cmdline", "rayguest.run=blktest rayguest.blocks=4")
	if s := blkSums(t, out)["vda"]; s != guestSum(before[:4*4096]) {
		t.Fatalf("read-only sum %s, want %s", s, guestSum(before[:4*4096]))
	}
}

var flushedRE = regexp.MustCompile(`rayguest: blk vda flushed blocks=(\d+)`)

// TestBlkKill9Qcow2 kills rayvmm with SIGKILL in the middle of a blktest on
// a qcow2 volume, several times at different points: qemu-img check finds
// no corruption (leaks allowed) and every block the guest saw flushed holds
// what the guest wrote.
func TestBlkKill9Qcow2(t *testing.T) {
	requireKVM(t)
	requireTool(t, "qemu-img")
	for i, after := range []int{1, 3, 6} {
		t.Run(fmt.Sprintf("after %d flushes", after), func(t *testing.T) {
			state := t.TempDir()
			rayvmmOK(t, state, "volume", "create", "v", "--size", "64M", "--format", "qcow2")
			seed := uint64(10 + i)
			cmd := exec.Command(rayvmm, "--state-dir", state, "boot", "--disk", "volume=v",
				"--cmdline", fmt.Sprintf("rayguest.run=blktest rayguest.seed=%d rayguest.blocks=4096 rayguest.flushevery=64", seed))
			p := startProc(t, cmd)
			p.out.waitFor(t, fmt.Sprintf("flushed blocks=%d\n", 64*after), 3*time.Minute)
			cmd.Process.Signal(syscall.SIGKILL)
			p.exited(t, "SIGKILL", time.Minute)
			flushed := 0
			for _, m := range flushedRE.FindAllStringSubmatch(p.out.String(), -1) {
				fmt.Sscan(m[1], &flushed)
			}
			if flushed >= 4096 {
				t.Fatalf("the guest finished before the kill; nothing was tested")
			}
			v := inspect(t, state, "v")
			if v.State != "available" {
				t.Fatalf("volume is %s after its VMM was killed", v.State)
			}
			t.Logf("killed after %d flushed blocks: %s", flushed, strings.TrimSpace(qemuCheckClean(t, v.Path)))
			got := toRaw(t, v.Path)
			for b := 0; b < flushed; b++ {
				if !bytes.Equal(got[b*4096:(b+1)*4096], pattern(seed, uint64(b))) {
					t.Fatalf("block %d was flushed before the kill but does not hold the guest's data", b)
				}
			}
			// The volume is usable again: a new VM attaches it and reads it.
			out := bootOK(t, state, "--disk", "volume=v", "--cmdline", fmt.Sprintf("rayguest.run=blksum rayguest.blocks=%d", flushed))
			if s := blkSums(t, out)["vda"]; s != guestSum(got[:flushed*4096]) {
				t.Fatalf("after the crash the guest reads sum %s, host image has %s", s, guestSum(got[:flushed*4096]))
			}
		})
	}
}

// TestBlkQoS runs the same 41-request blktest (20 writes, a flush, 20
// reads) with and without iops=10. Token-bucket arithmetic bounds the
// throttled run from below whatever the machine's speed or load: the bucket
// holds 10 operations and refills 10 per second, so the 31 requests past
// the first 10 cannot finish in under 3.1 s. The two runs' wall times are
// not compared with each other: on a loaded machine either can be slowed
// by seconds.
func TestBlkQoS(t *testing.T) {
	requireKVM(t)
	const blocks, iops = 20, 10
	requests := 2*blocks + 1
	timed := func(spec string) (time.Duration, string) {
		img := sparseFile(t, diskSize)
		metrics := filepath.Join(t.TempDir(), "m.json")
		start := time.Now()
		out := bootOK(t, t.TempDir(), "--disk", "path="+img+",format=raw"+spec, "--metrics-file", metrics,
			"--cmdline", fmt.Sprintf("rayguest.run=blktest rayguest.blocks=%d", blocks))
		d := time.Since(start)
		if s := blkSums(t, out); s["vda"] == "" {
			t.Fatalf("blktest did not finish:\n%s", out)
		}
		b, err := os.ReadFile(metrics)
		if err != nil {
			t.Fatal(err)
		}
		return d, string(b)
	}
	free, mFree := timed("")
	limited, mLimited := timed(fmt.Sprintf(",iops=%d", iops))
	t.Logf("%d requests: unthrottled %v, iops=%d %v", requests, free, iops, limited)
	type metrics struct {
		Disks []struct {
			Metrics struct {
				Throttled float64 `json:"throttled_seconds"`
				Writes    uint64  `json:"write_ops"`
				Reads     uint64  `json:"read_ops"`
				Flushes   uint64  `json:"flush_ops"`
			} `json:"metrics"`
		} `json:"disks"`
	}
	parse := func(s string) (m metrics) {
		if err := json.Unmarshal([]byte(s), &m); err != nil || len(m.Disks) != 1 {
			t.Fatalf("metrics file: %v\n%s", err, s)
		}
		return m
	}
	f, l := parse(mFree).Disks[0].Metrics, parse(mLimited).Disks[0].Metrics
	if l.Writes != blocks || l.Reads != blocks || l.Flushes != 1 {
		t.Fatalf("throttled run did %d writes, %d reads, %d flushes", l.Writes, l.Reads, l.Flushes)
	}
	if f.Throttled != 0 {
		t.Fatalf("unthrottled run was throttled for %.2fs", f.Throttled)
	}
	if min := time.Duration(requests-iops) * time.Second / iops; limited < min {
		t.Fatalf("iops=%d run took %v, under the %v the bucket allows: the limit was not enforced", iops, limited, min)
	}
	// rayguest issues requests one at a time, about 500 a second under
	// the emulator: 50 times the limit, so requests wait for tokens unless
	// the guest ran 50 times slower than usual for the whole run.
	if l.Throttled <= 0 {
		t.Fatalf("iops=%d run took %v but no request waited for the limiter", iops, limited)
	}
}

// TestBlkBadInput: each bad disk argument or volume command fails with one
// clear line and leaves no volume, image or lock file behind.
func TestBlkBadInput(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "base", "--size", "8M", "--format", "qcow2")
	rayvmmOK(t, state, "volume", "snapshot", "base", "snap")
	listing := func() string {
		var names []string
		filepath.Walk(state, func(p string, info os.FileInfo, err error) error {
			if err == nil && !info.IsDir() {
				names = append(names, strings.TrimPrefix(p, state))
			}
			return nil
		})
		return strings.Join(names, "\n")
	}
	before := listing()
	img := sparseFile(t, 1<<20)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unknown disk option", []string{"boot", "--disk", "path=" + img + ",turbo"}, `unknown option "turbo"`},
		{"missing file", []string{"boot", "--disk", "path=/nonexistent/disk.img"}, "no such file"},
		{"missing volume", []string{"boot", "--disk", "volume=nope"}, "nope"},
		{"bad iops", []string{"boot", "--disk", "path=" + img + ",iops=-1"}, "iops"},
		{"snapshot read-write", []string{"boot", "--disk", "volume=snap"}, "read-only"},
		{"size 0", []string{"volume", "create", "x", "--size", "0"}, "greater than zero"},
		{"bad size", []string{"volume", "create", "x", "--size", "big"}, "size"},
		{"duplicate name", []string{"volume", "create", "base", "--size", "8M"}, "exists"},
		{"rm parent", []string{"volume", "rm", "snap"}, "parent"},
		{"rm missing", []string{"volume", "rm", "nope"}, "nope"},
		{"clone missing", []string{"volume", "clone", "nope", "x"}, "nope"},
		{"import missing", []string{"volume", "import", "/nonexistent.img", "x"}, "no such file"},
		{"bad volume name", []string{"volume", "create", "../evil", "--size", "8M"}, "name"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, nil, time.Minute, append([]string{"--state-dir", state}, tc.args...)...)
			msg := strings.TrimSpace(r.stderr)
			if r.code == 0 || strings.Count(msg, "\n") != 0 || !strings.Contains(msg, tc.want) {
				t.Fatalf("exit %d, stderr %q; want a one-line error mentioning %q", r.code, msg, tc.want)
			}
			if after := listing(); after != before {
				t.Fatalf("state directory changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// TestBlkAttachedElsewhere: a volume attached by one VMM is refused to a
// second one and to rm, and is free again once the first exits.
func TestBlkAttachedElsewhere(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "v", "--size", "8M")
	cmd := exec.Command(rayvmm, "--state-dir", state, "boot", "--disk", "volume=v", "--cmdline", "rayguest.run=echo")
	stdin, _ := cmd.StdinPipe()
	p := startProc(t, cmd)
	p.out.waitFor(t, "rayguest: ready", time.Minute)
	if v := inspect(t, state, "v"); v.State != "attached" {
		t.Fatalf("state while a VM runs: %s", v.State)
	}
	r := run(t, nil, time.Minute, "--state-dir", state, "boot", "--disk", "volume=v")
	if r.code == 0 || !strings.Contains(r.stderr, "attached") {
		t.Fatalf("second attach: exit %d %s", r.code, r.stderr)
	}
	r = run(t, nil, time.Minute, "--state-dir", state, "volume", "rm", "v")
	if r.code == 0 || !strings.Contains(r.stderr, "attached") {
		t.Fatalf("rm while attached: exit %d %s", r.code, r.stderr)
	}
	stdin.Write([]byte("quit\n"))
	if err := p.exited(t, `"quit"`, time.Minute); err != nil {
		t.Fatalf("first VM: %v\n%s", err, p.out.String())
	}
	if v := inspect(t, state, "v"); v.State != "available" {
		t.Fatalf("state after the VM exited: %s", v.State)
	}
	rayvmmOK(t, state, "volume", "rm", "v")
}

// TestBlkImageInUse: an image file one VM writes cannot be attached by a
// second VM, read-write or read-only, nor written by qemu-io; several VMs
// may share an image read-only.
func TestBlkImageInUse(t *testing.T) {
	requireKVM(t)
	requireTool(t, "qemu-io")
	img := sparseFile(t, 8<<20)
	cmd := exec.Command(rayvmm, "boot", "--disk", "path="+img+",format=raw", "--cmdline", "rayguest.run=echo")
	stdin, _ := cmd.StdinPipe()
	first := startProc(t, cmd)
	first.out.waitFor(t, "rayguest: ready", time.Minute)
	for _, spec := range []string{"path=" + img + ",format=raw", "path=" + img + ",format=raw,readonly"} {
		r := run(t, nil, time.Minute, "boot", "--disk", spec)
		if r.code == 0 || !strings.Contains(r.stderr, "in use") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Fatalf("--disk %s while another VM writes it: exit %d, %q", spec, r.code, r.stderr)
		}
	}
	if exec.Command("qemu-io", "-f", "raw", "-c", "write 0 512", img).Run() == nil {
		t.Fatal("qemu-io wrote an image a VM is using")
	}
	stdin.Write([]byte("quit\n"))
	if err := first.exited(t, `"quit"`, time.Minute); err != nil {
		t.Fatalf("first VM: %v\n%s", err, first.out.String())
	}
	// Readers share: two read-only disks on one image in one VM.
	out := bootOK(t, t.TempDir(), "--disk", "path="+img+",format=raw,readonly", "--disk", "path="+img+",format=raw,readonly",
		"--cmdline", "rayguest.run=blksum rayguest.blocks=2")
	if s := blkSums(t, out); s["vda"] == "" || s["vda"] != s["vdb"] {
		t.Fatalf("two readers: %v", s)
	}
}
