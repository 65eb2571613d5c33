// Package api is a VM's control API: HTTP/1.1 with JSON bodies on a Unix
// socket, shaped like Firecracker's where it fits, served by the VM
// process.
//
//	GET   /                         id, state, uptime, vCPUs, memory, version
//	GET   /vm/config                the effective spec (live rate limits included)
//	PATCH /vm                       {"state": "Paused"} or {"state": "Resumed"}
//	PUT   /actions                  {"action_type": "Shutdown"}: stop cleanly, disks flushed, exit 0
//	PATCH /drives/{id}              {"rateLimit": {"iops": N, "bps": N, "burst": N}}
//	PATCH /network-interfaces/{id}  {"rateLimit": {"rxBps": N, "txBps": N, ...}}
//	GET   /metrics                  Prometheus text format
//
// A rateLimit object changes only the fields it names (0 lifts a limit);
// the token buckets are replaced while the VM runs. Every error is a 4xx
// (5xx for a failure of the VM itself) with {"fault_message": "..."}, as
// Firecracker answers, and leaves the VM running: malformed JSON, unknown
// fields (named by their path), unknown ids, a wrong method, a body over
// 1 MiB. Requests are served concurrently; those that change the VM are
// serialized.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmm"
)

// Info is what GET / says about the build.
type Info struct {
	Version string
}

// Server serves one VM's API.
type Server struct {
	vm   *vmm.VM
	info Info
	log  *slog.Logger
	srv  server

	mu   sync.Mutex // serializes changes; guards spec
	spec *spec.VM
}

// NewServer makes the API of v, whose effective spec is s (the server keeps
// its own copy and updates it as the API changes the VM).
func NewServer(v *vmm.VM, s *spec.VM, info Info, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Server{vm: v, info: info, log: log, spec: s.Clone()}
	a.srv.handle = a.route
	return a
}

// Serve accepts API connections on l until Close.
func (a *Server) Serve(l net.Listener) error { return a.srv.serve(l) }

// Close stops serving: the listener and every connection are closed.
func (a *Server) Close() { a.srv.close() }

// Spec is the effective spec as the API has changed it.
func (a *Server) Spec() *spec.VM {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.spec.Clone()
}

// route dispatches a request.
func (a *Server) route(r *request) response {
	path, _, _ := strings.Cut(r.path, "?")
	type route struct {
		method string
		handle func(*request, string) response
	}
	var routes []route
	var arg string
	switch {
	case path == "/":
		routes = []route{{"GET", a.getInfo}}
	case path == "/vm/config":
		routes = []route{{"GET", a.getConfig}}
	case path == "/vm":
		routes = []route{{"PATCH", a.patchVM}}
	case path == "/actions":
		routes = []route{{"PUT", a.putAction}}
	case path == "/metrics":
		routes = []route{{"GET", a.getMetrics}}
	case strings.HasPrefix(path, "/drives/"):
		arg = strings.TrimPrefix(path, "/drives/")
		routes = []route{{"PATCH", a.patchDrive}}
	case strings.HasPrefix(path, "/network-interfaces/"):
		arg = strings.TrimPrefix(path, "/network-interfaces/")
		routes = []route{{"PATCH", a.patchNIC}}
	default:
		return faultResponse(404, fmt.Sprintf("no such resource %q", path))
	}
	var allow []string
	for _, rt := range routes {
		if rt.method == r.method {
			return rt.handle(r, arg)
		}
		allow = append(allow, rt.method)
	}
	resp := faultResponse(405, fmt.Sprintf("method %s is not allowed on %s (use %s)", r.method, path, strings.Join(allow, ", ")))
	resp.allow = strings.Join(allow, ", ")
	return resp
}

// Fault is an error body, as Firecracker sends it.
type Fault struct {
	Message string `json:"fault_message"`
}

func faultResponse(status int, msg string) response {
	b, _ := json.Marshal(Fault{Message: msg})
	return response{status: status, ctype: "application/json", body: b}
}

func jsonResponse(v any) response {
	b, err := json.Marshal(v)
	if err != nil {
		return faultResponse(500, err.Error())
	}
	return response{status: 200, ctype: "application/json", body: append(b, '\n')}
}

var noContent = response{status: 204}

// decode reads a request body strictly into v (spec.Decode: unknown
// fields and bad values are named by their path).
func decode(r *request, v any) *response {
	if len(r.body) == 0 {
		resp := faultResponse(400, "the request needs a JSON body")
		return &resp
	}
	if err := spec.Decode(r.body, v); err != nil {
		resp := faultResponse(400, err.Error())
		return &resp
	}
	return nil
}

// InstanceInfo is GET /'s answer.
type InstanceInfo struct {
	ID            string  `json:"id"`
	State         string  `json:"state"`
	UptimeSeconds float64 `json:"uptime_seconds"`
	VCPUs         int     `json:"vcpus"`
	Memory        string  `json:"memory"`
	MemoryBytes   int64   `json:"memory_bytes"`
	VMMVersion    string  `json:"vmm_version"`
	AppName       string  `json:"app_name"`
}

