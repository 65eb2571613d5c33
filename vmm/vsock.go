package vmm

import (
	"fmt"
	"syscall"

	"github.com/rayvmm/rayvmm/devices/virtio/vsock"
)

// VsockConfig is a vsock device's host side, already opened by the control
// plane: the listening Unix socket host programs connect to, and its path
// (guest connections to host port P are connected to Path_P).
type VsockConfig struct {
	CID      uint32
	Listener syscall.Conn // a listening AF_UNIX stream socket (*net.UnixListener, *os.File)
	Path     string
}

// Vsock is the VM's virtio-vsock device.
type Vsock struct {
	Device *vsock.Device
	Slot   *VirtioSlot
}

// AttachVsock places a virtio-vsock device on the MMIO bus (one per VM).
// It opens nothing: the device keeps a duplicate of cfg.Listener, which the
// caller still owns (and whose file it removes); the device is closed with
// the VM.
func (v *VM) AttachVsock(cfg VsockConfig) (*Vsock, error) {
	if v.vsock != nil {
		return nil, fmt.Errorf("%w: a second vsock device (a VM has one)", ErrConfig)
	}
	dev, err := vsock.New(vsock.Config{CID: cfg.CID, Listener: cfg.Listener, Path: cfg.Path, Log: v.log})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	v.OnClose(dev.Close)
	slot, err := v.AddVirtio(dev)
	if err != nil {
		return nil, err
	}
	v.vsock = &Vsock{Device: dev, Slot: slot}
	return v.vsock, nil
}

// Vsock is the attached vsock device, or nil.
func (v *VM) Vsock() *Vsock { return v.vsock }
