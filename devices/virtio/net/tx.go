package net

import (
	"errors"

	"github.com/rayvmm/rayvmm/devices/virtio/queue"
)

// txLoop sends the driver's frames to the port until a is reset. It
// checks whether the driver wants an interrupt after completing half a
// ring of chains (and whenever the ring runs empty), so a busy driver can
// refill the ring while the device works through the other half.
func (d *Device) txLoop(a *activation) {
	defer close(a.txDone)
	buf := make([]byte, HeaderLen+maxFrameLen(d.mtu))
	completed := 0 // used entries added since the last interrupt check
	batch := max(1, int(a.txq.Size())/2)
	for {
		a.mu.RLock()
		if a.dead || a.broken.Load() {
			a.mu.RUnlock()
			<-a.done
			return
		}
		c, ok, err := a.txq.Pop()
		if err != nil {
			a.mu.RUnlock()
			d.broken(a, err)
			continue
		}
		if !ok {
			if completed > 0 {
				d.interrupt(a, a.txq, TxQueue)
				completed = 0
			}
			more, err := a.txq.EnableNotification()
			a.mu.RUnlock()
			if err != nil {
				d.broken(a, err)
				continue
			}
			if more {
				continue
			}
			select {
			case <-a.txKick:
			case <-a.done:
				return
			}
			a.mu.RLock()
			if !a.dead {
				err = a.txq.DisableNotification()
			}
			a.mu.RUnlock()
			if err != nil {
				d.broken(a, err)
			}
			continue
		}
		frame, err := d.gather(a, &c, buf)
		if err != nil {
			a.txq.AddUsed(c.Head(), 0) // fails only for a head out of range
			completed++
			a.mu.RUnlock()
			d.txDrop(err)
			continue
		}
		if d.txLimit != nil {
			if completed > 0 { // let the driver reclaim buffers while we wait
				d.interrupt(a, a.txq, TxQueue)
				completed = 0
			}
			a.mu.RUnlock()
			waited, err := d.txLimit.Wait(a.ctx, uint64(len(frame)))
			d.metrics.TxThrottledNs.Add(uint64(waited))
			if err != nil && a.ctx.Err() != nil {
				<-a.done
				return
			}
			a.mu.RLock()
			if a.dead {
				a.mu.RUnlock()
				return
			}
		}
		// Send, count, then return the buffer (as Firecracker does): once
		// the driver sees it used, the frame is on its way and counted.
		if _, err := d.port.Write(frame); err != nil {
			d.metrics.TxPortErrors.Add(1)
			d.log.Warn("virtio-net: port write failed; frame dropped", "err", err)
		} else {
			d.metrics.TxFrames.Add(1)
			d.metrics.TxBytes.Add(uint64(len(frame)))
		}
		if err := a.txq.AddUsed(c.Head(), 0); err != nil {
			a.mu.RUnlock()
			d.broken(a, err)
			continue
		}
		if completed++; completed >= batch {
			d.interrupt(a, a.txq, TxQueue)
			completed = 0
		}
		a.mu.RUnlock()
	}
}

// gather copies a transmit chain (header and frame, device-readable
// buffers only) into buf and returns the frame. The whole chain is walked
// and checked before anything is copied. Called with a.mu held.
func (d *Device) gather(a *activation, c *queue.Chain, buf []byte) ([]byte, error) {
	descs, err := c.Collect(a.txDescs[:0])
	a.txDescs = descs[:0]
	if err != nil {
		return nil, err
	}
	total := uint64(0)
	for _, desc := range descs {
		if desc.Writable() {
			return nil, errWriteOnly
		}
		total += uint64(desc.Len)
	}
	if total > uint64(len(buf)) {
		return nil, errTooBig
	}
	n := 0
	for _, desc := range descs {
		b, err := a.mem.Slice(desc.Addr, uint64(desc.Len))
		if err != nil {
			return nil, err
		}
		n += copy(buf[n:], b)
	}
	return checkTx(buf[:n], d.mtu)
}

// txDrop counts and logs a dropped transmit frame.
func (d *Device) txDrop(err error) {
	switch {
	case errors.Is(err, errTooBig):
		d.metrics.TxDropTooBig.Add(1)
	case errors.Is(err, errRunt), errors.Is(err, errShortHdr):
		d.metrics.TxDropRunt.Add(1)
	case errors.Is(err, errOffload):
		d.metrics.TxDropOffload.Add(1)
	default: // a malformed chain: bad index, loop, address outside RAM, wrong direction
		d.metrics.TxDropBadChain.Add(1)
	}
	d.log.Warn("virtio-net: transmit frame dropped", "err", err)
}
