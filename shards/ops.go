package shards

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/rayvmm/rayvmm/shards/engine"
)

// ReplicaStatus is a replica as `volume inspect` shows it.
type ReplicaStatus struct {
	engine.Replica
	NodeLive bool  `json:"node_live"`
	Copied   int64 `json:"rebuild_copied,omitempty"` // bytes, while rebuilding
	Of       int64 `json:"rebuild_total,omitempty"`
}

// ShardStatus is a shard as `volume inspect` shows it.
type ShardStatus struct {
	Index    int             `json:"index"`
	Offset   int64           `json:"offset"`
	Gen      uint64          `json:"generation"`
	Healthy  int             `json:"healthy"`
	Replicas []ReplicaStatus `json:"replicas"`
}

// VolumeStatus is `volume inspect` of a sharded volume.
type VolumeStatus struct {
	Volume
	Kind  string `json:"kind"` // "sharded"
	State string `json:"state"`
	Owner *Owner `json:"owner,omitempty"`
	// Dirty: attached now, or the last attachment ended without a clean
	// detach (the next one resyncs the replicas).
	Dirty    bool          `json:"dirty"`
	Degraded int           `json:"degraded_shards"`
	Shards   []ShardStatus `json:"shards"`
}

// Inspect returns a volume's shard map with replica states, node
// liveness and rebuild progress.
func (s *Store) Inspect(ctx context.Context, name string) (*VolumeStatus, error) {
	v, err := s.Volume(ctx, name)
	if err != nil {
		return nil, err
	}
	shards, _, err := s.Shards(ctx, name)
	if err != nil {
		return nil, err
	}
	_, live, err := s.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	prog, err := s.Progress(ctx, name)
	if err != nil {
		return nil, err
	}
	st := &VolumeStatus{Volume: *v, Kind: "sharded", State: "available"}
	if r, err := s.c.Get(ctx, ownerKey(name)); err == nil && len(r.Kvs) > 0 {
		if st.Owner, err = decode[Owner](r.Kvs[0].Value, "owner"); err == nil {
			st.State = "attached"
		}
	}
	if r, err := s.c.Get(ctx, dirtyKey(name)); err == nil {
		st.Dirty = len(r.Kvs) > 0
	}
	for _, sh := range shards {
		ss := ShardStatus{Index: sh.Index, Offset: int64(sh.Index) * v.ShardSize, Gen: sh.Gen, Healthy: sh.Healthy()}
		for _, r := range sh.Replicas {
			rs := ReplicaStatus{Replica: r, NodeLive: live[r.Node]}
			if r.State == engine.Rebuilding {
				rs.Copied = prog[fmt.Sprintf("%d/%s", sh.Index, r.Node)]
				rs.Of = min(v.ShardSize, v.Size-ss.Offset)
			}
			ss.Replicas = append(ss.Replicas, rs)
		}
		if ss.Healthy < v.Replicas {
			st.Degraded++
		}
		st.Shards = append(st.Shards, ss)
	}
	if st.Degraded > 0 {
		st.State += ", degraded"
	}
	return st, nil
}

// NodeStatus is a node as `shard nodes` shows it.
type NodeStatus struct {
	Node
	Live     bool `json:"live"`
	Replicas int  `json:"replicas"`
	Failed   int  `json:"failed_replicas"`
}

