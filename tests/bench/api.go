package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// APIResult is the latency of the VM's control API, beside a bare Unix
// socket round trip in the same run.
type APIResult struct {
	Calls int `json:"calls"`
	// Each: microseconds per call.
	RawRoundTrip Latency `json:"raw_unix_round_trip_us"`
	Get          Latency `json:"get_root_us"`
	GetNewConn   Latency `json:"get_root_new_connection_us"`
	PauseResume  Latency `json:"pause_resume_us"`
	Error        string  `json:"error,omitempty"`
}

// Latency is a distribution of call times.
type Latency struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	P99    float64 `json:"p99"`
}

func latency(xs []float64) Latency {
	if len(xs) == 0 {
		return Latency{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return Latency{N: len(s), Median: s[len(s)/2], P99: s[(len(s)*99)/100]}
}

// apiLatency boots an echo guest with an API socket and times calls
// against it: GET / on one keep-alive connection, GET / on a new
// connection each time, and PATCH /vm Paused then Resumed (one sample per
// pair); and, for the floor, a 64-byte round trip through a bare Unix
// socket served by this process.
func apiLatency(ctx context.Context, rayvmm, dir string, calls int) *APIResult {
	r := &APIResult{Calls: calls}
	sock := filepath.Join(dir, "api.sock")
	cmd := exec.CommandContext(ctx, rayvmm, "boot", "--cmdline", "rayguest.run=echo", "--api-socket", sock)
	stdin, _ := cmd.StdinPipe() // kept open: the echo guest waits for input
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		r.Error = err.Error()
		return r
	}
	defer func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	}()
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "rayguest: ready") {
				close(ready)
				break
			}
		}
		io.Copy(io.Discard, out)
	}()
	select {
	case <-ready:
	case <-time.After(time.Minute):
		r.Error = "the echo guest never became ready"
		return r
	}
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}
	keep := &http.Client{Transport: &http.Transport{DialContext: dial}}
	fresh := &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
	call := func(c *http.Client, method, path, body string) (time.Duration, error) {
		req, _ := http.NewRequestWithContext(ctx, method, "http://localhost"+path, strings.NewReader(body))
		start := time.Now()
		resp, err := c.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		d := time.Since(start)
		if resp.StatusCode >= 300 {
			return 0, fmt.Errorf("%s %s: HTTP %d", method, path, resp.StatusCode)
		}
		return d, nil
	}
	var get, getNew, pr []float64
	for i := 0; i < calls && r.Error == ""; i++ {
		d, err := call(keep, "GET", "/", "")
		if err != nil {
			r.Error = err.Error()
			break
		}
		get = append(get, us(d))
		if d, err = call(fresh, "GET", "/", ""); err != nil {
			r.Error = err.Error()
			break
		}
		getNew = append(getNew, us(d))
		p, err := call(keep, "PATCH", "/vm", `{"state":"Paused"}`)
		if err != nil {
			r.Error = err.Error()
			break
		}
		q, err := call(keep, "PATCH", "/vm", `{"state":"Resumed"}`)
		if err != nil {
			r.Error = err.Error()
			break
		}
		pr = append(pr, us(p+q))
	}
	r.Get, r.GetNewConn, r.PauseResume = latency(get), latency(getNew), latency(pr)
	r.RawRoundTrip = rawUnixRoundTrip(filepath.Join(dir, "raw.sock"), calls)
	call(keep, "PUT", "/actions", `{"action_type":"Shutdown"}`)
	return r
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

// rawUnixRoundTrip times 64-byte request/response round trips through a
// Unix socket served by a goroutine of this process.
func rawUnixRoundTrip(path string, n int) Latency {
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return Latency{}
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		return Latency{}
	}
	defer c.Close()
	buf := make([]byte, 64)
	var xs []float64
	for range n {
		start := time.Now()
		if _, err := c.Write(buf); err != nil {
			break
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			break
		}
		xs = append(xs, us(time.Since(start)))
	}
	return latency(xs)
}
