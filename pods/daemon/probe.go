package daemon

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rayvmm/rayvmm/pods"
)

// Probes, with Kubernetes' semantics: the startup probe runs first, and
// liveness and readiness only once it succeeded (or at once without one),
// each after its initialDelaySeconds from the VM's start, then every
// periodSeconds, each try bounded by timeoutSeconds. failureThreshold
// failures in a row fail a probe: a failed startup or liveness probe
// stops the VM (and the restart policy decides, restarting it under
// OnFailure whatever its status), a failed readiness probe clears Ready
// and nothing else; successThreshold successes in a row make it Ready
// again.

// probe runs a run's probes until ctx ends (the run ended).
func (d *Daemon) probe(ctx context.Context, v *vm, in *instance) {
	defer d.wg.Done()
	s := v.spec
	d.mu.Lock()
	started := v.rec.Started
	d.mu.Unlock()
	if !started && s.StartupProbe != nil {
		ok := d.probeLoop(ctx, v, in, pods.ProbeStartup, s.StartupProbe, func(ok bool, fails, _ int) bool {
			if ok {
				return true
			}
			if fails >= int(s.StartupProbe.FailureThreshold) {
				d.probeFailed(v, pods.ProbeStartup, fails, true)
				return true
			}
			return false
		})
		if !ok {
			return
		}
		d.mu.Lock()
		v.rec.Started = true
		if s.ReadinessProbe == nil {
			v.rec.Ready = true
		}
		v.p.event(s.Name, pods.Normal, "StartupSucceeded", "startup probe of VM %s succeeded", s.Name)
		v.p.save()
		d.mu.Unlock()
	}
	var wg sync.WaitGroup
	if s.LivenessProbe != nil {
		wg.Go(func() {
			d.probeLoop(ctx, v, in, pods.ProbeLiveness, s.LivenessProbe, func(ok bool, fails, _ int) bool {
				if !ok && fails >= int(s.LivenessProbe.FailureThreshold) {
					d.probeFailed(v, pods.ProbeLiveness, fails, true)
					return true
				}
				return false
			})
		})
	}
	if r := s.ReadinessProbe; r != nil {
		wg.Go(func() {
			d.probeLoop(ctx, v, in, pods.ProbeReadiness, r, func(ok bool, fails, oks int) bool {
				d.mu.Lock()
				defer d.mu.Unlock()
				switch {
				case ok && oks >= int(r.SuccessThreshold) && !v.rec.Ready:
					v.rec.Ready = true
					v.p.event(s.Name, pods.Normal, "Ready", "VM %s is ready", s.Name)
					v.p.save()
				case !ok && fails >= int(r.FailureThreshold) && v.rec.Ready:
					v.rec.Ready = false
					v.p.event(s.Name, pods.Warning, "NotReady", "VM %s is not ready: readiness probe failed %d times", s.Name, fails)
					v.p.save()
					d.wg.Add(1)
					go d.auditProbe(v, pods.ProbeReadiness, fails)
				}
				return false
			})
		})
	}
	wg.Wait()
}

// probeFailed acts on a failed startup or liveness probe: the VM is
// stopped (and restarted by the policy). d.mu must not be held.
func (d *Daemon) probeFailed(v *vm, kind string, fails int, kill bool) {
	d.mu.Lock()
	v.p.event(v.spec.Name, pods.Warning, "Unhealthy", "VM %s failed its %s probe %d times in a row; it will be restarted (by restartPolicy %s)", v.spec.Name, kind, fails, v.p.rec.Pod.Spec.RestartPolicy)
	d.mu.Unlock()
	d.wg.Add(1)
	go d.auditProbe(v, kind, fails)
	if kill {
		select {
		case v.kill <- kind + " probe failed":
		default:
		}
	}
}

func (d *Daemon) auditProbe(v *vm, kind string, fails int) {
	defer d.wg.Done()
	d.audit(context.Background(), Entry{Action: AuditPodProbeFailure, Object: Object{Kind: "pod", Name: v.p.name()},
		Params: map[string]string{"vm": pods.VMName(v.p.name(), v.spec.Name), "probe": kind, "failures": strconv.Itoa(fails)}})
}

