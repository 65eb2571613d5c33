package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/storage/volume"
)

// The API: HTTP/1.1 with JSON bodies on the daemon's Unix socket.
//
//	POST   /v1/pods                      apply a pod (YAML or JSON body)
//	GET    /v1/pods                      list pods
//	GET    /v1/pods/{name}               a pod: spec, status, owner
//	GET    /v1/pods/{name}/events        its events
//	GET    /v1/pods/{name}/logs          a VM's console (?vm=, ?follow=1, ?previous=1)
//	GET    /v1/pods/{name}/wait          until ?for=Ready|Running|Ended|Removed (?timeout=)
//	POST   /v1/pods/{name}/stop          stop every VM (?grace=SECONDS)
//	DELETE /v1/pods/{name}               remove (?force=1 stops it first; ?grace=SECONDS)
//	GET    /metrics                      Prometheus (the pods the caller may inspect)
//	GET    /v1/version
//
// Errors are {"message": "...", "field": "..."} with 400 (a bad spec or
// request; field names the spec's path), 403 (the access policy), 404,
// 409 (a conflict: the pod exists with another spec, or runs), 500.

func (d *Daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/pods", d.handleApply)
	mux.HandleFunc("GET /v1/pods", d.handleList)
	mux.HandleFunc("GET /v1/pods/{name}", d.onPod(ActInspect, d.handleGet))
	mux.HandleFunc("GET /v1/pods/{name}/events", d.onPod(ActInspect, d.handleEvents))
	mux.HandleFunc("GET /v1/pods/{name}/logs", d.onPod(ActInspect, d.handleLogs))
	mux.HandleFunc("GET /v1/pods/{name}/wait", d.handleWait)
	mux.HandleFunc("POST /v1/pods/{name}/stop", d.onPod(ActRun, d.handleStop))
	mux.HandleFunc("DELETE /v1/pods/{name}", d.onPod(ActDelete, d.handleRm))
	mux.HandleFunc("GET /metrics", d.handleMetrics)
	mux.HandleFunc("GET /v1/version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"version": d.cfg.Version, "stateDir": d.st.Dir()})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no such call: %s %s", r.Method, r.URL.Path))
	})
	return d.recoverer(mux)
}

// recoverer answers 500 for a handler that panicked, instead of dropping
// the connection; the daemon goes on serving.
func (d *Daemon) recoverer(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				d.log.Error("request panicked", "method", r.Method, "path", r.URL.Path, "panic", v)
				writeErr(w, http.StatusInternalServerError, fmt.Errorf("internal error: %v", v))
			}
		}()
		h.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, code int, err error) {
	e := pods.APIError{Message: pods.OneLine(err.Error())}
	var fe *spec.FieldError
	if errors.As(err, &fe) {
		e.Field = fe.Path
	}
	writeJSON(w, code, e)
}

