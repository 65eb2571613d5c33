package shards

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rayvmm/rayvmm/shards/engine"
)

// Errors.
var (
	ErrNotFound = errors.New("no such sharded volume")
	ErrExists   = errors.New("already exists")
	ErrNoNode   = errors.New("no such node")
	ErrOwned    = errors.New("sharded volume is in use")
	ErrNotOwner = errors.New("this process no longer owns the volume")
	ErrPlace    = errors.New("cannot place replicas")
)

// Store is the cluster metadata in etcd.
type Store struct {
	c   *clientv3.Client
	log *slog.Logger
}

// NewStore wraps an etcd client.
func NewStore(c *clientv3.Client, log *slog.Logger) *Store {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{c: c, log: log}
}

// Client is the etcd client.
func (s *Store) Client() *clientv3.Client { return s.c }

// Close closes the client.
func (s *Store) Close() error { return s.c.Close() }

// Nodes returns every node record by name and which nodes are live.
func (s *Store) Nodes(ctx context.Context) ([]Node, map[string]bool, error) {
	r, err := s.c.Get(ctx, Prefix+"nodes/", clientv3.WithPrefix())
	if err != nil {
		return nil, nil, fmt.Errorf("list nodes: %w", err)
	}
	var nodes []Node
	for _, kv := range r.Kvs {
		n, err := decode[Node](kv.Value, "node")
		if err != nil {
			return nil, nil, err
		}
		nodes = append(nodes, *n)
	}
	lr, err := s.c.Get(ctx, Prefix+"live/", clientv3.WithPrefix(), clientv3.WithRev(r.Header.Revision))
	if err != nil {
		return nil, nil, fmt.Errorf("list live nodes: %w", err)
	}
	live := map[string]bool{}
	for _, kv := range lr.Kvs {
		live[strings.TrimPrefix(string(kv.Key), Prefix+"live/")] = true
	}
	for _, n := range nodes {
		if n.Static {
			live[n.Name] = true
		}
	}
	return nodes, live, nil
}

// Node returns one node.
func (s *Store) Node(ctx context.Context, name string) (*Node, error) {
	r, err := s.c.Get(ctx, nodeKey(name))
	if err != nil {
		return nil, fmt.Errorf("get node %s: %w", name, err)
	}
	if len(r.Kvs) == 0 {
		return nil, fmt.Errorf("%w %q", ErrNoNode, name)
	}
	return decode[Node](r.Kvs[0].Value, "node")
}

// AddStaticNode records an NBD server rayvmm does not run as a node.
func (s *Store) AddStaticNode(ctx context.Context, name, addr string) error {
	if err := CheckName("node", name); err != nil {
		return err
	}
	n := Node{Name: name, Address: addr, Static: true, Registered: time.Now().UTC()}
	r, err := s.c.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(nodeKey(name)), "=", 0)).
		Then(clientv3.OpPut(nodeKey(name), encode(n))).Commit()
	if err != nil {
		return fmt.Errorf("add node %s: %w", name, err)
	}
	if !r.Succeeded {
		return fmt.Errorf("add node %s: %w", name, ErrExists)
	}
	return nil
}