// NodeStatuses lists the nodes, live or dead, with their replica counts.
func (s *Store) NodeStatuses(ctx context.Context) ([]NodeStatus, error) {
	nodes, live, err := s.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	maps, _, err := s.allShards(ctx)
	if err != nil {
		return nil, err
	}
	count, failed := map[string]int{}, map[string]int{}
	for _, shards := range maps {
		for _, sh := range shards {
			for _, r := range sh.Replicas {
				count[r.Node]++
				if !sh.Readable(r) {
					failed[r.Node]++
				}
			}
		}
	}
	var out []NodeStatus
	for _, n := range nodes {
		out = append(out, NodeStatus{Node: n, Live: live[n.Name], Replicas: count[n.Name], Failed: failed[n.Name]})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (s *Store) allShards(ctx context.Context) (map[string][]engine.Shard, []Volume, error) {
	vols, err := s.Volumes(ctx)
	if err != nil {
		return nil, nil, err
	}
	maps := map[string][]engine.Shard{}
	for _, v := range vols {
		if maps[v.Name], _, err = s.Shards(ctx, v.Name); err != nil {
			return nil, nil, err
		}
	}
	return maps, vols, nil
}

// Plan computes the rebalance moves for the live nodes.
func (s *Store) Plan(ctx context.Context) ([]Move, error) {
	maps, vols, err := s.allShards(ctx)
	if err != nil {
		return nil, err
	}
	nodes, live, err := s.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	var liveNames []string
	for _, n := range nodes {
		if live[n.Name] {
			liveNames = append(liveNames, n.Name)
		}
	}
	return PlanRebalance(vols, maps, liveNames)
}

// Apply records moves in the shard maps: the new replica is added as
// rebuilding, the old one marked leaving. The volume's owner (or
// Repair) carries them out.
func (s *Store) Apply(ctx context.Context, moves []Move) error {
	for _, m := range moves {
		v, err := s.Volume(ctx, m.Volume)
		if err != nil {
			return err
		}
		_, err = s.updateShard(ctx, m.Volume, m.Shard, 0, func(sh *engine.Shard) error {
			if sh.Find(m.To) >= 0 {
				return fmt.Errorf("%s shard %d already has a replica on %s", m.Volume, m.Shard, m.To)
			}
			if m.From != "" {
				i := sh.Find(m.From)
				if i < 0 {
					return fmt.Errorf("%s shard %d has no replica on %s", m.Volume, m.Shard, m.From)
				}
				sh.Replicas[i].Leaving = true
			}
			sh.Replicas = append(sh.Replicas, engine.Replica{Node: m.To, Export: v.Export(m.Shard), State: engine.Rebuilding})
			return nil
		})
		if err != nil {
			return fmt.Errorf("rebalance: %w", err)
		}
	}
	return nil
}

// Owned reports whether a process owns the volume now.
func (s *Store) Owned(ctx context.Context, name string) (bool, error) {
	r, err := s.c.Get(ctx, ownerKey(name))
	if err != nil {
		return false, err
	}
	return len(r.Kvs) > 0, nil
}

// Repair brings a volume's replicas to health: if no process owns it,
// it attaches it and runs the repair loop here; if one does (an attached
// VM), it waits for that owner's repair. progress is called with the
// number of replicas still pending. It returns once nothing is pending,
// or ErrRepairIncomplete when what is left needs a node that is down.
func (s *Store) Repair(ctx context.Context, name, holder string, progress func(pending int)) error {
	owned, err := s.Owned(ctx, name)
	if err != nil {
		return err
	}
	var a *Attachment
	if !owned {
		a, err = Attach(ctx, s, name, AttachOptions{Holder: holder, Log: s.log})
		if errors.Is(err, ErrOwned) {
			a = nil // someone attached it meanwhile: wait for them
		} else if err != nil {
			return err
		}
	}
	defer func() {
		if a != nil {
			a.Close()
		}
	}()
	stuck := 0
	last := -1
	changed := time.Now()
	for {
		n, err := s.Pending(ctx, name)
		if err != nil {
			return err
		}
		if a != nil {
			n += int(a.unsynced.Load()) // shards still to resync count as pending too
		}
		if progress != nil {
			progress(n)
		}
		if n == 0 {
			return nil
		}
		if n == last {
			stuck++
		} else {
			stuck, last, changed = 0, n, time.Now()
		}
		if time.Since(changed) > 2*time.Minute {
			return fmt.Errorf("%s: %d replicas still need repair and nothing changed for 2 minutes (the owner's log says why): %w", name, n, ErrRepairIncomplete)
		}
		// Repairable work needs live nodes: if every pending replica's
		// node is down, stop after a while rather than wait for ever.
		if stuck > 100 && !s.repairable(ctx, name) {
			return fmt.Errorf("%s: %d replicas need a node that is not live: %w", name, n, ErrRepairIncomplete)
		}
		if a != nil {
			a.Kick()
		}
		t := time.NewTimer(200 * time.Millisecond) // polling etcd for the owner's progress
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}

// repairable reports whether some pending replica's node is live.
func (s *Store) repairable(ctx context.Context, name string) bool {
	shards, _, err := s.Shards(ctx, name)
	if err != nil {
		return true
	}
	_, live, err := s.Nodes(ctx)
	if err != nil {
		return true
	}
	for _, sh := range shards {
		for _, r := range sh.Replicas {
			if (!sh.Readable(r) || r.Leaving) && live[r.Node] {
				return true
			}
		}
	}
	return false
}
