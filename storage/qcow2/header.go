package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// ErrCorrupt is the category of every error caused by a malformed image:
// a bad header, a table outside the file, an entry with reserved bits set.
var ErrCorrupt = errors.New("corrupt qcow2 image")

// ErrUnsupported is the category of valid qcow2 features rayvmm does not
// implement (encryption, external data files, extended L2 entries, writes
// to v2 images or images with internal snapshots, ...).
var ErrUnsupported = errors.New("unsupported qcow2 feature")

const (
	magic = 0x514649fb // "QFI\xfb"

	v2HeaderLen = 72
	v3HeaderLen = 104
	// createHeaderLen is what Create writes: the v3 header plus the
	// compression type byte and padding, as qemu-img 5.1+ does.
	createHeaderLen = 112

	minClusterBits = 9
	maxClusterBits = 21

	// Limits from qemu (block/qcow2.h), which also bound how much memory a
	// hostile header can make us allocate.
	maxL1Bytes       = 32 << 20
	maxRefTableBytes = 8 << 20
	maxSnapshots     = 65536
	maxBackingName   = 1023
	maxBackingFmtLen = 15

	// Header extension types.
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureTable = 0x6803f857
	extDataFile     = 0x44415441

	// Incompatible feature bits.
	incDirty       = 1 << 0
	incCorrupt     = 1 << 1
	incDataFile    = 1 << 2
	incCompression = 1 << 3
	incExtendedL2  = 1 << 4
	incKnown       = incDirty | incCorrupt | incDataFile | incCompression | incExtendedL2

	// Table entry bits.
	flagCopied     = uint64(1) << 63
	flagCompressed = uint64(1) << 62
	flagZero       = uint64(1) << 0
	offsetMask     = uint64(0x00fffffffffffe00)
	l1Reserved     = uint64(0x7f000000000001ff)
	l2Reserved     = uint64(0x3f000000000001fe)
	rtReserved     = uint64(0x1ff)

	// Header field offsets that are rewritten in place.
	offRefTable  = 48
	offAutoclear = 88
)

// header is the parsed, validated qcow2 header and its extensions.
type header struct {
	version         uint32
	backingOff      uint64
	backingLen      uint32
	clusterBits     uint32
	size            uint64
	cryptMethod     uint32
	l1Size          uint32
	l1Off           uint64
	rtOff           uint64
	rtClusters      uint32
	nbSnapshots     uint32
	snapshotsOff    uint64
	incompat        uint64
	compat          uint64
	autoclear       uint64
	refcountOrder   uint32
	headerLen       uint32
	compressionType uint8

	backingFile   string
	backingFormat string
	features      map[[2]uint8]string // (type, bit) -> name, from the feature table
}

func corruptf(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, a...))
}

func unsupportedf(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsupported, fmt.Sprintf(format, a...))
}

// l2Bits is log2 of the number of entries in an L2 table.
func (h *header) l2Bits() uint32 { return h.clusterBits - 3 }

// l1Needed is the number of L1 entries a virtual size needs.
func l1Needed(size uint64, clusterBits uint32) uint64 {
	per := uint64(1) << (2*clusterBits - 3)
	n := size / per
	if size%per != 0 {
		n++
	}
	return n
}

// inFile reports whether [off, off+n) is inside a file of fileSize bytes.
func inFile(off, n uint64, fileSize int64) bool {
	end := off + n
	return end >= off && end <= uint64(fileSize)
}

