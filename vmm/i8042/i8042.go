// Package i8042 emulates the part of the PC keyboard controller a kernel
// uses to reset the machine: the command 0xFE written to port 0x64 pulses
// the CPU reset line, which rayvmm takes as the guest powering off.
package i8042

import "sync"

const (
	// Base is the controller's first port (data at 0x60, command at 0x64).
	Base = 0x60
	// Size covers ports 0x60-0x64.
	Size = 5

	cmdReset = 0xfe
)

// Controller calls Reset when the guest asks for a CPU reset.
type Controller struct {
	once  sync.Once
	Reset func()
}

// Read implements bus.Device: no keyboard, empty buffers.
func (c *Controller) Read(off uint64, data []byte) {
	for i := range data {
		data[i] = 0
	}
}

// Write implements bus.Device.
func (c *Controller) Write(off uint64, data []byte) {
	if off == 4 && len(data) == 1 && data[0] == cmdReset && c.Reset != nil {
		c.once.Do(c.Reset)
	}
}
