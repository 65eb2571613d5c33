// Package vmproc is the hand-over between a control plane (rayvmm boot, the
// pods daemon) and a VM process (rayvmm-vm): the control plane resolves
// names and state, opens every resource the VM needs — /dev/kvm, the
// kernel, each disk image with its backing chain, each TAP, the API and
// vsock sockets, the metrics file — and sends them to rayvmm-vm over a Unix
// socket pair (SCM_RIGHTS), descriptor 3 in the VM process, with a Handoff
// (the effective spec and a table mapping each resource to its
// descriptor); the VM process puts the descriptors in place from
// descriptor 64 on, opens nothing by path and never touches the state
// directory. Starting the process (package spawn) is apart from handing
// it its VM (Hand), so that rayvmm boot can start it ahead, while it
// starts itself.
//
// Two launch modes:
//
//   - Foreground (rayvmm boot): the VM process never outlives the control
//     plane. The handoff socket stays open as a lifeline: when the control plane
//     exits, however it exits (kill -9 included), the VM process reads
//     EOF and stops cleanly. As a second line, the process is started with
//     a parent-death signal (SIGTERM) from an OS thread that stays locked
//     for the child's whole life (Linux sends it when the forking thread
//     exits, not the process), and the VM process checks, right after it
//     starts, that its parent is still the control plane that launched it.
//   - Detached (the pods daemon): the VM process gets a session of its own
//     and no lifeline, so it survives the daemon; the daemon finds it again
//     by pid, process start time and API socket (see Process.StartTime).
//
// The package links only the standard library, spec, seccap (the
// sandbox's plain-data config, and the fork thread's preparation) and
// x/sys, because both sides link it.
package vmproc

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/seccap"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmproc/spawn"
)

// Version is the handoff format's version; both sides must agree.
const Version = 1

// HandoffFD is the socket the handoff arrives on; the resources it carries
// are placed from FirstResourceFD on, in order: high enough to be free
// whatever the Go runtime opened at its start (it keeps the cgroup's CPU
// quota files open, for GOMAXPROCS).
const (
	HandoffFD       = spawn.HandoffFD
	FirstResourceFD = 64
)

// EnvHandoff marks a process started by Launch: it holds the handoff
// descriptor's number. Without it, rayvmm-vm explains itself and exits.
const EnvHandoff = spawn.EnvHandoff

