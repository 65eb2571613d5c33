package qcow2

import (
	"bytes"
	"compress/flate"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
)

// Compression types (the header's compression_type byte, qcow2.txt).
const (
	compressionZlib = 0
	compressionZstd = 1
)

// compressionName names a compression type for messages.
func compressionName(t uint8) string {
	switch t {
	case compressionZlib:
		return "zlib"
	case compressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("type %d", t)
}

// zstdMaxWindow is the largest window a zstd frame may declare: libzstd's
// default limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT, 2^27), which qemu decodes
// with. Decoding allocates no window (the output cluster is the history),
// so a frame declaring a big one costs nothing; one beyond libzstd's limit
// is refused as qemu refuses it.
const zstdMaxWindow = 1 << 27

// readCompressed reads and decompresses the compressed cluster an L2
// entry describes. What the image claims (offset, length, content) is
// untrusted: the data must lie in the file, and a stream that is garbage,
// ends early or would decode to more than one cluster is ErrCorrupt,
// however it is built. No more than one cluster (plus one zstd block) is
// ever allocated for the output.
func (im *Image) readCompressed(e uint64) ([]byte, error) {
	x := 62 - (im.h.clusterBits - 8)
	host := e & (uint64(1)<<x - 1)
	sectors := (e>>x)&(uint64(1)<<(im.h.clusterBits-8)-1) + 1
	n := sectors*512 - host%512
	if !inFile(host, 1, im.fileSize) {
		return nil, corruptf("compressed cluster at %#x outside the file", host)
	}
	n = min(n, uint64(im.fileSize)-host)
	buf := make([]byte, n)
	if _, err := im.f.ReadAt(buf, int64(host)); err != nil && err != io.EOF {
		return nil, fmt.Errorf("read compressed cluster: %w", err)
	}
	out := make([]byte, im.cs)
	var err error
	switch im.h.compressionType {
	case compressionZlib:
		err = inflate(out, buf)
	case compressionZstd:
		err = im.unzstd(out, buf)
	default: // parseHeader refuses other types
		err = unsupportedf("compression %s", compressionName(im.h.compressionType))
	}
	if err != nil {
		return nil, fmt.Errorf("%s-compressed cluster at %#x: %w", compressionName(im.h.compressionType), host, err)
	}
	return out, nil
}

// inflate decompresses raw deflate data (qemu's zlib type writes no zlib
// header) into all of dst. Bytes after the stream are ignored: they are
// padding or the next compressed cluster.
func inflate(dst, src []byte) error {
	zr := flate.NewReader(bytes.NewReader(src))
	defer zr.Close()
	if _, err := io.ReadFull(zr, dst); err != nil {
		return corruptf("deflate: %v", err)
	}
	return nil
}

// zstdDecoder returns the image's zstd decoder, made on first use: an
// image that has no zstd cluster, or is never read where it has one,
// never pays for it (the decoder's tables and block buffers are a few
// hundred KiB).
func (im *Image) zstdDecoder() (*zstd.Decoder, error) {
	im.zstdOnce.Do(func() {
		im.zstd, im.zstdErr = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderLowmem(true),
			zstd.WithDecodeAllCapLimit(true),
			zstd.WithDecoderMaxWindow(zstdMaxWindow))
		if im.zstdErr != nil {
			im.zstdErr = fmt.Errorf("zstd decoder: %w", im.zstdErr)
		}
	})
	return im.zstd, im.zstdErr
}

// unzstd decompresses qemu's zstd cluster data into all of dst, as qemu's
// qcow2_zstd_decompress does: the data is one or more zstd frames,
// decoded until the cluster is full; a frame that would go past the end
// of the cluster is an error; what follows the frame that fills the
// cluster (padding, or the start of the next compressed cluster, which
// qemu packs at byte granularity) is not looked at. Every frame is
// decoded into the rest of dst with the decoder limited to that space.
func (im *Image) unzstd(dst, src []byte) error {
	dec, err := im.zstdDecoder()
	if err != nil {
		return err
	}
	out := dst[:0]
	for len(out) < len(dst) {
		n, skippable, err := zstdFrameLen(src)
		if err != nil {
			return corruptf("zstd: after %d of %d bytes: %v", len(out), len(dst), err)
		}
		if !skippable {
			got, err := dec.DecodeAll(src[:n], out)
			if err != nil {
				return corruptf("zstd: after %d of %d bytes: %v", len(out), len(dst), err)
			}
			if len(got) > len(dst) { // the cap limit makes this unreachable
				return corruptf("zstd: frame decodes past the end of the cluster")
			}
			if len(got) > 0 && &got[0] != &dst[0] {
				copy(dst, got)
			}
			out = dst[:len(got)]
		}
		src = src[n:]
	}
	return nil
}

// errZstdShort is a frame that runs past the compressed data.
var errZstdShort = errors.New("frame runs past the end of the compressed data")

// zstdFrameLen returns the length of the zstd frame at the start of src
// (RFC 8878 section 3.1), and whether it is a skippable frame, by walking
// its header and block headers without decoding anything. The decoder is
// then handed exactly one frame: it would otherwise go on into the bytes
// after it.
func zstdFrameLen(src []byte) (n int, skippable bool, err error) {
	if len(src) == 0 {
		return 0, false, errors.New("compressed data ends before the cluster is full")
	}
	var h zstd.Header
	rest, err := h.DecodeAndStrip(src)
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, false, errZstdShort
		}
		return 0, false, err
	}
	n = h.HeaderSize
	if h.Skippable {
		if uint64(h.SkippableSize) > uint64(len(rest)) {
			return 0, false, errZstdShort
		}
		return n + int(h.SkippableSize), true, nil
	}
	for {
		if len(rest) < 3 {
			return 0, false, errZstdShort
		}
		bh := uint32(rest[0]) | uint32(rest[1])<<8 | uint32(rest[2])<<16
		last, typ, size := bh&1 != 0, (bh>>1)&3, int(bh>>3)
		switch typ {
		case 1: // RLE: one byte repeated size times
			size = 1
		case 3:
			return 0, false, errors.New("reserved block type")
		}
		if size > len(rest)-3 {
			return 0, false, errZstdShort
		}
		n += 3 + size
		rest = rest[3+size:]
		if last {
			break
		}
	}
	if h.HasCheckSum {
		if len(rest) < 4 {
			return 0, false, errZstdShort
		}
		n += 4
	}
	return n, false, nil
}
