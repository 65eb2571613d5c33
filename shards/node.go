package shards

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/shards/nbd"
	"github.com/rayvmm/rayvmm/storage/raw"
)

// NodeConfig configures a storage node.
type NodeConfig struct {
	Name   string
	Listen string // host:port
	// Advertise is the address other processes reach it at (default:
	// the address it listens on).
	Advertise string
	Dir       string // replica files, DIR/VOLUME-ID/SHARD.raw
	Store     *Store
	Log       *slog.Logger
	TTL       int // lease TTL in seconds (default 5)
	// Ready is called once the node listens and is registered.
	Ready func(addr string)
}

// Node is a running storage node.
type node struct {
	cfg   NodeConfig
	log   *slog.Logger
	srv   *nbd.Server
	mu    sync.Mutex
	exps  map[string]*nodeExport // by export name
	files map[string]*openFile   // by path
	rmu   sync.Mutex             // one reconcile at a time (the watch, and Open)
	// orphans are directories of unknown volumes already reported.
	orphans map[string]bool
}

type nodeExport struct {
	path, desc string
	size       int64
}

type openFile struct {
	f    *raw.File
	refs int
}

// ServeNode runs a storage node until ctx ends: an NBD server with one
// export per replica the shard maps place on it, registered under a lease
// that it keeps alive (and grants anew after an etcd outage that outlived
// it). On the way out it revokes the lease, so the node is seen dead at
// once.
func ServeNode(ctx context.Context, cfg NodeConfig) error {
	if err := CheckName("node", cfg.Name); err != nil {
		return err
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 5
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return fmt.Errorf("shard node: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(cfg.Dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("shard node: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("shard node: %s is used by another shard node: %w", cfg.Dir, err)
	}
	if n, err := cfg.Store.Node(ctx, cfg.Name); err == nil && n.Static {
		return fmt.Errorf("shard node: %s is registered as a static node (%s); remove it first", cfg.Name, n.Address)
	} else if err != nil && !errors.Is(err, ErrNoNode) {
		return fmt.Errorf("shard node: %w", err)
	}
	l, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("shard node: %w", err)
	}
	if cfg.Advertise == "" {
		cfg.Advertise = l.Addr().String()
	}
	n := &node{cfg: cfg, log: cfg.Log.With("node", cfg.Name), exps: map[string]*nodeExport{}, files: map[string]*openFile{}, orphans: map[string]bool{}}
	n.srv = &nbd.Server{Exports: n, Log: n.log}
	if err := n.reconcile(ctx); err != nil {
		l.Close()
		return err
	}
	rec := Node{Name: cfg.Name, Address: cfg.Advertise, Registered: time.Now().UTC()}
	if _, err := cfg.Store.c.Put(ctx, nodeKey(cfg.Name), encode(rec)); err != nil {
		l.Close()
		return fmt.Errorf("shard node: register: %w", err)
	}
	served := make(chan error, 1)
	go func() { served <- n.srv.Serve(l) }()
	lctx, stopLease := context.WithCancel(ctx)
	leaseDone := make(chan struct{})
	var lease clientv3.LeaseID
	var leaseMu sync.Mutex
	registered := make(chan error, 1)
	go func() {
		defer close(leaseDone)
		n.keepLive(lctx, func(id clientv3.LeaseID, err error) {
			leaseMu.Lock()
			lease = id
			leaseMu.Unlock()
			select {
			case registered <- err:
			default:
			}
		})
	}()
	if err := <-registered; err != nil {
		stopLease()
		<-leaseDone
		n.srv.Close()
		<-served
		return err
	}
	watchDone := make(chan struct{})
	go func() { defer close(watchDone); n.watch(lctx) }()
	if cfg.Ready != nil {
		cfg.Ready(cfg.Advertise)
	}
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-served:
	}
	stopLease()
	<-leaseDone
	<-watchDone
	leaseMu.Lock()
	if lease != 0 {
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		cfg.Store.c.Revoke(rctx, lease)
		cancel()
	}
	leaseMu.Unlock()
	n.srv.Close()
	if serveErr == nil {
		serveErr = <-served
	}
	n.mu.Lock()
	for _, of := range n.files {
		of.f.Close()
	}
	n.mu.Unlock()
	return serveErr
}