// httpError carries a status code.
type httpError struct {
	code int
	err  error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

func errCode(code int, format string, args ...any) error {
	return &httpError{code: code, err: fmt.Errorf(format, args...)}
}

func fail(w http.ResponseWriter, err error) {
	var he *httpError
	switch {
	case errors.As(err, &he):
		writeErr(w, he.code, err)
	case errors.Is(err, spec.ErrInvalid):
		writeErr(w, http.StatusBadRequest, err)
	default:
		writeErr(w, http.StatusInternalServerError, err)
	}
}

// request is one decision a request needs: an action on an object.
type request struct {
	action string
	o      Object
}

// decisions decides each of the caller's requests: the decisions' audit
// entries, and for each request a 403 error if it is denied (nil if
// allowed). Its own error is for a caller it cannot name or a request the
// policy cannot decide.
func (d *Daemon) decisions(ctx context.Context, reqs []request) ([]Entry, []error, error) {
	c, ok := callerOf(ctx)
	if !ok {
		return nil, nil, errCode(http.StatusForbidden, "the caller could not be identified (SO_PEERCRED)")
	}
	denied := make([]error, len(reqs))
	if d.cfg.Authorizer == nil {
		return nil, denied, nil
	}
	es := make([]Entry, len(reqs))
	for i, rq := range reqs {
		dec, err := d.cfg.Authorizer.Decide(c, rq.action, rq.o)
		if err != nil {
			return nil, nil, errCode(http.StatusBadRequest, "%s %s: %w", rq.action, rq.o, err)
		}
		params := map[string]string{"request": rq.action, "rule": dec.Reason}
		for k, v := range dec.Params {
			params[k] = v
		}
		es[i] = Entry{Caller: &c, Action: AuditPolicyAllow, Object: rq.o, Decision: "allow", Params: params}
		if !dec.Allow {
			es[i].Action, es[i].Decision = AuditPolicyDeny, "deny"
			denied[i] = errCode(http.StatusForbidden, "%s", dec.Reason)
		}
	}
	return es, denied, nil
}

// decideAll decides each of the caller's requests (see decisions) and
// records every decision, allow or deny, in order and committed together.
// Its own error is also for decisions it could not record.
func (d *Daemon) decideAll(ctx context.Context, reqs []request) ([]error, error) {
	es, denied, err := d.decisions(ctx, reqs)
	if err != nil {
		return nil, err
	}
	if err := d.audit(ctx, es...); err != nil {
		return nil, err
	}
	return denied, nil
}

// authorize decides the caller's requests (see decideAll) and returns the
// first denial as a 403 error naming what decided it.
func (d *Daemon) authorize(ctx context.Context, reqs ...request) error {
	recorded, err := d.authorizeAsync(ctx, reqs...)
	if err != nil {
		return err
	}
	return recorded()
}

// authorizeAsync is authorize for a request that goes on while its
// decisions are recorded: a denial is recorded, and returned, at once;
// when everything is allowed the records are written while the request
// proceeds, and recorded waits for them. The request must call recorded
// before it answers, and fail with its error (a decision that could not
// be recorded): every decision is on disk before its answer.
func (d *Daemon) authorizeAsync(ctx context.Context, reqs ...request) (recorded func() error, err error) {
	es, denied, err := d.decisions(ctx, reqs)
	if err != nil {
		return nil, err
	}
	for _, derr := range denied {
		if derr != nil {
			if err := d.audit(ctx, es...); err != nil {
				return nil, err
			}
			return nil, derr
		}
	}
	if len(es) == 0 {
		return func() error { return nil }, nil
	}
	ch := make(chan error, 1)
	go func() { ch <- d.audit(context.WithoutCancel(ctx), es...) }()
	return sync.OnceValue(func() error { return <-ch }), nil
}

// applyDecisions is every decision an apply needs: the pod itself, its
// pod volumes (made by cloning a snapshot), and each VM's volumes and
// networks.
func applyDecisions(p *pods.Pod) []request {
	name := p.Metadata.Name
	out := []request{
		{ActCreate, Object{Kind: "pod", Name: name, Labels: p.Metadata.Labels}},
		{ActRun, Object{Kind: "pod", Name: name, Labels: p.Metadata.Labels}},
	}
	podVol := map[string]bool{}
	for _, v := range p.Spec.Volumes {
		podVol[v.Name] = true
		out = append(out, request{ActClone, Object{Kind: "volume", Name: v.From}}, request{ActCreate, Object{Kind: "volume", Name: pods.VolumeName(name, v.Name)}})
	}
	for _, vm := range p.Spec.VMs {
		for _, dsk := range vm.Disks {
			if dsk.Volume == "" {
				continue
			}
			vol := dsk.Volume
			if podVol[vol] {
				vol = pods.VolumeName(name, vol)
			}
			a := ActAttachRW
			if dsk.ReadOnly {
				a = ActAttachRO
			}
			out = append(out, request{a, Object{Kind: "volume", Name: vol}})
		}
		for _, n := range vm.Nets {
			if n.Network != "" {
				out = append(out, request{ActJoin, Object{Kind: "network", Name: n.Network}})
			}
		}
	}
	return out
}

func (d *Daemon) handleApply(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(io.LimitReader(r.Body, pods.MaxDocument+1))
	if err != nil {
		fail(w, errCode(http.StatusBadRequest, "read the pod: %w", err))
		return
	}
	p, err := pods.Load(b)
	if err != nil {
		fail(w, err)
		return
	}
	res, code, err := d.apply(r.Context(), p)
	if err != nil {
		fail(w, err)
		return
	}
	writeJSON(w, code, res)
}

// apply creates a pod, starts a stopped one applied again with the same
// spec, and refuses a different spec for an existing pod (pod specs are
// immutable, as in Kubernetes).
//
// A new pod needs every decision of applyDecisions, for the caller, who
// becomes its owner and whose clearance it runs at. Applying an existing
// pod again needs only run on it: its spec is the same, and what it
// attaches and joins was decided for its owner when it was created.
//
// A new pod's decisions are recorded while it is made (its VMs start
// meanwhile); the answer waits for their records and its own.
func (d *Daemon) apply(ctx context.Context, p *pods.Pod) (_ *pods.ApplyResult, _ int, err error) {
	var recorded func() error // the new pod's decisions, on disk
	defer func() {
		if recorded != nil {
			if rerr := recorded(); rerr != nil && err == nil {
				err = rerr
			}
		}
	}()
	caller, _ := callerOf(ctx)
	name := p.Metadata.Name
	obj := Object{Kind: "pod", Name: name, Labels: p.Metadata.Labels}
	want, _ := json.Marshal(p)
	d.mu.Lock()
	_, exists := d.pods[name]
	d.mu.Unlock()
	decided := false // every decision of a new pod was made
	for {
		if exists {
			if err := d.authorize(ctx, request{ActRun, obj}); err != nil {
				return nil, 0, err
			}
		} else {
			if recorded, err = d.authorizeAsync(ctx, applyDecisions(p)...); err != nil {
				return nil, 0, err
			}
			decided = true
		}
		d.mu.Lock()
		if _, exists = d.pods[name]; exists || decided {
			break
		}
		// Removed since: decide it as a new pod.
		d.mu.Unlock()
	}
	if old, ok := d.pods[name]; ok {
		defer d.mu.Unlock()
		have, _ := json.Marshal(old.rec.Pod)
		if !bytes.Equal(have, want) {
			return nil, 0, errCode(http.StatusConflict, "pod %s exists with another spec; pod specs cannot change (as in Kubernetes): rm it and apply again", name)
		}
		if old.removed || old.stopping {
			return nil, 0, errCode(http.StatusConflict, "pod %s is being stopped or removed; try again when it is done", name)
		}
		res := &pods.ApplyResult{Name: name, UID: old.rec.UID, Result: "unchanged"}
		if old.rec.Stopped {
			old.restart()
			res.Result = "started"
			old.event("", pods.Normal, "Applied", "pod applied again by %s: starting it", caller)
			d.wg.Add(1)
			go func() {
				defer d.wg.Done()
				d.audit(context.Background(), Entry{Caller: &caller, Action: AuditPodApply, Object: obj, Params: map[string]string{"uid": old.rec.UID, "result": "started"}})
			}()
		}
		return res, http.StatusOK, nil
	}
	rec := &record{UID: newUID(), Pod: p, Owner: pods.Owner{UID: caller.UID, GID: caller.GID}, Created: time.Now().UTC()}
	for _, v := range p.Spec.VMs {
		rec.VMs = append(rec.VMs, &vmRecord{Name: v.Name, State: pods.VMState{Waiting: &pods.Waiting{Reason: pods.ReasonCreating}}})
	}
	np := newPod(d, rec)
	np.event("", pods.Normal, "Created", "pod %s applied by %s", name, caller)
	d.pods[name] = np
	ch := np.save()
	// The VMs start while the record is written: each VM's own commit
	// (its pid, before it runs) carries the whole record, so no VM can run
	// unrecorded; the answer waits for this commit and the audit record.
	np.resume()
	d.mu.Unlock()
	err = <-ch
	if err == nil {
		err = recorded()
	}
	if err == nil {
		err = d.audit(ctx, Entry{Caller: &caller, Action: AuditPodApply, Object: obj, Params: map[string]string{"uid": rec.UID, "vms": strconv.Itoa(len(p.Spec.VMs)), "restart_policy": p.Spec.RestartPolicy}})
	}
	if err != nil {
		// Not recorded (the state store failed) or not audited: undo.
		zero := time.Duration(0)
		d.rm(context.Background(), np, true, &caller, &zero)
		return nil, 0, fmt.Errorf("apply pod %s: %w", name, err)
	}
	return &pods.ApplyResult{Name: name, UID: rec.UID, Result: "created"}, http.StatusCreated, nil
}

// restart starts a stopped pod again: its VMs from scratch, with their
// restart counts kept. d.mu must be held.
func (p *pod) restart() {
	p.rec.Stopped, p.rec.Reason, p.rec.Message = false, "", ""
	for _, v := range p.vms {
		if v.rec.PID != 0 {
			continue
		}
		v.rec.State = pods.VMState{Waiting: &pods.Waiting{Reason: pods.ReasonCreating}}
		v.rec.NextStart, v.rec.Backoff = time.Time{}, 0
	}
	p.save()
	p.resume()
}

// lookup finds a pod the caller may act on.
func (d *Daemon) lookup(r *http.Request, action string) (*pod, error) {
	p, recorded, err := d.lookupAsync(r, action)
	if err != nil {
		return nil, err
	}
	if err := recorded(); err != nil {
		return nil, err
	}
	return p, nil
}

// lookupAsync is lookup with the decision recorded while the request
// goes on (see authorizeAsync): the caller waits for recorded before it
// answers.
func (d *Daemon) lookupAsync(r *http.Request, action string) (_ *pod, recorded func() error, _ error) {
	name := r.PathValue("name")
	if err := pods.CheckName(name); err != nil {
		return nil, nil, errCode(http.StatusBadRequest, "pod name %v", err)
	}
	d.mu.Lock()
	p, ok := d.pods[name]
	var labels map[string]string
	if ok {
		labels = p.rec.Pod.Metadata.Labels
	}
	d.mu.Unlock()
	recorded, err := d.authorizeAsync(r.Context(), request{action, Object{Kind: "pod", Name: name, Labels: labels}})
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		if err := recorded(); err != nil {
			return nil, nil, err
		}
		return nil, nil, errCode(http.StatusNotFound, "no such pod: %s", name)
	}
	return p, recorded, nil
}

