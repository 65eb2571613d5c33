package launch

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// fileID is what identifies an open file: its device and inode.
type fileID struct{ dev, ino uint64 }

// identify returns the identities of files (the child's ends of its output
// pipes or its terminal), taken before the launcher closes its copies.
func identify(files []*os.File) map[fileID]bool {
	ids := map[fileID]bool{}
	for _, f := range files {
		var st syscall.Stat_t
		if syscall.Fstat(int(f.Fd()), &st) == nil {
			ids[fileID{st.Dev, st.Ino}] = true
		}
	}
	return ids
}

// holders lists the processes, other than this one, with a descriptor on
// one of the files ids names, from /proc/PID/fd.
func holders(ids map[fileID]bool) []int {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil || pid == os.Getpid() {
			continue
		}
		fds, _ := os.ReadDir(filepath.Join(p, "fd"))
		for _, fd := range fds {
			var st syscall.Stat_t
			if syscall.Stat(filepath.Join(p, "fd", fd.Name()), &st) == nil && ids[fileID{st.Dev, st.Ino}] {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// describe names processes for a message: "sleep (pid 12), sh (pid 13)".
func describe(pids []int) string {
	var out []string
	for _, pid := range pids {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		out = append(out, fmt.Sprintf("%s (pid %d)", strings.TrimSpace(string(comm)), pid))
	}
	return strings.Join(out, ", ")
}
