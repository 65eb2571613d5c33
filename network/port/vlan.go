package port

import (
	"encoding/binary"
	"errors"
)

// 802.1Q framing, done by rayvmm itself because the host kernel may have no
// 802.1Q support. A tagged frame is dst(6) src(6) TPID 0x8100(2) TCI(2)
// ethertype(2) payload; the VLAN ID is the low 12 bits of the TCI.
const (
	ethHeaderLen  = 14
	vlanTagLen    = 4
	tpid8021Q     = 0x8100
	macAddrsLen   = 12
	vlanIDMask    = 0x0fff
	maxFrameBytes = 65535 + ethHeaderLen + vlanTagLen
)

// Errors of 802.1Q framing.
var (
	ErrShortFrame  = errors.New("frame shorter than an Ethernet header")
	ErrUntagged    = errors.New("frame has no 802.1Q tag")
	ErrUnknownVLAN = errors.New("frame tagged with a VLAN not on this trunk")
)

// VLANOf returns the VLAN ID of an 802.1Q-tagged frame. Frames without a
// tag, and priority-tagged frames (VLAN ID 0), yield ErrUntagged.
func VLANOf(frame []byte) (uint16, error) {
	if len(frame) < ethHeaderLen {
		return 0, ErrShortFrame
	}
	if binary.BigEndian.Uint16(frame[macAddrsLen:]) != tpid8021Q {
		return 0, ErrUntagged
	}
	if len(frame) < ethHeaderLen+vlanTagLen {
		return 0, ErrShortFrame
	}
	id := binary.BigEndian.Uint16(frame[macAddrsLen+2:]) & vlanIDMask
	if id == 0 || id == vlanIDMask {
		return 0, ErrUntagged
	}
	return id, nil
}

// Untag copies frame without its outermost 802.1Q tag into dst and returns
// the VLAN and the length written. dst must hold len(frame)-4 bytes.
func Untag(dst, frame []byte) (vlan uint16, n int, err error) {
	vlan, err = VLANOf(frame)
	if err != nil {
		return 0, 0, err
	}
	n = len(frame) - vlanTagLen
	if len(dst) < n {
		return 0, 0, errors.New("untag: destination too small")
	}
	copy(dst, frame[:macAddrsLen])
	copy(dst[macAddrsLen:], frame[macAddrsLen+vlanTagLen:])
	return vlan, n, nil
}

// Tag copies frame into dst with an 802.1Q tag for vlan after the MAC
// addresses and returns the length written. dst must hold len(frame)+4
// bytes; dst and frame may not overlap.
func Tag(dst, frame []byte, vlan uint16) (int, error) {
	if len(frame) < ethHeaderLen {
		return 0, ErrShortFrame
	}
	n := len(frame) + vlanTagLen
	if len(dst) < n {
		return 0, errors.New("tag: destination too small")
	}
	copy(dst, frame[:macAddrsLen])
	binary.BigEndian.PutUint16(dst[macAddrsLen:], tpid8021Q)
	binary.BigEndian.PutUint16(dst[macAddrsLen+2:], vlan&vlanIDMask)
	copy(dst[macAddrsLen+vlanTagLen:], frame[macAddrsLen:])
	return n, nil
}
