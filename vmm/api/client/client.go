// Package client talks to a VM's control API (package vmm/api) over its
// Unix socket: what `rayvmm vm` and the pods daemon use. It uses net/http,
// which only the control plane links.
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
	"time"

	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmm/api"
)

// Client is a connection pool to one VM's API socket.
type Client struct {
	path string
	http *http.Client
}

// New returns a client for the API socket at path.
func New(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConnsPerHost: 4,
	}
	return &Client{path: path, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// Close drops idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// FaultError is an error the API answered with.
type FaultError struct {
	Status  int
	Message string
}

func (e *FaultError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.Message, e.Status) }

// do sends a request with an optional JSON body and decodes a JSON answer
// into out (when not nil).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Op == "dial" {
			return fmt.Errorf("API socket %s: %w (is the VM running?)", c.path, oe.Err)
		}
		return fmt.Errorf("API socket %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("API %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var f api.Fault
		if json.Unmarshal(b, &f) != nil || f.Message == "" {
			f.Message = http.StatusText(resp.StatusCode)
		}
		return &FaultError{Status: resp.StatusCode, Message: f.Message}
	}
	if out == nil {
		return nil
	}
	if p, ok := out.(*[]byte); ok {
		*p = b
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("API %s %s: %w", method, path, err)
	}
	return nil
}

// Info is GET /.
func (c *Client) Info(ctx context.Context) (*api.InstanceInfo, error) {
	var i api.InstanceInfo
	return &i, c.do(ctx, "GET", "/", nil, &i)
}

// Config is GET /vm/config: the effective spec.
func (c *Client) Config(ctx context.Context) (*spec.VM, error) {
	var b []byte
	if err := c.do(ctx, "GET", "/vm/config", nil, &b); err != nil {
		return nil, err
	}
	return spec.Parse(b)
}

// Pause stops every vCPU; it returns once none runs.
func (c *Client) Pause(ctx context.Context) error {
	return c.do(ctx, "PATCH", "/vm", api.VMState{State: "Paused"}, nil)
}

// Resume lets the vCPUs run again.
func (c *Client) Resume(ctx context.Context) error {
	return c.do(ctx, "PATCH", "/vm", api.VMState{State: "Resumed"}, nil)
}

// Shutdown stops the VM cleanly (disks flushed, exit status 0).
func (c *Client) Shutdown(ctx context.Context) error {
	return c.do(ctx, "PUT", "/actions", api.Action{Type: "Shutdown"}, nil)
}

// SetDriveRateLimit changes the fields of drive id's rate limit that rl
// sets (a map, so that a 0 lifts a limit and an absent field stays).
func (c *Client) SetDriveRateLimit(ctx context.Context, id string, rl map[string]int64) error {
	return c.do(ctx, "PATCH", "/drives/"+id, map[string]any{"rateLimit": rl}, nil)
}

// SetNICRateLimit is SetDriveRateLimit for a network interface.
func (c *Client) SetNICRateLimit(ctx context.Context, id string, rl map[string]int64) error {
	return c.do(ctx, "PATCH", "/network-interfaces/"+id, map[string]any{"rateLimit": rl}, nil)
}

// Metrics is GET /metrics, in the Prometheus text format.
func (c *Client) Metrics(ctx context.Context) ([]byte, error) {
	var b []byte
	return b, c.do(ctx, "GET", "/metrics", nil, &b)
}
