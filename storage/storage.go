// Package storage holds the disk backends that sit behind virtio-blk: raw
// files, qcow2 images, volumes and their snapshots, and I/O throttling.
//
// A Disk is a small interface; optional capabilities (discard, write zeroes)
// are further small interfaces that a device discovers by type assertion.
package storage

import "context"

// Disk is a block device backend addressed in bytes.
//
// Its methods may be called from many goroutines at once: the virtio-blk
// device keeps many requests in flight. A backend keeps its own metadata
// consistent under that (qcow2 serializes its table updates); two
// requests for the same bytes in flight at once may complete in either
// order, as on any disk.
//
// ctx bounds how long a request keeps its caller: when ctx ends (the
// guest reset the device, the VM is stopping), a backend that waits on
// something that may hang — an NBD replica on another machine — returns
// ctx's error at once and does not touch p after returning. Local files
// ignore ctx: a pread, pwrite or fdatasync cannot be interrupted, and
// their time is bounded by the local disk.
type Disk interface {
	// ReadAt reads len(p) bytes at off.
	ReadAt(ctx context.Context, p []byte, off int64) (n int, err error)
	// WriteAt writes len(p) bytes at off.
	WriteAt(ctx context.Context, p []byte, off int64) (n int, err error)
	// Flush makes every write that completed before it was called
	// durable.
	Flush(ctx context.Context) error
	// Size is the virtual size in bytes.
	Size() int64
	Close() error
}

// Discarder is a Disk that can deallocate a byte range; reads of a
// discarded range return zeroes.
type Discarder interface {
	Discard(ctx context.Context, off, n int64) error
}

// ZeroWriter is a Disk that can zero a byte range without a data buffer;
// unmap allows it to deallocate the range.
type ZeroWriter interface {
	WriteZeroes(ctx context.Context, off, n int64, unmap bool) error
}