// probeLoop probes every period after the initial delay, calling result
// with each outcome and the counts of failures and successes in a row,
// until result says done (true) or ctx ends (false).
func (d *Daemon) probeLoop(ctx context.Context, v *vm, in *instance, kind string, p *pods.Probe, result func(ok bool, fails, oks int) bool) bool {
	wait := func(dur time.Duration) bool {
		if dur <= 0 {
			return ctx.Err() == nil
		}
		t := time.NewTimer(dur)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
	if !wait(time.Until(in.started.Add(time.Duration(p.InitialDelaySeconds) * time.Second))) {
		return false
	}
	fails, oks := 0, 0
	period := time.Duration(p.PeriodSeconds) * time.Second
	for {
		next := time.Now().Add(period)
		err := d.check(ctx, v, in, p)
		if ctx.Err() != nil {
			return false
		}
		ok := err == nil
		d.metrics.probed(v.p.name(), v.spec.Name, kind, ok)
		if ok {
			oks, fails = oks+1, 0
		} else {
			fails, oks = fails+1, 0
			d.mu.Lock()
			v.p.event(v.spec.Name, pods.Warning, "Unhealthy", "%s probe failed: %v", upperFirst(kind), err)
			d.mu.Unlock()
		}
		if result(ok, fails, oks) {
			return true
		}
		if !wait(time.Until(next)) {
			return false
		}
	}
}

func upperFirst(s string) string { return strings.ToUpper(s[:1]) + s[1:] }

// check runs one probe try.
func (d *Daemon) check(ctx context.Context, v *vm, in *instance, p *pods.Probe) error {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(p.TimeoutSeconds)*time.Second)
	defer cancel()
	switch {
	case p.Vsock != nil:
		return checkVsock(ctx, in.eff.Vsock.UDS, p.Vsock.Port)
	case p.UDP != nil:
		host := p.UDP.Host
		if host == "" {
			host = pods.GuestAddr(v.spec.Cmdline)
		}
		return checkUDP(ctx, host, p.UDP.Port, p.UDP.Payload)
	}
	return fmt.Errorf("no probe handler")
}

// checkVsock connects to a guest port through the VM's hybrid vsock
// socket, as Firecracker's host side does ("CONNECT PORT\n", answered
// "OK N\n"), sends "ping" and expects "pong".
func checkVsock(ctx context.Context, uds string, port uint32) error {
	// A socket error names the socket by the path it was bound to, a
	// temporary one: say what happened instead.
	why := func(err error) string {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return "no answer in time"
		}
		if errors.Is(err, io.EOF) {
			return "connection closed"
		}
		var op *net.OpError
		if errors.As(err, &op) && op.Err != nil {
			return op.Err.Error()
		}
		return err.Error()
	}
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "unix", uds)
	if err != nil {
		return fmt.Errorf("connect to the vsock socket: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	r := bufio.NewReaderSize(c, 64)
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return fmt.Errorf("vsock CONNECT %d: %s", port, why(err))
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("vsock CONNECT %d: %s", port, why(err))
	}
	if !strings.HasPrefix(line, "OK ") {
		return fmt.Errorf("vsock CONNECT %d: %q", port, strings.TrimSpace(line))
	}
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return fmt.Errorf("vsock port %d: send ping: %s", port, why(err))
	}
	line, err = r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("vsock port %d: no pong: %s", port, why(err))
	}
	if strings.TrimRight(line, "\r\n") != "pong" {
		return fmt.Errorf("vsock port %d: answered %q, want pong", port, strings.TrimSpace(line))
	}
	return nil
}

// checkUDP sends payload to host:port and expects it echoed back.
func checkUDP(ctx context.Context, host string, port int, payload string) error {
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "udp4", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("udp %s:%d: %w", host, port, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := c.Write([]byte(payload)); err != nil {
		return fmt.Errorf("udp %s:%d: send: %w", host, port, err)
	}
	buf := make([]byte, len(payload)+64)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("udp %s:%d: no echo: %w", host, port, err)
		}
		if bytes.Equal(buf[:n], []byte(payload)) {
			return nil
		}
		// Not our echo (a late answer to an earlier try): keep reading.
	}
}
