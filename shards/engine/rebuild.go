package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrBusy is returned when a replica is already in service.
var ErrBusy = errors.New("replica already in service")

// Rebuild brings r, a replica of shard, into service: it joins in
// write-only mode (guest writes reach it from now on), the shard is
// copied into it from healthy replicas chunk by chunk, read back and
// compared, and once Reporter.Rebuilt has recorded it, it is read like
// any healthy replica. While the guest does I/O the copy runs at most
// half the time (it sleeps as long as it worked), so guest I/O keeps at
// least half its throughput. On error the replica is failed again.
func (v *Volume) Rebuild(ctx context.Context, shardIdx int, r Replica) error {
	if shardIdx < 0 || shardIdx >= len(v.shards) {
		return fmt.Errorf("rebuild: shard %d: %w", shardIdx, ErrLayout)
	}
	s := v.shards[shardIdx]
	if !v.bg.enter() {
		return fmt.Errorf("rebuild shard %d on %s: volume closed", shardIdx, r.Node)
	}
	defer v.bg.leave()
	ctx, cancel := v.stoppable(ctx)
	defer cancel()
	c, err := v.dial(ctx, s, r)
	if err != nil {
		err = fmt.Errorf("rebuild shard %d on %s: %w", shardIdx, r.Node, err)
		if _, rerr := v.cfg.Reporter.Failed(ctx, shardIdx, r.Node, err.Error()); rerr != nil {
			v.log.Warn("record a replica that could not be rebuilt as failed", "shard", shardIdx, "node", r.Node, "err", rerr)
		}
		return err
	}
	nr := v.newReplica(r, Rebuilding)
	nr.c = c
	s.mu.Lock()
	for _, x := range s.reps {
		if x.Node == r.Node {
			s.mu.Unlock()
			c.Close()
			return fmt.Errorf("rebuild shard %d on %s: %w", shardIdx, r.Node, ErrBusy)
		}
	}
	s.reps = append(s.reps, nr)
	s.mu.Unlock()
	v.watchConn(s, nr)
	if err := v.rebuild(ctx, s, nr); err != nil {
		err = fmt.Errorf("rebuild shard %d on %s: %w", shardIdx, r.Node, err)
		<-v.fail(s, nr, err).done
		return err
	}
	return nil
}

func (v *Volume) rebuild(ctx context.Context, s *shard, nr *replica) error {
	pass := func(name string, f func(k int, off int64, b, b2 []byte) error) error {
		return v.chunkPass(ctx, s, name, func() error {
			if nr.st() == Failed {
				return fmt.Errorf("%s: the replica failed under guest I/O", name)
			}
			return nil
		}, f)
	}
	var copied int64
	err := pass("copy", func(k int, off int64, b, _ []byte) error {
		if err := v.readPiece(piece{s: s, off: off, p: b, n: int64(len(b))}); err != nil {
			return err
		}
		err := v.replicaOp(s, nr, off, int64(len(b)), true, func(ctx context.Context) error {
			if allZero(b) {
				return nr.c.WriteZeroes(ctx, off, int64(len(b)), false)
			}
			return nr.c.WriteAt(ctx, b, off, false)
		})
		if err != nil {
			return err
		}
		copied += int64(len(b))
		v.cfg.Reporter.Progress(s.idx, nr.Node, copied)
		return nil
	})
	if err != nil {
		return err
	}
	if err := v.replicaOp(s, nr, 0, -1, false, func(ctx context.Context) error { return nr.c.Flush(ctx) }); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	err = pass("verify", func(k int, off int64, b, b2 []byte) error {
		if err := v.readPiece(piece{s: s, off: off, p: b, n: int64(len(b))}); err != nil {
			return err
		}
		if err := v.replicaOp(s, nr, off, int64(len(b2)), false, func(ctx context.Context) error { return nr.c.ReadAt(ctx, b2, off) }); err != nil {
			return err
		}
		if !bytes.Equal(b, b2) {
			return errors.New("the copy differs from the healthy replica")
		}
		return nil
	})
	if err != nil {
		return err
	}
	var ls Shard
	err = v.retryCtx(ctx, func(ctx context.Context) error {
		var err error
		ls, err = v.cfg.Reporter.Rebuilt(ctx, s.idx, nr.Node)
		return err
	})
	if err != nil {
		return fmt.Errorf("record as healthy: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if nr.st() == Failed {
		return errors.New("the replica failed while it was recorded as healthy")
	}
	nr.state.Store(Healthy)
	s.gen, s.layout = ls.Gen, ls
	return nil
}

// chunkPass runs f on every chunk of s in order, each under the chunk's
// exclusive lock (guest writes to that chunk wait), with two chunk-sized
// buffers. Whenever the guest did I/O since the previous chunk it sleeps
// as long as the chunk took: a pass uses at most half the time while the
// guest is busy. check runs before each chunk.
func (v *Volume) chunkPass(ctx context.Context, s *shard, name string, check func() error, f func(k int, off int64, b, b2 []byte) error) error {
	cs := v.cfg.ChunkSize
	src, dst := make([]byte, cs), make([]byte, cs)
	lastOps := v.guestOps.Load()
	for k := range s.chunks {
		if err := check(); err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		off := int64(k) * cs
		n := min(cs, s.length-off)
		start := time.Now()
		s.chunks[k].Lock()
		err := f(k, off, src[:n], dst[:n])
		s.chunks[k].Unlock()
		if err != nil {
			return fmt.Errorf("%s at %d: %w", name, off, err)
		}
		if ops := v.guestOps.Load(); ops != lastOps {
			lastOps = ops
			if err := v.sleep(ctx, time.Since(start)); err != nil {
				return err
			}
		}
	}
	return nil
}

// stoppable is ctx, also cancelled when the volume closes.
func (v *Volume) stoppable(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-v.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

func (v *Volume) sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-v.stop:
		return errors.New("volume closed")
	}
}

// retryCtx is retry bounded by ctx as well.
func (v *Volume) retryCtx(ctx context.Context, f func(context.Context) error) error {
	done := make(chan error, 1)
	go func() { done <- v.retry("record a rebuilt replica", f) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

var zeroPage [4096]byte

// allZero compares page by page with memeq, which is vectorised.
func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:n], zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Drop takes node's replica of shard out of service once the control
// plane has removed it from the shard map (rebalance): writes stop going
// to it and its connection is closed after its outstanding writes.
func (v *Volume) Drop(shardIdx int, node string) error {
	if shardIdx < 0 || shardIdx >= len(v.shards) {
		return fmt.Errorf("drop: shard %d: %w", shardIdx, ErrLayout)
	}
	s := v.shards[shardIdx]
	s.mu.Lock()
	var r *replica
	for i, x := range s.reps {
		if x.Node == node {
			r = x
			s.reps = append(s.reps[:i], s.reps[i+1:]...)
			break
		}
	}
	s.mu.Unlock()
	if r == nil {
		return nil
	}
	// A flush ordered after every outstanding write drains them.
	v.replicaOp(s, r, 0, -1, false, func(ctx context.Context) error { return r.c.Flush(ctx) })
	r.state.Store(Failed)
	return r.c.Close()
}

// Replicas lists the replicas in service for shard, with their states as
// the engine sees them.
func (v *Volume) Replicas(shardIdx int) []Replica {
	s := v.shards[shardIdx]
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Replica
	for _, r := range s.reps {
		x := r.Replica
		x.State = r.st()
		out = append(out, x)
	}
	return out
}
