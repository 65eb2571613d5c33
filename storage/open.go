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
		return newProbeGuard(d), nil
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

// ImageFile is one open file of a disk image's backing chain (see Files).
type ImageFile = qcow2.ChainFile

// Files lists the open files behind a disk OpenDisk returned, top image
// first, and whether it is a raw image whose format was detected rather
// than given: what a control plane hands to a VM process, which rebuilds
// the disk with FromFiles. The disk still owns the files; once the other
// process has them, Release the disk here.
func Files(d Disk) (files []ImageFile, probed bool, err error) {
	switch d := d.(type) {
	case *probeGuard:
		files, _, err = Files(d.Disk)
		return files, true, err
	case *raw.File:
		return []ImageFile{{File: d.File(), Format: "raw", Path: d.File().Name()}}, false, nil
	case *qcow2.Image:
		return d.Files(), false, nil
	}
	return nil, false, fmt.Errorf("disk %T has no files to hand over", d)
}

// FromFiles opens a disk from the files Files listed (in this process or,
// with the descriptors passed, in another one): raw, or qcow2 with its
// backing chain checked against the files. It opens nothing by path and
// takes ownership of the files; on error it closes them.
func FromFiles(files []ImageFile, readOnly, probed bool) (Disk, error) {
	if len(files) == 0 {
		return nil, fmt.Errorf("open disk from files: no files")
	}
	switch files[0].Format {
	case "raw":
		if len(files) != 1 {
			for _, f := range files {
				f.File.Close()
			}
			return nil, fmt.Errorf("open raw disk %s: %d files handed over, want 1", files[0].Path, len(files))
		}
		d, err := raw.FromFile(files[0].File, readOnly)
		if err != nil {
			files[0].File.Close()
			return nil, fmt.Errorf("open raw disk %s: %w", files[0].Path, err)
		}
		if probed && !readOnly {
			return newProbeGuard(d), nil
		}
		return d, nil
	case "qcow2":
		return qcow2.OpenFiles(files, qcow2.Options{ReadOnly: readOnly})
	}
	for _, f := range files {
		f.File.Close()
	}
	return nil, fmt.Errorf("open disk %s: unknown format %q (want raw or qcow2)", files[0].Path, files[0].Format)
}

// Release closes a disk's descriptors without flushing, truncating or
// writing anything: for a disk whose files were handed to another process,
// which now owns the image.
func Release(d Disk) error {
	switch d := d.(type) {
	case *probeGuard:
		return Release(d.Disk)
	case *raw.File:
		return d.Release()
	case *qcow2.Image:
		return d.Release()
	}
	return fmt.Errorf("disk %T cannot be released", d)
}