// RemoveNode forgets a node that holds no replica.
func (s *Store) RemoveNode(ctx context.Context, name string) error {
	vols, err := s.Volumes(ctx)
	if err != nil {
		return err
	}
	for _, v := range vols {
		shards, _, err := s.Shards(ctx, v.Name)
		if err != nil {
			return err
		}
		for _, sh := range shards {
			if sh.Find(name) >= 0 {
				return fmt.Errorf("remove node %s: it holds a replica of %s shard %d; run rayvmm shard rebalance once it is gone", name, v.Name, sh.Index)
			}
		}
	}
	r, err := s.c.Delete(ctx, nodeKey(name))
	if err != nil {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	if r.Deleted == 0 {
		return fmt.Errorf("remove node %s: %w", name, ErrNoNode)
	}
	return nil
}

// Volumes lists the sharded volumes by name.
func (s *Store) Volumes(ctx context.Context) ([]Volume, error) {
	r, err := s.c.Get(ctx, Prefix+"volumes/", clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list sharded volumes: %w", err)
	}
	var out []Volume
	for _, kv := range r.Kvs {
		v, err := decode[Volume](kv.Value, "volume")
		if err != nil {
			return nil, err
		}
		out = append(out, *v)
	}
	return out, nil
}

// Volume returns one volume.
func (s *Store) Volume(ctx context.Context, name string) (*Volume, error) {
	r, err := s.c.Get(ctx, volumeKey(name))
	if err != nil {
		return nil, fmt.Errorf("get sharded volume %s: %w", name, err)
	}
	if len(r.Kvs) == 0 {
		return nil, fmt.Errorf("%w %q", ErrNotFound, name)
	}
	return decode[Volume](r.Kvs[0].Value, "volume")
}

// Shards returns a volume's shard map and each shard key's mod revision.
func (s *Store) Shards(ctx context.Context, name string) ([]engine.Shard, []int64, error) {
	r, err := s.c.Get(ctx, shardPrefix(name), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, nil, fmt.Errorf("get shard map of %s: %w", name, err)
	}
	var out []engine.Shard
	var revs []int64
	for _, kv := range r.Kvs {
		sh, err := decode[engine.Shard](kv.Value, "shard")
		if err != nil {
			return nil, nil, err
		}
		if sh.Index != len(out) {
			return nil, nil, fmt.Errorf("shard map of %s: key %s holds shard %d: %w", name, kv.Key, sh.Index, engine.ErrLayout)
		}
		out = append(out, *sh)
		revs = append(revs, kv.ModRevision)
	}
	return out, revs, nil
}

// Progress returns the running rebuilds' copied bytes by "shard/node".
func (s *Store) Progress(ctx context.Context, name string) (map[string]int64, error) {
	r, err := s.c.Get(ctx, progressPrefix(name), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("get rebuild progress of %s: %w", name, err)
	}
	out := map[string]int64{}
	for _, kv := range r.Kvs {
		var n int64
		fmt.Sscan(string(kv.Value), &n)
		k := strings.TrimPrefix(string(kv.Key), progressPrefix(name))
		idx, node, _ := strings.Cut(k, "/")
		var i int
		fmt.Sscan(idx, &i)
		out[fmt.Sprintf("%d/%s", i, node)] = n
	}
	return out, nil
}

// CreateOptions are a new volume's parameters.
type CreateOptions struct {
	Size, ShardSize int64
	Replicas        int
	MinReplicas     int // 0: a majority for strong, 1 for eventual
	Consistency     engine.Consistency
	Nodes           []string // nil: every live node
}

// Volume checks the options and returns the record of a new volume
// called name, with the defaults filled in; it touches no etcd, so bad
// flags are refused before anything is started or written.
func (o CreateOptions) Volume(name string) (*Volume, error) {
	if err := CheckName("volume", name); err != nil {
		return nil, err
	}
	if o.Consistency == "" {
		o.Consistency = engine.Strong
	}
	if o.MinReplicas == 0 {
		o.MinReplicas = 1
		if o.Consistency == engine.Strong {
			o.MinReplicas = o.Replicas/2 + 1
		}
	}
	v := &Volume{Name: name, ID: randomID(), Size: o.Size, ShardSize: o.ShardSize, Replicas: o.Replicas,
		MinReplicas: o.MinReplicas, Consistency: o.Consistency, Created: time.Now().UTC()}
	switch {
	case o.Replicas < 1:
		return nil, fmt.Errorf("create %s: --replicas %d: need at least 1", name, o.Replicas)
	case o.MinReplicas < 1 || o.MinReplicas > o.Replicas:
		return nil, fmt.Errorf("create %s: --min-replicas %d: want 1 to %d", name, o.MinReplicas, o.Replicas)
	case o.Consistency != engine.Strong && o.Consistency != engine.Eventual:
		return nil, fmt.Errorf("create %s: --consistency %q: want strong or eventual", name, o.Consistency)
	case o.ShardSize < 64<<10 || o.ShardSize%(64<<10) != 0:
		return nil, fmt.Errorf("create %s: --shard-size %d: want a multiple of 64K", name, o.ShardSize)
	case o.Size <= 0 || o.Size%o.ShardSize != 0:
		return nil, fmt.Errorf("create %s: --size %d: want a positive multiple of the shard size %d", name, o.Size, o.ShardSize)
	case v.Shards() > 1<<20:
		return nil, fmt.Errorf("create %s: %d shards: at most %d", name, v.Shards(), 1<<20)
	}
	return v, nil
}

// CreateVolume records a new volume and places its replicas on distinct
// live nodes with balanced counts; the nodes make the replica files when
// they see the shard map.
func (s *Store) CreateVolume(ctx context.Context, name string, o CreateOptions) (*Volume, error) {
	v, err := o.Volume(name)
	if err != nil {
		return nil, err
	}
	o.MinReplicas, o.Consistency = v.MinReplicas, v.Consistency
	nodes, live, err := s.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	known := map[string]bool{}
	for _, n := range nodes {
		known[n.Name] = true
	}
	cands := o.Nodes
	if cands == nil {
		for _, n := range nodes {
			if live[n.Name] {
				cands = append(cands, n.Name)
			}
		}
	}
	for _, n := range cands {
		if !known[n] {
			return nil, fmt.Errorf("create %s: %w %q", name, ErrNoNode, n)
		}
		if !live[n] {
			return nil, fmt.Errorf("create %s: node %s is not live", name, n)
		}
	}
	placement, err := Place(v.Shards(), o.Replicas, cands, nil)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	ops := []clientv3.Op{clientv3.OpPut(volumeKey(name), encode(v))}
	for i, ns := range placement {
		sh := engine.Shard{Index: i, Gen: 1}
		for _, n := range ns {
			sh.Replicas = append(sh.Replicas, engine.Replica{Node: n, Export: v.Export(i), State: engine.Healthy, Gen: 1})
		}
		ops = append(ops, clientv3.OpPut(shardKey(name, i), encode(sh)))
	}
	// etcd limits a transaction to 128 operations by default: the volume
	// record goes last, in its own transaction, once every shard is there.
	if err := s.putAbsent(ctx, volumeKey(name), ops[1:], ops[0]); err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	return v, nil
}

// putAbsent writes ops in batches and then last, each only while key does
// not exist; on failure it deletes what it wrote.
func (s *Store) putAbsent(ctx context.Context, key string, ops []clientv3.Op, last clientv3.Op) error {
	absent := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	var written []string
	undo := func() {
		for _, k := range written {
			s.c.Delete(context.WithoutCancel(ctx), k)
		}
	}
	for len(ops) > 0 {
		n := min(len(ops), 100)
		r, err := s.c.Txn(ctx).If(absent).Then(ops[:n]...).Commit()
		if err != nil {
			undo()
			return err
		}
		if !r.Succeeded {
			undo()
			return ErrExists
		}
		for _, op := range ops[:n] {
			written = append(written, string(op.KeyBytes()))
		}
		ops = ops[n:]
	}
	r, err := s.c.Txn(ctx).If(absent).Then(last).Commit()
	if err == nil && !r.Succeeded {
		err = ErrExists
	}
	if err != nil {
		undo()
	}
	return err
}

// RemoveVolume deletes a volume's records (refused while it is owned);
// the nodes then delete its replica files.
func (s *Store) RemoveVolume(ctx context.Context, name string) error {
	r, err := s.c.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(ownerKey(name)), "=", 0),
		clientv3.Compare(clientv3.CreateRevision(volumeKey(name)), ">", 0)).
		Then(clientv3.OpDelete(volumeKey(name)), clientv3.OpDelete(shardPrefix(name), clientv3.WithPrefix()),
			clientv3.OpDelete(progressPrefix(name), clientv3.WithPrefix()), clientv3.OpDelete(dirtyKey(name))).Commit()
	if err != nil {
		return fmt.Errorf("remove sharded volume %s: %w", name, err)
	}
	if !r.Succeeded {
		if _, err := s.Volume(ctx, name); err != nil {
			return err
		}
		return fmt.Errorf("remove %s: %w (%s)", name, ErrOwned, s.ownerString(ctx, name))
	}
	return nil
}

