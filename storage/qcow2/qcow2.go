// Package qcow2 reads and writes qcow2 images (version 3; version 2 read
// only) compatibly with qemu-img, including backing-file chains.
//
// Everything in an image file is untrusted: the header, its extensions and
// every L1, L2 and refcount entry are validated and bounds-checked against
// the file before use, and a malformed image yields an error wrapping
// ErrCorrupt, never a panic. Compressed clusters are read with deflate
// (qemu's zlib type) or zstd (github.com/klauspost/compress, decoded into
// no more than the cluster), and copied out before a write changes them.
//
// Writes are ordered so that a process killed at any point (kill -9)
// leaves an image that `qemu-img check` finds consistent apart from leaked
// clusters: a cluster's refcount is raised before anything points to it,
// data is written before the L2 entry that maps it, and a new L2 table or
// refcount block is written (and synced) before the L1 or refcount table
// entry that refers to it. Clusters are allocated at the end of the file
// and never reused, so a freed cluster cannot be reached by a stale
// pointer; discarded clusters are given back to the host with
// FALLOC_FL_PUNCH_HOLE. Flush is fdatasync: everything written before it
// is durable after it. L2 tables are cached and written through.
//
// Power loss is a weaker case: between two Flushes the kernel may persist
// an L2 entry before the refcount or the data it depends on (only new L2
// tables and refcount blocks are fenced with fdatasync). Such an image
// may need `qemu-img check -r all`, and a cluster copied up from the
// backing file may read as zeroes if its copy was lost. Closing this gap
// needs write-back L2 tables flushed behind a barrier, as qemu does.
package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/storage/raw"
)

// ErrReadOnly is returned by writes to an image opened read-only.
var ErrReadOnly = errors.New("image is read-only")

// ErrOutOfRange is returned for I/O not wholly inside the virtual disk.
var ErrOutOfRange = errors.New("offset out of range")

// MaxBackingDepth is the longest backing chain Open follows.
const MaxBackingDepth = 64

// l2CacheBytes bounds the L2 table cache (with 64 KiB clusters, 64
// tables that map 32 GiB of disk). A variable so tests can force
// evictions.
var l2CacheBytes = 4 << 20

// Backing is what an image needs from its backing file.
type Backing interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	Size() int64
	Close() error
}

// Options tune Open.
type Options struct {
	// ReadOnly opens the image without write access.
	ReadOnly bool
}

// Image is an open qcow2 image. It is safe for concurrent use: mu
// serializes every lookup and change of the tables (L1, L2, refcounts)
// and allocation; data is read and written outside it, at host offsets a
// lookup returned. That is safe because a host cluster, once allocated,
// is never allocated again (clusters are always taken at the end of the
// image), so a concurrent discard can only make a racing read or write
// see the old cluster, as if it had happened before the discard. The
// contexts are ignored: every file is local.
type Image struct {
	mu       sync.Mutex
	f        *os.File
	path     string
	h        *header
	cs       int64 // cluster size
	readOnly bool
	backing  Backing
	l1       []uint64
	l2Cache  map[uint64][]uint64
	fileSize int64
	closed   bool

	// Writable images only.
	rt       []uint64         // refcount table
	rtOff    int64            // where refcount table entries are written
	rcBlocks map[int64][]byte // cached refcount blocks by host offset
	allocEnd int64            // next cluster to allocate; everything past it is zero
	zero     []byte           // one cluster of zeroes
	growing  bool             // the refcount table is being moved
	failed   error            // a metadata update failed half way

	// The zstd decoder, made on the first read of a zstd cluster (see
	// zstdDecoder). It is never closed: it runs no goroutine, and Close
	// would race with a read still decoding (the decoder panics then).
	zstdOnce sync.Once
	zstd     *zstd.Decoder
	zstdErr  error
}

// Open opens the qcow2 image at path and, recursively and read-only, its
// backing chain.
func Open(path string, opts Options) (*Image, error) {
	return openChain(path, opts, &chain{seen: map[[2]uint64]bool{}})
}

// ChainFile is one open file of an image's backing chain: how a control
// plane hands an image (see Files) to a VM process, which opens it with
// OpenFiles without opening anything by path. Image locks (see package
// raw) belong to the open file description and travel with it.
type ChainFile struct {
	File *os.File
	// Name is what the image above this one records as its backing file
	// ("" for the top image).
	Name string
	// Format is "qcow2" or "raw".
	Format string
	// Path is where the file was opened, for messages only.
	Path string
}

