package launch

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// MemSample is one reading of /proc/PID/smaps, in KiB.
type MemSample struct {
	// GuestFound: a mapping exactly the size of guest memory was found;
	// GuestRSS is how much of it is resident, i.e. the guest memory the
	// VMM and the guest have touched. Guest RAM is one mapping in all three
	// VMMs (rayvmm and QEMU: private anonymous, gokvm: shared anonymous).
	GuestFound bool  `json:"guest_found"`
	GuestRSS   int64 `json:"guest_rss_kib"`
	// The rest of the resident set, split as smaps splits it: file-backed
	// (executable, libraries; shared with other processes through the page
	// cache) and anonymous (heap, stacks, runtime; private to the process).
	OtherFileRSS int64 `json:"other_file_rss_kib"`
	OtherAnonRSS int64 `json:"other_anon_rss_kib"`
	TotalRSS     int64 `json:"total_rss_kib"`
	// HWMKiB is the sampled process's VmHWM (peak RSS of its own address
	// space; unlike wait4's ru_maxrss it does not start from the parent's
	// peak when a vfork-style child execs).
	HWMKiB int64 `json:"vm_hwm_kib"`
	// ControlHWMKiB is the started process's VmHWM when a child of it was
	// sampled (Request.SampleChild).
	ControlHWMKiB int64 `json:"control_hwm_kib,omitempty"`
}

func ReadSmaps(pid int, guestKiB int64) (*MemSample, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseSmaps(f, guestKiB)
}

// parseSmaps sums a smaps file: the guest RAM mapping (the first mapping of
// exactly guestKiB) apart from file-backed and anonymous others.
func parseSmaps(r io.Reader, guestKiB int64) (*MemSample, error) {
	m := &MemSample{}
	type vma struct {
		file      bool
		size, rss int64
	}
	var cur *vma
	flush := func() {
		if cur == nil {
			return
		}
		m.TotalRSS += cur.rss
		switch {
		case !m.GuestFound && cur.size == guestKiB:
			m.GuestFound, m.GuestRSS = true, cur.rss
		case cur.file:
			m.OtherFileRSS += cur.rss
		default:
			m.OtherAnonRSS += cur.rss
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if isVMAHeader(fields[0]) {
			flush()
			cur = &vma{}
			// The path is the sixth field; anonymous mappings and the
			// kernel's [heap], [stack], ... have none or a bracketed one.
			// gokvm's MAP_SHARED guest RAM shows as /dev/zero (deleted),
			// which is memory, not a file.
			if len(fields) >= 6 && strings.HasPrefix(fields[5], "/") && fields[5] != "/dev/zero" && !strings.HasPrefix(fields[5], "/memfd:") {
				cur.file = true
			}
			continue
		}
		if cur == nil || len(fields) < 2 {
			continue
		}
		switch fields[0] {
		case "Size:", "Rss:":
			v, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("smaps: %q: %w", line, err)
			}
			if fields[0] == "Size:" {
				cur.size = v
			} else {
				cur.rss = v
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("smaps: %w", err)
	}
	flush()
	return m, nil
}

// isVMAHeader reports whether a smaps field is an address range
// "start-end" in hex, which starts a mapping's block.
func isVMAHeader(s string) bool {
	i := strings.IndexByte(s, '-')
	if i <= 0 || i == len(s)-1 {
		return false
	}
	for _, c := range s[:i] + s[i+1:] {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}
