package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/shards/nbd"
	"github.com/rayvmm/rayvmm/storage/raw"
)

// node is an in-process NBD server holding one replica file per shard.
type node struct {
	name  string
	dir   string
	files map[string]*raw.File
	srv   *nbd.Server
	addr  string
	done  chan error
}

func newNode(t testing.TB, name string, shards int, shardSize int64) *node {
	t.Helper()
	n := &node{name: name, dir: t.TempDir(), files: map[string]*raw.File{}}
	for i := range shards {
		f, err := raw.Create(filepath.Join(n.dir, fmt.Sprint(i)), shardSize)
		if err != nil {
			t.Fatal(err)
		}
		n.files[fmt.Sprintf("v/%d", i)] = f
	}
	t.Cleanup(func() {
		n.stop()
		for _, f := range n.files {
			f.Close()
		}
	})
	n.start(t)
	return n
}

func (n *node) start(t testing.TB) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ex := nbd.StaticExports{}
	for name, f := range n.files {
		ex[name] = &nbd.Export{Name: name, Backend: f}
	}
	n.srv, n.addr, n.done = &nbd.Server{Exports: ex}, l.Addr().String(), make(chan error, 1)
	go func() { n.done <- n.srv.Serve(l) }()
}

// stop is the node going away: its listener and connections close.
func (n *node) stop() {
	if n.srv != nil {
		n.srv.Close()
		<-n.done
		n.srv = nil
	}
}

func (n *node) shardBytes(t *testing.T, i int) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.dir, fmt.Sprint(i)))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cluster is the nodes plus a Dialer and a Reporter that keep the shard
// map in memory, as the control plane keeps it in etcd.
type cluster struct {
	t     testing.TB
	nodes map[string]*node

	mu      sync.Mutex
	layout  Layout
	failed  []string      // "shard/node" in report order
	gate    chan struct{} // when set, Failed waits for it
	reports int
}

func newCluster(t testing.TB, names []string, shards int, shardSize int64, cons Consistency, min int) *cluster {
	c := &cluster{t: t, nodes: map[string]*node{}}
	c.layout = Layout{Size: int64(shards) * shardSize, ShardSize: shardSize, Consistency: cons, MinReplicas: min}
	for _, n := range names {
		c.nodes[n] = newNode(t, n, shards, shardSize)
	}
	for i := range shards {
		s := Shard{Index: i, Gen: 1}
		for _, n := range names {
			s.Replicas = append(s.Replicas, Replica{Node: n, Export: fmt.Sprintf("v/%d", i), State: Healthy, Gen: 1})
		}
		c.layout.Shards = append(c.layout.Shards, s)
	}
	return c
}

func (c *cluster) Dial(ctx context.Context, shard int, r Replica) (*nbd.Client, error) {
	n := c.nodes[r.Node]
	if n == nil || n.srv == nil {
		return nil, fmt.Errorf("node %s is down", r.Node)
	}
	return nbd.Dial(ctx, n.addr, r.Export)
}

func (c *cluster) Failed(ctx context.Context, shard int, node, reason string) (Shard, error) {
	c.mu.Lock()
	gate := c.gate
	c.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return Shard{}, ctx.Err()
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reports++
	s := &c.layout.Shards[shard]
	if s.MarkFailed(node) {
		c.failed = append(c.failed, fmt.Sprintf("%d/%s", shard, node))
	}
	return *s, nil
}

func (c *cluster) Rebuilt(ctx context.Context, shard int, node string) (Shard, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &c.layout.Shards[shard]
	i := s.Find(node)
	s.Replicas[i].State, s.Replicas[i].Gen = Healthy, s.Gen
	return *s, nil
}

func (c *cluster) Progress(int, string, int64) {}

