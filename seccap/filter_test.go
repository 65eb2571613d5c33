package seccap

import (
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// verdict runs an assembled policy on one system call, as the kernel
// would, with x/net/bpf's interpreter.
func verdict(t *testing.T, prog []unix.SockFilter, auditArch uint32, nr int, args ...uint64) action {
	t.Helper()
	raw := make([]bpf.RawInstruction, len(prog))
	for i, f := range prog {
		raw[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}
	}
	insts, ok := bpf.Disassemble(raw)
	if !ok {
		t.Fatalf("the filter has instructions x/net/bpf does not know")
	}
	vm, err := bpf.NewVM(insts)
	if err != nil {
		t.Fatal(err)
	}
	// struct seccomp_data: nr, arch, instruction_pointer, args[6]. The
	// kernel loads words in host order; x/net/bpf's interpreter loads
	// them big-endian, so each 32-bit word is stored big-endian at the
	// offset where the host (little-endian) keeps it.
	d := make([]byte, 64)
	binary.BigEndian.PutUint32(d[0:], uint32(nr))
	binary.BigEndian.PutUint32(d[4:], auditArch)
	for i, a := range args {
		binary.BigEndian.PutUint32(d[16+8*i:], uint32(a))
		binary.BigEndian.PutUint32(d[16+8*i+4:], uint32(a>>32))
	}
	r, err := vm.Run(d)
	if err != nil {
		t.Fatal(err)
	}
	return action(uint32(r))
}

type action uint32

func (a action) String() string {
	switch a {
	case retAllow:
		return "allow"
	case retTrap:
		return "trap"
	case retLog:
		return "log"
	case retKillProcess:
		return "kill_process"
	}
	return fmt.Sprintf("%#x", uint32(a))
}

const x86_64 = 0xc000003e

func nr(t *testing.T, name string) int {
	t.Helper()
	n, ok := arch.X86_64.SyscallNames[name]
	if !ok {
		t.Fatalf("no syscall %s", name)
	}
	return n
}

// TestSysnum: the call numbers the filters use (x/sys) are those of
// go-seccomp-bpf's table.
func TestSysnum(t *testing.T) {
	for name, n := range sysnum {
		if want, ok := arch.X86_64.SyscallNames[name]; !ok || want != n {
			t.Errorf("%s: %d, go-seccomp-bpf says %d", name, n, want)
		}
	}
}

func TestProcessFilter(t *testing.T) {
	const pid = 4242
	strict := &Applied{Mode: ModeStrict, Trap: true, LandlockABI: 7, pid: pid}
	p, err := processProgram(Config{Mode: ModeStrict}, strict)
	if err != nil {
		t.Fatal(err)
	}
	withDial, err := processProgram(Config{Mode: ModeStrict, DialUnix: []string{"/run/vsock"}, DialTCP: []uint16{10809}}, strict)
	if err != nil {
		t.Fatal(err)
	}
	withVsock, err := processProgram(Config{Mode: ModeStrict, Vsock: true, DialUnix: []string{"/run/vsock"}}, strict)
	if err != nil {
		t.Fatal(err)
	}
	withShards, err := processProgram(Config{Mode: ModeStrict, RecvFDSockets: []int{9, 11}, DialTCP: []uint16{10809}}, strict)
	if err != nil {
		t.Fatal(err)
	}
	noLandlock, err := processProgram(Config{Mode: ModeStrict}, &Applied{Mode: ModeStrict, Trap: true, pid: pid})
	if err != nil {
		t.Fatal(err)
	}
	logged, err := processProgram(Config{Mode: ModeLog}, &Applied{Mode: ModeLog, LandlockABI: 7, pid: pid})
	if err != nil {
		t.Fatal(err)
	}
	allow, trap := action(retAllow), action(retTrap)
	tests := []struct {
		name string
		p    []unix.SockFilter
		call string
		args []uint64
		want action
	}{
		{"KVM_RUN", p, "ioctl", []uint64{12, kvmRun}, allow},
		{"KVM_IRQ_LINE_STATUS", p, "ioctl", []uint64{5, kvmIRQLineState}, allow},
		{"KVM_CREATE_VCPU (a vCPU is set up after the sandbox)", p, "ioctl", []uint64{5, kvmCreateVCPU}, allow},
		{"TCSETS", p, "ioctl", []uint64{0, tcsets}, allow},
		{"KVM_CREATE_VM", p, "ioctl", []uint64{4, 0xae01}, trap},
		{"KVM_SET_USER_MEMORY_REGION", p, "ioctl", []uint64{5, 0x4020ae46}, trap},
		{"TUNSETIFF", p, "ioctl", []uint64{7, unix.TUNSETIFF}, trap},
		{"TIOCSTI (type into the terminal)", p, "ioctl", []uint64{0, unix.TIOCSTI}, trap},
		{"KVM_RUN with junk in the upper half", p, "ioctl", []uint64{12, 1<<32 | kvmRun}, trap},
		// go-seccomp-bpf's assembler let these two through as write
		// and fstat (see bpf.go).
		{"ioctl request 1", p, "ioctl", []uint64{3, 1}, trap},
		{"mmap prot 5 (RX)", p, "mmap", []uint64{0, 4096, 5}, trap},
		{"futex wait", p, "futex", []uint64{0, 128}, allow},
		{"futex lock_pi", p, "futex", []uint64{0, 6 | 128}, trap},
		{"futex cmp_requeue", p, "futex", []uint64{0, 4}, trap},
		{"mmap RW", p, "mmap", []uint64{0, 4096, unix.PROT_READ | unix.PROT_WRITE}, allow},
		{"mmap RX", p, "mmap", []uint64{0, 4096, unix.PROT_READ | unix.PROT_EXEC}, trap},
		{"mprotect", p, "mprotect", []uint64{0, 4096, unix.PROT_EXEC}, trap},
		{"Go thread", p, "clone", []uint64{goThreadFlags}, allow},
		{"fork", p, "clone", []uint64{uint64(unix.SIGCHLD)}, trap},
		{"thread in a new user namespace", p, "clone", []uint64{goThreadFlags | unix.CLONE_NEWUSER}, trap},
		{"clone3", p, "clone3", nil, trap},
		{"vfork", p, "vfork", nil, trap},
		{"tgkill own thread", p, "tgkill", []uint64{pid, 17, uint64(unix.SIGURG)}, allow},
		{"tgkill other process", p, "tgkill", []uint64{1, 1, uint64(unix.SIGKILL)}, trap},
		{"kill other process", p, "kill", []uint64{1, uint64(unix.SIGKILL)}, trap},
		{"rt_sigaction SIGURG", p, "rt_sigaction", []uint64{uint64(unix.SIGURG)}, allow},
		{"rt_sigaction SIGSYS (the handler stays)", p, "rt_sigaction", []uint64{uint64(unix.SIGSYS)}, trap},
		{"fcntl F_SETFL", p, "fcntl", []uint64{3, unix.F_SETFL}, allow},
		{"fcntl F_SETOWN", p, "fcntl", []uint64{3, unix.F_SETOWN}, trap},
		{"openat with landlock", p, "openat", nil, allow},
		{"openat without landlock", noLandlock, "openat", nil, trap},
		{"open", p, "open", nil, trap},
		{"openat2", p, "openat2", nil, trap},
		{"socket AF_UNIX without dial", p, "socket", []uint64{unix.AF_UNIX}, trap},
		{"socket AF_UNIX to dial", withDial, "socket", []uint64{unix.AF_UNIX}, allow},
		{"socket AF_INET to dial", withDial, "socket", []uint64{unix.AF_INET}, allow},
		{"socket AF_NETLINK", withDial, "socket", []uint64{unix.AF_NETLINK}, trap},
		{"socket AF_PACKET", withDial, "socket", []uint64{unix.AF_PACKET}, trap},
		{"connect without dial", p, "connect", nil, trap},
		{"getsockopt without dial", p, "getsockopt", nil, trap},
		{"getsockopt to dial", withDial, "getsockopt", nil, allow},
		{"recvmsg (no descriptors are received)", withDial, "recvmsg", nil, trap},
		{"recvmsg on the shard socketpair", withShards, "recvmsg", []uint64{9}, allow},
		{"recvmsg on another descriptor", withShards, "recvmsg", []uint64{8}, trap},
		{"epoll_create1 without vsock", p, "epoll_create1", []uint64{unix.EPOLL_CLOEXEC}, trap},
		{"epoll_create1 for vsock", withVsock, "epoll_create1", []uint64{unix.EPOLL_CLOEXEC}, allow},
		{"epoll_create1 without CLOEXEC", withVsock, "epoll_create1", []uint64{0}, trap},
		{"readv without vsock", p, "readv", nil, trap},
		{"readv for vsock", withVsock, "readv", nil, allow},
		{"recvfrom peek for vsock", withVsock, "recvfrom", []uint64{7, 0, 32, unix.MSG_PEEK}, allow},
		{"recvfrom otherwise", withVsock, "recvfrom", []uint64{7, 0, 32, 0}, trap},
		{"ppoll for vsock", withVsock, "ppoll", nil, allow},
		{"ppoll without vsock", p, "ppoll", nil, trap},
		{"sendfile", p, "sendfile", nil, trap},
		{"splice", p, "splice", nil, trap},
		{"accept4 on the API socket", p, "accept4", nil, allow},
		{"bind", withDial, "bind", nil, trap},
		{"listen", withDial, "listen", nil, trap},
		{"execve", p, "execve", nil, trap},
		{"execveat", p, "execveat", nil, trap},
		{"ptrace", p, "ptrace", nil, trap},
		{"mount", p, "mount", nil, trap},
		{"umount2", p, "umount2", nil, trap},
		{"pivot_root", p, "pivot_root", nil, trap},
		{"unshare", p, "unshare", nil, trap},
		{"setns", p, "setns", nil, trap},
		{"open_by_handle_at", p, "open_by_handle_at", nil, trap},
		{"bpf", p, "bpf", nil, trap},
		{"kexec_load", p, "kexec_load", nil, trap},
		{"kexec_file_load", p, "kexec_file_load", nil, trap},
		{"keyctl", p, "keyctl", nil, trap},
		{"add_key", p, "add_key", nil, trap},
		{"userfaultfd", p, "userfaultfd", nil, trap},
		{"perf_event_open", p, "perf_event_open", nil, trap},
		{"io_uring_setup", p, "io_uring_setup", nil, trap},
		{"process_vm_writev", p, "process_vm_writev", nil, trap},
		{"init_module", p, "init_module", nil, trap},
		{"setuid", p, "setuid", nil, trap},
		{"prctl", p, "prctl", nil, trap},
		{"seccomp", p, "seccomp", nil, trap},
		{"chroot", p, "chroot", nil, trap},
		{"memfd_create", p, "memfd_create", nil, trap},
		{"log mode logs instead", logged, "execve", nil, action(retLog)},
		{"log mode allows the list", logged, "futex", []uint64{0, 129}, allow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := verdict(t, tt.p, x86_64, nr(t, tt.call), tt.args...); got != tt.want {
				t.Errorf("%s(%#x) = %v, want %v", tt.call, tt.args, got, tt.want)
			}
		})
	}
	t.Run("i386 ABI", func(t *testing.T) {
		if got := verdict(t, p, 0x40000003, 3); got != trap {
			t.Errorf("int 0x80 read = %v, want trap", got)
		}
	})
	t.Run("x32 ABI", func(t *testing.T) {
		if got := verdict(t, p, x86_64, 0x40000000|nr(t, "read")); got != trap {
			t.Errorf("x32 read = %v, want trap", got)
		}
	})
}

