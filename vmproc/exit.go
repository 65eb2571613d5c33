package vmproc

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"
)

// ExitRecord is what a detached VM process writes as it exits: its exit
// status and the one line saying why (what rayvmm boot prints). Only a
// process killed by a signal it cannot catch (SIGKILL) leaves none: its
// parent alone learns that status, and a parent that died before it (a
// daemon killed with kill -9) cannot pass it on.
type ExitRecord struct {
	Code    int       `json:"code"`
	Message string    `json:"message,omitempty"`
	Time    time.Time `json:"time"`
}

// maxExitRecord bounds what ReadExitRecord reads.
const maxExitRecord = 64 << 10

// WriteExitRecord writes r to f (the handed-over exit record file) from
// its start, and syncs it.
func WriteExitRecord(f *os.File, r ExitRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if len(b) > maxExitRecord {
		r.Message = r.Message[:maxExitRecord/2]
		if b, err = json.Marshal(r); err != nil {
			return err
		}
	}
	if err := f.Truncate(0); err != nil {
		return fmt.Errorf("exit record: %w", err)
	}
	if _, err := f.WriteAt(append(b, '\n'), 0); err != nil {
		return fmt.Errorf("exit record: %w", err)
	}
	return f.Sync()
}

// ErrNoExitRecord means the VM process wrote no exit record (it was
// killed by SIGKILL, or never started).
var ErrNoExitRecord = errors.New("no exit record")

// ReadExitRecord reads the exit record at path.
func ReadExitRecord(path string) (*ExitRecord, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, maxExitRecord+1)
	n, _ := f.Read(b)
	if n == 0 {
		return nil, ErrNoExitRecord
	}
	if n > maxExitRecord {
		return nil, fmt.Errorf("exit record %s: larger than %d bytes", path, maxExitRecord)
	}
	var r ExitRecord
	if err := json.Unmarshal(b[:n], &r); err != nil {
		return nil, fmt.Errorf("exit record %s: %w", path, err)
	}
	if r.Code < 0 || r.Code > 255 {
		return nil, fmt.Errorf("exit record %s: status %d out of range", path, r.Code)
	}
	return &r, nil
}