func (c *cluster) open(t *testing.T) *Volume {
	t.Helper()
	c.mu.Lock()
	l := c.layout
	c.mu.Unlock()
	v, err := Open(context.Background(), Config{Layout: l, Dialer: c, Reporter: c, Timeout: 2 * time.Second, ReportTimeout: 3 * time.Second, ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

// writer keeps a model of what the volume must hold.
type writer struct {
	mu   sync.Mutex
	want []byte
}

// writeRandom writes n random blocks of 1-12 KiB (some across shard
// boundaries) from g goroutines at once, each in its own region.
func (w *writer) writeRandom(t *testing.T, v *Volume, g, n int, seed uint64) error {
	var wg sync.WaitGroup
	errs := make(chan error, g)
	region := int64(len(w.want)) / int64(g)
	for gi := range g {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(gi)))
			for range n {
				size := int64(1+rng.IntN(3)) * 4096
				off := int64(gi)*region + rng.Int64N((region-size)/512)*512
				p := make([]byte, size)
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				if _, err := v.WriteAt(context.Background(), p, off); err != nil {
					errs <- err
					return
				}
				w.mu.Lock()
				copy(w.want[off:], p)
				w.mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

func (w *writer) check(t *testing.T, v *Volume) {
	t.Helper()
	got := make([]byte, len(w.want))
	if _, err := v.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, w.want) {
		t.Fatal("the volume does not read back what was written")
	}
}

// identical checks that every readable replica of every shard holds the
// expected bytes.
func (c *cluster) identical(t *testing.T, want []byte) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	ss := c.layout.ShardSize
	for i, s := range c.layout.Shards {
		for _, r := range s.Replicas {
			if !s.Readable(r) {
				t.Errorf("shard %d replica on %s is %s at generation %d (shard at %d)", i, r.Node, r.State, r.Gen, s.Gen)
				continue
			}
			if !bytes.Equal(c.nodes[r.Node].shardBytes(t, i), want[int64(i)*ss:int64(i+1)*ss]) {
				t.Errorf("shard %d replica on %s differs", i, r.Node)
			}
		}
	}
}

const shardSize = 256 << 10

func TestStrongWritesReachEveryReplica(t *testing.T) {
	c := newCluster(t, []string{"a", "b", "c"}, 4, shardSize, Strong, 2)
	v := c.open(t)
	w := &writer{want: make([]byte, 4*shardSize)}
	if err := w.writeRandom(t, v, 8, 30, 1); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.check(t, v)
	c.identical(t, w.want)
}

// TestStrongNodeLossAndRebuild: a node goes away under writes; every write
// still completes, its replicas are recorded failed (generation bumped)
// before the writes that noticed complete, and a rebuild onto the
// restarted node while writes go on makes the replicas identical again.
func TestStrongNodeLossAndRebuild(t *testing.T) {
	c := newCluster(t, []string{"a", "b", "c"}, 4, shardSize, Strong, 2)
	v := c.open(t)
	w := &writer{want: make([]byte, 4*shardSize)}
	if err := w.writeRandom(t, v, 4, 10, 1); err != nil {
		t.Fatal(err)
	}
	c.nodes["b"].stop()
	if err := w.writeRandom(t, v, 4, 20, 2); err != nil {
		t.Fatalf("writes with one node down: %v", err)
	}
	c.mu.Lock()
	for i, s := range c.layout.Shards {
		if r := s.Replicas[s.Find("b")]; r.State != Failed || s.Gen != 2 || r.Gen != 1 {
			t.Errorf("shard %d: b is %s at %d, shard generation %d; want failed at 1, shard at 2", i, r.State, r.Gen, s.Gen)
		}
	}
	c.mu.Unlock()
	w.check(t, v)

	c.nodes["b"].start(t)
	var wg sync.WaitGroup
	wg.Add(1)
	var werr error
	go func() { defer wg.Done(); werr = w.writeRandom(t, v, 4, 40, 3) }()
	for i := range 4 {
		c.mu.Lock()
		r := c.layout.Shards[i].Replicas[c.layout.Shards[i].Find("b")]
		c.mu.Unlock()
		if err := v.Rebuild(context.Background(), i, r); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	if err := v.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.check(t, v)
	c.identical(t, w.want)
}

// TestTwoOfThreeDown: with two nodes gone a strong volume (min 2) refuses
// writes with an I/O error in bounded time; reads still work; every
// write that was acknowledged is on the surviving replica.
func TestTwoOfThreeDown(t *testing.T) {
	c := newCluster(t, []string{"a", "b", "c"}, 2, shardSize, Strong, 2)
	v := c.open(t)
	w := &writer{want: make([]byte, 2*shardSize)}
	if err := w.writeRandom(t, v, 2, 10, 1); err != nil {
		t.Fatal(err)
	}
	c.nodes["a"].stop()
	c.nodes["b"].stop()
	start := time.Now()
	_, err := v.WriteAt(context.Background(), make([]byte, 4096), 0)
	if !errors.Is(err, ErrIO) {
		t.Fatalf("write with two of three replicas gone: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the failed write took %v", d)
	}
	w.check(t, v)
	if !bytes.Equal(c.nodes["c"].shardBytes(t, 0), w.want[:shardSize]) {
		t.Fatal("the surviving replica lacks acknowledged writes")
	}
}

// TestStrongWriteWaitsForReport: a write that finds a replica failed does
// not complete until the failure is recorded, and fails if it cannot be.
func TestStrongWriteWaitsForReport(t *testing.T) {
	c := newCluster(t, []string{"a", "b", "c"}, 1, shardSize, Strong, 2)
	v := c.open(t)
	gate := make(chan struct{})
	c.mu.Lock()
	c.gate = gate
	c.mu.Unlock()
	c.nodes["c"].stop()
	done := make(chan error, 1)
	go func() { _, err := v.WriteAt(context.Background(), make([]byte, 4096), 0); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("the write completed (%v) before the failure was recorded", err)
	case <-time.After(300 * time.Millisecond): // the write must still be waiting: this only bounds the check
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatalf("write after the failure was recorded: %v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.failed) != 1 || c.failed[0] != "0/c" {
		t.Fatalf("recorded failures %v", c.failed)
	}
}

// slowBackend delays writes, for a lagging replica.
type slowBackend struct {
	nbd.Backend
	delay time.Duration
}

func (s slowBackend) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	return s.Backend.WriteAt(ctx, p, off)
}

// TestEventualLagAndFlush: with one slow replica writes complete on the
// first acknowledgement; reads still see every write; a flush waits until
// the slow replica has them all.
func TestEventualLagAndFlush(t *testing.T) {
	c := newCluster(t, []string{"a", "b"}, 2, shardSize, Eventual, 1)
	b := c.nodes["b"]
	b.stop()
	ex := nbd.StaticExports{}
	for name, f := range b.files {
		ex[name] = &nbd.Export{Name: name, Backend: slowBackend{f, 20 * time.Millisecond}}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.srv, b.addr, b.done = &nbd.Server{Exports: ex}, l.Addr().String(), make(chan error, 1)
	go func() { b.done <- b.srv.Serve(l) }()

	v := c.open(t)
	w := &writer{want: make([]byte, 2*shardSize)}
	start := time.Now()
	if err := w.writeRandom(t, v, 1, 30, 1); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 30*20*time.Millisecond {
		t.Logf("eventual writes took %v; the slow replica's delay alone is %v", d, 30*20*time.Millisecond)
	}
	w.check(t, v)
	if err := v.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.identical(t, w.want)
}

// TestNoEtcdInDataPath: the engine, the link and the NBD package link neither etcd
// nor gRPC (the VM process links them).
func TestNoEtcdInDataPath(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/rayvmm/rayvmm/shards/engine", "github.com/rayvmm/rayvmm/shards/nbd", "github.com/rayvmm/rayvmm/shards/link").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "etcd") || strings.Contains(dep, "grpc") || strings.Contains(dep, "protobuf") {
			t.Errorf("the data path depends on %s", dep)
		}
	}
}

// TestResyncAfterUncleanShutdown: replicas that differ (a write that was
// in flight on one of them when the data path died) are read from the
// primary only until Resync has made them identical.
func TestResyncAfterUncleanShutdown(t *testing.T) {
	c := newCluster(t, []string{"a", "b", "c"}, 2, shardSize, Strong, 2)
	// The crash left b and c with a block a never got.
	for _, n := range []string{"b", "c"} {
		if _, err := c.nodes[n].files["v/1"].WriteAt(context.Background(), bytes.Repeat([]byte{0xee}, 4096), 8192); err != nil {
			t.Fatal(err)
		}
	}
	c.mu.Lock()
	l := c.layout
	c.mu.Unlock()
	v, err := Open(context.Background(), Config{Layout: l, Dialer: c, Reporter: c, Resync: true, ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	first := make([]byte, 4096) // the primary is a, the first in the layout
	for range 6 {               // round-robin would hit every replica in six reads
		got := make([]byte, 4096)
		if _, err := v.ReadAt(context.Background(), got, shardSize+8192); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, first) {
			t.Fatal("a resyncing shard returned different data for the same block")
		}
	}
	for i := range 2 {
		if err := v.Resync(context.Background(), i); err != nil {
			t.Fatal(err)
		}
	}
	if v.Resyncing(1) || v.Resynced.Load() != 2 {
		t.Fatalf("resyncing %v, %d chunks rewritten (want b's and c's)", v.Resyncing(1), v.Resynced.Load())
	}
	c.identical(t, make([]byte, 2*shardSize))
}

// TestIdleNodeLossNoticed: a node that goes away while the volume is idle
// is failed and reported without any guest I/O.
func TestIdleNodeLossNoticed(t *testing.T) {
	c := newCluster(t, []string{"a", "b"}, 1, shardSize, Strong, 1)
	v := c.open(t)
	c.nodes["b"].stop()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		n := len(c.failed)
		c.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the idle volume did not notice its replica's node went away")
		}
		time.Sleep(10 * time.Millisecond) // polling the reporter the engine calls
	}
	if got := v.Replicas(0); len(got) != 1 || got[0].Node != "a" {
		t.Fatalf("in service: %+v", got)
	}
}
