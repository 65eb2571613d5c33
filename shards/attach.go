package shards

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/shards/engine"
	"github.com/rayvmm/rayvmm/shards/link"
	"github.com/rayvmm/rayvmm/shards/nbd"
	"github.com/rayvmm/rayvmm/storage"
)

// AttachOptions configure Attach.
type AttachOptions struct {
	Holder string // who attaches, for `volume inspect` and errors
	Log    *slog.Logger
	// Engine tunes the data path (timeouts, lag, chunk size); its
	// Layout, Dialer and Reporter are filled in by Attach.
	Engine engine.Config
	// OwnerTTL is the ownership lease's TTL in seconds (default 10): a
	// killed owner's volume can be attached again after it.
	OwnerTTL int
}

// DataPath is the engine as the control plane drives it: in this
// process (*engine.Volume) or in a VM process over a link
// (*link.Control).
type DataPath interface {
	Rebuild(ctx context.Context, shard int, r engine.Replica) error
	Drop(shard int, node string) error
	Replicas(shard int) []engine.Replica
	Fence(err error)
	Resync(ctx context.Context, shard int) error
}

var (
	_ DataPath = (*engine.Volume)(nil)
	_ DataPath = (*link.Control)(nil)
)

// Attachment is a sharded volume opened for I/O: this process owns it (a
// lease-bound key no other process can take while it lives), records the
// engine's replica state changes in etcd, and repairs the volume in the
// background: replicas that failed are rebuilt as soon as their node is
// live, and rebalance moves are carried out. The engine runs in this
// process (Attach) or in a VM process at the other end of a link
// (AttachLink).
type Attachment struct {
	Volume *Volume
	layout engine.Layout // as read at attach
	// Disk is the engine when it runs in this process (Attach).
	Disk *engine.Volume

	dp    DataPath
	ctl   *link.Control
	st    *Store
	log   *slog.Logger
	lease clientv3.LeaseID
	lost  chan struct{}
	clean atomic.Bool // the linked engine detached cleanly

	bg     context.Context
	cancel context.CancelFunc
	done   sync.WaitGroup

	pmu      sync.Mutex
	progress map[string]int64  // "shard/node" -> copied, not yet written
	ids      map[string]string // "shard/node" -> replica ID its node reported
	kick     chan struct{}

	// Dirty: the last attachment did not end with a clean detach, so
	// the engine reads each shard from one replica until it is resynced.
	Dirty    bool
	resynced []bool       // by shard, touched by the repair loop only
	unsynced atomic.Int32 // shards not resynced yet
	// backoff delays the next rebuild of a replica whose rebuild failed
	// ("shard/node"; repair loop only).
	backoff  map[string]retryAt
	returned map[string]bool // nodes that registered since the last pass (pmu)
}

// Attach opens a sharded volume for I/O with the engine in this process.
func Attach(ctx context.Context, st *Store, name string, o AttachOptions) (_ *Attachment, err error) {
	a, err := prepare(ctx, st, name, o)
	if err != nil {
		return nil, err
	}
	cfg := o.Engine
	cfg.Layout, cfg.Dialer, cfg.Reporter, cfg.Log, cfg.Resync = a.layout, a, a, a.log, a.Dirty
	if a.Disk, err = engine.Open(ctx, cfg); err != nil {
		a.release()
		return nil, err
	}
	a.start(a.Disk)
	return a, nil
}

