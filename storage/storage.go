// Package storage holds the disk backends that sit behind virtio-blk: raw
// files, qcow2 images, volumes and their snapshots, and I/O throttling.
//
// A Disk is a small interface; optional capabilities (discard, write zeroes)
// are further small interfaces that a device discovers by type assertion.
package storage

import "io"

// Disk is a block device backend addressed in bytes.
type Disk interface {
	io.ReaderAt
	io.WriterAt
	// Flush makes every completed write durable.
	Flush() error
	// Size is the virtual size in bytes.
	Size() int64
	Close() error
}

// Discarder is a Disk that can deallocate a byte range; reads of a
// discarded range return zeroes.
type Discarder interface {
	Discard(off, n int64) error
}

// ZeroWriter is a Disk that can zero a byte range without a data buffer;
// unmap allows it to deallocate the range.
type ZeroWriter interface {
	WriteZeroes(off, n int64, unmap bool) error
}
