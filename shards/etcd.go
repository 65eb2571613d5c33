package shards

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/shards/cluster"
	"github.com/rayvmm/rayvmm/shards/nbd"
)

// The embedded etcd keeps its data in STATE/shards/etcd and serves
// clients on the unix socket STATE/shards/etcd.sock (mode 0600: only the
// state directory's owner reaches it, and no TCP port can clash). One
// process runs it at a time, holding STATE/shards/etcd.lock, which also
// records its pid.
func embedDir(stateDir string) string  { return cluster.EmbeddedDir(stateDir) }
func embedSock(stateDir string) string { return filepath.Join(embedDir(stateDir), "etcd.sock") }
func embedLock(stateDir string) string { return filepath.Join(embedDir(stateDir), "etcd.lock") }

// EmbeddedEndpoint is the client URL of the state directory's embedded
// etcd.
func EmbeddedEndpoint(stateDir string) string { return "unix://" + embedSock(stateDir) }

// ErrEtcdRunning is returned by RunEmbedded when another process already
// runs the state directory's etcd.
var ErrEtcdRunning = errors.New("the embedded etcd of this state directory is already running")

// RunEmbedded runs a single-node etcd for the state directory until ctx
// ends; extraClientURLs (e.g. http://0.0.0.0:2379) are served besides the
// unix socket, for storage nodes on other machines. ready is called once
// it serves.
func RunEmbedded(ctx context.Context, stateDir string, extraClientURLs []string, ready func()) error {
	dir := embedDir(stateDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("embedded etcd: %w", err)
	}
	lock, err := os.OpenFile(embedLock(stateDir), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("embedded etcd: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("embedded etcd in %s: %w", dir, ErrEtcdRunning)
	}
	lock.Truncate(0)
	lock.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	sock := embedSock(stateDir)
	os.Remove(sock) // left by a killed etcd; we hold the lock, so it is not in use
	cfg := embed.NewConfig()
	cfg.Name = "rayvmm"
	cfg.Dir = filepath.Join(dir, "etcd")
	cu, _ := url.Parse("unix://" + sock)
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	for _, s := range extraClientURLs {
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "http" && u.Scheme != "unix") || u.Host == "" {
			return fmt.Errorf("embedded etcd: client URL %q: want http://HOST:PORT", s)
		}
		cfg.ListenClientUrls = append(cfg.ListenClientUrls, *u)
		cfg.AdvertiseClientUrls = append(cfg.AdvertiseClientUrls, *u)
	}
	// The peer URL is never dialled (one member) but must be a URL:
	// a unix socket of its own keeps it off TCP ports.
	pu, _ := url.Parse("unix://" + filepath.Join(dir, "peer.sock"))
	os.Remove(pu.Path)
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.LogLevel = "error"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("embedded etcd: %w", err)
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(time.Minute):
		return errors.New("embedded etcd: not ready after a minute")
	case <-ctx.Done():
		return nil
	}
	os.Chmod(sock, 0o600)
	if ready != nil {
		ready()
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-e.Err():
		return fmt.Errorf("embedded etcd: %w", err)
	}
}

// StopEmbedded stops the state directory's embedded etcd, if one runs.
func StopEmbedded(stateDir string) (bool, error) {
	b, err := os.ReadFile(embedLock(stateDir))
	if err != nil {
		return false, nil
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid <= 0 || !embeddedRunning(stateDir) {
		return false, nil
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return false, nil
	}
	defer unix.Close(fd)
	if err := unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0); err != nil {
		return false, fmt.Errorf("stop embedded etcd (pid %d): %w", pid, err)
	}
	// poll is never restarted after a signal, and the Go runtime signals
	// its threads (SIGURG preemption): wait out the 10 s across EINTRs.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ms := int(time.Until(deadline).Milliseconds())
		if ms < 0 {
			ms = 0
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, ms)
		switch {
		case err == unix.EINTR && ms > 0:
			continue
		case err != nil:
			return true, fmt.Errorf("wait for embedded etcd (pid %d) to stop: %w", pid, err)
		case n == 0:
			return true, fmt.Errorf("embedded etcd (pid %d) still running 10 s after SIGTERM", pid)
		}
		return true, nil
	}
}