// parseHeader parses and validates the header in buf, the first cluster
// of the image (or the whole file if shorter), against the file's size.
func parseHeader(buf []byte, fileSize int64) (*header, error) {
	if len(buf) < v2HeaderLen {
		return nil, corruptf("file is %d bytes, too short for a qcow2 header", len(buf))
	}
	be := binary.BigEndian
	if m := be.Uint32(buf[0:]); m != magic {
		return nil, corruptf("bad magic %#08x (not a qcow2 image)", m)
	}
	h := &header{
		version:      be.Uint32(buf[4:]),
		backingOff:   be.Uint64(buf[8:]),
		backingLen:   be.Uint32(buf[16:]),
		clusterBits:  be.Uint32(buf[20:]),
		size:         be.Uint64(buf[24:]),
		cryptMethod:  be.Uint32(buf[32:]),
		l1Size:       be.Uint32(buf[36:]),
		l1Off:        be.Uint64(buf[40:]),
		rtOff:        be.Uint64(buf[48:]),
		rtClusters:   be.Uint32(buf[56:]),
		nbSnapshots:  be.Uint32(buf[60:]),
		snapshotsOff: be.Uint64(buf[64:]),
	}
	switch h.version {
	case 2:
		h.refcountOrder = 4
		h.headerLen = v2HeaderLen
	case 3:
		if len(buf) < v3HeaderLen {
			return nil, corruptf("file is %d bytes, too short for a v3 header", len(buf))
		}
		h.incompat = be.Uint64(buf[72:])
		h.compat = be.Uint64(buf[80:])
		h.autoclear = be.Uint64(buf[88:])
		h.refcountOrder = be.Uint32(buf[96:])
		h.headerLen = be.Uint32(buf[100:])
	default:
		return nil, unsupportedf("version %d (want 2 or 3)", h.version)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, corruptf("cluster_bits %d outside %d..%d", h.clusterBits, minClusterBits, maxClusterBits)
	}
	cs := uint64(1) << h.clusterBits
	if h.version == 3 {
		if h.headerLen < v3HeaderLen || h.headerLen%8 != 0 || uint64(h.headerLen) > cs {
			return nil, corruptf("header_length %d invalid", h.headerLen)
		}
		if uint64(h.headerLen) > uint64(len(buf)) {
			return nil, corruptf("header_length %d past the end of the file", h.headerLen)
		}
		if h.headerLen > v3HeaderLen {
			h.compressionType = buf[104]
		}
	}
	if h.refcountOrder > 6 {
		return nil, corruptf("refcount_order %d greater than 6", h.refcountOrder)
	}
	if h.cryptMethod != 0 {
		return nil, unsupportedf("encrypted image (crypt_method %d)", h.cryptMethod)
	}
	if h.size > 1<<62 {
		return nil, corruptf("virtual size %d too large", h.size)
	}

	// Extensions sit between the header and the backing file name (or the
	// end of the first cluster).
	extLimit := cs
	if h.backingOff != 0 {
		extLimit = h.backingOff
	}
	if err := h.parseExtensions(buf, extLimit); err != nil {
		return nil, err
	}
	if unknown := h.incompat &^ incKnown; unknown != 0 {
		return nil, unsupportedf("unknown incompatible features %s", h.featureNames(0, unknown))
	}
	if h.incompat&incDataFile != 0 {
		return nil, unsupportedf("external data file")
	}
	if h.incompat&incExtendedL2 != 0 {
		return nil, unsupportedf("extended L2 entries (subclusters)")
	}
	// qcow2.txt: a compression type other than zlib needs the
	// incompatible "compression type" bit, and the bit is set only then
	// (qemu refuses both mismatches, and types it does not know).
	switch {
	case h.compressionType != compressionZlib && h.compressionType != compressionZstd:
		return nil, unsupportedf("compression type %d (rayvmm reads zlib and zstd)", h.compressionType)
	case h.compressionType != compressionZlib && h.incompat&incCompression == 0:
		return nil, corruptf("compression type %s without the compression type feature bit", compressionName(h.compressionType))
	case h.compressionType == compressionZlib && h.incompat&incCompression != 0:
		return nil, corruptf("compression type feature bit set, but the compression type is zlib")
	}

	// Backing file name.
	if h.backingOff != 0 {
		if h.backingLen == 0 || h.backingLen > maxBackingName {
			return nil, corruptf("backing file name length %d invalid", h.backingLen)
		}
		if h.backingOff > cs || uint64(h.backingLen) > cs-h.backingOff {
			return nil, corruptf("backing file name at %#x+%d outside the first cluster", h.backingOff, h.backingLen)
		}
		if h.backingOff+uint64(h.backingLen) > uint64(len(buf)) {
			return nil, corruptf("backing file name past the end of the file")
		}
		name := buf[h.backingOff : h.backingOff+uint64(h.backingLen)]
		if bytes.IndexByte(name, 0) >= 0 {
			return nil, corruptf("backing file name contains a NUL byte")
		}
		h.backingFile = string(name)
	}

	// L1 table.
	need := l1Needed(h.size, h.clusterBits)
	if uint64(h.l1Size) < need {
		return nil, corruptf("L1 table has %d entries, virtual size %d needs %d", h.l1Size, h.size, need)
	}
	if uint64(h.l1Size)*8 > maxL1Bytes {
		return nil, corruptf("L1 table of %d entries too large", h.l1Size)
	}
	if h.l1Size > 0 {
		if h.l1Off == 0 || h.l1Off%cs != 0 {
			return nil, corruptf("L1 table offset %#x not cluster aligned", h.l1Off)
		}
		if !inFile(h.l1Off, uint64(h.l1Size)*8, fileSize) {
			return nil, corruptf("L1 table at %#x+%d outside the file (%d bytes)", h.l1Off, uint64(h.l1Size)*8, fileSize)
		}
	}

	// Refcount table.
	if h.rtClusters == 0 {
		return nil, corruptf("refcount table has no clusters")
	}
	if uint64(h.rtClusters)*cs > maxRefTableBytes {
		return nil, corruptf("refcount table of %d clusters too large", h.rtClusters)
	}
	if h.rtOff == 0 || h.rtOff%cs != 0 {
		return nil, corruptf("refcount table offset %#x not cluster aligned", h.rtOff)
	}
	if !inFile(h.rtOff, uint64(h.rtClusters)*cs, fileSize) {
		return nil, corruptf("refcount table at %#x outside the file (%d bytes)", h.rtOff, fileSize)
	}

	// Internal snapshots: only the table's location is checked; rayvmm
	// reads the active L1 table and refuses to write such images.
	if h.nbSnapshots > maxSnapshots {
		return nil, corruptf("%d internal snapshots (more than %d)", h.nbSnapshots, maxSnapshots)
	}
	if h.nbSnapshots > 0 && (h.snapshotsOff%8 != 0 || h.snapshotsOff == 0 || !inFile(h.snapshotsOff, 1, fileSize)) {
		return nil, corruptf("snapshot table offset %#x invalid", h.snapshotsOff)
	}
	return h, nil
}

