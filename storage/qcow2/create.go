package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"

	"github.com/rayvmm/rayvmm/storage/raw"
)

// DefaultClusterSize is the cluster size Create uses unless told
// otherwise (qemu-img's default).
const DefaultClusterSize = 64 << 10

// CreateOptions tune Create.
type CreateOptions struct {
	// ClusterSize is a power of two from 512 to 2 MiB; 0 means 64 KiB.
	ClusterSize int64
	// BackingFile makes the image an overlay. A relative name is resolved
	// against the new image's directory, and recorded as given.
	BackingFile string
	// BackingFormat is "qcow2" or "raw"; "" detects it.
	BackingFormat string
}

// Create makes a new, empty qcow2 v3 image at path (which must not exist)
// and opens it for writing. With a backing file, size 0 means the backing
// file's size.
func Create(path string, size int64, opts CreateOptions) (*Image, error) {
	if err := create(path, size, opts); err != nil {
		return nil, fmt.Errorf("create qcow2 image %s: %w", path, err)
	}
	im, err := Open(path, Options{})
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return im, nil
}

func create(path string, size int64, opts CreateOptions) error {
	cs := opts.ClusterSize
	if cs == 0 {
		cs = DefaultClusterSize
	}
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return fmt.Errorf("cluster size %d: want a power of two from 512 to 2M", cs)
	}
	cb := uint32(bits.TrailingZeros64(uint64(cs)))
	h := &header{clusterBits: cb, backingFile: opts.BackingFile, backingFormat: opts.BackingFormat}
	if opts.BackingFile != "" {
		bsize, bfmt, err := probeBacking(path, opts.BackingFile, opts.BackingFormat)
		if err != nil {
			return err
		}
		h.backingFormat = bfmt
		if size == 0 {
			size = bsize
		}
	}
	if size <= 0 {
		return fmt.Errorf("size %d must be positive", size)
	}
	if uint64(size) > 1<<62 {
		return fmt.Errorf("size %d too large", size)
	}
	h.size = uint64(size)
	l1 := l1Needed(h.size, cb)
	if l1*8 > maxL1Bytes {
		return fmt.Errorf("size %d too large for %d-byte clusters", size, cs)
	}
	h.l1Size = uint32(l1)
	l1c := max(1, roundUp(int64(l1)*8, cs)/cs)

	// Metadata: header, refcount table, refcount blocks, L1 table. Find
	// how many table and block clusters cover all of them.
	per := cs / 2
	rtc, rbc := int64(1), int64(1)
	for {
		total := 1 + rtc + rbc + l1c
		nrb := roundUp(total, per) / per
		nrt := roundUp(nrb*8, cs) / cs
		if nrb == rbc && nrt == rtc {
			break
		}
		rbc, rtc = nrb, nrt
	}
	total := 1 + rtc + rbc + l1c
	if rtc*cs > maxRefTableBytes {
		return fmt.Errorf("size %d too large for %d-byte clusters", size, cs)
	}
	h.rtOff, h.rtClusters = uint64(cs), uint32(rtc)
	rbOff := (1 + rtc) * cs
	h.l1Off = uint64((1 + rtc + rbc) * cs)

	hdr := encodeHeader(h, true)
	if int64(len(hdr)) > cs {
		// Drop the (optional) feature name table to fit small clusters.
		hdr = encodeHeader(h, false)
		if int64(len(hdr)) > cs {
			return fmt.Errorf("backing file name too long for %d-byte clusters", cs)
		}
	}
	rt := make([]byte, rtc*cs)
	for i := range rbc {
		be.PutUint64(rt[i*8:], uint64(rbOff+i*cs))
	}
	rb := make([]byte, rbc*cs)
	for c := range total {
		be.PutUint16(rb[c*2:], 1)
	}

	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	err = errors.Join(
		f.Truncate(total*cs),
		writeAt(f, rt, int64(h.rtOff)),
		writeAt(f, rb, rbOff),
		writeAt(f, hdr, 0),
		f.Sync(),
	)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

func writeAt(f *os.File, p []byte, off int64) error {
	_, err := f.WriteAt(p, off)
	return err
}

// probeBacking opens a would-be backing file to check it and learn its
// size and format.
func probeBacking(path, name, format string) (int64, string, error) {
	if len(name) > maxBackingName {
		return 0, "", fmt.Errorf("backing file name longer than %d bytes", maxBackingName)
	}
	p := name
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(path), p)
	}
	if format == "" {
		var err error
		if format, err = DetectFormat(p); err != nil {
			return 0, "", fmt.Errorf("backing file: %w", err)
		}
	}
	var b Backing
	switch format {
	case "qcow2":
		im, err := Open(p, Options{ReadOnly: true})
		if err != nil {
			return 0, "", fmt.Errorf("backing file: %w", err)
		}
		b = im
	case "raw":
		r, err := raw.Open(p, true)
		if err != nil {
			return 0, "", fmt.Errorf("backing file: %w", err)
		}
		b = r
	default:
		return 0, "", fmt.Errorf("backing file format %q: want qcow2 or raw", format)
	}
	defer b.Close()
	return b.Size(), format, nil
}