// AttachLink opens a sharded volume for an engine in another process (a
// VM process) at the other end of the link f: the agent's side of the
// VM-process split. The VM process opens its engine with link.OpenDisk on
// its end, which asks for the layout. Serve then waits for the VM
// process and gives the volume up.
func AttachLink(ctx context.Context, st *Store, name string, o AttachOptions, f *os.File) (_ *Attachment, err error) {
	a, err := prepare(ctx, st, name, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	if a.ctl, err = link.NewControl(f, a.dialExport, a, a.guard, a); err != nil {
		a.release()
		return nil, err
	}
	a.start(a.ctl)
	return a, nil
}

// AttachVM is the agent role in a process that starts VM processes
// itself (the pods daemon): it makes the link, attaches the volume on
// one end (AttachLink) and returns the other end, for the VM process.
// Run Serve for as long as the VM lives.
func AttachVM(ctx context.Context, st *Store, name string, o AttachOptions) (vmEnd *os.File, _ *Attachment, err error) {
	ctlEnd, vmEnd, err := link.Pair()
	if err != nil {
		return nil, nil, err
	}
	a, err := AttachLink(ctx, st, name, o, ctlEnd)
	if err != nil {
		vmEnd.Close()
		return nil, nil, err
	}
	return vmEnd, a, nil
}

// Layout implements link.Session: the layout the VM process's engine
// opens, and whether it resyncs (the last detach was not clean).
func (a *Attachment) Layout() (engine.Layout, bool) { return a.layout, a.Dirty }

// Detached implements link.Session: the VM process closed its engine,
// after a final flush that worked (clean) or not.
func (a *Attachment) Detached(clean bool) { a.clean.Store(clean) }

// Serve waits until the VM process's end of the link is closed: the VM
// process exited, cleanly or not, or was killed. Then it gives the volume
// up, as a clean detach if the engine reported one (the next attach
// needs no resync). If ctx ends first, the VM process's engine is fenced
// and the volume given up uncleanly.
func (a *Attachment) Serve(ctx context.Context) error {
	select {
	case <-a.ctl.Done():
	case <-ctx.Done():
		a.ctl.Fence(fmt.Errorf("the agent stops: %w", context.Cause(ctx)))
		a.Abort()
		return context.Cause(ctx)
	}
	if a.clean.Load() {
		return a.Close()
	}
	a.log.Warn("the VM process ended without a clean detach; the next attach resyncs the replicas")
	a.Abort()
	return nil
}

// guard limits what the VM process may ask for to the replicas of this
// volume's shards.
func (a *Attachment) guard(shard int, node, export string) error {
	if shard < 0 || shard >= a.Volume.Shards() {
		return fmt.Errorf("shard %d is not a shard of %s", shard, a.Volume.Name)
	}
	if export != "" && export != a.Volume.Export(shard) {
		return fmt.Errorf("export %q is not shard %d of %s", export, shard, a.Volume.Name)
	}
	ctx, cancel := context.WithTimeout(a.bg, 5*time.Second)
	defer cancel()
	r, err := a.st.c.Get(ctx, shardKey(a.Volume.Name, shard))
	if err != nil {
		return err
	}
	if len(r.Kvs) == 0 {
		return fmt.Errorf("shard %d of %s: %w", shard, a.Volume.Name, ErrNotFound)
	}
	sh, err := decode[engine.Shard](r.Kvs[0].Value, "shard")
	if err != nil {
		return err
	}
	if sh.Find(node) < 0 {
		return fmt.Errorf("node %s holds no replica of %s shard %d", node, a.Volume.Name, shard)
	}
	return nil
}

func prepare(ctx context.Context, st *Store, name string, o AttachOptions) (_ *Attachment, err error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.OwnerTTL <= 0 {
		o.OwnerTTL = 10
	}
	a := &Attachment{st: st, log: o.Log.With("volume", name), progress: map[string]int64{}, ids: map[string]string{}, backoff: map[string]retryAt{}, returned: map[string]bool{},
		kick: make(chan struct{}, 1), lost: make(chan struct{})}
	if a.lease, err = st.own(ctx, name, o.Holder, o.OwnerTTL); err != nil {
		return nil, err
	}
	a.bg, a.cancel = context.WithCancel(context.WithoutCancel(ctx))
	a.done.Add(1)
	go func() {
		defer a.done.Done()
		a.keepOwner(a.bg, a.lost)
	}()
	if a.Volume, a.layout, err = st.Layout(ctx, name); err != nil {
		a.release()
		return nil, err
	}
	// Mark the volume in use until a clean detach; finding the mark
	// means the last user did not detach cleanly.
	o2 := Owner{Holder: o.Holder, PID: os.Getpid(), Host: hostname(), Since: time.Now().UTC()}
	r, err := st.c.Txn(ctx).If(clientv3.Compare(clientv3.LeaseValue(ownerKey(name)), "=", a.lease)).
		Then(clientv3.OpGet(dirtyKey(name)), clientv3.OpPut(dirtyKey(name), encode(o2))).Commit()
	if err == nil && !r.Succeeded {
		err = ErrNotOwner
	}
	if err != nil {
		a.release()
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	a.Dirty = len(r.Responses[0].GetResponseRange().Kvs) > 0
	a.resynced = make([]bool, len(a.layout.Shards))
	if a.Dirty {
		a.unsynced.Store(int32(len(a.layout.Shards)))
		a.log.Warn("the volume was not detached cleanly; resyncing its replicas")
	}
	return a, nil
}

// start runs the fence watch and the repair loop on the data path.
func (a *Attachment) start(dp DataPath) {
	a.dp = dp
	a.done.Add(2)
	go func() {
		defer a.done.Done()
		select {
		case <-a.lost:
			a.log.Error("ownership of the volume lost (lease expired); refusing further I/O")
			dp.Fence(ErrNotOwner)
		case <-a.bg.Done():
		}
	}()
	go func() {
		defer a.done.Done()
		a.repairLoop(a.bg)
	}()
}

// own takes the volume's owner key under a new lease.
func (s *Store) own(ctx context.Context, name, holder string, ttl int) (clientv3.LeaseID, error) {
	if _, err := s.Volume(ctx, name); err != nil {
		return 0, err
	}
	l, err := s.c.Grant(ctx, int64(ttl))
	if err != nil {
		return 0, fmt.Errorf("attach %s: grant lease: %w", name, err)
	}
	o := Owner{Holder: holder, PID: os.Getpid(), Host: hostname(), Since: time.Now().UTC()}
	var r *clientv3.TxnResponse
	for attempt := 0; ; attempt++ {
		r, err = s.c.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(ownerKey(name)), "=", 0)).
			Then(clientv3.OpPut(ownerKey(name), encode(o), clientv3.WithLease(l.ID))).Commit()
		if err != nil || r.Succeeded || attempt > 0 || !s.reapDeadOwner(ctx, name) {
			break
		}
	}
	if err == nil && !r.Succeeded {
		err = fmt.Errorf("%w (%s)", ErrOwned, s.ownerString(ctx, name))
	}
	if err != nil {
		s.c.Revoke(context.WithoutCancel(ctx), l.ID)
		return 0, fmt.Errorf("attach %s: %w", name, err)
	}
	return l.ID, nil
}

