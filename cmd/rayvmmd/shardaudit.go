package main

import (
	"context"
	"strconv"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/cmd/internal/command"
	"github.com/rayvmm/rayvmm/shards"
)

// The sharded-volume commands record their actions in the state
// directory's audit log as rayvmm's CLI records local volumes' (the same
// helper, command.AuditLog): volume create and rm, volume rebuild, shard
// rebalance (one record for each volume whose replicas moved) and shard
// nodes add and rm, each after the action with its error, sealed, before
// the command reports it done. main seals and closes the log.
var auditLog = command.AuditLog{StateDir: &stateDir}

// shardedParams are the audit params of a sharded volume: its layout,
// so a record says the volume is sharded and how it is kept.
func shardedParams(v *shards.Volume) audit.Params {
	p := audit.Params{"sharded": "true"}
	if v == nil {
		return p
	}
	p["size"] = strconv.FormatInt(v.Size, 10)
	p["shard_size"] = strconv.FormatInt(v.ShardSize, 10)
	p["replicas"] = strconv.Itoa(v.Replicas)
	p["min_replicas"] = strconv.Itoa(v.MinReplicas)
	p["consistency"] = string(v.Consistency)
	return p
}

// volumeParams are shardedParams of volume name as the store has it
// now (only "sharded" when it cannot be read: it is gone, say).
func volumeParams(ctx context.Context, st *shards.Store, name string) audit.Params {
	v, err := st.Volume(ctx, name)
	if err != nil {
		return shardedParams(nil)
	}
	return shardedParams(v)
}

func nodeObj(name string) audit.Object { return audit.Object{Kind: audit.KindNode, Name: name} }
