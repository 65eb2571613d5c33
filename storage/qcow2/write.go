package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// extendStep is how far ahead of the last allocated cluster the file is
// extended, so that not every allocation costs an ftruncate. Close trims
// the file back.
const extendStep = 1 << 20

// maxRefBlocksPastEOF bounds how many refcount blocks initWrite reads to
// find where allocation may start.
const maxRefBlocksPastEOF = 16

var be = binary.BigEndian

// initWrite loads what writing needs: the refcount table, and where
// allocation may start (past the file and past every cluster that has a
// refcount).
func (im *Image) initWrite() error {
	h := im.h
	im.zero = make([]byte, im.cs)
	im.rcBlocks = map[int64][]byte{}
	im.rtOff = int64(h.rtOff)
	buf := make([]byte, int64(h.rtClusters)*im.cs)
	if _, err := im.f.ReadAt(buf, int64(h.rtOff)); err != nil {
		return fmt.Errorf("read refcount table: %w", err)
	}
	im.rt = make([]uint64, len(buf)/8)
	for i := range im.rt {
		e := be.Uint64(buf[i*8:])
		if e&rtReserved != 0 || e%uint64(im.cs) != 0 {
			return corruptf("refcount table entry %d (%#x) unaligned", i, e)
		}
		if e != 0 && !inFile(e, uint64(im.cs), im.fileSize) {
			return corruptf("refcount block %d at %#x outside the file", i, e)
		}
		im.rt[i] = e
	}
	// Find the last cluster with a refcount. Only clusters past the end of
	// the file matter (allocation starts there anyway), and a valid image
	// has at most a couple of refcount blocks for them; reading more, as a
	// hostile table of empty blocks would make us, is refused.
	last := int64(-1)
	per := im.cs / 2
	reads := 0
	for i := len(im.rt) - 1; i >= 0 && int64(i) >= roundUp(im.fileSize, im.cs)/im.cs/per && last < 0; i-- {
		if im.rt[i] == 0 {
			continue
		}
		if reads++; reads > maxRefBlocksPastEOF {
			return corruptf("more than %d refcount blocks for clusters past the end of the file", maxRefBlocksPastEOF)
		}
		blk, err := im.readRefBlock(int64(im.rt[i]))
		if err != nil {
			return err
		}
		for j := per - 1; j >= 0; j-- {
			if be.Uint16(blk[j*2:]) != 0 {
				last = int64(i)*per + j
				break
			}
		}
	}
	im.allocEnd = max(roundUp(im.fileSize, im.cs), (last+1)*im.cs)
	return nil
}

// clearAutoclear clears the autoclear features, which we do not maintain
// (qemu's bitmaps, say): a writer must, so that readers know they are
// stale. It is the first change a read-write open makes, once nothing
// else can fail.
func (im *Image) clearAutoclear() error {
	if im.h.autoclear == 0 {
		return nil
	}
	if _, err := im.f.WriteAt(make([]byte, 8), offAutoclear); err != nil {
		return fmt.Errorf("clear autoclear features: %w", err)
	}
	im.h.autoclear = 0
	return im.sync()
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

func (im *Image) sync() error {
	if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
		return fmt.Errorf("qcow2 sync: %w", err)
	}
	return nil
}

func (im *Image) pwrite(p []byte, off int64, what string) error {
	if _, err := im.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("qcow2 write %s at %#x: %w", what, off, err)
	}
	return nil
}

func put64(v uint64) []byte {
	var b [8]byte
	be.PutUint64(b[:], v)
	return b[:]
}

// fail records a metadata error after which the in-memory tables may no
// longer match the file: every later write fails with it.
func (im *Image) fail(err error) error {
	if err != nil && im.failed == nil {
		im.failed = fmt.Errorf("qcow2 image %s unusable after an earlier error: %w", im.path, err)
	}
	return err
}

