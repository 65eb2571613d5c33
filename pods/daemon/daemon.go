// Package daemon is the rayvmm daemon (`rayvmm daemon`, built into
// rayvmmd): it serves the pods API over HTTP/JSON on a Unix socket, runs
// each pod VM as a detached VM process (rayvmm-vm) in a cgroup of its
// own, restarts VMs by their pod's restart policy with Kubernetes'
// back-off, probes them (startup, liveness, readiness over vsock or UDP),
// keeps every pod's record and events in the state store, and serves
// Prometheus metrics.
//
// VM processes outlive the daemon, as containerd's shims outlive
// containerd: a daemon stopped (SIGTERM) or killed (kill -9) leaves its
// VMs running, and the next daemon on the state directory re-adopts them
// by pid, process start time and API socket, and learns how the ones that
// ended meanwhile did from the outcome each VM process writes to a file as it
// exits. Only one daemon serves a state directory at a time.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/pods/cgroup"
	"github.com/rayvmm/rayvmm/state"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// DefaultSocket is where the daemon listens unless told otherwise.
const DefaultSocket = "/run/rayvmm/rayvmm.sock"

// Config is the daemon's settings.
type Config struct {
	// StateDir holds the state store, volumes, networks and the pods'
	// logs, outcome files and sockets.
	StateDir string
	// Socket is the API's Unix socket (mode 0660), SocketGID its group
	// (-1: the daemon's).
	Socket    string
	SocketGID int
	// BackoffScale multiplies the restart back-off times (10 s doubling
	// to 300 s, reset after 10 minutes of running): 1 in production, a
	// fraction in tests.
	BackoffScale float64
	// Cgroups makes the VMs' cgroups (nil: this host's, parent
	// cgroup.DefaultParent).
	Cgroups *cgroup.Manager
	// VMBinary is rayvmm-vm ("": found as vmproc.FindBinary does).
	VMBinary string
	// Kernel is the built-in guest kernel, for VMs that name none.
	Kernel []byte
	// KVMDevice is the KVM device (default /dev/kvm).
	KVMDevice string
	Version   string
	Log       *slog.Logger
	// Authorizer and Auditor are the access policy and audit log hooks
	// (see hooks.go); nil: allow everyone who reaches the socket, record
	// nothing.
	Authorizer Authorizer
	Auditor    Auditor
	// Ready, if set, is called once the daemon listens and has resumed
	// its pods.
	Ready func()
}

// Back-off times before scaling, as in Kubernetes.
const (
	BackoffInitial = 10 * time.Second
	BackoffMax     = 300 * time.Second
	BackoffReset   = 10 * time.Minute
)

// ErrAlreadyRunning means another daemon serves the state directory.
var ErrAlreadyRunning = errors.New("another rayvmm daemon serves this state directory")

// Daemon is a running daemon.
type Daemon struct {
	cfg     Config
	st      *state.Store
	lock    *state.Lock
	cg      *cgroup.Manager
	log     *slog.Logger
	persist *persister
	runDir  string
	podDir  string

	ctx    context.Context // the daemon's life; cancelled at Shutdown
	cancel context.CancelFunc
	wg     sync.WaitGroup // supervisors and probes

	mu      sync.Mutex
	pods    map[string]*pod
	changed chan struct{} // closed and replaced at every change
	metrics *metrics

	srv          *http.Server
	listener     net.Listener
	removeSocket func() error
	persistEnd   chan struct{}
	persistRun   chan struct{}
}

// socketRoom is what the longest socket name under the run directory
// adds to it: "/<16 hex uid>-<vm index>.vsock_<port>".
const socketRoom = len("/0123456789abcdef-63.vsock_4294967295")

// New takes the state directory for this daemon: it refuses when another
// daemon holds it, reads every pod's record and prepares the cgroups. It
// starts nothing; Serve does.
func New(cfg Config) (*Daemon, error) {
	if cfg.BackoffScale <= 0 {
		cfg.BackoffScale = 1
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	st, err := state.Open(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	d := &Daemon{
		cfg: cfg, st: st, log: cfg.Log, pods: map[string]*pod{}, changed: make(chan struct{}),
		runDir: filepath.Join(st.Dir(), "run"), podDir: st.KindDir("pods"),
		persistEnd: make(chan struct{}), persistRun: make(chan struct{}),
	}
	if len(d.runDir)+socketRoom > 107 {
		return nil, fmt.Errorf("state directory %s: its path is too long for the VMs' sockets under it (%d bytes; at most %d)", st.Dir(), len(st.Dir()), 107-socketRoom-len("/run"))
	}
	for _, dir := range []string{d.podDir, d.runDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("state directory: %w", err)
		}
	}
	lockPath := filepath.Join(d.podDir, "daemon.lock")
	if d.lock, err = state.TryLock(lockPath, true); err != nil {
		if errors.Is(err, state.ErrLocked) {
			if _, pid := state.Holder(lockPath); pid > 0 {
				return nil, fmt.Errorf("%w (pid %d): %s", ErrAlreadyRunning, pid, st.Dir())
			}
			return nil, fmt.Errorf("%w: %s", ErrAlreadyRunning, st.Dir())
		}
		return nil, fmt.Errorf("daemon lock: %w", err)
	}
	d.lock.SetOwner()
	fail := func(err error) (*Daemon, error) {
		d.lock.Release()
		return nil, err
	}
	if d.cg = cfg.Cgroups; d.cg == nil {
		if d.cg, err = cgroup.Detect(cgroup.DefaultParent); err != nil {
			return fail(err)
		}
	}
	recs, err := loadRecords(st)
	if err != nil {
		return fail(fmt.Errorf("read pod records: %w", err))
	}
	d.persist = newPersister(st)
	d.metrics = newMetrics(d)
	d.ctx, d.cancel = context.WithCancel(context.Background())
	for name, r := range recs {
		d.pods[name] = newPod(d, r)
	}
	return d, nil
}

// newUID is a pod's random identity.
func newUID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Serve listens on the socket, re-adopts the pods of the state directory
// and serves until ctx is done or Shutdown is called; then it stops
// serving and leaves every VM running. It returns once it stopped.
func (d *Daemon) Serve(ctx context.Context) error {
	l, err := d.listen()
	if err != nil {
		d.lock.Release()
		return err
	}
	d.listener = l
	go func() { d.persist.run(d.persistEnd); close(d.persistRun) }()
	d.mu.Lock()
	for _, p := range d.pods {
		p.resume()
	}
	d.mu.Unlock()
	d.wg.Add(1)
	go d.watchLogs()
	d.audit(context.Background(), Entry{Action: AuditDaemonStart, Object: Object{Kind: "daemon", Name: d.st.Dir()},
		Params: map[string]string{"socket": d.cfg.Socket, "version": d.cfg.Version, "pods": strconv.Itoa(len(d.pods))}})
	d.srv = &http.Server{
		Handler:           d.handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if cr, err := peerCred(c); err == nil {
				return context.WithValue(ctx, callerKey{}, cr)
			}
			return ctx
		},
		ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- d.srv.Serve(l) }()
	if d.cfg.Ready != nil {
		d.cfg.Ready()
	}
	d.log.Info("serving", "socket", d.cfg.Socket, "state_dir", d.st.Dir(), "pods", len(d.pods), "cgroup_version", d.cg.Version())
	select {
	case <-ctx.Done():
	case <-d.ctx.Done():
	case err = <-errc:
	}
	d.stop()
	return err
}