func (s *Store) ownerString(ctx context.Context, name string) string {
	r, err := s.c.Get(ctx, ownerKey(name))
	if err != nil || len(r.Kvs) == 0 {
		return "owner unknown"
	}
	o, err := decode[Owner](r.Kvs[0].Value, "owner")
	if err != nil {
		return "owner unknown"
	}
	return fmt.Sprintf("by %s, pid %d on %s, since %s", o.Holder, o.PID, o.Host, o.Since.Format(time.RFC3339))
}

// updateShard applies f to shard i of a volume under compare-and-swap,
// retrying on conflicts; with lease set, only while owners/NAME is bound
// to that lease (a volume's former owner cannot change its map).
func (s *Store) updateShard(ctx context.Context, name string, i int, lease clientv3.LeaseID, f func(*engine.Shard) error) (engine.Shard, error) {
	for {
		r, err := s.c.Get(ctx, shardKey(name, i))
		if err != nil {
			return engine.Shard{}, err
		}
		if len(r.Kvs) == 0 {
			return engine.Shard{}, fmt.Errorf("shard %d of %s: %w", i, name, ErrNotFound)
		}
		sh, err := decode[engine.Shard](r.Kvs[0].Value, "shard")
		if err != nil {
			return engine.Shard{}, err
		}
		if err := f(sh); err != nil {
			return engine.Shard{}, err
		}
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(shardKey(name, i)), "=", r.Kvs[0].ModRevision)}
		if lease != 0 {
			cmps = append(cmps, clientv3.Compare(clientv3.LeaseValue(ownerKey(name)), "=", lease))
		}
		tr, err := s.c.Txn(ctx).If(cmps...).Then(clientv3.OpPut(shardKey(name, i), encode(sh))).Commit()
		if err != nil {
			return engine.Shard{}, err
		}
		if tr.Succeeded {
			return *sh, nil
		}
		if lease != 0 {
			o, err := s.c.Get(ctx, ownerKey(name))
			if err != nil {
				return engine.Shard{}, err
			}
			if len(o.Kvs) == 0 || clientv3.LeaseID(o.Kvs[0].Lease) != lease {
				return engine.Shard{}, ErrNotOwner
			}
		}
	}
}

// Layout is the engine's view of a volume.
func (s *Store) Layout(ctx context.Context, name string) (*Volume, engine.Layout, error) {
	v, err := s.Volume(ctx, name)
	if err != nil {
		return nil, engine.Layout{}, err
	}
	shards, _, err := s.Shards(ctx, name)
	if err != nil {
		return nil, engine.Layout{}, err
	}
	l := engine.Layout{Size: v.Size, ShardSize: v.ShardSize, Consistency: v.Consistency, MinReplicas: v.MinReplicas, Shards: shards}
	if err := l.Check(); err != nil {
		return nil, engine.Layout{}, fmt.Errorf("sharded volume %s: %w", name, err)
	}
	return v, l, nil
}

func randomID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}

// sortedNames returns the keys of m in order.
func sortedNames(m map[string]int) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
