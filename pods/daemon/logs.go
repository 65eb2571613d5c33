package daemon

import (
	"fmt"
	"io"
	"os"
	"time"
)

// A guest writes its console as fast as it likes, and the guest is
// hostile: its log must not fill the host's disk. Each VM's log is kept
// under MaxLogSize as the kubelet keeps container logs under
// containerLogMaxSize: when it grows past the limit, what it holds is
// copied to <vm>.log.1 (its newest MaxLogSize bytes, replacing the one
// before) and the log is cut to nothing. The VM process writes with O_APPEND, so its next write lands
// at the new end. Output written between the copy and the cut is lost,
// as with logrotate's copytruncate.

// MaxLogSize bounds a VM's console log (Kubernetes' default
// containerLogMaxSize).
const MaxLogSize = 10 << 20

// logCheckEvery is how often the daemon looks at the logs' sizes.
const logCheckEvery = 5 * time.Second

// rotateLog cuts the log at path if it is larger than max, keeping its
// content in path.1.
func rotateLog(path string, max int64) (bool, error) {
	st, err := os.Stat(path)
	if err != nil || st.Size() <= max {
		return false, nil
	}
	src, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer src.Close()
	// Keep the newest max bytes.
	if _, err := src.Seek(st.Size()-max, io.SeekStart); err != nil {
		return false, err
	}
	dst, err := os.OpenFile(path+".1", os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return false, err
	}
	_, cerr := io.Copy(dst, io.LimitReader(src, max))
	if err := dst.Close(); cerr == nil {
		cerr = err
	}
	if cerr != nil {
		return false, fmt.Errorf("rotate %s: %w", path, cerr)
	}
	if err := os.Truncate(path, 0); err != nil {
		return false, fmt.Errorf("rotate %s: %w", path, err)
	}
	return true, nil
}

// watchLogs rotates the running VMs' logs until the daemon stops.
func (d *Daemon) watchLogs() {
	defer d.wg.Done()
	t := time.NewTicker(logCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		var paths []string
		d.mu.Lock()
		for _, p := range d.pods {
			for _, v := range p.vms {
				if v.cur != nil {
					paths = append(paths, d.logPath(p.name(), v.spec.Name))
				}
			}
		}
		d.mu.Unlock()
		for _, path := range paths {
			if _, err := rotateLog(path, MaxLogSize); err != nil {
				d.log.Warn("VM log", "err", err)
			}
		}
	}
}