// OpenFiles opens an image from its chain's files, top first, as Files
// returned them: each image's recorded backing file name and format must
// match the next file's, and every file must be used. It takes ownership
// of the files; on error it closes them all.
func OpenFiles(files []ChainFile, opts Options) (_ *Image, err error) {
	defer func() {
		if err != nil {
			for _, f := range files {
				f.File.Close()
			}
		}
	}()
	if len(files) == 0 || files[0].Format != "qcow2" || files[0].Name != "" {
		return nil, fmt.Errorf("open qcow2 image from files: the first file must be the top qcow2 image")
	}
	c := &chain{seen: map[[2]uint64]bool{}, files: files}
	im, err := newImage(files[0].File, files[0].Path, opts.ReadOnly, c)
	if err != nil {
		return nil, fmt.Errorf("open qcow2 image %s: %w", files[0].Path, err)
	}
	if n := len(im.Files()); n != len(files) {
		im.Release()
		return nil, fmt.Errorf("open qcow2 image %s: %w: its chain has %d files, but %d were handed over", files[0].Path, ErrChainMismatch, n, len(files))
	}
	return im, nil
}

// Files lists the image's open files, top first, for handing the image to
// another process (OpenFiles there, then Release here). The image still
// owns them.
func (im *Image) Files() []ChainFile {
	out := []ChainFile{{File: im.f, Format: "qcow2", Path: im.path}}
	switch b := im.backing.(type) {
	case *Image:
		sub := b.Files()
		sub[0].Name = im.h.backingFile
		out = append(out, sub...)
	case *raw.File:
		out = append(out, ChainFile{File: b.File(), Name: im.h.backingFile, Format: "raw", Path: b.File().Name()})
	}
	return out
}

// Release closes the image's descriptors (and its backing chain's)
// without writing, truncating or syncing anything: for an image whose
// files were handed to another process, which now owns the image. Any
// later use of this Image fails.
func (im *Image) Release() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	errs := []error{im.f.Close()}
	switch b := im.backing.(type) {
	case *Image:
		errs = append(errs, b.Release())
	case *raw.File:
		errs = append(errs, b.Release())
	}
	return errors.Join(errs...)
}

// chain tracks a backing chain being opened, to stop loops and runaway
// depth.
type chain struct {
	depth int
	seen  map[[2]uint64]bool
	// files, for OpenFiles: the chain's files, top first; backing files
	// come from here instead of being opened by path.
	files []ChainFile
}

func openChain(path string, opts Options, c *chain) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, _, err := raw.OpenFile(path, flag)
	if err != nil {
		return nil, fmt.Errorf("open qcow2 image: %w", err)
	}
	im, err := newImage(f, path, opts.ReadOnly, c)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open qcow2 image %s: %w", path, err)
	}
	return im, nil
}

func newImage(f *os.File, path string, readOnly bool, c *chain) (*Image, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("stat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("not a regular file")
	}
	id := [2]uint64{st.Dev, st.Ino}
	if c.seen[id] {
		return nil, corruptf("backing chain loops back to %s", path)
	}
	c.seen[id] = true
	im := &Image{f: f, path: path, readOnly: readOnly, fileSize: st.Size, l2Cache: map[uint64][]uint64{}}

	first := make([]byte, min(st.Size, 1<<maxClusterBits))
	if _, err := io.ReadFull(io.NewSectionReader(f, 0, int64(len(first))), first); err != nil {
		return nil, fmt.Errorf("read header: %w", err)
	}
	h, err := parseHeader(first, st.Size)
	if err != nil {
		return nil, err
	}
	im.h = h
	im.cs = 1 << h.clusterBits
	if !readOnly {
		if err := h.writable(); err != nil {
			return nil, err
		}
	}
	if err := im.loadL1(); err != nil {
		return nil, err
	}
	if !readOnly {
		if err := im.initWrite(); err != nil {
			return nil, err
		}
	}
	if h.backingFile != "" {
		if err := im.openBacking(c); err != nil {
			return nil, err
		}
	}
	if !readOnly {
		if err := im.clearAutoclear(); err != nil {
			if im.backing != nil {
				im.backing.Close()
			}
			return nil, err
		}
	}
	return im, nil
}

// writable reports why an image with this header cannot be opened for
// writing, if it cannot.
func (h *header) writable() error {
	switch {
	case h.version != 3:
		return unsupportedf("writing version %d images (convert with qemu-img amend -o compat=v3)", h.version)
	case h.refcountOrder != 4:
		return unsupportedf("writing images with %d-bit refcounts (only 16)", 1<<h.refcountOrder)
	case h.nbSnapshots != 0:
		return unsupportedf("writing images with %d internal snapshots", h.nbSnapshots)
	case h.incompat&incCorrupt != 0:
		return corruptf("image is marked corrupt; repair it with qemu-img check -r all")
	case h.incompat&incDirty != 0:
		return unsupportedf("image has the dirty bit set (lazy refcounts); repair it with qemu-img check -r all")
	}
	return nil
}

