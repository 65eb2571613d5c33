package api

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// A small, strict HTTP/1.1 server: enough for a JSON API on a Unix socket
// (curl --unix-socket, Go's net/http client, Firecracker's SDKs), and
// nothing else. Why not net/http: measured on the development machine,
// serving with net/http costs about 2.5 MiB of resident memory (mostly its
// larger binary's pages touched at init and on the first request: 5.3 MiB
// peak RSS against 2.9 MiB for the same tiny program serving the same
// request by hand), half of the VM process's whole 5 MiB budget; rayvmm-vm
// as a whole peaks at about 4.4 MiB beside the guest's memory without it
// (make bench). This server is bufio and strconv.
//
// What it does: request line and headers (each line at most maxLine bytes,
// at most maxHeaders of them), Content-Length bodies up to MaxBody bytes,
// "Expect: 100-continue", keep-alive (HTTP/1.1 unless "Connection: close";
// HTTP/1.0 closes), a read deadline per request and a bound on open
// connections. What it refuses, with a 4xx and a fault message: chunked or
// other transfer codings, a body without Content-Length, oversized lines,
// headers or bodies, and malformed request lines; the connection is then
// closed.

// Limits.
const (
	// MaxBody is the largest request body (Firecracker's limit too).
	MaxBody     = 1 << 20
	maxLine     = 8 << 10
	maxHeaders  = 64
	maxConns    = 64
	maxDrain    = 16 << 20 // largest oversized body read before refusing it
	readTimeout = 30 * time.Second
)

// request is one parsed HTTP request.
type request struct {
	method, path string
	header       map[string]string // lower-case names; repeated ones joined with ", "
	body         []byte
	close        bool // the client asked to close, or spoke HTTP/1.0
}

// response is what a handler returns.
type response struct {
	status int
	ctype  string
	body   []byte
	allow  string // for 405
}

// handlerFunc serves one request.
type handlerFunc func(*request) response

// httpError is a request the server refuses before a handler sees it.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

// server accepts connections and serves requests on them.
type server struct {
	handle handlerFunc
	mu     sync.Mutex
	l      net.Listener
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// serve accepts until l is closed.
func (s *server) serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.l = l
	s.conns = map[net.Conn]struct{}{}
	s.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// EMFILE and friends: back off rather than spin.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		s.mu.Lock()
		if s.closed || len(s.conns) >= maxConns {
			s.mu.Unlock()
			writeResponse(c, faultResponse(503, "too many API connections"), true)
			c.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.conn(c)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

// close stops accepting, closes every connection and waits for handlers.
func (s *server) close() {
	s.mu.Lock()
	s.closed = true
	if s.l != nil {
		s.l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// conn serves requests on c until it closes or fails.
func (s *server) conn(c net.Conn) {
	br := bufio.NewReaderSize(c, 4096)
	for {
		c.SetReadDeadline(time.Now().Add(readTimeout))
		req, err := readRequest(br, c)
		if err != nil {
			var he *httpError
			if errors.As(err, &he) {
				writeResponse(c, faultResponse(he.status, he.msg), true)
			}
			return // EOF, timeout, or a request we cannot frame
		}
		c.SetReadDeadline(time.Time{})
		resp := s.handle(req)
		if err := writeResponse(c, resp, req.close); err != nil || req.close {
			return
		}
	}
}

// readLine reads one CRLF (or LF) terminated line of at most maxLine bytes.
func readLine(br *bufio.Reader) (string, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		line = append(line, frag...)
		if len(line) > maxLine {
			return "", &httpError{431, fmt.Sprintf("a request line or header is longer than %d bytes", maxLine)}
		}
		if err == nil {
			break
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if len(line) > 0 && errors.Is(err, io.EOF) {
				return "", &httpError{400, "request ends in the middle of a line"}
			}
			return "", err
		}
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// readRequest reads one request from br; w receives "100 Continue".
func readRequest(br *bufio.Reader, w io.Writer) (*request, error) {
	line, err := readLine(br)
	if err != nil {
		return nil, err
	}
	if line == "" { // a stray CRLF between requests is allowed (RFC 9112 2.2)
		if line, err = readLine(br); err != nil {
			return nil, err
		}
	}
	parts := strings.Split(line, " ")
	if len(parts) != 3 || parts[0] == "" || !strings.HasPrefix(parts[1], "/") {
		return nil, &httpError{400, "malformed request line"}
	}
	r := &request{method: parts[0], path: parts[1], header: map[string]string{}}
	switch parts[2] {
	case "HTTP/1.1":
	case "HTTP/1.0":
		r.close = true
	default:
		return nil, &httpError{505, fmt.Sprintf("unsupported protocol %q (want HTTP/1.1)", parts[2])}
	}
	for n := 0; ; n++ {
		h, err := readLine(br)
		if err != nil {
			return nil, err
		}
		if h == "" {
			break
		}
		if n >= maxHeaders {
			return nil, &httpError{431, fmt.Sprintf("more than %d header fields", maxHeaders)}
		}
		k, v, ok := strings.Cut(h, ":")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, &httpError{400, "malformed header field"}
		}
		k, v = strings.ToLower(k), strings.TrimSpace(v)
		if old, dup := r.header[k]; dup {
			if k == "content-length" {
				return nil, &httpError{400, "Content-Length given twice"}
			}
			v = old + ", " + v
		}
		r.header[k] = v
	}
	if c := strings.ToLower(r.header["connection"]); strings.Contains(c, "close") {
		r.close = true
	}
	if te, ok := r.header["transfer-encoding"]; ok {
		return nil, &httpError{501, fmt.Sprintf("Transfer-Encoding %q is not supported; send a Content-Length", te)}
	}
	cl, hasBody := r.header["content-length"]
	if !hasBody {
		return r, nil
	}
	n, err := strconv.ParseInt(cl, 10, 64)
	if err != nil || n < 0 {
		return nil, &httpError{400, fmt.Sprintf("bad Content-Length %q", cl)}
	}
	if n > MaxBody {
		// Read and drop a body of reasonable size first, so that a client
		// that sends it without waiting for "100 Continue" reads the fault
		// rather than a reset connection.
		if n <= maxDrain && !strings.EqualFold(r.header["expect"], "100-continue") {
			io.CopyN(io.Discard, br, n)
		}
		return nil, &httpError{413, fmt.Sprintf("request body of %d bytes is larger than %d", n, MaxBody)}
	}
	if strings.EqualFold(r.header["expect"], "100-continue") && n > 0 {
		if _, err := io.WriteString(w, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return nil, err
		}
	}
	r.body = make([]byte, n)
	if _, err := io.ReadFull(br, r.body); err != nil {
		return nil, &httpError{400, "request body shorter than its Content-Length"}
	}
	return r, nil
}

var statusText = map[int]string{
	200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
	409: "Conflict", 413: "Content Too Large", 431: "Request Header Fields Too Large",
	500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}

// writeResponse writes resp in one write.
func writeResponse(w io.Writer, resp response, closing bool) error {
	var b bytes.Buffer
	text := statusText[resp.status]
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", resp.status, text)
	if resp.status != 204 {
		if resp.ctype != "" {
			fmt.Fprintf(&b, "Content-Type: %s\r\n", resp.ctype)
		}
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(resp.body))
	}
	if resp.allow != "" {
		fmt.Fprintf(&b, "Allow: %s\r\n", resp.allow)
	}
	if closing {
		b.WriteString("Connection: close\r\n")
	}
	b.WriteString("\r\n")
	if resp.status != 204 {
		b.Write(resp.body)
	}
	_, err := w.Write(b.Bytes())
	return err
}