// reapDeadOwner revokes the lease of an owner that was a process on this
// host that no longer exists (killed with SIGKILL: its lease would only
// expire after its TTL), so the volume can be attached at once, as a
// local volume's lock dies with its process. It reports whether it did.
func (s *Store) reapDeadOwner(ctx context.Context, name string) bool {
	r, err := s.c.Get(ctx, ownerKey(name))
	if err != nil || len(r.Kvs) == 0 {
		return false
	}
	o, err := decode[Owner](r.Kvs[0].Value, "owner")
	if err != nil || o.Host != hostname() || o.PID <= 0 || o.PID == os.Getpid() {
		return false
	}
	if err := unix.Kill(o.PID, 0); !errors.Is(err, unix.ESRCH) {
		return false // alive (or not ours to ask): wait for its lease
	}
	s.log.Warn("the volume's owner process is gone; taking over", "volume", name, "pid", o.PID, "holder", o.Holder)
	_, err = s.c.Revoke(ctx, clientv3.LeaseID(r.Kvs[0].Lease))
	return err == nil
}

// keepOwner keeps the ownership lease alive; lost is closed if it expires.
func (a *Attachment) keepOwner(ctx context.Context, lost chan struct{}) {
	ka, err := a.st.c.KeepAlive(ctx, a.lease)
	if err != nil {
		close(lost)
		return
	}
	for range ka {
	}
	if ctx.Err() == nil {
		close(lost)
	}
}