func (im *Image) loadL1() error {
	h := im.h
	im.l1 = make([]uint64, h.l1Size)
	if h.l1Size == 0 {
		return nil
	}
	buf := make([]byte, int(h.l1Size)*8)
	if _, err := im.f.ReadAt(buf, int64(h.l1Off)); err != nil {
		return fmt.Errorf("read L1 table: %w", err)
	}
	for i := range im.l1 {
		e := binary.BigEndian.Uint64(buf[i*8:])
		if e&l1Reserved != 0 {
			return corruptf("L1 entry %d (%#x) has reserved bits set", i, e)
		}
		if off := e & offsetMask; off != 0 {
			if off%uint64(im.cs) != 0 || !inFile(off, uint64(im.cs), im.fileSize) {
				return corruptf("L1 entry %d points to L2 table at %#x, unaligned or outside the file", i, off)
			}
		} else if e != 0 {
			return corruptf("L1 entry %d (%#x) has flags but no offset", i, e)
		}
		im.l1[i] = e
	}
	return nil
}

// openBacking opens the backing file named in the header, relative to
// the image's directory, or takes it from the files OpenFiles was given.
func (im *Image) openBacking(c *chain) error {
	name := im.h.backingFile
	if strings.Contains(name, ":") && !strings.HasPrefix(name, "/") && !strings.HasPrefix(name, ".") {
		if p, _, ok := strings.Cut(name, ":"); ok && !strings.ContainsRune(p, '/') {
			return unsupportedf("backing file %q uses a protocol", name)
		}
	}
	if c.depth+1 > MaxBackingDepth {
		return corruptf("backing chain deeper than %d", MaxBackingDepth)
	}
	if c.files != nil {
		return im.backingFromFiles(c)
	}
	p := name
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(im.path), p)
	}
	format := im.h.backingFormat
	if format == "" {
		var err error
		if format, err = DetectFormat(p); err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
	}
	var b Backing
	switch format {
	case "qcow2":
		bc := &chain{depth: c.depth + 1, seen: c.seen}
		bim, err := openChain(p, Options{ReadOnly: true}, bc)
		if err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
		b = bim
	case "raw":
		r, err := raw.Open(p, true)
		if err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
		b = r
	default:
		return unsupportedf("backing file format %q", format)
	}
	im.backing = b
	return nil
}

// ErrChainMismatch is returned by OpenFiles when the files handed over are
// not the image's backing chain.
var ErrChainMismatch = errors.New("backing chain does not match the files handed over")

// backingFromFiles takes the next file of c.files as the backing file,
// after checking it is the one the header names.
func (im *Image) backingFromFiles(c *chain) error {
	name := im.h.backingFile
	i := c.depth + 1
	if i >= len(c.files) {
		return fmt.Errorf("%w: %s names backing file %q, but no file was handed over for it", ErrChainMismatch, im.path, name)
	}
	cf := c.files[i]
	if cf.Name != name {
		return fmt.Errorf("%w: %s names backing file %q, but the file handed over is for %q (%s)", ErrChainMismatch, im.path, name, cf.Name, cf.Path)
	}
	format := im.h.backingFormat
	if format == "" {
		var err error
		if format, err = detectFile(cf.File); err != nil {
			return fmt.Errorf("backing file %s: %w", cf.Path, err)
		}
	}
	if format != cf.Format {
		return fmt.Errorf("%w: backing file %s is %s, but was handed over as %s", ErrChainMismatch, cf.Path, format, cf.Format)
	}
	switch format {
	case "qcow2":
		bim, err := newImage(cf.File, cf.Path, true, &chain{depth: i, seen: c.seen, files: c.files})
		if err != nil {
			return fmt.Errorf("backing file %s: %w", cf.Path, err)
		}
		im.backing = bim
	case "raw":
		r, err := raw.FromFile(cf.File, true)
		if err != nil {
			return fmt.Errorf("backing file %s: %w", cf.Path, err)
		}
		im.backing = r
	default:
		return unsupportedf("backing file format %q", format)
	}
	return nil
}

// DetectFormat returns "qcow2" if the file at path starts with the qcow2
// magic, else "raw".
func DetectFormat(path string) (string, error) {
	f, _, err := raw.OpenFile(path, os.O_RDONLY)
	if err != nil {
		return "", fmt.Errorf("detect format: %w", err)
	}
	defer f.Close()
	format, err := detectFile(f)
	if err != nil {
		return "", fmt.Errorf("detect format of %s: %w", path, err)
	}
	return format, nil
}

