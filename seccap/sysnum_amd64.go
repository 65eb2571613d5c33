package seccap

import "golang.org/x/sys/unix"

// The numbers of the calls the allow-lists name, on amd64, from x/sys.
// (go-seccomp-bpf's tables for every architecture cost each process
// 0.2 to 0.5 ms and 160 KiB at init; the VM process needs these few.)
var sysnum = map[string]int{
	"recvmsg":           unix.SYS_RECVMSG,
	"recvfrom":          unix.SYS_RECVFROM,
	"readv":             unix.SYS_READV,
	"ppoll":             unix.SYS_PPOLL,
	"epoll_create1":     unix.SYS_EPOLL_CREATE1,
	"accept4":           unix.SYS_ACCEPT4,
	"clock_gettime":     unix.SYS_CLOCK_GETTIME,
	"clone":             unix.SYS_CLONE,
	"close":             unix.SYS_CLOSE,
	"connect":           unix.SYS_CONNECT,
	"epoll_ctl":         unix.SYS_EPOLL_CTL,
	"epoll_pwait":       unix.SYS_EPOLL_PWAIT,
	"exit":              unix.SYS_EXIT,
	"exit_group":        unix.SYS_EXIT_GROUP,
	"fallocate":         unix.SYS_FALLOCATE,
	"fcntl":             unix.SYS_FCNTL,
	"fdatasync":         unix.SYS_FDATASYNC,
	"fstat":             unix.SYS_FSTAT,
	"fsync":             unix.SYS_FSYNC,
	"ftruncate":         unix.SYS_FTRUNCATE,
	"futex":             unix.SYS_FUTEX,
	"getpeername":       unix.SYS_GETPEERNAME,
	"getpid":            unix.SYS_GETPID,
	"getrusage":         unix.SYS_GETRUSAGE,
	"getsockname":       unix.SYS_GETSOCKNAME,
	"getsockopt":        unix.SYS_GETSOCKOPT,
	"gettid":            unix.SYS_GETTID,
	"ioctl":             unix.SYS_IOCTL,
	"kill":              unix.SYS_KILL,
	"lseek":             unix.SYS_LSEEK,
	"madvise":           unix.SYS_MADVISE,
	"mmap":              unix.SYS_MMAP,
	"munmap":            unix.SYS_MUNMAP,
	"nanosleep":         unix.SYS_NANOSLEEP,
	"openat":            unix.SYS_OPENAT,
	"pread64":           unix.SYS_PREAD64,
	"pwrite64":          unix.SYS_PWRITE64,
	"read":              unix.SYS_READ,
	"restart_syscall":   unix.SYS_RESTART_SYSCALL,
	"rt_sigaction":      unix.SYS_RT_SIGACTION,
	"rt_sigprocmask":    unix.SYS_RT_SIGPROCMASK,
	"rt_sigreturn":      unix.SYS_RT_SIGRETURN,
	"sched_getaffinity": unix.SYS_SCHED_GETAFFINITY,
	"sched_yield":       unix.SYS_SCHED_YIELD,
	"seccomp":           unix.SYS_SECCOMP,
	"setsockopt":        unix.SYS_SETSOCKOPT,
	"shutdown":          unix.SYS_SHUTDOWN,
	"sigaltstack":       unix.SYS_SIGALTSTACK,
	"socket":            unix.SYS_SOCKET,
	"tgkill":            unix.SYS_TGKILL,
	"write":             unix.SYS_WRITE,
	"writev":            unix.SYS_WRITEV,
}

// auditArch is AUDIT_ARCH_X86_64, what seccomp_data.arch holds for
// native system calls.
const auditArch = unix.AUDIT_ARCH_X86_64

// archName names the architecture in errors.
const archName = "x86_64"