func (h *header) parseExtensions(buf []byte, limit uint64) error {
	limit = min(limit, uint64(len(buf)))
	off := uint64(h.headerLen)
	be := binary.BigEndian
	for off+8 <= limit {
		typ := be.Uint32(buf[off:])
		n := uint64(be.Uint32(buf[off+4:]))
		off += 8
		if typ == extEnd {
			return nil
		}
		if n > limit-off {
			return corruptf("header extension %#x of %d bytes runs past %#x", typ, n, limit)
		}
		data := buf[off : off+n]
		switch typ {
		case extBackingFmt:
			if n > maxBackingFmtLen {
				return corruptf("backing format extension of %d bytes too long", n)
			}
			h.backingFormat = string(bytes.TrimRight(data, "\x00"))
		case extFeatureTable:
			h.features = map[[2]uint8]string{}
			for i := uint64(0); i+48 <= n; i += 48 {
				e := data[i : i+48]
				name := string(bytes.TrimRight(e[2:], "\x00"))
				h.features[[2]uint8{e[0], e[1]}] = name
			}
		case extDataFile:
			// Only meaningful with the incompatible bit, checked later.
		}
		off += (n + 7) &^ 7
	}
	return nil
}

// featureNames names the set bits of a feature word of kind typ (0
// incompatible, 1 compatible, 2 autoclear) from the image's feature table.
func (h *header) featureNames(typ uint8, bits uint64) string {
	var names []string
	for b := uint8(0); b < 64; b++ {
		if bits&(1<<b) == 0 {
			continue
		}
		if n, ok := h.features[[2]uint8{typ, b}]; ok && n != "" {
			names = append(names, fmt.Sprintf("%q (bit %d)", n, b))
		} else {
			names = append(names, fmt.Sprintf("bit %d", b))
		}
	}
	return strings.Join(names, ", ")
}

// encodeHeader builds the first bytes of a new v3 image: header,
// extensions (the feature name table if features) and backing file name.
// It sets h.backingOff/backingLen.
func encodeHeader(h *header, features bool) []byte {
	be := binary.BigEndian
	buf := make([]byte, createHeaderLen)
	ext := func(typ uint32, data []byte) {
		var hd [8]byte
		be.PutUint32(hd[0:], typ)
		be.PutUint32(hd[4:], uint32(len(data)))
		buf = append(buf, hd[:]...)
		buf = append(buf, data...)
		for len(buf)%8 != 0 {
			buf = append(buf, 0)
		}
	}
	if h.backingFormat != "" {
		ext(extBackingFmt, []byte(h.backingFormat))
	}
	if features {
		ext(extFeatureTable, featureTable())
	}
	ext(extEnd, nil)
	if h.backingFile != "" {
		h.backingOff = uint64(len(buf))
		h.backingLen = uint32(len(h.backingFile))
		buf = append(buf, h.backingFile...)
	}
	be.PutUint32(buf[0:], magic)
	be.PutUint32(buf[4:], 3)
	be.PutUint64(buf[8:], h.backingOff)
	be.PutUint32(buf[16:], h.backingLen)
	be.PutUint32(buf[20:], h.clusterBits)
	be.PutUint64(buf[24:], h.size)
	be.PutUint32(buf[32:], 0)
	be.PutUint32(buf[36:], h.l1Size)
	be.PutUint64(buf[40:], h.l1Off)
	be.PutUint64(buf[48:], h.rtOff)
	be.PutUint32(buf[56:], h.rtClusters)
	be.PutUint32(buf[60:], 0)
	be.PutUint64(buf[64:], 0)
	be.PutUint64(buf[72:], 0)
	be.PutUint64(buf[80:], 0)
	be.PutUint64(buf[88:], 0)
	be.PutUint32(buf[96:], 4)
	be.PutUint32(buf[100:], createHeaderLen)
	return buf
}

// featureTable is the feature name table qemu-img writes, so tools can
// name the bits of images rayvmm created.
func featureTable() []byte {
	feats := []struct {
		typ, bit uint8
		name     string
	}{
		{0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
		{0, 3, "compression type"}, {0, 4, "extended L2 entries"},
		{1, 0, "lazy refcounts"}, {2, 0, "bitmaps"}, {2, 1, "raw external data"},
	}
	out := make([]byte, 0, 48*len(feats))
	for _, f := range feats {
		e := make([]byte, 48)
		e[0], e[1] = f.typ, f.bit
		copy(e[2:], f.name)
		out = append(out, e...)
	}
	return out
}