// detectFile is DetectFormat of an open file.
func detectFile(f *os.File) (string, error) {
	var b [4]byte
	n, err := f.ReadAt(b[:], 0)
	if err != nil && err != io.EOF {
		return "", err
	}
	if n == 4 && binary.BigEndian.Uint32(b[:]) == magic {
		return "qcow2", nil
	}
	return "raw", nil
}

// Size is the virtual size in bytes.
func (im *Image) Size() int64 { return int64(im.h.size) }

// ClusterSize is the image's cluster size in bytes.
func (im *Image) ClusterSize() int64 { return im.cs }

// Version is the qcow2 version (2 or 3).
func (im *Image) Version() int { return int(im.h.version) }

// BackingFile is the backing file name as recorded in the image ("" if
// none), and BackingFormat its recorded format.
func (im *Image) BackingFile() string   { return im.h.backingFile }
func (im *Image) BackingFormat() string { return im.h.backingFormat }

// Backing is the opened backing file, or nil.
func (im *Image) Backing() Backing { return im.backing }

// ReadOnly reports whether the image refuses writes.
func (im *Image) ReadOnly() bool { return im.readOnly }

// Path is the file the image was opened from.
func (im *Image) Path() string { return im.path }

// Close closes the image and its backing chain. A writable image first
// gives back clusters it extended the file by and syncs.
func (im *Image) Close() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	var errs []error
	if !im.readOnly {
		if im.fileSize > im.allocEnd {
			if err := im.f.Truncate(im.allocEnd); err != nil {
				errs = append(errs, fmt.Errorf("qcow2 close: truncate: %w", err))
			}
		}
		if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
			errs = append(errs, fmt.Errorf("qcow2 close: sync: %w", err))
		}
	}
	if err := im.f.Close(); err != nil {
		errs = append(errs, fmt.Errorf("qcow2 close: %w", err))
	}
	if im.backing != nil {
		if err := im.backing.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Flush makes every completed write durable.
func (im *Image) Flush(context.Context) error {
	if im.readOnly {
		return nil
	}
	if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
		return fmt.Errorf("qcow2 flush: %w", err)
	}
	return nil
}

// mapping is where a guest cluster's data lives.
type mapping struct {
	kind  int
	host  int64  // kindData, kindZeroAlloc: cluster offset in the file
	entry uint64 // the raw L2 entry
}

const (
	kindUnallocated = iota // read from the backing file, or zeroes
	kindZero               // reads as zeroes
	kindZeroAlloc          // reads as zeroes, host cluster preallocated
	kindData
	kindCompressed
)

// lookup maps the guest cluster containing off. Called with mu held.
func (im *Image) lookup(off int64) (mapping, error) {
	l2, _, err := im.l2For(off, false)
	if err != nil || l2 == nil {
		return mapping{}, err
	}
	e := l2[im.l2Index(off)]
	return im.classify(e)
}

func (im *Image) classify(e uint64) (mapping, error) {
	if e&flagCompressed != 0 {
		return mapping{kind: kindCompressed, entry: e}, nil
	}
	host := int64(e & offsetMask)
	switch {
	case e&flagZero != 0 && host != 0:
		return mapping{kind: kindZeroAlloc, host: host, entry: e}, nil
	case e&flagZero != 0:
		return mapping{kind: kindZero, entry: e}, nil
	case host == 0:
		return mapping{kind: kindUnallocated, entry: e}, nil
	}
	return mapping{kind: kindData, host: host, entry: e}, nil
}

func (im *Image) l1Index(off int64) int {
	return int(uint64(off) >> (2*im.h.clusterBits - 3))
}

func (im *Image) l2Index(off int64) int {
	return int((uint64(off) >> im.h.clusterBits) & (uint64(im.cs)/8 - 1))
}

// l2For returns the L2 table covering guest offset off (nil if none and
// !create) and its host offset. With create it allocates a missing table.
// Called with mu held.
func (im *Image) l2For(off int64, create bool) ([]uint64, int64, error) {
	i := im.l1Index(off)
	if i >= len(im.l1) {
		return nil, 0, corruptf("guest offset %#x beyond the L1 table", off)
	}
	e := im.l1[i]
	l2Off := int64(e & offsetMask)
	if l2Off == 0 {
		if !create {
			return nil, 0, nil
		}
		return im.allocL2(i)
	}
	if !im.readOnly && e&flagCopied == 0 {
		return nil, 0, corruptf("L1 entry %d lacks the COPIED flag (shared L2 table)", i)
	}
	if t, ok := im.l2Cache[uint64(l2Off)]; ok {
		return t, l2Off, nil
	}
	t, err := im.readL2(l2Off)
	if err != nil {
		return nil, 0, err
	}
	im.cacheL2(uint64(l2Off), t)
	return t, l2Off, nil
}

