package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/guestkernel"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmproc"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// rayvmm boot and the audit log on the two processes: the boot record is
// written while the VM process builds the VM, and the guest waits for it
// (the gate); a VM process killed by a signal is recorded with its
// detaches; a user who is not root and cannot write the log still boots,
// with one warning; root never boots unrecorded.

const gateHelperEnv = "RAYVMM_TEST_GATE"

// gateHelper is a stand-in control plane: it launches a gated VM process,
// says "launched", and on a line from its stdin lets the guest run ("go")
// or not ("cut"); then it prints the VM process's outcome as JSON.
func gateHelper() int {
	var args struct {
		State, Binary string
		Spec          spec.VM
	}
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "helper:", err); return 1 }
	if err := json.Unmarshal([]byte(os.Getenv(gateHelperEnv)), &args); err != nil {
		return fail(err)
	}
	s := &args.Spec
	s.Defaults()
	res, err := control.Open(context.Background(), s, control.Options{StateDir: args.State, BuiltinKernel: guestkernel.ELF})
	if err != nil {
		return fail(err)
	}
	defer res.Close()
	res.Handoff.Console = true // the guest's serial output on this stdout
	p, err := vmproc.Launch(res.Handoff, res.Files, vmproc.Options{Binary: args.Binary, Stdout: os.Stdout, Stderr: os.Stderr, Gate: true})
	if err != nil {
		return fail(err)
	}
	res.Launched()
	fmt.Println("launched")
	line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	switch strings.TrimSpace(line) {
	case "go":
		err = p.Go()
	default:
		err = p.CutLifeline()
	}
	if err != nil {
		return fail(err)
	}
	if _, err := p.Wait(); err != nil {
		return fail(err)
	}
	o, err := res.Outcome()
	if err != nil {
		return fail(err)
	}
	b, _ := json.Marshal(o)
	fmt.Printf("outcome %s\n", b)
	return 0
}

// TestAuditBootGate: a gated VM process builds the VM and serves its API,
// but runs no guest instruction (no KVM_RUN in its boot times, no vCPU
// exit) until the control plane's go; without the go (the control plane
// could not record the boot) the guest never runs and the VM process says
// so.
func TestAuditBootGate(t *testing.T) {
	requireKVM(t)
	for _, tc := range []struct {
		say     string
		ran     bool
		reason  string
		console string
	}{
		{"go", true, "guest powered off", "rayguest: poweroff"},
		{"cut", false, "stopped before the guest ran: the control plane", ""},
	} {
		t.Run(tc.say, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "api.sock")
			arg, _ := json.Marshal(map[string]any{"State": t.TempDir(), "Binary": rayvmmVM,
				"Spec": map[string]any{"name": "gated", "apiSocket": sock}})
			helper := exec.Command(os.Args[0], "-test.run=^$")
			helper.Env = append(os.Environ(), gateHelperEnv+"="+string(arg))
			in, err := helper.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			p := startProc(t, helper)
			p.out.waitForLine(t, "launched", guestWait)
			// The API answers once the VM is built: the VM process is at
			// its gate (or about to be) and has run no guest code.
			for range 3 {
				fams := scrape(t, sock)
				if v := sample(t, fams, "rayvmm_boot_first_kvm_run_seconds", nil); v != 0 {
					t.Fatalf("first KVM_RUN at %vs before the go", v)
				}
				if f := fams["rayvmm_vcpu_exits_total"]; f != nil && len(f.Metric) > 0 {
					t.Fatalf("vCPU exits before the go: %v", f)
				}
			}
			if out := p.out.String(); strings.Contains(out, "rayguest:") {
				t.Fatalf("the guest printed before the go:\n%s", out)
			}
			io.WriteString(in, tc.say+"\n")
			if err := p.exited(t, tc.say, guestWait); err != nil {
				t.Fatalf("helper: %v\n%s", err, p.out.String())
			}
			out := p.out.String()
			var o vmproc.Outcome
			i := strings.Index(out, "outcome ")
			if i < 0 || json.Unmarshal([]byte(strings.TrimSpace(out[i+len("outcome "):])), &o) != nil {
				t.Fatalf("no outcome:\n%s", out)
			}
			if o.Status != 0 || o.Ran != tc.ran || !strings.HasPrefix(o.Reason, tc.reason) {
				t.Fatalf("outcome %+v, want status 0, ran %v, reason %q", o, tc.ran, tc.reason)
			}
			if tc.console != "" && !strings.Contains(out, tc.console) {
				t.Fatalf("the guest did not run after the go:\n%s", out)
			}
			if tc.console == "" && strings.Contains(out, "rayguest:") {
				t.Fatalf("the guest ran without the go:\n%s", out)
			}
		})
	}
}

