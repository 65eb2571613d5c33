// Package engine is the data path of a sharded, replicated volume: a
// storage.Disk that splits guest I/O at shard boundaries and sends it over
// NBD to every replica of each shard (Longhorn's engine). It links no etcd:
// it is handed the shard map, a Dialer for replica connections and a
// Reporter that records replica state changes, so it can run inside the
// slim VM process while the control plane owns the metadata.
//
// Writes go to every healthy and rebuilding replica in parallel. With
// Strong consistency a write completes when all of them have acknowledged
// it, and a replica that fails is reported (failed, shard generation
// bumped) before the write completes; with Eventual it completes on the
// first healthy acknowledgement and the rest follow in order, at most
// MaxLag requests behind, and FLUSH waits for all of them. Reads go
// round-robin to healthy replicas and fall over to the next on error.
// Every replica request has a timeout. A shard with fewer than
// MinReplicas healthy replicas refuses writes with an I/O error; with none
// it refuses reads too.
//
// Rebuild adds a replica in write-only mode, copies the shard into it from
// a healthy replica chunk by chunk while guest I/O goes on (a chunk being
// copied holds back guest writes to that chunk only), verifies it, and
// switches it to healthy once the Reporter has recorded that.
package engine

import (
	"errors"
	"fmt"
)

// Consistency is a volume's write acknowledgement rule.
type Consistency string

// Consistency modes.
const (
	Strong   Consistency = "strong"
	Eventual Consistency = "eventual"
)

// State is a replica's state in the shard map.
type State string

// Replica states.
const (
	Healthy    State = "healthy"    // has every acknowledged write; read and written
	Rebuilding State = "rebuilding" // written, not read, until a rebuild verifies it
	Failed     State = "failed"     // neither; stale since the generation it carries
)

// Replica is one copy of a shard: an NBD export on a node.
type Replica struct {
	Node   string `json:"node"`
	Export string `json:"export"`
	State  State  `json:"state"`
	// Gen is the shard generation this replica is known to be current
	// at. A healthy replica carries the shard's generation; one that
	// failed keeps the generation it failed at, so it is never read
	// again until a rebuild brings it to the current one.
	Gen uint64 `json:"generation"`
	// Leaving marks a replica a rebalance removes once the shard has
	// its other replicas healthy; the engine still writes it until then.
	Leaving bool `json:"leaving,omitempty"`
	// Error is why the replica failed, for the operator.
	Error string `json:"error,omitempty"`
	// ID is the identity of the replica's data as its node reports it
	// (a node makes a new one with every new replica file); a replica
	// whose node reports another ID is not this replica and is failed.
	// Empty: not known yet (recorded at first connect), or a node that
	// reports none (qemu-nbd).
	ID string `json:"id,omitempty"`
}

// Shard is one ShardSize slice of the volume and its replicas.
type Shard struct {
	Index    int       `json:"index"`
	Gen      uint64    `json:"generation"`
	Replicas []Replica `json:"replicas"`
}

// Readable reports whether r may be read: healthy at the shard's
// generation.
func (s *Shard) Readable(r Replica) bool { return r.State == Healthy && r.Gen == s.Gen }

// Healthy counts the readable replicas.
func (s *Shard) Healthy() int {
	n := 0
	for _, r := range s.Replicas {
		if s.Readable(r) {
			n++
		}
	}
	return n
}

// Find returns the index of node's replica, or -1.
func (s *Shard) Find(node string) int {
	for i, r := range s.Replicas {
		if r.Node == node {
			return i
		}
	}
	return -1
}

// MarkFailed records node's replica as failed and, if it was healthy,
// bumps the shard's generation and carries the other healthy replicas to
// it, so the failed one is stale from now on. It reports whether anything
// changed.
func (s *Shard) MarkFailed(node string) bool {
	i := s.Find(node)
	if i < 0 || s.Replicas[i].State == Failed {
		return false
	}
	wasReadable := s.Readable(s.Replicas[i])
	s.Replicas[i].State = Failed
	if wasReadable {
		s.Gen++
		for j := range s.Replicas {
			if j != i && s.Replicas[j].State == Healthy && s.Replicas[j].Gen == s.Gen-1 {
				s.Replicas[j].Gen = s.Gen
			}
		}
	}
	return true
}

// Layout is what the engine needs to know about a volume.
type Layout struct {
	Size        int64       `json:"size"`
	ShardSize   int64       `json:"shard_size"`
	Consistency Consistency `json:"consistency"`
	// MinReplicas is the fewest healthy replicas a shard needs to accept
	// writes (Ceph's min_size).
	MinReplicas int     `json:"min_replicas"`
	Shards      []Shard `json:"shards"`
}

// ErrLayout is wrapped by errors about an inconsistent layout.
var ErrLayout = errors.New("invalid volume layout")

// Check validates a layout.
func (l *Layout) Check() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%s: %w", fmt.Sprintf(format, a...), ErrLayout)
	}
	switch {
	case l.ShardSize <= 0 || l.ShardSize%4096 != 0:
		return bad("shard size %d is not a positive multiple of 4096", l.ShardSize)
	case l.Size <= 0 || l.Size%512 != 0:
		return bad("size %d is not a positive multiple of 512", l.Size)
	case int64(len(l.Shards)) != (l.Size+l.ShardSize-1)/l.ShardSize:
		return bad("%d shards for size %d and shard size %d", len(l.Shards), l.Size, l.ShardSize)
	case l.Consistency != Strong && l.Consistency != Eventual:
		return bad("consistency %q", l.Consistency)
	case l.MinReplicas < 1:
		return bad("min replicas %d", l.MinReplicas)
	}
	for i, s := range l.Shards {
		if s.Index != i {
			return bad("shard %d has index %d", i, s.Index)
		}
		seen := map[string]bool{}
		for _, r := range s.Replicas {
			if seen[r.Node] {
				return bad("shard %d has two replicas on node %s", i, r.Node)
			}
			seen[r.Node] = true
		}
	}
	return nil
}

// ShardLen is the size of shard i (the last one may be short).
func (l *Layout) ShardLen(i int) int64 {
	return min(l.ShardSize, l.Size-int64(i)*l.ShardSize)
}