// listen makes the API socket: mode 0660, in SocketGID's group. A stale
// socket (nothing accepts on it) is replaced; the daemon lock already
// says no other daemon of this state directory runs, but a socket path
// another daemon (of another state directory) serves is refused.
func (d *Daemon) listen() (net.Listener, error) {
	path := d.cfg.Socket
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	l, remove, err := control.ListenSocket(path)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	d.removeSocket = remove
	gid := -1
	if d.cfg.SocketGID >= 0 {
		gid = d.cfg.SocketGID
	}
	if err := os.Chown(path, -1, gid); err != nil {
		l.Close()
		remove()
		return nil, fmt.Errorf("socket %s: chown: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		remove()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return l, nil
}

// Shutdown stops the daemon as SIGTERM does: it stops serving and
// probing and leaves the VMs running for the next daemon.
func (d *Daemon) Shutdown() { d.cancel() }

// stop ends serving, probing and supervising, writes what is pending and
// lets go of the state directory. The VM processes keep running.
func (d *Daemon) stop() {
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d.srv.Shutdown(sctx)
	if d.removeSocket != nil {
		d.removeSocket()
	}
	d.cancel()
	d.wg.Wait()
	d.audit(context.Background(), Entry{Action: AuditDaemonStop, Object: Object{Kind: "daemon", Name: d.st.Dir()}})
	close(d.persistEnd)
	<-d.persistRun
	d.lock.Release()
	d.log.Info("stopped; VMs keep running")
}

// Reload records a reload of the policy file (SIGHUP) in the audit log,
// with its error when the file was refused; the policy itself is reloaded
// by whoever owns it (cmd/rayvmmd).
func (d *Daemon) Reload(file string, err error) {
	d.audit(context.Background(), Entry{Action: AuditDaemonReload, Object: Object{Kind: "daemon", Name: d.st.Dir()},
		Params: map[string]string{"policy": file}, Err: err})
}

// notify wakes everyone waiting for a change. d.mu must be held.
func (d *Daemon) notify() {
	close(d.changed)
	d.changed = make(chan struct{})
}

// audit records e if an auditor is wired.
func (d *Daemon) audit(ctx context.Context, es ...Entry) error {
	if d.cfg.Auditor == nil || len(es) == 0 {
		return nil
	}
	if err := d.cfg.Auditor.Record(ctx, es...); err != nil {
		d.log.Error("audit log", "action", es[0].Action, "records", len(es), "err", err)
		return fmt.Errorf("audit log: %w", err)
	}
	return nil
}

// files of a pod VM.
func (d *Daemon) logPath(pod, vm string) string { return filepath.Join(d.podDir, pod, vm+".log") }
func (d *Daemon) prevLogPath(pod, vm string) string {
	return filepath.Join(d.podDir, pod, vm+".previous.log")
}
func (d *Daemon) exitPath(pod, vm string) string { return filepath.Join(d.podDir, pod, vm+".exit") }

// reportPath is where a VM process's sandbox reports the call it refused
// (strict mode), kept beside its outcome file for a daemon that re-adopts
// it.
func (d *Daemon) reportPath(pod, vm string) string {
	return filepath.Join(d.podDir, pod, vm+".sandbox")
}
func (d *Daemon) apiSocket(uid string, i int) string {
	return filepath.Join(d.runDir, fmt.Sprintf("%s-%d.api", uid, i))
}
func (d *Daemon) vsockSocket(uid string, i int) string {
	return filepath.Join(d.runDir, fmt.Sprintf("%s-%d.vsock", uid, i))
}

// PodState is a pod's Info, for tests and the benchmark in this process.
func (d *Daemon) PodState(name string) (*pods.Info, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pods[name]
	if !ok {
		return nil, false
	}
	return p.info(), true
}