func TestVCPUFilter(t *testing.T) {
	const pid, vcpuFD, vmFD = 4242, 12, 5
	p, err := assemble(vcpuGroups(vcpuFD, vmFD, pid), retTrap)
	if err != nil {
		t.Fatal(err)
	}
	allow, trap := action(retAllow), action(retTrap)
	tests := []struct {
		name string
		call string
		args []uint64
		want action
	}{
		{"KVM_RUN on its vCPU", "ioctl", []uint64{vcpuFD, kvmRun}, allow},
		{"KVM_RUN on another vCPU", "ioctl", []uint64{vcpuFD + 1, kvmRun}, trap},
		{"KVM_GET_REGS for a crash report", "ioctl", []uint64{vcpuFD, kvmGetRegs}, allow},
		{"serial IRQ on the VM", "ioctl", []uint64{vmFD, kvmIRQLineState}, allow},
		{"serial IRQ on the vCPU fd", "ioctl", []uint64{vcpuFD, kvmIRQLineState}, trap},
		{"KVM_SET_REGS", "ioctl", []uint64{vcpuFD, kvmSetRegs}, trap},
		{"KVM_CREATE_VCPU", "ioctl", []uint64{vmFD, kvmCreateVCPU}, trap},
		{"console output", "write", []uint64{1}, allow},
		{"futex wake", "futex", []uint64{0, 129}, allow},
		{"kick another vCPU", "tgkill", []uint64{pid, 99, uint64(unix.SIGURG)}, allow},
		{"thread exit", "exit", nil, allow},
		{"read", "read", nil, trap},
		{"pwrite64 (disk I/O is the devices')", "pwrite64", nil, trap},
		{"openat", "openat", nil, trap},
		{"socket", "socket", []uint64{unix.AF_UNIX}, trap},
		{"accept4", "accept4", nil, trap},
		{"clone", "clone", []uint64{goThreadFlags}, trap},
		{"epoll_pwait", "epoll_pwait", nil, trap},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := verdict(t, p, x86_64, nr(t, tt.call), tt.args...); got != tt.want {
				t.Errorf("%s(%#x) = %v, want %v", tt.call, tt.args, got, tt.want)
			}
		})
	}
}