// Handoff is what the VM process is handed: the effective spec and where
// each resource is. Every FD is a descriptor the process inherited.
type Handoff struct {
	Version int `json:"version"`
	// Spec is the effective spec: defaulted, validated, every NIC's MAC
	// resolved.
	Spec *spec.VM `json:"spec"`

	KVM    File  `json:"kvm"`
	Kernel File  `json:"kernel"`
	Initrd *File `json:"initrd,omitempty"`
	// Disks back Spec.Disks, NICs back Spec.Nets, in order.
	Disks []Disk `json:"disks"`
	NICs  []NIC  `json:"nics"`
	// API is the listening API socket (Spec.APISocket), if any.
	API *File `json:"api,omitempty"`
	// Vsock is the listening vsock socket (Spec.Vsock.UDS), if any.
	Vsock *File `json:"vsock,omitempty"`
	// Metrics is a file to write the device metrics (JSON) to when the VM
	// exits, if any.
	Metrics *File `json:"metrics,omitempty"`
	// Sandbox is how the VM process confines itself once the VM is built
	// and before the guest runs (nil: not at all). Its ReportFD is a
	// handed-over descriptor (the SIGSYS report pipe of strict mode).
	Sandbox *seccap.Config `json:"sandbox,omitempty"`
	// Holds are descriptors the VM process only keeps open for as long as
	// it runs, such as a volume's lock, so that the state they stand for
	// lasts exactly as long as the VM.
	Holds []File `json:"holds,omitempty"`

	// Outcome is a pipe on which the VM process reports how the VM ended
	// (WriteOutcome), just before it exits, for the control plane's
	// audit log; for a detached VM process a file, which a control plane
	// that was not its parent when it ended (a restarted daemon) reads.
	Outcome *File `json:"outcome,omitempty"`

	// Console: stdin and stdout are the guest's serial console (raw mode
	// on a terminal, Ctrl-A x quits).
	Console bool `json:"console"`
	// Gate: the guest's first instruction waits for the control plane's
	// go (one byte on the handoff descriptor, Process.Go), so that the
	// control plane can record the boot durably while the VM process
	// builds the VM. EOF instead of the go means the guest must not run.
	Gate bool `json:"gate"`
	// Lifeline: the handoff socket stays open in the control plane; EOF on it
	// means the control plane is gone and the VM stops.
	Lifeline bool `json:"lifeline"`
	// ParentPID is the control plane's pid (checked at start in
	// foreground mode).
	ParentPID int `json:"parent_pid"`

	// Started is when the control plane started, and CPUBefore the CPU
	// time it had used when it launched the VM process: the boot timer
	// measures from there.
	Started   time.Time     `json:"started"`
	CPUBefore time.Duration `json:"cpu_before_ns"`
	// LaunchedAt is when the control plane started the VM process, for
	// the boot timer. A VM process started ahead of its VM (see package
	// spawn) was launched long before the handoff was sent.
	LaunchedAt time.Time `json:"launched_at"`
	// ReadyAt is when the control plane had everything ready to hand
	// over and would have started the VM process, had it not started it
	// ahead: the split costs the time from there to the handoff read.
	ReadyAt   time.Time `json:"ready_at"`
	BootTimer bool      `json:"boot_timer"`
	// LogLevel is a log/slog level name (DEBUG, INFO, WARN, ERROR).
	LogLevel string `json:"log_level"`
	// Version of the control plane, for the API's GET /.
	RayvmmVersion string `json:"rayvmm_version"`
}

// File is a handed-over descriptor and what it is, for messages.
type File struct {
	FD   int    `json:"fd"`
	Name string `json:"name"`
}

// Disk is one disk's image files, top first (see storage.Files), or the
// link of a sharded volume.
type Disk struct {
	Files []ImageFile `json:"files,omitempty"`
	// Link is a sharded volume's: the VM process's end of the link to
	// the volume's agent (package shards/link), which hands the engine
	// its layout and its replica connections. No Files then.
	Link     *File `json:"link,omitempty"`
	ReadOnly bool  `json:"read_only"`
	// Probed: a raw image whose format was detected, which keeps the
	// guard against the guest writing a qcow2 header.
	Probed bool `json:"probed"`
	// Source is a path, "volume:NAME" or "sharded:NAME", for messages and
	// metrics.
	Source string `json:"source"`
}

// ImageFile is one file of a disk's backing chain.
type ImageFile struct {
	File
	// BackingName is what the image above records as its backing file
	// ("" for the top image).
	BackingName string `json:"backing_name,omitempty"`
	Format      string `json:"format"`
}

// NIC is one NIC's host side: one TAP, or one per VLAN of a trunk.
type NIC struct {
	TAPs []TAP `json:"taps"`
	// Trunk: the VM process multiplexes the TAPs, tagging frames with
	// each TAP's VLAN.
	Trunk bool `json:"trunk"`
	MTU   int  `json:"mtu"`
}

// TAP is one open TAP interface.
type TAP struct {
	File
	VLAN uint16 `json:"vlan,omitempty"`
}

// ErrNotNeeded means the control plane closed the handoff socket without
// sending a handoff: it started the VM process ahead of its VM and then
// did not need it (the spec was bad, say). The VM process exits quietly.
var ErrNotNeeded = errors.New("no VM to run: the control plane did not need this VM process")

// ErrNoHandoff means the process was not started by a control plane.
var ErrNoHandoff = errors.New("no handoff: rayvmm-vm runs one VM for rayvmm and is started by `rayvmm boot` or the rayvmm daemon with the VM's resources already open; it is not meant to be run by hand")