// Close stops the repair loop, flushes and closes the engine (when it
// runs here) and gives up ownership; if the flush worked (and for a
// linked engine, always: its owner calls Abort when its flush failed)
// the detach is clean and the next attachment needs no resync.
func (a *Attachment) Close() error {
	var err error
	if a.Disk != nil {
		err = a.Disk.Flush(context.Background())
	}
	a.release()
	if err == nil && a.unsynced.Load() == 0 { // else the next attachment resyncs what is left
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, derr := a.st.c.Delete(ctx, dirtyKey(a.Volume.Name)); derr != nil {
			a.log.Warn("could not record the clean detach; the next attach resyncs", "err", derr)
		}
	}
	return err
}

// Abort gives up ownership without a clean detach: the next attachment
// resyncs the replicas.
func (a *Attachment) Abort() { a.release() }

func (a *Attachment) release() {
	if a.cancel != nil {
		a.cancel() // the repair loop stops, its rebuild is cancelled
	}
	a.done.Wait()
	if a.Disk != nil {
		a.Disk.Close()
	}
	if a.ctl != nil {
		a.ctl.Close()
	}
	a.flushProgress()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a.st.c.Revoke(ctx, a.lease)
}

// Dial implements engine.Dialer: it looks the node's address up and
// negotiates the replica's export with structured replies.
func (a *Attachment) Dial(ctx context.Context, shard int, r engine.Replica) (*nbd.Client, error) {
	conn, info, err := a.dialExport(ctx, shard, r)
	if err != nil {
		return nil, err
	}
	return nbd.NewClient(conn, info), nil
}

func (a *Attachment) dialExport(ctx context.Context, shard int, r engine.Replica) (net.Conn, nbd.Info, error) {
	conn, info, err := DialExport(ctx, a.st, r)
	if err == nil {
		a.dialed(shard, r, info)
	}
	return conn, info, err
}

// DialReplica connects to a replica's export on its node, wherever the
// node is now registered.
func DialReplica(ctx context.Context, st *Store, r engine.Replica) (*nbd.Client, error) {
	conn, info, err := DialExport(ctx, st, r)
	if err != nil {
		return nil, err
	}
	return nbd.NewClient(conn, info), nil
}

// replicaIDTag precedes the replica ID in a rayvmm node's export
// description.
const replicaIDTag = "replica id "

// ReplicaID is the replica ID a rayvmm node puts in an export's
// description, or "" (another NBD server).
func ReplicaID(info nbd.Info) string {
	_, id, ok := strings.Cut(info.Description, replicaIDTag)
	if !ok {
		return ""
	}
	return strings.TrimRight(id, ")")
}

// ErrReplaced is returned when a node reports another replica ID than
// the shard map records: its data is not the replica's.
var ErrReplaced = errors.New("the node's replica is not the one in the shard map (its file was made anew)")

