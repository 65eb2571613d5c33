package net

import (
	"encoding/binary"
	"errors"
)

// Frame layout.
const (
	// HeaderLen is the size of struct virtio_net_hdr_v1 (VERSION_1 always
	// has num_buffers).
	HeaderLen    = 12
	ethHeaderLen = 14
	vlanTagLen   = 4
	tpid8021Q    = 0x8100

	hdrFlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	gsoNone          = 0 // VIRTIO_NET_HDR_GSO_NONE
	hdrNumBuffers    = 10
)

// Reasons a transmitted frame is dropped.
var (
	errRunt      = errors.New("frame shorter than an Ethernet header")
	errTooBig    = errors.New("frame larger than the MTU")
	errOffload   = errors.New("virtio-net header asks for an offload that was not negotiated")
	errShortHdr  = errors.New("chain shorter than the virtio-net header")
	errWriteOnly = errors.New("transmit chain has a device-writable buffer")
)

// maxFrameLen is the largest frame the MTU allows: MTU plus the Ethernet
// header plus one 802.1Q tag (a trunk's guest sends tagged frames).
func maxFrameLen(mtu int) int { return mtu + ethHeaderLen + vlanTagLen }

// checkTx checks a transmit buffer: the virtio-net header followed by a
// frame. It returns the frame.
func checkTx(buf []byte, mtu int) ([]byte, error) {
	if len(buf) < HeaderLen {
		return nil, errShortHdr
	}
	if buf[0]&hdrFlagNeedsCsum != 0 || buf[1] != gsoNone {
		return nil, errOffload
	}
	frame := buf[HeaderLen:]
	if len(frame) < ethHeaderLen {
		return nil, errRunt
	}
	limit := mtu + ethHeaderLen
	if binary.BigEndian.Uint16(frame[12:]) == tpid8021Q {
		limit += vlanTagLen
	}
	if len(frame) > limit {
		return nil, errTooBig
	}
	return frame, nil
}

// rxHeader writes the header of a received frame: no flags, no GSO, one
// buffer.
func rxHeader(h []byte) {
	clear(h[:HeaderLen])
	binary.LittleEndian.PutUint16(h[hdrNumBuffers:], 1)
}
