package api

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestReadRequest(t *testing.T) {
	long := strings.Repeat("a", maxLine+1)
	tests := []struct {
		name, in         string
		method, path     string
		body             string
		close, continued bool
		status           int // of the refusal; 0: accepted
	}{
		{name: "get", in: "GET / HTTP/1.1\r\nHost: x\r\n\r\n", method: "GET", path: "/"},
		{name: "body", in: "PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"Paused\"}\n", method: "PATCH", path: "/vm", body: "{\"state\":\"Paused\"}\n"},
		{name: "bare LF", in: "GET /metrics HTTP/1.1\nAccept: */*\n\n", method: "GET", path: "/metrics"},
		{name: "leading CRLF", in: "\r\nGET / HTTP/1.1\r\n\r\n", method: "GET", path: "/"},
		{name: "HTTP/1.0 closes", in: "GET / HTTP/1.0\r\n\r\n", method: "GET", path: "/", close: true},
		{name: "Connection: close", in: "GET / HTTP/1.1\r\nConnection: close\r\n\r\n", method: "GET", path: "/", close: true},
		{name: "100-continue", in: "PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}", method: "PUT", path: "/actions", body: "{}", continued: true},
		{name: "malformed request line", in: "GET /\r\n\r\n", status: 400},
		{name: "path not absolute", in: "GET vm HTTP/1.1\r\n\r\n", status: 400},
		{name: "HTTP/2", in: "GET / HTTP/2.0\r\n\r\n", status: 505},
		{name: "long line", in: "GET /" + long + " HTTP/1.1\r\n\r\n", status: 431},
		{name: "too many headers", in: "GET / HTTP/1.1\r\n" + strings.Repeat("X: y\r\n", maxHeaders+1) + "\r\n", status: 431},
		{name: "malformed header", in: "GET / HTTP/1.1\r\nno colon\r\n\r\n", status: 400},
		{name: "space before colon", in: "GET / HTTP/1.1\r\nContent-Length : 1\r\n\r\nx", status: 400},
		{name: "chunked", in: "PATCH /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", status: 501},
		{name: "bad length", in: "PATCH /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n", status: 400},
		{name: "two lengths", in: "PATCH /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", status: 400},
		{name: "body too big", in: "PATCH /vm HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n", status: 413},
		{name: "short body", in: "PATCH /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", status: 400},
		{name: "cut in a line", in: "GET / HTTP/1.1\r\nHost", status: 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w bytes.Buffer
			r, err := readRequest(bufio.NewReader(strings.NewReader(tt.in)), &w)
			if tt.status != 0 {
				var he *httpError
				if !errors.As(err, &he) || he.status != tt.status {
					t.Fatalf("readRequest = %+v, %v; want a %d refusal", r, err, tt.status)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.method != tt.method || r.path != tt.path || string(r.body) != tt.body || r.close != tt.close {
				t.Fatalf("got %+v", r)
			}
			if got := w.String() == "HTTP/1.1 100 Continue\r\n\r\n"; got != tt.continued {
				t.Fatalf("wrote %q", w.String())
			}
		})
	}
}

// TestKeepAlive: requests on one connection are read one after another.
func TestKeepAlive(t *testing.T) {
	in := "GET / HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /metrics HTTP/1.1\r\n\r\n"
	br := bufio.NewReader(strings.NewReader(in))
	var paths []string
	for {
		r, err := readRequest(br, io.Discard)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			break
		}
		paths = append(paths, r.method+" "+r.path+" "+string(r.body))
	}
	if got := strings.Join(paths, "|"); got != "GET / |PATCH /vm {}|GET /metrics " {
		t.Fatalf("read %q", got)
	}
}

// FuzzReadRequest: whatever a client sends, the parser returns a request
// within the limits or an error, never a panic, and never a body longer
// than MaxBody.
func FuzzReadRequest(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		br := bufio.NewReader(bytes.NewReader(in))
		for range 4 {
			r, err := readRequest(br, io.Discard)
			if err != nil {
				return
			}
			if len(r.body) > MaxBody || len(r.header) > maxHeaders || !strings.HasPrefix(r.path, "/") {
				t.Fatalf("accepted %+v", r)
			}
		}
	})
}
