// Package client talks to the rayvmm daemon's pods API (package
// pods/daemon) over its Unix socket: what `rayvmm pod ...` uses. It links
// net/http and package pods only, so the CLI stays light.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rayvmm/rayvmm/pods"
)

// DefaultHost is the daemon's default socket.
const DefaultHost = "unix:///run/rayvmm/rayvmm.sock"

// EnvHost names the daemon's socket for the CLI, as DOCKER_HOST does.
const EnvHost = "RAYVMM_HOST"

// SocketPath reads a host in the form unix:///PATH (or a bare path).
func SocketPath(host string) (string, error) {
	if host == "" {
		host = DefaultHost
	}
	if p, ok := strings.CutPrefix(host, "unix://"); ok {
		host = p
	} else if strings.Contains(host, "://") {
		return "", fmt.Errorf("host %q: only unix:///PATH sockets are supported", host)
	}
	if host == "" || !strings.HasPrefix(host, "/") {
		return "", fmt.Errorf("host %q: want unix:///ABSOLUTE/PATH", host)
	}
	return host, nil
}

// Client is a connection pool to the daemon.
type Client struct {
	path string
	http *http.Client
}

// New returns a client of the daemon at host (unix:///PATH; "" is
// $RAYVMM_HOST, else DefaultHost).
func New(host string) (*Client, error) {
	if host == "" {
		host = os.Getenv(EnvHost)
	}
	path, err := SocketPath(host)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConnsPerHost: 4,
	}
	return &Client{path: path, http: &http.Client{Transport: tr}}, nil
}

// Close drops idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Error is an error the daemon answered with.
type Error struct {
	Status  int
	Message string
	// Field is the spec path a 400 names.
	Field string
}

func (e *Error) Error() string { return e.Message }

// do sends a request and decodes a JSON answer into out (when not nil).
func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	return nil
}

// send sends a request and returns a successful answer; an error answer
// becomes an *Error.
func (c *Client) send(ctx context.Context, method, path string, body []byte) (*http.Response, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://rayvmm"+path, r)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Op == "dial" {
			return nil, fmt.Errorf("daemon socket %s: %w (is rayvmm daemon running? --host or %s name its socket)", c.path, oe.Err, EnvHost)
		}
		return nil, fmt.Errorf("daemon socket %s: %w", c.path, err)
	}
	if resp.StatusCode < 300 {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var e pods.APIError
	if json.Unmarshal(b, &e) != nil || e.Message == "" {
		e.Message = fmt.Sprintf("%s %s: %s", method, path, http.StatusText(resp.StatusCode))
	}
	return nil, &Error{Status: resp.StatusCode, Message: e.Message, Field: e.Field}
}

func podPath(name string, rest string) string { return "/v1/pods/" + url.PathEscape(name) + rest }

// Apply sends a pod document (YAML or JSON).
func (c *Client) Apply(ctx context.Context, doc []byte) (*pods.ApplyResult, error) {
	var r pods.ApplyResult
	return &r, c.do(ctx, http.MethodPost, "/v1/pods", doc, &r)
}

// List returns every pod the caller may see.
func (c *Client) List(ctx context.Context) ([]*pods.Info, error) {
	var out []*pods.Info
	return out, c.do(ctx, http.MethodGet, "/v1/pods", nil, &out)
}

// Get returns one pod.
func (c *Client) Get(ctx context.Context, name string) (*pods.Info, error) {
	var i pods.Info
	return &i, c.do(ctx, http.MethodGet, podPath(name, ""), nil, &i)
}

// Events returns a pod's events, oldest first.
func (c *Client) Events(ctx context.Context, name string) ([]pods.Event, error) {
	var out []pods.Event
	return out, c.do(ctx, http.MethodGet, podPath(name, "/events"), nil, &out)
}

// Grace is a stop's grace period (SIGTERM, then SIGKILL after it);
// Default is the pod's terminationGracePeriodSeconds.
type Grace int

// Default grace: the pod's own.
const Default Grace = -1

func (g Grace) query(v url.Values) {
	if g >= 0 {
		v.Set("grace", strconv.Itoa(int(g)))
	}
}

// Stop stops every VM of a pod and returns it stopped.
func (c *Client) Stop(ctx context.Context, name string, grace Grace) (*pods.Info, error) {
	var i pods.Info
	q := url.Values{}
	grace.query(q)
	return &i, c.do(ctx, http.MethodPost, podPath(name, "/stop?"+q.Encode()), nil, &i)
}

// Remove removes a pod; force stops it first.
func (c *Client) Remove(ctx context.Context, name string, force bool, grace Grace) error {
	q := url.Values{}
	if force {
		q.Set("force", "1")
	}
	grace.query(q)
	return c.do(ctx, http.MethodDelete, podPath(name, "?"+q.Encode()), nil, nil)
}

// Wait waits until a pod is Ready, Running, Ended or Removed, for at most
// timeout; it returns the pod (nil once removed).
func (c *Client) Wait(ctx context.Context, name, cond string, timeout time.Duration) (*pods.Info, error) {
	q := url.Values{"for": {cond}, "timeout": {timeout.String()}}
	resp, err := c.send(ctx, http.MethodGet, podPath(name, "/wait?"+q.Encode()), nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if cond == "Removed" {
		return nil, nil
	}
	var i pods.Info
	if err := json.NewDecoder(resp.Body).Decode(&i); err != nil {
		return nil, fmt.Errorf("wait for pod %s: %w", name, err)
	}
	return &i, nil
}

// Logs copies a VM's console log to w; follow goes on until the VM's run
// ends or ctx is done; previous reads the run before the current one.
func (c *Client) Logs(ctx context.Context, name, vm string, follow, previous bool, w io.Writer) error {
	q := url.Values{}
	if vm != "" {
		q.Set("vm", vm)
	}
	if follow {
		q.Set("follow", "1")
	}
	if previous {
		q.Set("previous", "1")
	}
	resp, err := c.send(ctx, http.MethodGet, podPath(name, "/logs?"+q.Encode()), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// Metrics returns the daemon's Prometheus text.
func (c *Client) Metrics(ctx context.Context) ([]byte, error) {
	resp, err := c.send(ctx, http.MethodGet, "/metrics", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(io.LimitReader(resp.Body, 64<<20))
}
