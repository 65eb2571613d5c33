package nbd

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/internal/testenv"
	"github.com/rayvmm/rayvmm/storage/raw"
)

// memBackend is an in-memory export for tests of the protocol itself.
type memBackend struct {
	mu      sync.Mutex
	b       []byte
	flushes int
}

func (m *memBackend) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}

func (m *memBackend) WriteAt(_ context.Context, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}

func (m *memBackend) Flush(context.Context) error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

func (m *memBackend) Size() int64 { return int64(len(m.b)) }

// rawExport creates a sparse raw file of size bytes and an export on it.
func rawExport(t testing.TB, name string, size int64) (*Export, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), strings.ReplaceAll(name, "/", "_")+".raw")
	f, err := raw.Create(p, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &Export{Name: name, Description: "test export " + name, Backend: f}, p
}

// startServer serves exports on a 127.0.0.1 port and returns the address.
func startServer(t testing.TB, exports Exports) (*Server, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Exports: exports}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, l.Addr().String()
}

func dial(t testing.TB, addr, export string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, export)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// runTool runs a host tool and returns its combined output.
func runTool(t testing.TB, name string, args ...string) string {
	t.Helper()
	testenv.RequireTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// QemuNBD starts qemu-nbd serving file as export on a free 127.0.0.1
// port; --fork returns once it listens, so its exit is the readiness
// signal. It is killed when the test ends.
func QemuNBD(t testing.TB, file, export string) string {
	t.Helper()
	testenv.RequireTool(t, "qemu-nbd")
	pidFile := filepath.Join(t.TempDir(), "qemu-nbd.pid")
	for attempt := 0; ; attempt++ {
		port := freePort(t)
		out, err := exec.Command("qemu-nbd", "--fork", "--persistent", "--shared=8", "--pid-file", pidFile,
			"-f", "raw", "-x", export, "-b", "127.0.0.1", "-p", strconv.Itoa(port), file).CombinedOutput()
		if err != nil {
			if strings.Contains(string(out), "in use") && attempt < 5 {
				continue // another test took the port between probe and bind
			}
			t.Fatalf("qemu-nbd: %v\n%s", err, out)
		}
		b, err := os.ReadFile(pidFile)
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		t.Cleanup(func() { killWait(pid) })
		return fmt.Sprintf("127.0.0.1:%d", port)
	}
}

// killWait ends a process that is not our child (qemu-nbd --fork) and
// waits for it through a pidfd.
func killWait(pid int) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // already gone
	}
	defer unix.Close(fd)
	unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0)
	unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 10000)
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