// keepLive holds live/NAME under a lease, granting a new lease whenever
// the old one is lost (etcd restarted for longer than the TTL). got is
// called with each new lease, or with the first attempt's error.
func (n *node) keepLive(ctx context.Context, got func(clientv3.LeaseID, error)) {
	c := n.cfg.Store.c
	first := true
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := func() error {
			gctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			l, err := c.Grant(gctx, int64(n.cfg.TTL))
			if err != nil {
				return fmt.Errorf("grant lease: %w", err)
			}
			if _, err := c.Put(gctx, liveKey(n.cfg.Name), n.cfg.Advertise, clientv3.WithLease(l.ID)); err != nil {
				return fmt.Errorf("register as live: %w", err)
			}
			ka, err := c.KeepAlive(ctx, l.ID)
			if err != nil {
				return fmt.Errorf("keep lease alive: %w", err)
			}
			got(l.ID, nil)
			first = false
			backoff = 100 * time.Millisecond
			for range ka {
			}
			return nil
		}()
		if err != nil && first {
			got(0, fmt.Errorf("shard node: %w", err))
			return
		}
		if ctx.Err() != nil {
			return
		}
		n.log.Warn("node lease lost; registering again", "err", err)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// watch reconciles the exports whenever a volume or shard map changes.
func (n *node) watch(ctx context.Context) {
	for ctx.Err() == nil {
		wc := n.cfg.Store.c.Watch(clientv3.WithRequireLeader(ctx), Prefix, clientv3.WithPrefix())
		for wr := range wc {
			if wr.Err() != nil {
				break
			}
			relevant := false
			for _, ev := range wr.Events {
				k := string(ev.Kv.Key)
				relevant = relevant || strings.HasPrefix(k, Prefix+"volumes/") || strings.HasPrefix(k, Prefix+"shards/")
			}
			if relevant {
				if err := n.reconcile(ctx); err != nil {
					n.log.Warn("reconcile exports", "err", err)
				}
			}
		}
		t := time.NewTimer(500 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
		if err := n.reconcile(ctx); err != nil {
			n.log.Warn("reconcile exports", "err", err)
		}
	}
}

// reconcile makes the exports match the shard maps: a replica file for
// every replica placed here (created sparse when missing), and the files
// of replicas no longer placed here removed.
func (n *node) reconcile(ctx context.Context) error {
	n.rmu.Lock()
	defer n.rmu.Unlock()
	st := n.cfg.Store
	vols, err := st.Volumes(ctx)
	if err != nil {
		return err
	}
	want := map[string]*nodeExport{}
	ids := map[string]bool{}
	for _, v := range vols {
		ids[v.ID] = true
		shards, _, err := st.Shards(ctx, v.Name)
		if err != nil {
			return err
		}
		for _, sh := range shards {
			if sh.Find(n.cfg.Name) < 0 {
				continue
			}
			size := min(v.ShardSize, v.Size-int64(sh.Index)*v.ShardSize)
			p := filepath.Join(n.cfg.Dir, v.ID, fmt.Sprintf("%d.raw", sh.Index))
			id, err := ensureFile(p, size)
			if err != nil {
				return err
			}
			want[v.Export(sh.Index)] = &nodeExport{path: p, size: size,
				desc: fmt.Sprintf("rayvmm replica of %s shard %d (volume id %s, %s%s)", v.Name, sh.Index, v.ID, replicaIDTag, id)}
		}
	}
	n.mu.Lock()
	n.exps = want
	n.mu.Unlock()
	// Remove files no shard map names, but only in directories of
	// volumes this cluster knows (a node pointed at the wrong etcd must
	// not delete anything) or that were removed since the node saw them.
	wanted := map[string]bool{}
	for _, e := range want {
		wanted[e.path] = true
	}
	dirs, _ := os.ReadDir(n.cfg.Dir)
	for _, d := range dirs {
		if d.IsDir() && !ids[d.Name()] && !n.orphans[d.Name()] {
			// A volume removed while this node was away, or another
			// cluster's: kept, and said once.
			n.orphans[d.Name()] = true
			n.log.Warn("replica files of a volume this cluster does not know; remove the directory if it is not needed",
				"dir", filepath.Join(n.cfg.Dir, d.Name()))
		}
		if !d.IsDir() || !ids[d.Name()] {
			continue
		}
		files, _ := filepath.Glob(filepath.Join(n.cfg.Dir, d.Name(), "*.raw"))
		for _, f := range files {
			if !wanted[f] {
				n.log.Info("removing replica no longer placed here", "file", f)
				os.Remove(strings.TrimSuffix(f, ".raw") + ".id")
				os.Remove(f)
			}
		}
	}
	return nil
}

// ensureFile makes a replica file of size bytes (sparse) if there is
// none, with a new random replica ID beside it (SHARD.id), and returns
// the ID. The ID is the replica's identity: a file made anew (the node's
// directory was wiped or replaced) has a new one, so it is not taken for
// the replica the shard map knows.
func ensureFile(p string, size int64) (string, error) {
	idPath := strings.TrimSuffix(p, ".raw") + ".id"
	if st, err := os.Stat(p); err == nil {
		if st.Size() != size {
			return "", fmt.Errorf("replica file %s is %d bytes, want %d", p, st.Size(), size)
		}
		if b, err := os.ReadFile(idPath); err == nil && len(b) > 0 && len(b) <= 64 {
			return strings.TrimSpace(string(b)), nil
		}
		// No ID (or a broken one): this data's identity is unknown.
	} else {
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return "", err
		}
		f, err := raw.Create(p, size)
		if err != nil {
			return "", err
		}
		if err := f.Close(); err != nil {
			return "", err
		}
	}
	id := randomID()
	tmp := idPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(id+"\n"), 0o600); err != nil {
		return "", err
	}
	return id, os.Rename(tmp, idPath)
}

// Open implements nbd.Exports: replicas share one open file per export.
// An export this node does not know yet makes it look at etcd again (the
// shard map may have just placed it here).
func (n *node) Open(name string) (*nbd.Export, func(), bool) {
	n.mu.Lock()
	e := n.exps[name]
	n.mu.Unlock()
	if e == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		err := n.reconcile(ctx)
		cancel()
		if err != nil {
			n.log.Warn("reconcile exports", "err", err)
		}
		n.mu.Lock()
		e = n.exps[name]
		n.mu.Unlock()
		if e == nil {
			return nil, nil, false
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	of := n.files[e.path]
	if of == nil {
		f, err := raw.Open(e.path, false)
		if err != nil {
			n.log.Warn("open replica", "export", name, "err", err)
			return nil, nil, false
		}
		of = &openFile{f: f}
		n.files[e.path] = of
	}
	of.refs++
	release := func() {
		n.mu.Lock()
		defer n.mu.Unlock()
		if of.refs--; of.refs == 0 {
			of.f.Close()
			delete(n.files, e.path)
		}
	}
	return &nbd.Export{Name: name, Description: e.desc, Backend: of.f}, release, true
}

// List implements nbd.Exports.
func (n *node) List() []nbd.Listing {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []nbd.Listing
	for name, e := range n.exps {
		out = append(out, nbd.Listing{Name: name, Description: e.desc})
	}
	sortListings(out)
	return out
}