func (a *Server) getInfo(*request, string) response {
	a.mu.Lock()
	s := a.spec
	info := InstanceInfo{
		ID: s.Name, State: string(a.vm.State()), UptimeSeconds: a.vm.Uptime().Seconds(),
		VCPUs: s.CPUs, Memory: s.Memory.String(), MemoryBytes: int64(s.Memory),
		VMMVersion: a.info.Version, AppName: "rayvmm",
	}
	a.mu.Unlock()
	return jsonResponse(info)
}

func (a *Server) getConfig(*request, string) response {
	return jsonResponse(a.Spec())
}

// VMState is PATCH /vm's body.
type VMState struct {
	State string `json:"state"`
}

func (a *Server) patchVM(r *request, _ string) response {
	var body VMState
	if f := decode(r, &body); f != nil {
		return *f
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var err error
	switch body.State {
	case "Paused":
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = a.vm.Pause(ctx)
		cancel()
	case "Resumed":
		err = a.vm.Resume()
	default:
		return faultResponse(400, fmt.Sprintf("state: %q: want Paused or Resumed", body.State))
	}
	switch {
	case errors.Is(err, vmm.ErrStopped):
		return faultResponse(409, err.Error())
	case err != nil:
		return faultResponse(500, err.Error())
	}
	a.log.Info("API: VM " + strings.ToLower(body.State))
	return noContent
}

// Action is PUT /actions's body.
type Action struct {
	Type string `json:"action_type"`
}

func (a *Server) putAction(r *request, _ string) response {
	var body Action
	if f := decode(r, &body); f != nil {
		return *f
	}
	switch body.Type {
	case "Shutdown":
		a.log.Info("API: shutdown")
		a.vm.Stop("API request: Shutdown")
		return noContent
	}
	return faultResponse(400, fmt.Sprintf("action_type: %q: this API knows Shutdown", body.Type))
}

// Patch is the body of PATCH /drives/{id} (R = spec.DiskRateLimit) and
// PATCH /network-interfaces/{id} (R = spec.NICRateLimit). The rate limit
// changes only the fields it names.
type Patch[R any] struct {
	ID        string `json:"id,omitempty"`
	RateLimit *R     `json:"rateLimit,omitempty"`
}

func (a *Server) patchDrive(r *request, id string) response {
	disks := a.vm.Disks()
	ids := make([]string, len(disks))
	for i, d := range disks {
		ids[i] = d.Spec.ID
	}
	return patchRateLimit(a, r, "drive", id, ids,
		func(i int) spec.DiskRateLimit { return a.spec.Disks[i].RateLimit },
		func(i int, rl spec.DiskRateLimit) error {
			if err := disks[i].SetRateLimit(rl); err != nil {
				return err
			}
			a.spec.Disks[i].RateLimit = rl
			return nil
		})
}

func (a *Server) patchNIC(r *request, id string) response {
	nics := a.vm.NICs()
	ids := make([]string, len(nics))
	for i, n := range nics {
		ids[i] = n.Spec.ID
	}
	return patchRateLimit(a, r, "network interface", id, ids,
		func(i int) spec.NICRateLimit { return a.spec.Nets[i].RateLimit },
		func(i int, rl spec.NICRateLimit) error {
			if err := nics[i].SetRateLimit(rl); err != nil {
				return err
			}
			a.spec.Nets[i].RateLimit = rl
			return nil
		})
}

// patchRateLimit serves a PATCH of device id (one of ids) whose body may
// change its rate limit: cur reads the limit in force, set applies a new
// one (both under a.mu).
func patchRateLimit[R any](a *Server, r *request, what, id string, ids []string, cur func(int) R, set func(int, R) error) response {
	a.mu.Lock()
	defer a.mu.Unlock()
	i := slices.Index(ids, id)
	if i < 0 {
		return faultResponse(404, fmt.Sprintf("no %s with id %q", what, id))
	}
	rl := cur(i)
	body := Patch[R]{RateLimit: &rl}
	if f := decode(r, &body); f != nil {
		return *f
	}
	if body.ID != "" && body.ID != id {
		return faultResponse(400, fmt.Sprintf("id: %q does not match the path's %q", body.ID, id))
	}
	if body.RateLimit == nil {
		return noContent
	}
	if err := set(i, *body.RateLimit); err != nil {
		return faultResponse(400, err.Error())
	}
	a.log.Info("API: rate limit changed", what, id, "rate_limit", *body.RateLimit)
	return noContent
}

func (a *Server) getMetrics(*request, string) response {
	return response{status: 200, ctype: "text/plain; version=0.0.4; charset=utf-8", body: a.metrics()}
}
