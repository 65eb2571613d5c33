package tests

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// virtio-vsock end to end: rayvmm boots rayguest with --vsock, and the
// tests talk to the guest the way Firecracker's hybrid vsock users do:
// socat and Go clients on the Unix socket, listeners on <uds>_<port>.

// vsockVM is a running rayvmm boot with a vsock device.
type vsockVM struct {
	*proc
	uds string
}

// startVsock boots rayguest with --vsock cid=3,uds=uds and cmdline, and
// waits for want (a readiness line) if it is not empty.
func startVsock(t *testing.T, uds, cmdline, want string, extra ...string) *vsockVM {
	t.Helper()
	requireKVM(t)
	args := append([]string{"boot", "--vsock", "cid=3,uds=" + uds, "--cmdline", cmdline}, extra...)
	vm := &vsockVM{proc: startProc(t, exec.Command(rayvmm, args...)), uds: uds}
	if want != "" {
		vm.out.waitFor(t, want, guestWait)
	}
	return vm
}

// wait waits for the VM to end by itself (its guest job done) and returns
// rayvmm's exit status.
func (vm *vsockVM) wait(t *testing.T) int {
	t.Helper()
	vm.exited(t, "the guest's job", guestWait)
	return vm.cmd.ProcessState.ExitCode()
}

// stop ends the VM the way a user does (SIGTERM) and checks it exits 0.
func (vm *vsockVM) stop(t *testing.T) {
	t.Helper()
	vm.cmd.Process.Signal(syscall.SIGTERM)
	if err := vm.exited(t, "SIGTERM", guestWait); err != nil {
		t.Fatalf("rayvmm after SIGTERM: %v\n%s", err, vm.out.String())
	}
}

const echoReady = "rayguest: vsock cid 3 listening on port 52"

// dialGuest connects to a guest port through the hybrid socket and
// returns the connection after the OK line, and that line.
func dialGuest(t testing.TB, uds string, port int) (*net.UnixConn, string) {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: uds, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		t.Fatal(err)
	}
	line, err := readLineFrom(c, guestWait)
	if err != nil {
		t.Fatalf("CONNECT %d: %v", port, err)
	}
	if !strings.HasPrefix(line, "OK ") {
		t.Fatalf("CONNECT %d: got %q", port, line)
	}
	return c, line
}

// readLineFrom reads one line a byte at a time (nothing after it is
// consumed).
func readLineFrom(c net.Conn, limit time.Duration) (string, error) {
	c.SetReadDeadline(time.Now().Add(limit))
	defer c.SetReadDeadline(time.Time{})
	var b []byte
	one := make([]byte, 1)
	for {
		if _, err := c.Read(one); err != nil {
			return string(b), err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
}

// echoRoundTrip writes data on c while reading as much back, and returns
// what came back.
func echoRoundTrip(c net.Conn, data []byte) ([]byte, error) {
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		werr <- err
	}()
	c.SetReadDeadline(time.Now().Add(guestWait))
	defer c.SetReadDeadline(time.Time{})
	got := make([]byte, len(data))
	_, rerr := io.ReadFull(c, got)
	return got, errors.Join(<-werr, rerr)
}

// waitEOF waits for the peer to close c (EOF or reset) and returns what
// it read before.
func waitEOF(c net.Conn, limit time.Duration) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(limit))
	b, err := io.ReadAll(c)
	if errors.Is(err, syscall.ECONNRESET) {
		err = nil
	}
	return b, err
}

