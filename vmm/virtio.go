package vmm

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/devices/virtio"
	"github.com/rayvmm/rayvmm/devices/virtio/mmio"
	"github.com/rayvmm/rayvmm/vmm/boot"
	"github.com/rayvmm/rayvmm/vmm/kvm"
)

// virtio-mmio placement: one 4 KiB window per device from VirtioMMIOBase,
// interrupts on IOAPIC pins from 5 up (pin 4 is COM1).
const (
	virtioWindow   = 0x1000
	virtioFirstIRQ = 5
	ioapicPins     = 24
	// MaxVirtioDevices is how many virtio-mmio devices fit on the IOAPIC.
	MaxVirtioDevices = ioapicPins - virtioFirstIRQ
)

// VirtioSlot is where a virtio-mmio device was placed.
type VirtioSlot struct {
	Base      uint64
	IRQ       uint32
	Transport *mmio.Transport
	// IRQFD and IOEventFD say whether interrupts and notifications bypass
	// user space (false: they fell back to KVM_IRQ_LINE and MMIO exits).
	IRQFD, IOEventFD bool
}

// AddVirtio places dev on the next virtio-mmio window: it registers the
// transport on the MMIO bus, connects its interrupt through an irqfd (or
// KVM_IRQ_LINE), its queue notifications through ioeventfds (or MMIO exits),
// and announces it on the kernel command line. Call before Run.
func (v *VM) AddVirtio(dev virtio.Device) (*VirtioSlot, error) {
	n := len(v.virtio)
	if n >= MaxVirtioDevices {
		return nil, fmt.Errorf("%w: more than %d virtio devices", ErrConfig, MaxVirtioDevices)
	}
	s := &VirtioSlot{Base: boot.VirtioMMIOBase + uint64(n)*virtioWindow, IRQ: uint32(virtioFirstIRQ + n)}
	irq, err := v.newIRQ(s.IRQ)
	if err != nil {
		return nil, err
	}
	s.IRQFD = irq.fd != nil
	s.Transport = mmio.New(dev, v.mem, irq, v.log)
	if err := v.mmio.Register(fmt.Sprintf("virtio-%s-%d", dev.Type(), n), s.Base, virtioWindow, s.Transport); err != nil {
		irq.close()
		return nil, err
	}
	v.OnClose(irq.close)
	s.IOEventFD = v.sys.CheckExtension(kvm.CapIOEventFD) != 0
	if s.IOEventFD {
		for q := range dev.QueueSizes() {
			if err := v.notifyFD(s, uint32(q)); err != nil {
				v.log.Warn("ioeventfd unavailable; queue notifications will exit to rayvmm", "err", err)
				s.IOEventFD = false
				break
			}
		}
	}
	v.virtio = append(v.virtio, s)
	v.AppendCmdline(mmio.CmdlineArg(s.Base, virtioWindow, s.IRQ))
	return s, nil
}

// irqLine raises a GSI through an irqfd when KVM has them, else by pulsing
// KVM_IRQ_LINE.
type irqLine struct {
	vm  *kvm.VM
	gsi uint32
	fd  *os.File
}

func (v *VM) newIRQ(gsi uint32) (*irqLine, error) {
	l := &irqLine{vm: v.vm, gsi: gsi}
	if v.sys.CheckExtension(kvm.CapIRQFD) == 0 {
		return l, nil
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd for irq %d: %w", gsi, err)
	}
	if err := v.vm.IRQFD(fd, gsi); err != nil {
		unix.Close(fd)
		return nil, err
	}
	l.fd = os.NewFile(uintptr(fd), fmt.Sprintf("irqfd-%d", gsi))
	return l, nil
}

var one = binary.LittleEndian.AppendUint64(nil, 1)

// Raise implements mmio.IRQ.
func (l *irqLine) Raise() error {
	if l.fd != nil {
		_, err := l.fd.Write(one)
		return err
	}
	if err := l.vm.IRQLine(l.gsi, true); err != nil {
		return err
	}
	return l.vm.IRQLine(l.gsi, false)
}

func (l *irqLine) close() error {
	if l.fd != nil {
		return l.fd.Close()
	}
	return nil
}

// notifyFD attaches an ioeventfd to queue q's notifications and a goroutine
// that forwards them to the transport.
func (v *VM) notifyFD(s *VirtioSlot, q uint32) error {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	match := uint64(q)
	if err := v.vm.IOEventFD(fd, s.Base+mmio.NotifyOffset, 4, &match); err != nil {
		unix.Close(fd)
		return err
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("ioeventfd-%#x-%d", s.Base, q))
	v.OnClose(f.Close)
	go func() {
		buf := make([]byte, 8)
		for {
			if _, err := f.Read(buf); err != nil {
				return // closed with the VM
			}
			s.Transport.QueueNotify(q)
		}
	}()
	return nil
}