// auditRecords reads a state directory's audit log.
func auditRecords(t *testing.T, state string) []*audit.Record {
	t.Helper()
	var rs []*audit.Record
	err := audit.Read(audit.Dir(state), func(r *audit.Record) error {
		if r.Seal == nil {
			rs = append(rs, r)
		}
		return nil
	}, func(file string, line int, err error) { t.Errorf("%s:%d: %v", file, line, err) })
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// TestAuditBootKilled: kill -9 of the VM process is recorded as vm.crash
// with the signal, after the boot and its attach, and followed by the
// detach once the volume's lock is gone; the log verifies.
func TestAuditBootKilled(t *testing.T) {
	requireKVM(t)
	state := t.TempDir()
	rayvmmOK(t, state, "volume", "create", "data", "--size", "16M")
	b := startBoot(t, "rayguest: ready", "--state-dir", state, "boot", "--name", "victim", "--cmdline", "rayguest.run=echo", "--disk", "volume=data")
	vm := vmProcess(t, b.cmd.Process.Pid)
	if err := unix.Kill(vm, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := b.wait(t); code != 1 || !strings.Contains(b.out.String(), "rayvmm: VM process killed by signal 9 (killed)") {
		t.Fatalf("rayvmm boot: exit %d\n%s", code, b.out.String())
	}
	var got []string
	for _, r := range auditRecords(t, state) {
		got = append(got, r.Action+" "+r.Object.String()+" "+r.Result)
	}
	want := []string{
		"volume.create volume/data ok",
		"vm.boot vm/victim ok",
		"volume.attach volume/data ok",
		"vm.crash vm/victim VM process killed by signal 9 (killed)",
		"volume.detach volume/data ok",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("audit log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if out := rayvmmOK(t, state, "audit", "verify"); !strings.Contains(out, "intact") {
		t.Fatalf("audit verify: %s", out)
	}
}

// TestAuditBootPermissions: a user who is not root, with access to a KVM
// device but none to the state directory, boots the built-in guest with
// one warning line and nothing recorded; with a state directory of its
// own, its boots are recorded under its uid. Root with a state directory
// that cannot be used does not boot at all.
func TestAuditBootPermissions(t *testing.T) {
	requireKVM(t)
	const nobody = 65534
	// Somewhere the user can reach: the binaries and a KVM device node
	// of its own (the host's /dev/kvm stays as it is).
	dir, err := os.MkdirTemp("", "rayvmm-nonroot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "rayvmm")
	copyFile(t, rayvmm, bin)
	copyFile(t, rayvmmVM, filepath.Join(dir, "rayvmm-vm"))
	var st unix.Stat_t
	if err := unix.Stat("/dev/kvm", &st); err != nil {
		t.Fatal(err)
	}
	kvm := filepath.Join(dir, "kvm")
	if err := unix.Mknod(kvm, unix.S_IFCHR|0o600, int(st.Rdev)); err != nil {
		t.Fatalf("mknod %s: %v", kvm, err)
	}
	if err := os.Chown(kvm, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	rootState := filepath.Join(dir, "root-state") // root's, 0700
	if err := os.Mkdir(rootState, 0o700); err != nil {
		t.Fatal(err)
	}
	own := filepath.Join(dir, "own-state")
	if err := os.Mkdir(own, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(own, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	asNobody := func(state string) result {
		t.Helper()
		return runCommand(t, nil, guestWait, func(ctx context.Context) *exec.Cmd {
			cmd := exec.CommandContext(ctx, bin, "boot", "--kvm-device", kvm)
			cmd.Env = []string{"HOME=/nonexistent", "PATH=/usr/bin:/bin", "RAYVMM_STATE_DIR=" + state}
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
			return cmd
		})
	}

	r := asNobody(rootState)
	warn := strings.TrimSpace(r.stderr)
	if r.code != 0 || !strings.Contains(r.stdout, "rayguest: poweroff") {
		t.Fatalf("boot as uid %d without the rights to the log: exit %d\n%s%s", nobody, r.code, r.stdout, r.stderr)
	}
	if strings.Count(warn, "\n") != 0 || !strings.HasPrefix(warn, "rayvmm: warning: this boot is not recorded in the audit log") || !strings.Contains(warn, "permission denied") {
		t.Fatalf("want one warning line naming the permission problem, got %q", r.stderr)
	}
	if ents, _ := os.ReadDir(rootState); len(ents) != 0 {
		t.Fatalf("the unwritable state directory got %v", ents)
	}

	r = asNobody(own)
	if r.code != 0 || strings.TrimSpace(r.stderr) != "" {
		t.Fatalf("boot as uid %d with its own state directory: exit %d\n%s%s", nobody, r.code, r.stdout, r.stderr)
	}
	rs := auditRecords(t, own)
	if len(rs) != 2 || rs[0].Action != audit.VMBoot || rs[1].Action != audit.VMExit || rs[0].Actor.UID != nobody {
		t.Fatalf("records of the user's boot: %+v", rs)
	}

	// Root fails closed: a state directory that cannot be made (a file is
	// in the way) stops the boot before anything is made.
	blocker := filepath.Join(dir, "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	api := filepath.Join(dir, "api.sock")
	r = run(t, nil, guestWait, "--state-dir", filepath.Join(blocker, "state"), "boot", "--api-socket", api)
	msg := strings.TrimSpace(r.stderr)
	if r.code == 0 || strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "audit") || strings.Contains(r.stdout, "rayguest:") {
		t.Fatalf("root with an unusable state directory: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Lstat(api); err == nil {
		t.Fatal("the failed boot left its API socket")
	}
}
