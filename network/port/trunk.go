package port

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// Trunk is a Port that carries several VLANs to a guest as 802.1Q-tagged
// frames, with one TAP per VLAN on the host (each on that VLAN's bridge).
// A frame read from the TAP of VLAN N reaches the guest tagged with N; a
// frame the guest sends tagged N goes, untagged, to the TAP of VLAN N.
// Untagged frames and frames for other VLANs from the guest are dropped and
// counted.
type Trunk struct {
	taps   map[uint16]*TAP
	frames chan trunkFrame
	done   chan struct{}
	once   sync.Once
	wg     sync.WaitGroup
	bufs   sync.Pool
	stats  TrunkStats
}

// TrunkStats count the frames a trunk dropped.
type TrunkStats struct {
	Untagged    atomic.Uint64 // from the guest, with no tag
	UnknownVLAN atomic.Uint64 // from the guest, tagged with a VLAN not on the trunk
	RxTooBig    atomic.Uint64 // toward the guest, larger than its read buffer once tagged
}

type trunkFrame struct {
	vlan uint16
	buf  *[]byte
	n    int
}

// NewTrunk makes a trunk of taps, keyed by VLAN. The trunk owns the TAPs
// and closes them on Close.
func NewTrunk(taps map[uint16]*TAP) *Trunk {
	t := &Trunk{
		taps:   taps,
		frames: make(chan trunkFrame, 64),
		done:   make(chan struct{}),
	}
	t.bufs.New = func() any { b := make([]byte, maxFrameBytes); return &b }
	for vlan, tap := range taps {
		t.wg.Add(1)
		go t.pump(vlan, tap)
	}
	return t
}

// pump moves frames from one TAP to the channel Read drains.
func (t *Trunk) pump(vlan uint16, tap *TAP) {
	defer t.wg.Done()
	for {
		b := t.bufs.Get().(*[]byte)
		n, err := tap.Read(*b)
		if err != nil {
			t.bufs.Put(b)
			return // closed; any other read error on a TAP is fatal for it too
		}
		select {
		case t.frames <- trunkFrame{vlan: vlan, buf: b, n: n}:
		case <-t.done:
			t.bufs.Put(b)
			return
		}
	}
}

// Read returns the next frame from any of the trunk's TAPs, tagged with
// its VLAN.
func (t *Trunk) Read(p []byte) (int, error) {
	for {
		var f trunkFrame
		select {
		case f = <-t.frames:
		case <-t.done:
			return 0, os.ErrClosed
		}
		n, err := Tag(p, (*f.buf)[:f.n], f.vlan)
		t.bufs.Put(f.buf)
		if err != nil {
			t.stats.RxTooBig.Add(1)
			continue
		}
		return n, nil
	}
}

// TryRead is Read that returns ok false at once when no frame is waiting.
func (t *Trunk) TryRead(p []byte) (int, bool, error) {
	for {
		var f trunkFrame
		select {
		case f = <-t.frames:
		case <-t.done:
			return 0, false, os.ErrClosed
		default:
			return 0, false, nil
		}
		n, err := Tag(p, (*f.buf)[:f.n], f.vlan)
		t.bufs.Put(f.buf)
		if err != nil {
			t.stats.RxTooBig.Add(1)
			continue
		}
		return n, true, nil
	}
}

// Write sends a tagged frame from the guest, untagged, to its VLAN's TAP.
// A frame that cannot be delivered is counted and reported with an error
// wrapping ErrUntagged or ErrUnknownVLAN.
func (t *Trunk) Write(p []byte) (int, error) {
	select {
	case <-t.done:
		return 0, os.ErrClosed
	default:
	}
	vlan, err := VLANOf(p)
	if err != nil {
		t.stats.Untagged.Add(1)
		return 0, fmt.Errorf("trunk: drop frame: %w", err)
	}
	tap, ok := t.taps[vlan]
	if !ok {
		t.stats.UnknownVLAN.Add(1)
		return 0, fmt.Errorf("trunk: drop frame for VLAN %d: %w", vlan, ErrUnknownVLAN)
	}
	b := t.bufs.Get().(*[]byte)
	defer t.bufs.Put(b)
	_, n, err := Untag(*b, p)
	if err != nil {
		return 0, fmt.Errorf("trunk: %w", err)
	}
	if _, err := tap.Write((*b)[:n]); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Stats returns the trunk's drop counters.
func (t *Trunk) Stats() *TrunkStats { return &t.stats }

// TrunkSnapshot is a copy of TrunkStats for JSON.
type TrunkSnapshot struct {
	Untagged    uint64 `json:"untagged"`
	UnknownVLAN uint64 `json:"unknown_vlan"`
	RxTooBig    uint64 `json:"rx_too_big"`
}

// Snapshot copies the counters.
func (s *TrunkStats) Snapshot() TrunkSnapshot {
	return TrunkSnapshot{Untagged: s.Untagged.Load(), UnknownVLAN: s.UnknownVLAN.Load(), RxTooBig: s.RxTooBig.Load()}
}

// Close closes every TAP and stops the readers.
func (t *Trunk) Close() error {
	var errs []error
	t.once.Do(func() {
		close(t.done)
		for _, tap := range t.taps {
			errs = append(errs, tap.Close())
		}
		t.wg.Wait()
	})
	return errors.Join(errs...)
}