// DialExport connects to a replica's export and negotiates it. A replica
// that is to be read or written as healthy must report the ID the shard
// map records (when one is recorded); one being rebuilt may be new.
func DialExport(ctx context.Context, st *Store, r engine.Replica) (net.Conn, nbd.Info, error) {
	n, err := st.Node(ctx, r.Node)
	if err != nil {
		return nil, nbd.Info{}, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", n.Address)
	if err != nil {
		return nil, nbd.Info{}, fmt.Errorf("node %s: %w", r.Node, err)
	}
	info, err := nbd.Handshake(ctx, conn, r.Export, true)
	if err != nil {
		conn.Close()
		return nil, nbd.Info{}, fmt.Errorf("node %s: %w", r.Node, err)
	}
	if id := ReplicaID(info); r.State != engine.Rebuilding && r.ID != "" && id != r.ID {
		conn.Close()
		return nil, nbd.Info{}, fmt.Errorf("node %s export %s reports replica id %q, the shard map has %q: %w", r.Node, r.Export, id, r.ID, ErrReplaced)
	}
	return conn, info, nil
}

// dialed records the replica ID a node reported: kept until a rebuild
// of that replica is recorded, or recorded now for a replica whose ID
// was not known.
func (a *Attachment) dialed(shard int, r engine.Replica, info nbd.Info) {
	id := ReplicaID(info)
	if id == "" || id == r.ID {
		return
	}
	a.pmu.Lock()
	a.ids[fmt.Sprintf("%d/%s", shard, r.Node)] = id
	a.pmu.Unlock()
	if r.State != engine.Healthy || r.ID != "" {
		return
	}
	ctx, cancel := context.WithTimeout(a.bg, 5*time.Second)
	defer cancel()
	if _, err := a.st.updateShard(ctx, a.Volume.Name, shard, a.lease, func(sh *engine.Shard) error {
		if i := sh.Find(r.Node); i >= 0 && sh.Replicas[i].ID == "" {
			sh.Replicas[i].ID = id
		}
		return nil
	}); err != nil {
		a.log.Warn("record a replica's id", "shard", shard, "node", r.Node, "err", err)
	}
}

// Failed implements engine.Reporter.
func (a *Attachment) Failed(ctx context.Context, shard int, node, reason string) (engine.Shard, error) {
	return a.st.updateShard(ctx, a.Volume.Name, shard, a.lease, func(sh *engine.Shard) error {
		if sh.MarkFailed(node) {
			if i := sh.Find(node); i >= 0 {
				sh.Replicas[i].Error = truncate(reason, 300)
			}
		}
		return nil
	})
}

// Rebuilt implements engine.Reporter.
func (a *Attachment) Rebuilt(ctx context.Context, shard int, node string) (engine.Shard, error) {
	sh, err := a.st.updateShard(ctx, a.Volume.Name, shard, a.lease, func(sh *engine.Shard) error {
		i := sh.Find(node)
		if i < 0 || sh.Replicas[i].State != engine.Rebuilding {
			return fmt.Errorf("shard %d replica on %s is no longer being rebuilt", shard, node)
		}
		sh.Replicas[i].State, sh.Replicas[i].Gen, sh.Replicas[i].Error = engine.Healthy, sh.Gen, ""
		a.pmu.Lock()
		if id, ok := a.ids[fmt.Sprintf("%d/%s", shard, node)]; ok {
			sh.Replicas[i].ID = id // the rebuilt data's identity
		}
		a.pmu.Unlock()
		return nil
	})
	if err == nil {
		a.pmu.Lock()
		delete(a.progress, fmt.Sprintf("%d/%s", shard, node))
		a.pmu.Unlock()
		a.st.c.Delete(ctx, progressKey(a.Volume.Name, shard, node))
	}
	return sh, err
}

// Progress implements engine.Reporter: the latest value is written at
// most once a second by the repair loop.
func (a *Attachment) Progress(shard int, node string, copied int64) {
	a.pmu.Lock()
	a.progress[fmt.Sprintf("%d/%s", shard, node)] = copied
	a.pmu.Unlock()
}

func (a *Attachment) flushProgress() {
	a.pmu.Lock()
	p := a.progress
	a.progress = map[string]int64{}
	a.pmu.Unlock()
	for k, n := range p {
		var shard int
		idx, node, _ := strings.Cut(k, "/")
		fmt.Sscan(idx, &shard)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		a.st.c.Put(ctx, progressKey(a.Volume.Name, shard, node), fmt.Sprint(n), clientv3.WithLease(a.lease))
		cancel()
	}
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// repairLoop rebuilds replicas that need it and completes moves, on
// every change of the volume's shard map or of node liveness, and every
// few seconds (a rebuild that failed is tried again).
func (a *Attachment) repairLoop(ctx context.Context) {
	wctx := clientv3.WithRequireLeader(ctx)
	go func() {
		for ctx.Err() == nil {
			w1 := a.st.c.Watch(wctx, shardPrefix(a.Volume.Name), clientv3.WithPrefix())
			w2 := a.st.c.Watch(wctx, Prefix+"live/", clientv3.WithPrefix())
		loop:
			for {
				select {
				case _, ok := <-w1:
					if !ok {
						break loop
					}
				case wr, ok := <-w2:
					if !ok {
						break loop
					}
					// A node that registered anew gets its rebuilds
					// tried at once, whatever their backoff.
					a.pmu.Lock()
					for _, ev := range wr.Events {
						if ev.Type == clientv3.EventTypePut {
							a.returned[strings.TrimPrefix(string(ev.Kv.Key), Prefix+"live/")] = true
						}
					}
					a.pmu.Unlock()
				}
				a.Kick()
			}
			if !sleepCtx(ctx, time.Second) {
				return
			}
		}
	}()
	tick := time.NewTicker(3 * time.Second)
	defer tick.Stop()
	for {
		if err := a.repair(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("repair pass", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-a.kick:
		case <-tick.C:
		}
	}
}

// retryAt is when a failed rebuild may be tried again, and the delay
// that led there (doubling up to a minute).
type retryAt struct {
	at    time.Time
	delay time.Duration
}

// Kick asks the repair loop for a pass now.
func (a *Attachment) Kick() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// ErrRepairIncomplete is returned by RepairPass when something still
// needs doing that cannot be done now (a node is down).
var ErrRepairIncomplete = errors.New("volume still needs repair")

// repair is one pass: leaving replicas whose shard has its replicas
// healthy are removed (record first, then the engine stops writing them);
// replicas that failed or are being rebuilt, on live nodes, are rebuilt
// one at a time.
func (a *Attachment) repair(ctx context.Context) error {
	a.pmu.Lock()
	for n := range a.returned {
		for k := range a.backoff {
			if strings.HasSuffix(k, "/"+n) {
				delete(a.backoff, k)
			}
		}
	}
	clear(a.returned)
	a.pmu.Unlock()
	shards, _, err := a.st.Shards(ctx, a.Volume.Name)
	if err != nil {
		return err
	}
	_, live, err := a.st.Nodes(ctx)
	if err != nil {
		return err
	}
	for _, sh := range shards {
		if a.Dirty && sh.Index < len(a.resynced) && !a.resynced[sh.Index] {
			if err := a.dp.Resync(ctx, sh.Index); err != nil {
				a.log.Warn("resync", "shard", sh.Index, "err", err)
			} else {
				a.resynced[sh.Index] = true
				if a.unsynced.Add(-1) == 0 {
					a.log.Info("replicas resynced")
				}
			}
		}
		if err := a.repairShard(ctx, sh, live); err != nil {
			return err
		}
	}
	return nil
}

func (a *Attachment) repairShard(ctx context.Context, sh engine.Shard, live map[string]bool) error {
	inService := map[string]engine.State{}
	for _, r := range a.dp.Replicas(sh.Index) {
		inService[r.Node] = r.State
	}
	stayHealthy := 0
	for _, r := range sh.Replicas {
		if sh.Readable(r) && !r.Leaving {
			stayHealthy++
		}
	}
	for _, r := range sh.Replicas {
		switch {
		case r.Leaving && stayHealthy >= a.Volume.Replicas:
			if _, err := a.st.updateShard(ctx, a.Volume.Name, sh.Index, a.lease, func(s *engine.Shard) error {
				if i := s.Find(r.Node); i >= 0 && s.Replicas[i].Leaving {
					s.Replicas = append(s.Replicas[:i], s.Replicas[i+1:]...)
				}
				return nil
			}); err != nil {
				return fmt.Errorf("remove shard %d replica on %s: %w", sh.Index, r.Node, err)
			}
			a.log.Info("moved replica away", "shard", sh.Index, "node", r.Node)
			a.dp.Drop(sh.Index, r.Node)
		case r.Leaving:
			// Kept until the shard has its replicas elsewhere.
		case (r.State == engine.Failed || r.State == engine.Rebuilding) && live[r.Node] && inService[r.Node] == "":
			k := fmt.Sprintf("%d/%s", sh.Index, r.Node)
			b := a.backoff[k]
			if time.Now().Before(b.at) {
				continue // its last rebuild failed: not again yet
			}
			if err := a.rebuild(ctx, sh.Index, r); err != nil {
				b.delay = min(max(2*b.delay, time.Second), time.Minute)
				a.backoff[k] = retryAt{time.Now().Add(b.delay), b.delay}
				a.log.Warn("rebuild", "shard", sh.Index, "node", r.Node, "err", err, "retry_in", b.delay)
			} else {
				delete(a.backoff, k)
			}
		}
	}
	return nil
}

func (a *Attachment) rebuild(ctx context.Context, shard int, r engine.Replica) error {
	if r.State == engine.Failed {
		if _, err := a.st.updateShard(ctx, a.Volume.Name, shard, a.lease, func(s *engine.Shard) error {
			if i := s.Find(r.Node); i >= 0 && s.Replicas[i].State == engine.Failed {
				s.Replicas[i].State = engine.Rebuilding
			}
			return nil
		}); err != nil {
			return err
		}
	}
	r.State = engine.Rebuilding // as recorded: its data is to be replaced, whatever its ID
	a.log.Info("rebuilding replica", "shard", shard, "node", r.Node)
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				a.flushProgress()
			case <-stop:
				return
			}
		}
	}()
	err := a.dp.Rebuild(ctx, shard, r)
	close(stop)
	if err == nil {
		a.log.Info("replica rebuilt", "shard", shard, "node", r.Node)
	}
	return err
}