// GoByte is the control plane's go on the handoff descriptor (see
// Handoff.Gate).
const GoByte = 'g'

// Received is a handoff read by the VM process, with the descriptor it
// came on.
type Received struct {
	*Handoff
	// At is when the handoff was read.
	At   time.Time
	pipe *os.File
	// rest is what was read past the handoff (the go, if it came early).
	rest []byte
	goCh chan struct{} // closed by the go (at once without a gate)
	gone chan struct{} // closed by EOF on the handoff descriptor
}

// Receive reads the handoff in the VM process. It fails with ErrNoHandoff
// when the process was not started by Launch.
func Receive() (*Received, error) {
	v := os.Getenv(EnvHandoff)
	if v == "" {
		return nil, ErrNoHandoff
	}
	os.Unsetenv(EnvHandoff)
	fd, err := strconv.Atoi(v)
	if err != nil || fd != HandoffFD {
		return nil, fmt.Errorf("handoff: %s=%q, want %d", EnvHandoff, v, HandoffFD)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("handoff: descriptor %d is not a socket: %w", fd, ErrNoHandoff)
	}
	// Non-blocking: the wait for the handoff (a VM process started ahead
	// waits milliseconds for it) and then the lifeline's Read park in
	// Go's poller rather than holding an OS thread.
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("handoff: %w", err)
	}
	pipe := os.NewFile(uintptr(fd), "handoff")
	payload, rest, err := receive(pipe)
	if err != nil {
		pipe.Close()
		return nil, err
	}
	var h Handoff
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		pipe.Close()
		return nil, fmt.Errorf("handoff: %w", err)
	}
	if err := h.check(); err != nil {
		pipe.Close()
		return nil, fmt.Errorf("handoff: %w", err)
	}
	// A jailed VM process is pid 1 of a pid namespace of its own, where
	// its parent has no pid (getppid returns 0); the lifeline still holds.
	jailed := h.Sandbox != nil && h.Sandbox.Jail != nil
	if ppid := os.Getppid(); h.Lifeline && ppid != h.ParentPID && !(jailed && ppid == 0) {
		pipe.Close()
		return nil, fmt.Errorf("handoff: the control plane (pid %d) exited before the VM started", h.ParentPID)
	}
	r := &Received{Handoff: &h, At: time.Now(), pipe: pipe, goCh: make(chan struct{}), gone: make(chan struct{})}
	if !h.Lifeline && !h.Gate {
		pipe.Close()
		r.pipe = nil
		close(r.goCh)
		return r, nil
	}
	r.rest = rest
	if !h.Gate {
		close(r.goCh)
	}
	go r.watch()
	return r, nil
}

// receive reads the handoff from the socket f (non-blocking): its length
// (4 bytes, little endian), then its JSON, with the handed-over
// descriptors, which it puts in place from FirstResourceFD on. It returns
// the JSON and whatever was read past it (the go, if it came early).
func receive(f *os.File) (payload, rest []byte, err error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("handoff: %w", err)
	}
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	var got []byte
	var fds []int
	need := -1
	for need < 0 || len(got) < need {
		var n, oobn int
		rerr := rc.Read(func(fd uintptr) bool {
			n, oobn, _, _, err = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC|unix.MSG_DONTWAIT)
			return err != unix.EAGAIN && err != unix.EINTR
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			closeAll(fds)
			return nil, nil, fmt.Errorf("handoff: read: %w", err)
		}
		if oobn > 0 {
			more, err := rights(oob[:oobn])
			fds = append(fds, more...)
			if err != nil {
				closeAll(fds)
				return nil, nil, fmt.Errorf("handoff: descriptors: %w", err)
			}
		}
		if n == 0 {
			closeAll(fds)
			if len(got) == 0 {
				return nil, nil, ErrNotNeeded
			}
			return nil, nil, errors.New("handoff: read: the control plane exited before the VM started")
		}
		got = append(got, buf[:n]...)
		if need < 0 && len(got) >= 4 {
			need = 4 + int(binary.LittleEndian.Uint32(got))
			if need > 4+maxHandoff {
				closeAll(fds)
				return nil, nil, fmt.Errorf("handoff: %d bytes, more than %d", need-4, maxHandoff)
			}
		}
	}
	if err := place(fds); err != nil {
		return nil, nil, fmt.Errorf("handoff: %w", err)
	}
	return got[4:need], got[need:], nil
}

