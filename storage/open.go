package storage

import (
	"fmt"

	"github.com/rayvmm/rayvmm/storage/qcow2"
	"github.com/rayvmm/rayvmm/storage/raw"
)

// Formats are the disk image formats OpenDisk and CreateDisk understand.
var Formats = []string{"raw", "qcow2"}

var (
	_ Disk       = (*raw.File)(nil)
	_ Discarder  = (*raw.File)(nil)
	_ ZeroWriter = (*raw.File)(nil)
	_ Disk       = (*qcow2.Image)(nil)
	_ Discarder  = (*qcow2.Image)(nil)
	_ ZeroWriter = (*qcow2.Image)(nil)
)

// DetectFormat returns "qcow2" if the file at path is a qcow2 image, else
// "raw".
func DetectFormat(path string) (string, error) { return qcow2.DetectFormat(path) }

// OpenDisk opens a disk image. format is "raw", "qcow2", or "" to detect
// it from the file's first bytes. A qcow2 image's backing chain is opened
// read-only.
//
// A raw image whose format was detected, not given, refuses writes that
// would make it detect as qcow2 next time (see probeGuard).
func OpenDisk(path, format string, readOnly bool) (Disk, error) {
	probed := false
	if format == "" {
		var err error
		if format, err = DetectFormat(path); err != nil {
			return nil, fmt.Errorf("open disk: %w", err)
		}
		probed = true
	}
	switch format {
	case "raw":
		d, err := raw.Open(path, readOnly)
		if err != nil || !probed || readOnly {
			return d, err
		}
		return probeGuard{d}, nil
	case "qcow2":
		return qcow2.Open(path, qcow2.Options{ReadOnly: readOnly})
	}
	return nil, fmt.Errorf("open disk %s: unknown format %q (want raw or qcow2)", path, format)
}

// CreateDisk creates a new, empty image of size bytes in format ("raw" or
// "qcow2") at path, which must not exist.
func CreateDisk(path, format string, size int64) (Disk, error) {
	switch format {
	case "raw":
		return raw.Create(path, size)
	case "qcow2":
		return qcow2.Create(path, size, qcow2.CreateOptions{})
	}
	return nil, fmt.Errorf("create disk %s: unknown format %q (want raw or qcow2)", path, format)
}