// TestVsockSocat: socat as the client, as Firecracker's docs show.
func TestVsockSocat(t *testing.T) {
	socat := requireTool(t, "socat")
	uds := filepath.Join(t.TempDir(), "v.sock")
	vm := startVsock(t, uds, "rayguest.run=vsock-echo", echoReady)
	cmd := exec.Command(socat, "-", "UNIX-CONNECT:"+uds)
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := bufio.NewScanner(out)
	next := func() string {
		t.Helper()
		got := make(chan string, 1)
		go func() {
			if lines.Scan() {
				got <- lines.Text()
			}
			close(got)
		}()
		select {
		case l := <-got:
			return l
		case <-time.After(guestWait):
			t.Fatal("socat printed nothing")
		}
		return ""
	}
	fmt.Fprintf(in, "CONNECT 52\n")
	if l := next(); l != "OK 1073741824" {
		t.Fatalf("socat got %q, want OK 1073741824", l)
	}
	fmt.Fprintf(in, "hello from socat\n")
	if l := next(); l != "hello from socat" {
		t.Fatalf("echo: %q", l)
	}
	// socat's stdin ends: it shuts the socket for writing, the guest
	// echoes what is left and closes, and socat exits 0.
	fmt.Fprintf(in, "last line\n")
	in.Close()
	if l := next(); l != "last line" {
		t.Fatalf("echo after half-close: %q", l)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("socat: %v", err)
		}
	case <-time.After(guestWait):
		t.Fatal("socat did not exit after its input ended")
	}
	vm.stop(t)
}

// TestVsockEcho: a Go client moves 1 MiB each way, and 32 connections
// echo at once, all byte for byte.
func TestVsockEcho(t *testing.T) {
	uds := filepath.Join(t.TempDir(), "v.sock")
	metrics := filepath.Join(t.TempDir(), "m.json")
	api := filepath.Join(t.TempDir(), "api.sock")
	vm := startVsock(t, uds, "rayguest.run=vsock-echo", echoReady, "--metrics-file", metrics, "--api-socket", api)

	data := make([]byte, 1<<20)
	rand.Read(data)
	c, _ := dialGuest(t, uds, 52)
	start := time.Now()
	got, err := echoRoundTrip(c, data)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatal("1 MiB echo: SHA-256 differs")
	}
	t.Logf("1 MiB each way in %v", time.Since(start))
	// The API's /metrics has the device's counters while it runs.
	fams := scrape(t, api)
	for _, m := range []struct {
		name string
		min  float64
	}{
		{"rayvmm_vsock_rx_bytes_total", 1 << 20}, {"rayvmm_vsock_tx_bytes_total", 1 << 20},
		{"rayvmm_vsock_host_connects_established_total", 1}, {"rayvmm_vsock_connections", 1},
	} {
		if v := sample(t, fams, m.name, nil); v < m.min {
			t.Errorf("%s = %v, want at least %v", m.name, v, m.min)
		}
	}
	if v := sample(t, fams, "rayvmm_vsock_errors_total", map[string]string{"kind": "bad_header"}); v != 0 {
		t.Errorf("bad_header errors: %v", v)
	}
	c.Close()

	const n, size = 32, 32 << 10
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, _ := dialGuest(t, uds, 52)
			defer c.Close()
			msg := make([]byte, size)
			rand.Read(msg)
			back, err := echoRoundTrip(c, msg)
			if err == nil && !bytes.Equal(back, msg) {
				err = fmt.Errorf("connection %d: echo differs", i)
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	vm.stop(t)
	m := readVsockMetrics(t, metrics)
	if m["host_connects_ok"] != n+1 || m["credit_overflow"] != 0 || m["bad_header"] != 0 {
		t.Fatalf("metrics %v", m)
	}
}