// rights are the descriptors in the control messages b.
func rights(b []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(b)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		more, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, err
		}
		fds = append(fds, more...)
	}
	return fds, nil
}

// place moves the received descriptors fds to FirstResourceFD,
// FirstResourceFD+1, ... as the handoff's table numbers them, as long as
// those numbers are free.
func place(fds []int) error {
	below := true // all below their places: moved there directly
	for _, fd := range fds {
		below = below && fd < FirstResourceFD
	}
	from := fds
	if !below {
		// Out of the way first (above every place), then into place.
		from = make([]int, len(fds))
		for i, fd := range fds {
			h, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, FirstResourceFD+len(fds))
			if err != nil {
				closeAll(from[:i])
				closeAll(fds)
				return fmt.Errorf("place descriptor %d: %w", fd, err)
			}
			from[i] = h
		}
		closeAll(fds)
	}
	for i, fd := range from {
		to := FirstResourceFD + i
		if _, err := unix.FcntlInt(uintptr(to), unix.F_GETFD, 0); err != unix.EBADF {
			closeAll(from[i:])
			return fmt.Errorf("descriptor %d, where resource %d goes, is taken", to, i)
		}
		if err := unix.Dup3(fd, to, unix.O_CLOEXEC); err != nil {
			closeAll(from[i:])
			return fmt.Errorf("place descriptor %d: %w", to, err)
		}
		unix.Close(fd)
	}
	return nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// watch reads the handoff descriptor after the handoff: the go, then
// nothing until EOF, which means the control plane is gone (or, before
// the go, that the guest must not run).
func (r *Received) watch() {
	b := make([]byte, 1)
	waiting := r.Gate
	for {
		if len(r.rest) > 0 {
			b[0], r.rest = r.rest[0], r.rest[1:]
		} else if n, err := r.pipe.Read(b); err != nil {
			close(r.gone)
			return
		} else if n == 0 {
			continue
		}
		if waiting && b[0] == GoByte {
			waiting = false
			close(r.goCh)
		}
	}
}

// Go returns a channel closed once the control plane lets the guest run
// (at once when the handoff has no gate).
func (r *Received) Go() <-chan struct{} { return r.goCh }

// check refuses a handoff that does not fit its spec.
func (h *Handoff) check() error {
	switch {
	case h.Version != Version:
		return fmt.Errorf("version %d, this rayvmm-vm speaks %d (rayvmm and rayvmm-vm are from different builds)", h.Version, Version)
	case h.Spec == nil:
		return errors.New("no spec")
	case len(h.Disks) != len(h.Spec.Disks) || len(h.NICs) != len(h.Spec.Nets):
		return fmt.Errorf("%d disks and %d NICs handed over for a spec with %d and %d", len(h.Disks), len(h.NICs), len(h.Spec.Disks), len(h.Spec.Nets))
	}
	if (h.Vsock != nil) != (h.Spec.Vsock != nil) {
		return fmt.Errorf("vsock socket handed over: %v, in the spec: %v", h.Vsock != nil, h.Spec.Vsock != nil)
	}
	if (h.API != nil) != (h.Spec.APISocket != "") {
		return fmt.Errorf("API socket handed over: %v, in the spec: %v", h.API != nil, h.Spec.APISocket != "")
	}
	if err := h.Spec.Validate(); err != nil {
		return fmt.Errorf("spec: %w", err)
	}
	if sb := h.Sandbox; sb != nil {
		if _, err := seccap.ParseMode(string(sb.Mode)); err != nil || sb.Mode == "" {
			return fmt.Errorf("sandbox: mode %q", sb.Mode)
		}
		if sb.Jail != nil && sb.Mode == seccap.ModeOff {
			return errors.New("sandbox: a jail with the sandbox off")
		}
	}
	for i, d := range h.Disks {
		if (len(d.Files) == 0) == (d.Link == nil) {
			return fmt.Errorf("disk %d: %d files and link %v: want files or a link", i, len(d.Files), d.Link != nil)
		}
	}
	for i, n := range h.NICs {
		if len(n.TAPs) == 0 || (!n.Trunk && len(n.TAPs) != 1) {
			return fmt.Errorf("NIC %d: %d TAPs", i, len(n.TAPs))
		}
	}
	return nil
}