// embeddedRunning reports whether a process holds the embedded etcd's
// lock.
func embeddedRunning(stateDir string) bool {
	f, err := os.Open(embedLock(stateDir))
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err != nil {
		return true
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}

// ConnectOptions say how to reach the cluster metadata.
type ConnectOptions struct {
	// Endpoints of an etcd cluster; empty means the state directory's
	// embedded etcd.
	Endpoints []string
	StateDir  string
	// Start, when set, is how the embedded etcd is started when it is
	// not running: a command that runs RunEmbedded in the background and
	// writes a line to file descriptor 3 once it serves (rayvmm runs
	// itself as `rayvmm shard etcd`). Nil: do not start it.
	Start func() *exec.Cmd
	Log   *slog.Logger
}

// ErrNoCluster is returned by Connect when there is no etcd to use:
// no endpoints, no embedded etcd running, and none to start.
var ErrNoCluster = errors.New("no etcd: give --etcd-endpoints, or run `rayvmm shard etcd`")

// Configured reports whether sharded volumes are in use here (see
// cluster.Configured).
func Configured(o ConnectOptions) bool { return cluster.Configured(o.Endpoints, o.StateDir) }

// Connect returns a Store on the cluster: the given endpoints, or the
// embedded etcd, which it starts in the background (o.Start) when it is
// not running.
func Connect(ctx context.Context, o ConnectOptions) (*Store, error) {
	eps := o.Endpoints
	if len(eps) == 0 {
		if !embeddedRunning(o.StateDir) {
			if o.Start == nil {
				return nil, ErrNoCluster
			}
			if err := startEmbedded(ctx, o); err != nil {
				return nil, err
			}
		}
		eps = []string{EmbeddedEndpoint(o.StateDir)}
	}
	c, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second,
		DialKeepAliveTime: 2 * time.Second, DialKeepAliveTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %s: %w", strings.Join(eps, ","), err)
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := c.Get(sctx, Prefix+"probe"); err != nil {
		c.Close()
		return nil, fmt.Errorf("connect to etcd %s: %w", strings.Join(eps, ","), err)
	}
	return NewStore(c, o.Log), nil
}

// startEmbedded starts the embedded etcd in a process of its own, in its
// own session (it outlives this command, like gpg-agent), and waits for
// its readiness line on a pipe.
func startEmbedded(ctx context.Context, o ConnectOptions) error {
	if err := os.MkdirAll(embedDir(o.StateDir), 0o700); err != nil {
		return fmt.Errorf("start embedded etcd: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	logf, err := os.OpenFile(filepath.Join(embedDir(o.StateDir), "etcd.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		w.Close()
		return fmt.Errorf("start embedded etcd: %w", err)
	}
	defer logf.Close()
	cmd := o.Start()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, logf, logf
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start embedded etcd: %w", err)
	}
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	line := make(chan error, 1)
	go func() {
		b := make([]byte, 64)
		_, err := r.Read(b)
		line <- err
	}()
	select {
	case err := <-line:
		if err == nil {
			go func() { <-exited }() // reap it if it exits while we run
			return nil
		}
		// The pipe closed without a line: it exited. Another process
		// may have won the race to start it.
		<-exited
		if embeddedRunning(o.StateDir) {
			return waitSocket(ctx, o.StateDir)
		}
		return fmt.Errorf("start embedded etcd: it exited (see %s)", filepath.Join(embedDir(o.StateDir), "etcd.log"))
	case <-time.After(time.Minute):
		return errors.New("start embedded etcd: not ready after a minute")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitSocket waits for the embedded etcd that another process is starting.
func waitSocket(ctx context.Context, stateDir string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(embedSock(stateDir)); err == nil {
			return nil
		}
		t := time.NewTimer(50 * time.Millisecond) // another process's start; no signal reaches us
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
	return errors.New("the embedded etcd another process started did not come up in 30 s")
}

func sortListings(l []nbd.Listing) {
	sort.Slice(l, func(i, j int) bool { return l[i].Name < l[j].Name })
}
