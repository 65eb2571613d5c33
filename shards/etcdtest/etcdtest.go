// Package etcdtest runs Debian's etcd (etcd-server 3.4) as a real,
// external single-member cluster for tests: a temporary data directory,
// client and peer URLs on free 127.0.0.1 ports, ready once /health says
// so; it can be stopped and started again on the same ports and data.
package etcdtest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// Etcd is one etcd process.
type Etcd struct {
	Endpoint string // http://127.0.0.1:PORT
	t        testing.TB
	dir      string
	client   string
	peer     string
	cmd      *exec.Cmd
	exited   chan struct{}
	log      *os.File
}

// Start runs etcd for the test; it is stopped when the test ends.
func Start(t testing.TB) *Etcd {
	t.Helper()
	testenv.RequireTool(t, "etcd")
	e := &Etcd{t: t, dir: t.TempDir()}
	for attempt := 0; ; attempt++ {
		e.client, e.peer = freeAddr(t), freeAddr(t)
		e.Endpoint = "http://" + e.client
		err := e.start()
		if err == nil {
			break
		}
		if attempt == 4 {
			t.Fatal(err)
		}
	}
	t.Cleanup(e.Stop)
	return e
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Restart starts a stopped etcd again on the same ports and data.
func (e *Etcd) Restart() {
	e.t.Helper()
	if err := e.start(); err != nil {
		e.t.Fatal(err)
	}
}

func (e *Etcd) start() error {
	log, err := os.OpenFile(e.dir+"/etcd.log", os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	e.log = log
	e.cmd = exec.Command("etcd", "--name", "default", "--data-dir", e.dir+"/data",
		"--listen-client-urls", "http://"+e.client, "--advertise-client-urls", "http://"+e.client,
		"--listen-peer-urls", "http://"+e.peer, "--initial-advertise-peer-urls", "http://"+e.peer,
		"--initial-cluster", "default=http://"+e.peer, "--log-level", "warn")
	e.cmd.Stdout, e.cmd.Stderr = log, log
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := e.cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("start etcd: %w", err)
	}
	e.exited = make(chan struct{})
	go func() { e.cmd.Wait(); close(e.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-e.exited:
			b, _ := os.ReadFile(e.dir + "/etcd.log")
			return fmt.Errorf("etcd exited before it was healthy:\n%s", b)
		default:
		}
		if e.healthy() {
			return nil
		}
		time.Sleep(20 * time.Millisecond) // polling /health, etcd's readiness signal
	}
	e.Stop()
	return fmt.Errorf("etcd at %s not healthy after 30 s", e.client)
}

func (e *Etcd) healthy() bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", e.Endpoint+"/health", nil)
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode == 200 && strings.Contains(string(b), `"true"`)
}

// Stop ends etcd (SIGTERM) and waits for it.
func (e *Etcd) Stop() {
	if e.cmd == nil {
		return
	}
	e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.exited:
	case <-time.After(10 * time.Second):
		e.cmd.Process.Kill()
		<-e.exited
	}
	e.cmd = nil
	e.log.Close()
}