// WriteAt writes len(p) bytes of the virtual disk at off. A write inside
// an allocated cluster is a single pwrite.
func (im *Image) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if im.readOnly {
		return 0, fmt.Errorf("qcow2 write: %w", ErrReadOnly)
	}
	done := 0
	for done < len(p) {
		n, err := im.writeChunk(ctx, p[done:], off+int64(done))
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

func (im *Image) writeChunk(ctx context.Context, p []byte, off int64) (int, error) {
	im.mu.Lock()
	if err := im.checkIO("write", off, int64(len(p))); err != nil {
		im.mu.Unlock()
		return 0, err
	}
	if im.failed != nil {
		im.mu.Unlock()
		return 0, im.failed
	}
	p = p[:min(int64(len(p)), im.cs-off%im.cs)]
	m, err := im.lookup(off)
	if err == nil && m.kind == kindData {
		im.mu.Unlock()
		if m.entry&flagCopied == 0 {
			return 0, corruptf("data cluster at %#x lacks the COPIED flag (shared cluster)", m.host)
		}
		if _, err := im.f.WriteAt(p, m.host+off%im.cs); err != nil {
			return 0, fmt.Errorf("qcow2 write at %#x: %w", off, err)
		}
		return len(p), nil
	}
	defer im.mu.Unlock()
	if err != nil {
		return 0, err
	}
	if err := im.allocWrite(ctx, p, off, m); err != nil {
		return 0, err
	}
	return len(p), nil
}

// allocWrite writes p (inside one cluster) to a cluster that has no data
// cluster of its own yet. Called with mu held.
func (im *Image) allocWrite(ctx context.Context, p []byte, off int64, m mapping) error {
	coff := off % im.cs
	switch m.kind {
	case kindZeroAlloc:
		if m.entry&flagCopied == 0 {
			return corruptf("zero cluster at %#x lacks the COPIED flag", m.host)
		}
		buf := make([]byte, im.cs)
		copy(buf[coff:], p)
		if err := im.pwrite(buf, m.host, "data"); err != nil {
			return err
		}
		return im.fail(im.setL2(off, uint64(m.host)|flagCopied))
	}
	// The rest of the cluster comes from the backing file (unallocated),
	// from the compressed data (a compressed cluster is never written in
	// place: it gets a cluster of its own), or is zero (zero cluster, or
	// no backing file).
	var base []byte
	switch {
	case int64(len(p)) == im.cs:
	case m.kind == kindUnallocated && im.backing != nil:
		base = make([]byte, im.cs)
		if err := im.readBacking(ctx, base, off-coff); err != nil {
			return err
		}
	case m.kind == kindCompressed:
		var err error
		if base, err = im.readCompressed(m.entry); err != nil {
			return fmt.Errorf("qcow2 write at %#x: %w", off, err)
		}
	}
	if isZero(base) {
		base = nil
	}
	if _, _, err := im.l2For(off, true); err != nil {
		return im.fail(err)
	}
	host, err := im.allocCluster()
	if err != nil {
		return im.fail(err)
	}
	// New clusters lie past everything ever written, so they read as
	// zeroes: only non-zero bytes need writing.
	if base == nil {
		err = im.pwrite(p, host+coff, "data")
	} else {
		copy(base[coff:], p)
		err = im.pwrite(base, host, "data")
	}
	if err != nil {
		return err // the cluster leaks; nothing points to it
	}
	if err := im.setL2(off, uint64(host)|flagCopied); err != nil {
		return im.fail(err)
	}
	if m.kind == kindCompressed {
		return im.fail(im.freeCompressed(m.entry))
	}
	return nil
}

// freeCompressed drops the references a compressed cluster's L2 entry
// held: one on each host cluster its data touches, as qemu counts them
// (qcow2.txt, "Compressed Clusters Descriptor"). Called with mu held,
// after nothing points to the data any more: a crash before it only
// leaks.
func (im *Image) freeCompressed(e uint64) error {
	x := 62 - (im.h.clusterBits - 8)
	start := int64(e&(uint64(1)<<x-1)) &^ 511
	sectors := int64((e>>x)&(uint64(1)<<(im.h.clusterBits-8)-1)) + 1
	end := start + sectors*512
	for c := start &^ (im.cs - 1); c < end; c += im.cs {
		if err := im.addRef(c, -1); err != nil {
			return err
		}
	}
	return nil
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if be.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// setL2 writes the L2 entry for guest offset off, whose table exists.
func (im *Image) setL2(off int64, e uint64) error {
	t, l2Off, err := im.l2For(off, false)
	if err != nil {
		return err
	}
	if t == nil {
		return fmt.Errorf("qcow2: no L2 table for guest offset %#x", off)
	}
	i := im.l2Index(off)
	if err := im.pwrite(put64(e), l2Off+int64(i)*8, "L2 entry"); err != nil {
		return err
	}
	t[i] = e
	return nil
}

// allocL2 allocates the L2 table for L1 entry i. Called with mu held.
func (im *Image) allocL2(i int) ([]uint64, int64, error) {
	host, err := im.allocCluster()
	if err != nil {
		return nil, 0, err
	}
	// The new cluster reads as zeroes (an empty table). Make that and its
	// refcount durable before the L1 entry points to it.
	if err := im.sync(); err != nil {
		return nil, 0, err
	}
	e := uint64(host) | flagCopied
	if err := im.pwrite(put64(e), int64(im.h.l1Off)+int64(i)*8, "L1 entry"); err != nil {
		return nil, 0, err
	}
	im.l1[i] = e
	t := make([]uint64, im.cs/8)
	im.cacheL2(uint64(host), t)
	return t, host, nil
}

// allocCluster allocates one zero cluster at the end of the image and
// gives it refcount 1.
func (im *Image) allocCluster() (int64, error) {
	host := im.allocEnd
	if uint64(host+im.cs) > offsetMask {
		return 0, corruptf("image full: next cluster at %#x is past what an L2 entry can address", host)
	}
	im.allocEnd += im.cs
	if err := im.ensureFile(im.allocEnd); err != nil {
		return 0, err
	}
	if err := im.addRef(host, 1); err != nil {
		return 0, err
	}
	return host, nil
}

// ensureFile makes the file at least end bytes long.
func (im *Image) ensureFile(end int64) error {
	if end <= im.fileSize {
		return nil
	}
	n := roundUp(end, max(im.cs, extendStep))
	if err := im.f.Truncate(n); err != nil {
		return fmt.Errorf("qcow2 extend file to %d: %w", n, err)
	}
	im.fileSize = n
	return nil
}

// addRef changes the refcount of the cluster at host by delta.
func (im *Image) addRef(host int64, delta int) error {
	ci := host / im.cs
	per := im.cs / 2
	blk, boff, err := im.refBlock(ci / per)
	if err != nil {
		return err
	}
	j := ci % per
	v := int(be.Uint16(blk[j*2:])) + delta
	if v < 0 || v > 0xffff {
		return corruptf("refcount of cluster %#x would become %d", host, v)
	}
	var b [2]byte
	be.PutUint16(b[:], uint16(v))
	if err := im.pwrite(b[:], boff+j*2, "refcount"); err != nil {
		return err
	}
	be.PutUint16(blk[j*2:], uint16(v))
	return nil
}

// refBlock returns refcount block ti and its offset, creating it (and
// growing the refcount table) if needed.
func (im *Image) refBlock(ti int64) ([]byte, int64, error) {
	if ti >= int64(len(im.rt)) {
		if err := im.growRefTable(ti); err != nil {
			return nil, 0, err
		}
	}
	off := int64(im.rt[ti])
	if off == 0 {
		return im.newRefBlock(ti)
	}
	if b, ok := im.rcBlocks[off]; ok {
		return b, off, nil
	}
	b, err := im.readRefBlock(off)
	if err != nil {
		return nil, 0, err
	}
	im.rcBlocks[off] = b
	return b, off, nil
}

func (im *Image) readRefBlock(off int64) ([]byte, error) {
	b := make([]byte, im.cs)
	if _, err := im.f.ReadAt(b, off); err != nil {
		return nil, fmt.Errorf("read refcount block at %#x: %w", off, err)
	}
	return b, nil
}

// newRefBlock allocates refcount block ti at the end of the file.
func (im *Image) newRefBlock(ti int64) ([]byte, int64, error) {
	per := im.cs / 2
	host := im.allocEnd
	if uint64(host+im.cs) > offsetMask {
		return nil, 0, corruptf("image full: refcount block at %#x is past what the table can address", host)
	}
	im.allocEnd += im.cs
	if err := im.ensureFile(im.allocEnd); err != nil {
		return nil, 0, err
	}
	blk := make([]byte, im.cs)
	ci := host / im.cs
	self := ci/per == ti
	if self {
		be.PutUint16(blk[(ci%per)*2:], 1)
		if err := im.pwrite(blk, host, "refcount block"); err != nil {
			return nil, 0, err
		}
	} else if err := im.addRef(host, 1); err != nil {
		return nil, 0, err
	}
	if err := im.sync(); err != nil {
		return nil, 0, err
	}
	if err := im.pwrite(put64(uint64(host)), im.rtOff+ti*8, "refcount table entry"); err != nil {
		return nil, 0, err
	}
	im.rt[ti] = uint64(host)
	im.rcBlocks[host] = blk
	return blk, host, nil
}

// growRefTable moves the refcount table to a bigger one at the end of the
// file that covers block ti and the clusters the move itself allocates.
func (im *Image) growRefTable(ti int64) error {
	if im.growing {
		return errors.New("qcow2: refcount table grew while growing")
	}
	per := im.cs / 2
	entries := max(ti+1, 2*int64(len(im.rt)))
	var k int64
	for {
		k = roundUp(entries*8, im.cs) / im.cs
		last := im.allocEnd/im.cs + k + k/per + 4
		if last/per+1 <= entries {
			break
		}
		entries = last/per + 1
	}
	if k*im.cs > maxRefTableBytes {
		return unsupportedf("refcount table would exceed %d bytes", maxRefTableBytes)
	}
	t0 := im.allocEnd
	im.allocEnd += k * im.cs
	if err := im.ensureFile(im.allocEnd); err != nil {
		return err
	}
	oldOff, oldClusters := int64(im.h.rtOff), int64(im.h.rtClusters)
	newRT := make([]uint64, k*im.cs/8)
	copy(newRT, im.rt)
	im.rt, im.rtOff, im.growing = newRT, t0, true
	defer func() { im.growing = false }()
	for c := range k {
		if err := im.addRef(t0+c*im.cs, 1); err != nil {
			return err
		}
	}
	buf := make([]byte, len(newRT)*8)
	for i, e := range newRT {
		be.PutUint64(buf[i*8:], e)
	}
	if err := im.pwrite(buf, t0, "refcount table"); err != nil {
		return err
	}
	if err := im.sync(); err != nil {
		return err
	}
	hdr := make([]byte, 12)
	be.PutUint64(hdr, uint64(t0))
	be.PutUint32(hdr[8:], uint32(k))
	if err := im.pwrite(hdr, offRefTable, "header"); err != nil {
		return err
	}
	im.h.rtOff, im.h.rtClusters = uint64(t0), uint32(k)
	if err := im.sync(); err != nil {
		return err
	}
	for c := range oldClusters {
		if err := im.addRef(oldOff+c*im.cs, -1); err != nil {
			return err
		}
	}
	return nil
}

// Discard deallocates [off, off+n); later reads return zeroes.
func (im *Image) Discard(ctx context.Context, off, n int64) error {
	return im.WriteZeroes(ctx, off, n, true)
}

// WriteZeroes zeroes [off, off+n) without a data buffer. Whole clusters
// become zero clusters (with unmap their host clusters are freed and
// punched out of the file); partial clusters are written with zeroes.
func (im *Image) WriteZeroes(ctx context.Context, off, n int64, unmap bool) error {
	if im.readOnly {
		return fmt.Errorf("qcow2 write zeroes: %w", ErrReadOnly)
	}
	im.mu.Lock()
	err := im.checkIO("write zeroes", off, n)
	im.mu.Unlock()
	if err != nil {
		return err
	}
	for n > 0 {
		c := min(n, im.cs-off%im.cs)
		if c == im.cs {
			err = im.zeroCluster(off, unmap)
		} else {
			err = im.zeroPartial(ctx, off, c)
		}
		if err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

func (im *Image) zeroPartial(ctx context.Context, off, n int64) error {
	im.mu.Lock()
	m, err := im.lookup(off)
	skip := m.kind == kindZero || m.kind == kindZeroAlloc || (m.kind == kindUnallocated && im.backing == nil)
	im.mu.Unlock()
	if err != nil || skip {
		return err
	}
	_, err = im.WriteAt(ctx, im.zero[:n], off)
	return err
}

func (im *Image) zeroCluster(off int64, unmap bool) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.failed != nil {
		return im.failed
	}
	m, err := im.lookup(off)
	if err != nil {
		return err
	}
	var e uint64
	switch m.kind {
	case kindZero:
		return nil
	case kindUnallocated:
		if im.backing == nil {
			return nil
		}
		e = flagZero
	case kindCompressed:
		e = flagZero
	case kindData, kindZeroAlloc:
		if m.entry&flagCopied == 0 {
			return corruptf("cluster at %#x lacks the COPIED flag", m.host)
		}
		switch {
		case !unmap:
			e = uint64(m.host) | flagCopied | flagZero
		case im.backing != nil:
			e = flagZero
		}
	}
	if _, _, err := im.l2For(off, true); err != nil {
		return im.fail(err)
	}
	if err := im.setL2(off, e); err != nil {
		return im.fail(err)
	}
	if m.kind == kindCompressed {
		return im.fail(im.freeCompressed(m.entry))
	}
	if unmap && (m.kind == kindData || m.kind == kindZeroAlloc) {
		// Nothing points to the cluster any more; a crash here only leaks it.
		if err := im.addRef(m.host, -1); err != nil {
			return im.fail(err)
		}
		err := unix.Fallocate(int(im.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, m.host, im.cs)
		if err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("qcow2 discard: punch hole at %#x: %w", m.host, err)
		}
	}
	return nil
}
