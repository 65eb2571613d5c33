// Package shards is the control plane of sharded, replicated volumes: the
// cluster metadata in etcd (nodes, volumes, shard maps, liveness leases,
// volume ownership), placement and rebalancing, the storage node server
// (`rayvmm shard serve`, NBD exports of the replicas a node holds), rebuild
// orchestration, and the embedded single-node etcd a single machine uses
// by default. The data path itself is shards/engine and the wire protocol
// shards/nbd; neither links etcd. See README.md.
package shards

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/rayvmm/rayvmm/shards/engine"
)

// Key layout in etcd, all under Prefix:
//
//	nodes/NAME           Node: a storage node's address (persistent)
//	live/NAME            the node's address, bound to its lease: present while it lives
//	volumes/NAME         Volume: size, shard size, replicas, consistency
//	shards/NAME/NNNNNN   engine.Shard: the shard's generation and replicas
//	owners/NAME          Owner, bound to the owner's lease: who runs the volume's data path
//	progress/NAME/NNNNNN/NODE   bytes copied by a running rebuild
//	dirty/NAME           Owner: set while the volume is attached, removed
//	                     by a clean detach; found at attach, the replicas are resynced
const Prefix = "/rayvmm/shards/"

func nodeKey(n string) string         { return Prefix + "nodes/" + n }
func liveKey(n string) string         { return Prefix + "live/" + n }
func volumeKey(v string) string       { return Prefix + "volumes/" + v }
func shardPrefix(v string) string     { return Prefix + "shards/" + v + "/" }
func shardKey(v string, i int) string { return fmt.Sprintf("%s%06d", shardPrefix(v), i) }
func ownerKey(v string) string        { return Prefix + "owners/" + v }
func progressPrefix(v string) string  { return Prefix + "progress/" + v + "/" }
func dirtyKey(v string) string        { return Prefix + "dirty/" + v }
func progressKey(v string, i int, n string) string {
	return fmt.Sprintf("%s%06d/%s", progressPrefix(v), i, n)
}

// Node is a storage node.
type Node struct {
	Name    string `json:"name"`
	Address string `json:"address"` // host:port of its NBD server
	// Static nodes are NBD servers rayvmm does not run (qemu-nbd,
	// nbdkit): they hold no lease, count as live, and their exports are
	// made by their operator.
	Static     bool      `json:"static,omitempty"`
	Registered time.Time `json:"registered"`
}

// Volume is a sharded volume's record.
type Volume struct {
	Name        string             `json:"name"`
	ID          string             `json:"id"` // random; replica files are kept under it
	Size        int64              `json:"size"`
	ShardSize   int64              `json:"shard_size"`
	Replicas    int                `json:"replicas"`
	MinReplicas int                `json:"min_replicas"`
	Consistency engine.Consistency `json:"consistency"`
	Created     time.Time          `json:"created"`
}

// Shards is the number of shards.
func (v *Volume) Shards() int { return int((v.Size + v.ShardSize - 1) / v.ShardSize) }

// Export is the NBD export name of shard i's replicas.
func (v *Volume) Export(i int) string { return fmt.Sprintf("%s/%d", v.Name, i) }

// Owner is who runs a volume's data path (an attached VM, a rebuild or a
// rebalance); one at a time, fenced by its lease.
type Owner struct {
	Holder string    `json:"holder"` // e.g. "rayvmm boot", "rayvmm volume rebuild"
	PID    int       `json:"pid"`
	Host   string    `json:"host"`
	Since  time.Time `json:"since"`
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// ErrBadName is returned for volume and node names rayvmm does not accept.
var ErrBadName = errors.New("names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")

// CheckName validates a volume or node name.
func CheckName(kind, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%s name %q: %w", kind, name, ErrBadName)
	}
	return nil
}

func decode[T any](b []byte, what string) (*T, error) {
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("decode %s record: %w", what, err)
	}
	return &v, nil
}

func encode(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own record types, which always marshal
	}
	return string(b)
}
