// Package vmproc is the hand-over between a control plane (rayvmm boot, the
// pods daemon) and a VM process (rayvmm-vm): the control plane resolves
// names and state, opens every resource the VM needs — /dev/kvm, the
// kernel, each disk image with its backing chain, each TAP, the API socket,
// the metrics file — and execs rayvmm-vm with them as inherited
// descriptors; the VM process reads a Handoff (the effective spec and a
// table mapping each resource to its descriptor) from descriptor 3, opens
// nothing by path and never touches the state directory.
//
// Two launch modes:
//
//   - Foreground (rayvmm boot): the VM process never outlives the control
//     plane. Descriptor 3 stays open as a lifeline: when the control plane
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
// The package links only the standard library, spec and x/sys, because
// both sides link it.
package vmproc

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/spec"
)

// Version is the handoff format's version; both sides must agree.
const Version = 1

// HandoffFD is the descriptor the handoff arrives on; resources follow
// from FirstResourceFD.
const (
	HandoffFD       = 3
	FirstResourceFD = 4
)

// EnvHandoff marks a process started by Launch: it holds the handoff
// descriptor's number. Without it, rayvmm-vm explains itself and exits.
const EnvHandoff = "RAYVMM_VM_HANDOFF_FD"

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
	// Metrics is a file to write the device metrics (JSON) to when the VM
	// exits, if any.
	Metrics *File `json:"metrics,omitempty"`
	// Holds are descriptors the VM process only keeps open for as long as
	// it runs, such as a volume's lock, so that the state they stand for
	// lasts exactly as long as the VM.
	Holds []File `json:"holds,omitempty"`

	// Console: stdin and stdout are the guest's serial console (raw mode
	// on a terminal, Ctrl-A x quits).
	Console bool `json:"console"`
	// Lifeline: descriptor 3 stays open in the control plane; EOF on it
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
	// LaunchedAt is when the control plane started the VM process (set by
	// Launch), for the boot timer's cost of the split.
	LaunchedAt time.Time `json:"launched_at"`
	BootTimer  bool      `json:"boot_timer"`
	// LogLevel is a log/slog level name (DEBUG, INFO, WARN, ERROR).
	LogLevel string `json:"log_level"`
	// Version of the control plane, for the API's GET /.
	RayvmmVersion string `json:"rayvmm_version"`
}

// File is an inherited descriptor and what it is, for messages.
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

// ErrNoHandoff means the process was not started by a control plane.
var ErrNoHandoff = errors.New("no handoff: rayvmm-vm runs one VM for rayvmm and is started by `rayvmm boot` or the rayvmm daemon with the VM's resources already open; it is not meant to be run by hand")

// Received is a handoff read by the VM process, with the descriptor it
// came on.
type Received struct {
	*Handoff
	// At is when the handoff was read.
	At   time.Time
	pipe *os.File
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
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return nil, fmt.Errorf("handoff: descriptor %d is not a pipe: %w", fd, ErrNoHandoff)
	}
	// Non-blocking, so that the lifeline's Read parks in Go's poller
	// rather than holding an OS thread.
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("handoff: %w", err)
	}
	pipe := os.NewFile(uintptr(fd), "handoff")
	var h Handoff
	dec := json.NewDecoder(pipe)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		pipe.Close()
		return nil, fmt.Errorf("handoff: read: %w (did the control plane exit?)", err)
	}
	if err := h.check(); err != nil {
		pipe.Close()
		return nil, fmt.Errorf("handoff: %w", err)
	}
	if h.Lifeline && os.Getppid() != h.ParentPID {
		pipe.Close()
		return nil, fmt.Errorf("handoff: the control plane (pid %d) exited before the VM started", h.ParentPID)
	}
	r := &Received{Handoff: &h, At: time.Now(), pipe: pipe}
	if !h.Lifeline {
		pipe.Close()
		r.pipe = nil
	}
	return r, nil
}

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
	if err := h.Spec.Validate(); err != nil {
		return fmt.Errorf("spec: %w", err)
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
// gone (EOF on the handoff descriptor); nil without a lifeline.
func (r *Received) Lifeline() <-chan struct{} {
	if r.pipe == nil {
		return nil
	}
	gone := make(chan struct{})
	go func() {
		b := make([]byte, 1)
		for {
			if _, err := r.pipe.Read(b); err != nil {
				close(gone)
				return
			}
		}
	}()
	return gone
}

// Open makes an *os.File of an inherited descriptor the handoff names.
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