// Lifeline returns a channel that is closed when the control plane is
// gone (EOF on the handoff descriptor); nil without a lifeline. With a
// gate and no lifeline (a detached VM process), EOF before the go still
// stops the VM: that channel is Refused.
func (r *Received) Lifeline() <-chan struct{} {
	if !r.Handoff.Lifeline {
		return nil
	}
	return r.gone
}

// Refused returns a channel closed when the control plane closed the
// handoff descriptor; before the go, that means the guest must not run.
// nil when nothing is read after the handoff.
func (r *Received) Refused() <-chan struct{} {
	if r.pipe == nil {
		return nil
	}
	return r.gone
}

// Outcome is how a VM ended, as its VM process reports it on
// Handoff.Outcome just before it exits (the control plane's audit log
// records it).
type Outcome struct {
	// Status is the VM process's exit status.
	Status int `json:"status"`
	// Reason is one line: how the guest ended ("guest powered off", "guest
	// shut down (triple fault) on vcpu 0 ..."), or the error that ended
	// the VM.
	Reason string `json:"reason"`
	// Ran: the guest ran; false for a VM that ended before its first
	// instruction (it failed to build, or was stopped before the go).
	Ran bool `json:"ran"`
}

// maxOutcome bounds an outcome report.
const maxOutcome = 64 << 10

// WriteOutcome reports o on f (the Handoff.Outcome pipe), one JSON line.
func WriteOutcome(f *os.File, o Outcome) error {
	b, err := json.Marshal(o)
	if err != nil {
		return err
	}
	if len(b) >= maxOutcome {
		o.Reason = o.Reason[:min(len(o.Reason), 4096)] + "..."
		if b, err = json.Marshal(o); err != nil {
			return err
		}
	}
	_, err = f.Write(append(b, '\n'))
	return err
}

// ReadOutcome reads the report from the Outcome pipe's read end once the
// VM process has exited; nil when it wrote none (it was killed, or died
// before it could).
func ReadOutcome(f *os.File) (*Outcome, error) {
	b, err := io.ReadAll(io.LimitReader(f, maxOutcome))
	if err != nil {
		return nil, fmt.Errorf("VM process outcome: %w", err)
	}
	if len(b) == 0 {
		return nil, nil
	}
	var o Outcome
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&o); err != nil {
		return nil, fmt.Errorf("VM process outcome %q: %w", b, err)
	}
	return &o, nil
}

// Open makes an *os.File of a handed-over descriptor the handoff names.
func (f File) Open() (*os.File, error) {
	if f.FD < FirstResourceFD {
		return nil, fmt.Errorf("%s: descriptor %d is not a handed-over resource", f.Name, f.FD)
	}
	var st unix.Stat_t
	if err := unix.Fstat(f.FD, &st); err != nil {
		return nil, fmt.Errorf("%s: descriptor %d: %w", f.Name, f.FD, err)
	}
	unix.CloseOnExec(f.FD)
	return os.NewFile(uintptr(f.FD), f.Name), nil
}
