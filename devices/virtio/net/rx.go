package net

import (
	"errors"
	"time"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
)

var (
	errSmallBuffer = errors.New("receive chain too small for the frame")
	errReadOnly    = errors.New("receive chain has a device-readable buffer")
)

// rxBatch is the most frames delivered between two interrupt checks when
// the port has more frames waiting.
const rxBatch = 64

// rxLoop moves frames from the port to the guest for the device's whole
// life, across resets: it waits for an activation with a free receive
// buffer, reads one frame (blocking), and delivers it to whatever
// activation is current by then. When the port can say whether more
// frames are waiting (TryReader), it delivers up to rxBatch of them before
// it interrupts the driver once.
func (d *Device) rxLoop() {
	buf := make([]byte, HeaderLen+65536)
	rxHeader(buf)
	tr, _ := d.port.(TryReader)
	for {
		a := d.act.Load()
		if a == nil {
			select {
			case <-d.wake:
				continue
			case <-d.closed:
				return
			}
		}
		if !d.waitRxBuffer(a) {
			select {
			case <-a.done:
				continue
			case <-d.closed:
				return
			}
		}
		n, err := d.port.Read(buf[HeaderLen:])
		if err != nil {
			if isClosed(err) {
				return
			}
			d.metrics.RxPortErrors.Add(1)
			d.log.Warn("virtio-net: port read failed", "err", err)
			select { // do not spin on an error that persists
			case <-time.After(10 * time.Millisecond):
			case <-d.closed:
				return
			}
			continue
		}
		d.receive(a, buf[:HeaderLen+n])
		for i := 0; tr != nil && i < rxBatch && d.hasRxBuffer(a); i++ {
			n, ok, err := tr.TryRead(buf[HeaderLen:])
			if err != nil || !ok {
				break
			}
			d.receive(a, buf[:HeaderLen+n])
		}
		d.rxFlush()
	}
}

// receive checks and rate-limits one frame read from the port and
// delivers it.
func (d *Device) receive(a *activation, frame []byte) {
	n := len(frame) - HeaderLen
	if n > maxFrameLen(d.mtu) {
		d.metrics.RxDropTooBig.Add(1)
		return
	}
	if d.rxLimit != nil {
		waited, err := d.rxLimit.Wait(a.ctx, uint64(n))
		d.metrics.RxThrottledNs.Add(uint64(waited))
		if err != nil && a.ctx.Err() != nil {
			d.metrics.RxDropInactive.Add(1)
			return
		}
	}
	d.deliver(frame)
}

// hasRxBuffer reports whether a has a receive chain available now.
func (d *Device) hasRxBuffer(a *activation) bool {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.dead || a.broken.Load() {
		return false
	}
	n, err := a.rxq.Pending()
	return err == nil && n > 0
}

// rxFlush interrupts the driver for the frames delivered since the last
// flush, if it wants that.
func (d *Device) rxFlush() {
	a := d.act.Load()
	if a == nil {
		return
	}
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.dead || !a.rxUsed {
		return
	}
	a.rxUsed = false
	d.interrupt(a, a.rxq, RxQueue)
}

// waitRxBuffer waits until a has a receive chain available. It returns
// false when a was reset or its ring is broken.
func (d *Device) waitRxBuffer(a *activation) bool {
	for {
		a.mu.RLock()
		if a.dead || a.broken.Load() {
			a.mu.RUnlock()
			return false
		}
		n, err := a.rxq.Pending()
		if err == nil && n == 0 {
			var more bool
			if more, err = a.rxq.EnableNotification(); more {
				n = 1
			}
		}
		if err == nil && n > 0 {
			err = a.rxq.DisableNotification()
		}
		if err != nil {
			// Under the lock: Reset does not wait for this goroutine, so
			// a NeedsReset after the unlock could reach a device that was
			// reset (and re-initialised) in between.
			d.broken(a, err)
			a.mu.RUnlock()
			return false
		}
		a.mu.RUnlock()
		if n > 0 {
			return true
		}
		select {
		case <-a.rxKick:
		case <-a.done:
			return false
		}
	}
}

// deliver puts one frame (header included) into the next receive chain of
// the current activation; rxFlush interrupts the driver for it.
func (d *Device) deliver(frame []byte) {
	a := d.act.Load()
	if a == nil {
		d.metrics.RxDropInactive.Add(1)
		return
	}
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.dead || a.broken.Load() {
		d.metrics.RxDropInactive.Add(1)
		return
	}
	c, ok, err := a.rxq.Pop()
	if err != nil {
		d.broken(a, err)
		return
	}
	if !ok {
		d.metrics.RxDropNoBuffer.Add(1)
		return
	}
	switch err := d.scatter(a, &c, frame); {
	case errors.Is(err, errSmallBuffer):
		a.rxq.Unpop() // keep the chain for a frame that fits
		d.metrics.RxDropSmallBuffer.Add(1)
		d.log.Warn("virtio-net: frame dropped", "err", err, "len", len(frame))
		return
	case err != nil:
		d.metrics.RxDropBadChain.Add(1)
		d.log.Warn("virtio-net: bad receive chain", "err", err)
		if a.rxq.AddUsed(c.Head(), 0) == nil {
			a.rxUsed = true
		}
		return
	}
	// Count, then publish: once the driver sees the frame it is counted.
	d.metrics.RxFrames.Add(1)
	d.metrics.RxBytes.Add(uint64(len(frame) - HeaderLen))
	if err := a.rxq.AddUsed(c.Head(), uint32(len(frame))); err != nil {
		d.broken(a, err)
		return
	}
	a.rxUsed = true
}

// scatter writes frame into the chain's device-writable buffers. The
// whole chain is walked and checked before anything is written, so a
// looping or partly bad chain gets nothing.
func (d *Device) scatter(a *activation, c *queue.Chain, frame []byte) error {
	descs, err := c.Collect(a.rxDescs[:0])
	a.rxDescs = descs[:0]
	if err != nil {
		return err
	}
	total := uint64(0)
	for _, desc := range descs {
		if !desc.Writable() {
			return errReadOnly
		}
		if _, err := a.mem.Slice(desc.Addr, uint64(desc.Len)); err != nil {
			return err
		}
		total += uint64(desc.Len)
	}
	if total < uint64(len(frame)) {
		return errSmallBuffer
	}
	for off, i := 0, 0; off < len(frame); i++ {
		b, _ := a.mem.Slice(descs[i].Addr, uint64(descs[i].Len))
		off += copy(b, frame[off:])
	}
	return nil
}