// TestHandlerDeathCallIsRefused: the SIGSYS handler ends the process by
// asking for rt_sigaction(SIGSYS), which both filters must refuse.
func TestHandlerDeathCallIsRefused(t *testing.T) {
	a := &Applied{Mode: ModeStrict, Trap: true, LandlockABI: 7, pid: 1}
	pp, err := processProgram(Config{Mode: ModeStrict, DialUnix: []string{"/x"}, DialTCP: []uint16{1}}, a)
	if err != nil {
		t.Fatal(err)
	}
	vp, err := assemble(vcpuGroups(-1, -1, 1), retTrap)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range [][]unix.SockFilter{pp, vp} {
		if got := verdict(t, p, x86_64, nr(t, "rt_sigaction"), uint64(unix.SIGSYS), 0, 0, 8); got != retTrap {
			t.Errorf("rt_sigaction(SIGSYS) = %v, want trap", got)
		}
	}
}

func TestTable(t *testing.T) {
	s := Table(Config{Mode: ModeStrict, DialUnix: []string{"/run"}})
	for _, want := range []string{
		"ioctl(arg1 in {KVM_RUN, KVM_IRQ_LINE_STATUS,",
		"futex(arg1 in {0x80, 0x81})",
		"mmap(arg2 has none of 0x4)",
		"rt_sigaction(arg0 != 0x1f)",
		"socket(arg0 == 0x1)",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("table lacks %q:\n%s", want, s)
		}
	}
	if !strings.Contains(s, "vCPU threads, on top:") {
		t.Errorf("no vCPU table:\n%s", s)
	}
}

func TestParseMode(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Mode
		err  bool
	}{
		{"strict", ModeStrict, false},
		{"log", ModeLog, false},
		{"off", ModeOff, false},
		{"Strict", "", true},
		{"on", "", true},
	} {
		got, err := ParseMode(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("ParseMode(%q) = %q, %v", tt.in, got, err)
		}
	}
	if m, err := ParseMode(""); err != nil || m != DefaultMode() {
		t.Errorf("ParseMode(\"\") = %q, %v; want the default %q", m, err, DefaultMode())
	}
}