// onPod makes a handler of a call on one pod: the pod is looked up and
// the caller's action on it decided first.
func (d *Daemon) onPod(action string, h func(http.ResponseWriter, *http.Request, *pod)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p, err := d.lookup(r, action)
		if err != nil {
			fail(w, err)
			return
		}
		h(w, r, p)
	}
}

// infoOf is p.info under the lock.
func (d *Daemon) infoOf(p *pod) *pods.Info {
	d.mu.Lock()
	defer d.mu.Unlock()
	return p.info()
}

// handleList lists the pods the caller may inspect. Each pod is a
// decision of its own, and each decision is recorded: they are decided
// together, so that the audit log commits their records at once.
// inspectAll is every pod, by name, and the inspect request for each:
// what a caller may see of the pods is decided pod by pod (a list,
// /metrics).
func (d *Daemon) inspectAll() ([]*pod, []request) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ps := make([]*pod, 0, len(d.pods))
	for _, p := range d.pods {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].name() < ps[j].name() })
	reqs := make([]request, len(ps))
	for i, p := range ps {
		reqs[i] = request{ActInspect, Object{Kind: "pod", Name: p.name(), Labels: p.rec.Pod.Metadata.Labels}}
	}
	return ps, reqs
}

func (d *Daemon) handleList(w http.ResponseWriter, r *http.Request) {
	ps, reqs := d.inspectAll()
	denied, err := d.decideAll(r.Context(), reqs)
	if err != nil {
		fail(w, err)
		return
	}
	out := []*pods.Info{}
	d.mu.Lock()
	for i, p := range ps {
		if denied[i] == nil && !p.removed { // list shows what the caller may inspect
			out = append(out, p.info())
		}
	}
	d.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

// handleMetrics serves the Prometheus metrics the caller may see: the
// samples of the pods it may inspect (each an inspect decision, recorded
// as for a pod list) and those that name no pod.
func (d *Daemon) handleMetrics(w http.ResponseWriter, r *http.Request) {
	_, reqs := d.inspectAll()
	denied, err := d.decideAll(r.Context(), reqs)
	if err != nil {
		fail(w, err)
		return
	}
	visible := map[string]bool{}
	for i, rq := range reqs {
		if denied[i] == nil {
			visible[rq.o.Name] = true
		}
	}
	d.metrics.handler(visible).ServeHTTP(w, r)
}

func (d *Daemon) handleGet(w http.ResponseWriter, r *http.Request, p *pod) {
	writeJSON(w, http.StatusOK, d.infoOf(p))
}

func (d *Daemon) handleEvents(w http.ResponseWriter, r *http.Request, p *pod) {
	d.mu.Lock()
	ev := slices.Clone(p.rec.Events)
	d.mu.Unlock()
	if ev == nil {
		ev = []pods.Event{}
	}
	writeJSON(w, http.StatusOK, ev)
}

// handleLogs copies a VM's console log; with follow it goes on copying
// what the VM writes until its run ends or the caller hangs up.
func (d *Daemon) handleLogs(w http.ResponseWriter, r *http.Request, p *pod) {
	q := r.URL.Query()
	vmName := q.Get("vm")
	d.mu.Lock()
	var v *vm
	for _, c := range p.vms {
		if c.spec.Name == vmName || (vmName == "" && len(p.vms) == 1) {
			v = c
		}
	}
	var names []string
	for _, c := range p.vms {
		names = append(names, c.spec.Name)
	}
	var cur *instance
	if v != nil {
		cur = v.cur
	}
	d.mu.Unlock()
	if v == nil {
		if vmName == "" {
			fail(w, errCode(http.StatusBadRequest, "pod %s has %d VMs: name one with vm= (%v)", p.name(), len(names), names))
		} else {
			fail(w, errCode(http.StatusNotFound, "pod %s has no VM %q (it has %v)", p.name(), vmName, names))
		}
		return
	}
	path := d.logPath(p.name(), v.spec.Name)
	if q.Get("previous") == "1" || q.Get("previous") == "true" {
		path = d.prevLogPath(p.name(), v.spec.Name)
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		fail(w, errCode(http.StatusNotFound, "VM %s of pod %s has no log yet", v.spec.Name, p.name()))
		return
	}
	if err != nil {
		fail(w, err)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	io.Copy(w, f)
	follow := q.Get("follow") == "1" || q.Get("follow") == "true"
	if !follow || cur == nil {
		return
	}
	fl, _ := w.(http.Flusher)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		if fl != nil {
			fl.Flush()
		}
		select {
		case <-r.Context().Done():
			return
		case <-cur.done:
			io.Copy(w, f)
			return
		case <-tick.C:
		}
		if _, err := io.Copy(w, f); err != nil {
			return
		}
	}
}

// handleWait waits for a pod condition: Ready, Running (the phase), Ended
// (Succeeded or Failed) or Removed.
func (d *Daemon) handleWait(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	q := r.URL.Query()
	cond := q.Get("for")
	timeout := 60 * time.Second
	if t := q.Get("timeout"); t != "" {
		var err error
		if timeout, err = time.ParseDuration(t); err != nil || timeout <= 0 || timeout > time.Hour {
			fail(w, errCode(http.StatusBadRequest, "timeout %q: want a duration up to 1h, such as 30s", t))
			return
		}
	}
	test := map[string]func(p *pod) bool{
		// Ready also ends the wait for a pod that ended (and so never
		// will be): the answer's phase says which.
		"Ready":   func(p *pod) bool { return p != nil && (p.ready() || p.ended()) },
		"Running": func(p *pod) bool { return p != nil && p.phase() == pods.Running },
		"Ended":   func(p *pod) bool { return p != nil && p.ended() },
		"Removed": func(p *pod) bool { return p == nil },
	}[cond]
	if test == nil {
		fail(w, errCode(http.StatusBadRequest, "for=%q: want Ready, Running, Ended or Removed", cond))
		return
	}
	// The decision is recorded while the wait goes on; every answer
	// waits for its record.
	_, recorded, err := d.lookupAsync(r, ActInspect)
	if err != nil {
		// Waiting for a pod that is gone to be removed answers at once
		// (below); a denial is a denial whatever is waited for.
		var he *httpError
		if cond != "Removed" || !errors.As(err, &he) || he.code != http.StatusNotFound {
			fail(w, err)
			return
		}
		recorded = func() error { return nil } // recorded with the 404
	}
	defer recorded()
	answer := func(code int, v any, err error) {
		if rerr := recorded(); rerr != nil {
			fail(w, rerr)
		} else if err != nil {
			fail(w, err)
		} else {
			writeJSON(w, code, v)
		}
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		d.mu.Lock()
		p := d.pods[name]
		if p != nil && p.removed {
			p = nil
		}
		ok := test(p)
		var info *pods.Info
		if p != nil {
			info = p.info()
		}
		changed := d.changed
		d.mu.Unlock()
		if ok {
			if info == nil {
				answer(http.StatusOK, map[string]string{"name": name, "result": "removed"}, nil)
			} else {
				answer(http.StatusOK, info, nil)
			}
			return
		}
		if p == nil && cond != "Removed" {
			answer(0, nil, errCode(http.StatusNotFound, "no such pod: %s (removed while waiting for %s)", name, cond))
			return
		}
		select {
		case <-changed:
		case <-r.Context().Done():
			return
		case <-deadline.C:
			what := "it is gone"
			if info != nil {
				what = fmt.Sprintf("phase %s, ready %s", info.Status.Phase, info.ReadyCount())
			}
			answer(0, nil, errCode(http.StatusGatewayTimeout, "pod %s: not %s after %v (%s)", name, cond, timeout, what))
			return
		}
	}
}

func (d *Daemon) handleStop(w http.ResponseWriter, r *http.Request, p *pod) {
	caller, _ := callerOf(r.Context())
	grace, err := graceParam(r)
	if err != nil {
		fail(w, err)
		return
	}
	err = d.stopPod(r.Context(), p, &caller, grace)
	err = errors.Join(err, d.audit(r.Context(), Entry{Caller: &caller, Action: AuditPodStop, Object: Object{Kind: "pod", Name: p.name()}, Err: err}))
	if err != nil {
		fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, d.infoOf(p))
}

// graceParam reads ?grace=SECONDS, which overrides the pod's
// terminationGracePeriodSeconds for one stop or rm (0: SIGKILL at once,
// as kubectl delete --grace-period=0).
func graceParam(r *http.Request) (*time.Duration, error) {
	v := r.URL.Query().Get("grace")
	if v == "" {
		return nil, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > 3600 {
		return nil, errCode(http.StatusBadRequest, "grace=%q: want 0 to 3600 seconds", v)
	}
	g := time.Duration(n) * time.Second
	return &g, nil
}

// stopPod stops every VM of p (SIGTERM, then SIGKILL after the grace
// period: the pod's, or grace) and waits for their supervisors to end.
func (d *Daemon) stopPod(ctx context.Context, p *pod, by *Caller, grace *time.Duration) error {
	d.mu.Lock()
	if p.removed {
		d.mu.Unlock()
		return errCode(http.StatusNotFound, "no such pod: %s", p.name())
	}
	p.stopping = true
	p.grace = grace
	p.rec.Stopped = true
	if p.rec.Reason == "" {
		p.rec.Reason = pods.ReasonStopped
		p.rec.Message = "stopped by " + by.String()
	}
	p.event("", pods.Normal, "Stopping", "pod stop by %s", by)
	var sups []chan struct{}
	for _, v := range p.vms {
		select {
		case v.kill <- reasonStop:
		default:
		}
		if v.sup != nil {
			sups = append(sups, v.sup)
		}
		if v.rec.State.Waiting != nil {
			v.rec.State = pods.VMState{Terminated: &pods.Terminated{Reason: pods.ReasonStopped, Message: "stopped before it started", FinishedAt: time.Now().UTC()}}
		}
	}
	ch := p.save()
	d.mu.Unlock()
	for _, s := range sups {
		select {
		case <-s:
		case <-ctx.Done():
			return ctx.Err()
		case <-d.ctx.Done():
			return errors.New("the daemon is stopping")
		}
	}
	d.mu.Lock()
	p.stopping, p.grace = false, nil
	p.event("", pods.Normal, "Stopped", "every VM of pod %s stopped", p.name())
	ch = p.save()
	d.mu.Unlock()
	return <-ch
}

func (d *Daemon) handleRm(w http.ResponseWriter, r *http.Request, p *pod) {
	force := r.URL.Query().Get("force") == "1" || r.URL.Query().Get("force") == "true"
	caller, _ := callerOf(r.Context())
	d.mu.Lock()
	vols := p.rec.Pod.Spec.Volumes
	name := p.name()
	d.mu.Unlock()
	var reqs []request
	for _, v := range vols {
		if !v.Retain {
			reqs = append(reqs, request{ActDelete, Object{Kind: "volume", Name: pods.VolumeName(name, v.Name)}})
		}
	}
	if len(reqs) > 0 {
		if err := d.authorize(r.Context(), reqs...); err != nil {
			fail(w, err)
			return
		}
	}
	grace, err := graceParam(r)
	if err != nil {
		fail(w, err)
		return
	}
	err = d.rm(r.Context(), p, force, &caller, grace)
	err = errors.Join(err, d.audit(r.Context(), Entry{Caller: &caller, Action: AuditPodRm, Object: Object{Kind: "pod", Name: name},
		Params: map[string]string{"force": strconv.FormatBool(force)}, Err: err}))
	if err != nil {
		fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"name": name, "result": "removed"})
}

// active reports whether any VM of p runs or waits to (re)start. d.mu
// must be held.
func (p *pod) active() bool {
	for _, v := range p.vms {
		if v.cur != nil || v.rec.PID != 0 {
			return true
		}
		if v.sup != nil {
			select {
			case <-v.sup:
			default:
				return true
			}
		}
	}
	return false
}

// rm removes a pod that runs no VM (with force, it is stopped first):
// its record, cgroups, logs and outcome files, and its volumes but the
// retained ones.
func (d *Daemon) rm(ctx context.Context, p *pod, force bool, by *Caller, grace *time.Duration) error {
	d.mu.Lock()
	active := p.active()
	d.mu.Unlock()
	if active {
		if !force {
			return errCode(http.StatusConflict, "pod %s is running: stop it first, or rm --force", p.name())
		}
		if err := d.stopPod(ctx, p, by, grace); err != nil {
			return err
		}
	}
	d.mu.Lock()
	if p.removed || p.active() {
		d.mu.Unlock()
		return errCode(http.StatusConflict, "pod %s is being removed or started by another request", p.name())
	}
	p.removed = true
	name := p.name()
	delete(d.pods, name)
	d.notify()
	vols, made := p.rec.Pod.Spec.Volumes, p.rec.Volumes
	d.mu.Unlock()
	var errs []error
	for _, v := range p.vms {
		errs = append(errs, cleanupSockets(d.effective(v)))
	}
	if err := d.cg.RemovePod(name); err != nil {
		errs = append(errs, err)
	}
	if st, err := volume.Open(d.st.Dir()); err == nil {
		for _, v := range vols {
			vn := pods.VolumeName(name, v.Name)
			if v.Retain || !slices.Contains(made, vn) {
				continue
			}
			if err := st.Remove(vn); err != nil && !errors.Is(err, volume.ErrNotFound) {
				errs = append(errs, fmt.Errorf("remove pod volume %s: %w", vn, err))
			}
		}
	} else {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(filepath.Join(d.podDir, name)); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, <-d.persist.mark(name, nil))
	return errors.Join(errs...)
}

// cleanupSockets removes a VM's sockets if a run left them.
func cleanupSockets(eff *spec.VM) error {
	var errs []error
	for _, s := range []string{eff.APISocket, vsockPath(eff)} {
		if s == "" {
			continue
		}
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func vsockPath(eff *spec.VM) string {
	if eff.Vsock == nil {
		return ""
	}
	return eff.Vsock.UDS
}