func readVsockMetrics(t *testing.T, path string) map[string]uint64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Vsock struct {
			Metrics map[string]uint64 `json:"metrics"`
		} `json:"vsock"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m.Vsock.Metrics
}

// connectPattern is the 64 KiB that vsock-connect sends: word i (64-bit
// little endian) = 0x6b636f73762d7972 + i * 0x9e3779b97f4a7c15.
func connectPattern() []byte {
	b := make([]byte, 64<<10)
	v := uint64(0x6b636f73762d7972)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], v)
		v += 0x9e3779b97f4a7c15
	}
	return b
}

// echoListener listens on path (mode 0666, so that a jailed VM process
// may connect too) for one connection, echoes what comes until the peer
// closes, and then sends what came on the channel (nil if the accept
// failed).
func echoListener(t *testing.T, path string) <-chan []byte {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		var all bytes.Buffer
		io.Copy(io.MultiWriter(c, &all), c)
		got <- all.Bytes()
	}()
	return got
}

// TestVsockGuestConnect: the guest connects to the host's <uds>_1234, and
// with nothing listening there it gets RST and says so.
func TestVsockGuestConnect(t *testing.T) {
	t.Run("listener", func(t *testing.T) {
		uds := filepath.Join(t.TempDir(), "v.sock")
		got := echoListener(t, uds+"_1234")
		vm := startVsock(t, uds, "rayguest.run=vsock-connect:1234", "")
		code := vm.wait(t)
		if !strings.Contains(vm.out.String(), "rayguest: vsock ok") {
			t.Fatalf("guest output:\n%s", vm.out.String())
		}
		select {
		case b := <-got:
			if !bytes.Equal(b, connectPattern()) {
				t.Fatalf("host got %d bytes, not the 64 KiB pattern", len(b))
			}
		case <-time.After(guestWait):
			t.Fatal("the host side never saw EOF after the guest's job ended")
		}
		if code != 0 {
			t.Fatalf("exit %d\n%s", code, vm.out.String())
		}
		if _, err := os.Lstat(uds); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("socket file left after exit: %v", err)
		}
	})
	t.Run("nothing listening", func(t *testing.T) {
		uds := filepath.Join(t.TempDir(), "v.sock")
		vm := startVsock(t, uds, "rayguest.run=vsock-connect:1234", "")
		vm.wait(t)
		if !strings.Contains(vm.out.String(), "rayguest: vsock FAIL connect to port 1234: connection reset") {
			t.Fatalf("guest output:\n%s", vm.out.String())
		}
	})
}

// TestVsockHealth: the responder answers ping with pong beside another job
// (the serial echo), and stops after failafter while the rest keeps going.
func TestVsockHealth(t *testing.T) {
	ping := func(c net.Conn) (string, error) {
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return "", err
		}
		return readLineFrom(c, 5*time.Second)
	}
	t.Run("beside the serial echo job", func(t *testing.T) {
		uds := filepath.Join(t.TempDir(), "v.sock")
		requireKVM(t)
		cmd := exec.Command(rayvmm, "boot", "--vsock", "cid=3,uds="+uds, "--cmdline", "rayguest.run=echo rayguest.health=8000")
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		g := &vsockVM{proc: startProc(t, cmd), uds: uds}
		g.out.waitFor(t, "rayguest: health on port 8000", guestWait)
		c, _ := dialGuest(t, uds, 8000)
		for range 3 {
			if l, err := ping(c); err != nil || l != "pong" {
				t.Fatalf("ping: %q, %v", l, err)
			}
		}
		fmt.Fprintf(in, "still echoing\n")
		g.out.waitFor(t, "rayguest: echo still echoing", guestWait)
		fmt.Fprintf(in, "quit\n")
		if code := g.wait(t); code != 0 {
			t.Fatalf("exit %d after quit\n%s", code, g.out.String())
		}
		if _, err := waitEOF(c, guestWait); err != nil {
			t.Fatalf("health connection after poweroff: %v", err)
		}
	})
	t.Run("failafter", func(t *testing.T) {
		uds := filepath.Join(t.TempDir(), "v.sock")
		// failafter leaves room for the first ping on a loaded machine.
		vm := startVsock(t, uds, "rayguest.run=vsock-echo rayguest.health=8000 rayguest.health.failafter=8", echoReady)
		c, _ := dialGuest(t, uds, 8000)
		if l, err := ping(c); err != nil || l != "pong" {
			t.Fatalf("first ping: %q, %v", l, err)
		}
		// Ping until the guest stops answering (failafter counts from
		// "health on port"; the guest prints when it first stays silent).
		deadline := time.Now().Add(guestWait)
		for !strings.Contains(vm.out.String(), "rayguest: health failafter reached") {
			if time.Now().After(deadline) {
				t.Fatalf("health never stopped; output:\n%s", vm.out.String())
			}
			c.Write([]byte("ping\n"))
			c.SetReadDeadline(time.Now().Add(time.Second))
			c.Read(make([]byte, 64)) // a pong, or a timeout once silent
		}
		// Pongs for pings answered before the silence may still come;
		// after them, a ping gets nothing.
		for {
			c.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := c.Read(make([]byte, 64)); err != nil {
				break
			}
		}
		c.Write([]byte("ping\n"))
		if l, err := readLineFrom(c, 2*time.Second); err == nil {
			t.Fatalf("ping after failafter answered %q", l)
		}
		// The rest of the guest still runs: echo works.
		e, _ := dialGuest(t, uds, 52)
		if got, err := echoRoundTrip(e, []byte("alive")); err != nil || string(got) != "alive" {
			t.Fatalf("echo after failafter: %q, %v", got, err)
		}
		vm.stop(t)
	})
}

// TestVsockClosing: closes reach the other side both ways, the socket file
// goes with the VM, a stale one from a killed VM is reclaimed and a live
// one is refused.
func TestVsockClosing(t *testing.T) {
	dir := t.TempDir()
	uds := filepath.Join(dir, "v.sock")
	metrics := filepath.Join(dir, "m.json")
	vm := startVsock(t, uds, "rayguest.run=vsock-echo", echoReady, "--metrics-file", metrics)
	if fi, err := os.Lstat(uds); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket file: %v, %v", fi, err)
	}

	// The host closes: the guest's connection ends (it answers the
	// device's SHUTDOWN with RST, in time: no shutdown timeout below).
	c, _ := dialGuest(t, uds, 52)
	if got, err := echoRoundTrip(c, []byte("x")); err != nil || string(got) != "x" {
		t.Fatal(err)
	}
	c.Close()
	// The host half-closes: the guest echoes what is left, then closes,
	// and the host reads EOF.
	h, _ := dialGuest(t, uds, 52)
	h.Write([]byte("tail"))
	h.CloseWrite()
	if b, err := waitEOF(h, guestWait); err != nil || string(b) != "tail" {
		t.Fatalf("after half-close the host read %q, %v", b, err)
	}

	// A second VM on the same path is refused while this one lives.
	r := run(t, nil, guestWait, "boot", "--vsock", "cid=4,uds="+uds, "--cmdline", "rayguest.run=vsock-echo")
	if r.code == 0 || !strings.Contains(r.stderr, "in use") {
		t.Fatalf("second VM on a live socket: exit %d\n%s", r.code, r.stderr)
	}
	dialGuest(t, uds, 52) // the first is untouched

	// The VM exits (SIGTERM): the socket file is removed.
	vm.stop(t)
	if _, err := os.Lstat(uds); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file after exit: %v", err)
	}
	// The connections the host closed were ended by the guest, not by the
	// device's timeout (the last one was still open at exit).
	m := readVsockMetrics(t, metrics)
	if m["conns_added"] != 3 || m["conns_removed"] < 2 || m["shutdown_timeouts"] != 0 || m["request_timeouts"] != 0 {
		t.Fatalf("metrics %v", m)
	}

	// kill -9 leaves the file; the next VM reclaims it.
	killed := startVsock(t, uds, "rayguest.run=vsock-echo", echoReady)
	killed.kill()
	if _, err := os.Lstat(uds); err != nil {
		t.Fatalf("after kill -9 the socket file is gone already: %v", err)
	}
	next := startVsock(t, uds, "rayguest.run=vsock-echo", echoReady)
	e, _ := dialGuest(t, uds, 52)
	if got, err := echoRoundTrip(e, []byte("reclaimed")); err != nil || string(got) != "reclaimed" {
		t.Fatalf("echo on the reclaimed socket: %q, %v", got, err)
	}
	next.stop(t)
}

// TestVsockHandshakeGarbage: every bad handshake ends its own connection
// and nothing else.
func TestVsockHandshakeGarbage(t *testing.T) {
	uds := filepath.Join(t.TempDir(), "v.sock")
	metrics := filepath.Join(t.TempDir(), "m.json")
	vm := startVsock(t, uds, "rayguest.run=vsock-echo", echoReady, "--metrics-file", metrics)
	good, _ := dialGuest(t, uds, 52)
	cases := []struct{ name, send string }{
		{"not a number", "CONNECT abc\n"},
		{"past 2^32-1", "CONNECT 99999999999\n"},
		{"1 MiB without a newline", strings.Repeat("A", 1<<20)},
		{"immediate close", ""},
		{"nothing listens on the port", "CONNECT 9999\n"},
		{"silence", "-"},
	}
	var wg sync.WaitGroup
	errs := make([]error, len(cases))
	for i, tc := range cases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: uds, Net: "unix"})
			if err != nil {
				errs[i] = err
				return
			}
			defer c.Close()
			switch tc.send {
			case "":
				return
			case "-":
			default:
				go c.Write([]byte(tc.send)) // 1 MiB does not fit the socket buffer
			}
			b, err := waitEOF(c, time.Minute) // the handshake timeout is 10 s
			if err != nil || len(b) != 0 {
				errs[i] = fmt.Errorf("%s: read %q, %v; want EOF and nothing else", tc.name, b, err)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	// The established connection and a new one still echo.
	if got, err := echoRoundTrip(good, []byte("still fine")); err != nil || string(got) != "still fine" {
		t.Fatalf("echo on the established connection: %q, %v", got, err)
	}
	e, _ := dialGuest(t, uds, 52)
	if got, err := echoRoundTrip(e, []byte("new one")); err != nil || string(got) != "new one" {
		t.Fatalf("echo on a new connection: %q, %v", got, err)
	}
	vm.stop(t)
	m := readVsockMetrics(t, metrics)
	if m["handshake_errors"] != 4 || m["handshake_timeouts"] != 1 || m["host_connects_ok"] != 2 {
		t.Fatalf("metrics %v", m)
	}
}

// TestVsockBadInput: a bad --vsock gets a one-line error and a non-zero
// exit, and leaves no socket behind; neither does a boot that fails after
// the socket was made.
func TestVsockBadInput(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	uds := filepath.Join(dir, "v.sock")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"cid 2", []string{"--vsock", "cid=2,uds=" + uds}, "vsock.cid: 2: want 3 to"},
		{"no uds", []string{"--vsock", "cid=3"}, "uds=PATH is missing"},
		{"unknown key", []string{"--vsock", "cid=3,uds=" + uds + ",mode=x"}, `unknown key "mode"`},
		{"path too long", []string{"--vsock", "cid=3,uds=" + filepath.Join(dir, strings.Repeat("s", 100))}, "longer than a Unix socket path may be"},
		{"no room for _PORT", []string{"--vsock", "cid=3,uds=" + filepath.Join(dir, strings.Repeat("s", 100-len(dir)))}, "too long: with _4294967295 behind it"},
		{"missing directory", []string{"--vsock", "cid=3,uds=" + filepath.Join(dir, "nope", "v.sock")}, "no such file"},
		{"not a socket", []string{"--vsock", "cid=3,uds=" + file}, "exists and is not a socket"},
		{"a disk fails", []string{"--vsock", "cid=3,uds=" + uds, "--disk", "path=" + filepath.Join(dir, "nope.img")}, "disks[0]: disk "},
		{"fails after the socket was made", []string{"--vsock", "cid=3,uds=" + uds, "--cmdline", strings.Repeat("x", 5000)}, "this kernel accepts at most"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, nil, 30*time.Second, append([]string{"boot", "--cmdline", "rayguest.run=vsock-echo"}, tc.args...)...)
			msg := strings.TrimSpace(r.stderr)
			if r.code == 0 || strings.Count(msg, "\n") != 0 || !strings.HasPrefix(msg, "rayvmm: ") || !strings.Contains(msg, tc.want) {
				t.Fatalf("exit %d, stderr %q; want one line mentioning %q", r.code, r.stderr, tc.want)
			}
			entries, _ := os.ReadDir(dir)
			if len(entries) != 1 || entries[0].Name() != "file" {
				t.Fatalf("left behind: %v", entries)
			}
			if b, _ := os.ReadFile(file); string(b) != "keep me" {
				t.Fatal("the regular file was changed")
			}
		})
	}
}
