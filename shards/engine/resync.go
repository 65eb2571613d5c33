package engine

import (
	"bytes"
	"context"
	"fmt"
)

// After a crash of the process that ran the data path, the replicas of a
// shard may differ where writes were in flight: each has the old or the
// new data of a write that was never acknowledged (under Eventual also of
// acknowledged writes not yet flushed). md RAID and DRBD resync such
// regions after an unclean shutdown; here the control plane opens the
// engine with Config.Resync, reads of every shard go to one replica (the
// primary: the first healthy one) until Resync has made the others
// identical to it, chunk by chunk under the same locks and throttle as a
// rebuild. Two reads of a block never return different data.

// primary is the replica reads use while the shard is resyncing.
func (s *shard) primary() *replica {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.reps {
		if r.st() == Healthy {
			return r
		}
	}
	return nil
}

// Resync makes the healthy replicas of shard identical to its primary if
// the volume was opened with Config.Resync, then lets reads use all of
// them again. Replicas that fail meanwhile are failed as usual; an error
// leaves the shard resyncing, to be tried again.
func (v *Volume) Resync(ctx context.Context, shardIdx int) error {
	if shardIdx < 0 || shardIdx >= len(v.shards) {
		return fmt.Errorf("resync: shard %d: %w", shardIdx, ErrLayout)
	}
	s := v.shards[shardIdx]
	if !s.resync.Load() {
		return nil
	}
	if !v.bg.enter() {
		return fmt.Errorf("resync shard %d: volume closed", shardIdx)
	}
	defer v.bg.leave()
	ctx, cancel := v.stoppable(ctx)
	defer cancel()
	err := v.chunkPass(ctx, s, "resync", func() error { return nil }, func(_ int, off int64, b, b2 []byte) error {
		p := s.primary()
		if p == nil {
			return fmt.Errorf("shard %d: no healthy replica: %w", s.idx, ErrIO)
		}
		n := int64(len(b))
		if err := v.replicaOp(s, p, off, n, false, func(ctx context.Context) error { return p.c.ReadAt(ctx, b, off) }); err != nil {
			v.fail(s, p, err)
			return err
		}
		s.mu.Lock()
		others := append([]*replica(nil), s.reps...)
		s.mu.Unlock()
		for _, r := range others {
			if r == p || r.st() != Healthy {
				continue
			}
			err := v.replicaOp(s, r, off, n, false, func(ctx context.Context) error { return r.c.ReadAt(ctx, b2, off) })
			if err == nil && !bytes.Equal(b, b2) {
				v.Resynced.Add(1)
				err = v.replicaOp(s, r, off, n, true, func(ctx context.Context) error { return r.c.WriteAt(ctx, b, off, false) })
			}
			if err != nil {
				v.fail(s, r, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.resync.Store(false)
	return nil
}

// Resyncing reports whether shard still reads from its primary only.
func (v *Volume) Resyncing(shardIdx int) bool {
	return shardIdx >= 0 && shardIdx < len(v.shards) && v.shards[shardIdx].resync.Load()
}