func (im *Image) cacheL2(off uint64, t []uint64) {
	if len(im.l2Cache) >= max(4, l2CacheBytes/int(im.cs)) {
		for k := range im.l2Cache {
			delete(im.l2Cache, k)
			break
		}
	}
	im.l2Cache[off] = t
}

// readL2 reads and validates the L2 table at host offset off.
func (im *Image) readL2(off int64) ([]uint64, error) {
	buf := make([]byte, im.cs)
	if _, err := im.f.ReadAt(buf, off); err != nil {
		return nil, fmt.Errorf("read L2 table at %#x: %w", off, err)
	}
	t := make([]uint64, im.cs/8)
	for i := range t {
		e := binary.BigEndian.Uint64(buf[i*8:])
		if err := im.checkL2Entry(e); err != nil {
			return nil, fmt.Errorf("L2 table at %#x entry %d: %w", off, i, err)
		}
		t[i] = e
	}
	return t, nil
}

func (im *Image) checkL2Entry(e uint64) error {
	if e&flagCompressed != 0 {
		if e&flagCopied != 0 {
			return corruptf("compressed entry %#x has the COPIED flag", e)
		}
		return nil // bounds are checked when it is read
	}
	if e&l2Reserved != 0 {
		return corruptf("entry %#x has reserved bits set", e)
	}
	host := e & offsetMask
	if host == 0 {
		return nil
	}
	if host%uint64(im.cs) != 0 {
		return corruptf("data cluster offset %#x not cluster aligned", host)
	}
	if !inFile(host, 1, im.fileSize) {
		return corruptf("data cluster offset %#x outside the file (%d bytes)", host, im.fileSize)
	}
	return nil
}

func (im *Image) checkIO(op string, off, n int64) error {
	if im.closed {
		return fmt.Errorf("qcow2 %s: image closed", op)
	}
	if off < 0 || n < 0 || off > im.Size() || n > im.Size()-off {
		return fmt.Errorf("qcow2 %s at %d+%d (disk size %d): %w", op, off, n, im.Size(), ErrOutOfRange)
	}
	return nil
}

// ReadAt reads len(p) bytes of the virtual disk at off.
func (im *Image) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		chunk, m, err := im.mapChunk("read", p[done:], off+int64(done))
		if err != nil {
			return done, err
		}
		if err := im.readChunk(ctx, chunk, off+int64(done), m); err != nil {
			return done, err
		}
		done += len(chunk)
	}
	return done, nil
}

// mapChunk returns the part of p inside the cluster at off and that
// cluster's mapping.
func (im *Image) mapChunk(op string, p []byte, off int64) ([]byte, mapping, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.checkIO(op, off, int64(len(p))); err != nil {
		return nil, mapping{}, err
	}
	n := min(int64(len(p)), im.cs-off%im.cs)
	m, err := im.lookup(off)
	return p[:n], m, err
}

func (im *Image) readChunk(ctx context.Context, p []byte, off int64, m mapping) error {
	switch m.kind {
	case kindData:
		return im.readHost(p, m.host+off%im.cs)
	case kindZero, kindZeroAlloc:
		clear(p)
		return nil
	case kindCompressed:
		c, err := im.readCompressed(m.entry)
		if err != nil {
			return fmt.Errorf("qcow2 read at %#x: %w", off, err)
		}
		copy(p, c[off%im.cs:])
		return nil
	}
	return im.readBacking(ctx, p, off)
}

// readHost reads file bytes; what lies past the end of the file reads as
// zeroes (a last cluster written only in part).
func (im *Image) readHost(p []byte, off int64) error {
	n, err := im.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	if err != nil {
		return fmt.Errorf("qcow2 read at host %#x: %w", off, err)
	}
	return nil
}

// readBacking reads guest bytes from the backing file, zeroes past its end.
func (im *Image) readBacking(ctx context.Context, p []byte, off int64) error {
	if im.backing == nil {
		clear(p)
		return nil
	}
	bs := im.backing.Size()
	n := int64(0)
	if off < bs {
		n = min(int64(len(p)), bs-off)
		if _, err := im.backing.ReadAt(ctx, p[:n], off); err != nil {
			return fmt.Errorf("qcow2 read backing at %#x: %w", off, err)
		}
	}
	clear(p[n:])
	return nil
}