// Pending counts what still needs repair: replicas that are not
// readable, and leaving replicas, over the whole volume.
func (s *Store) Pending(ctx context.Context, name string) (int, error) {
	shards, _, err := s.Shards(ctx, name)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, sh := range shards {
		for _, r := range sh.Replicas {
			if !sh.Readable(r) || r.Leaving {
				n++
			}
		}
	}
	return n, nil
}

var (
	_ storage.Disk       = (*engine.Volume)(nil)
	_ storage.Disk       = (*link.Disk)(nil)
	_ storage.ZeroWriter = (*link.Disk)(nil)
	_ link.Session       = (*Attachment)(nil)
)

// VMs is the agent role for a control plane that links etcd and starts
// VM processes itself (the pods daemon): each sharded disk's attachment
// runs in this process (AttachVM, Serve). rayvmm, which links no etcd,
// starts a rayvmmd agent process per disk instead (cluster.Agents); both
// fit vmproc/control's ShardedVolumes.
type VMs struct {
	Store *Store
	Log   *slog.Logger
}

// Attach owns the sharded volume name for the VM vm and returns the VM
// process's end of its link, and a function that waits, once the VM
// process is gone and every copy of that end is closed, until the volume
// has been given up.
func (v *VMs) Attach(ctx context.Context, name, vm string) (*os.File, func() error, error) {
	end, a, err := AttachVM(ctx, v.Store, name, AttachOptions{Holder: "VM " + vm, Log: v.Log})
	if err != nil {
		return nil, nil, err
	}
	done := make(chan error, 1)
	go func() { done <- a.Serve(context.WithoutCancel(ctx)) }()
	return end, func() error { return <-done }, nil
}
