package shards

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/shards/engine"
	"github.com/rayvmm/rayvmm/shards/etcdtest"
)

func TestPlace(t *testing.T) {
	p, err := Place(4, 3, []string{"c", "a", "b", "d"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for _, ns := range p {
		seen := map[string]bool{}
		for _, n := range ns {
			if seen[n] {
				t.Fatalf("shard placed twice on %s: %v", n, ns)
			}
			seen[n] = true
			count[n]++
		}
	}
	if !reflect.DeepEqual(count, map[string]int{"a": 3, "b": 3, "c": 3, "d": 3}) {
		t.Fatalf("counts %v", count)
	}
	if _, err := Place(1, 3, []string{"a", "b"}, nil); err == nil {
		t.Fatal("placed 3 replicas on 2 nodes")
	}
}

func TestPlanRebalance(t *testing.T) {
	vol := Volume{Name: "v", Replicas: 3}
	var shards []engine.Shard
	for i := range 4 {
		shards = append(shards, engine.Shard{Index: i, Gen: 1, Replicas: []engine.Replica{
			{Node: "a", State: engine.Healthy, Gen: 1}, {Node: "b", State: engine.Healthy, Gen: 1}, {Node: "c", State: engine.Healthy, Gen: 1}}})
	}
	maps := map[string][]engine.Shard{"v": shards}
	moves, err := PlanRebalance([]Volume{vol}, maps, []string{"a", "b", "c", "d"})
	if err != nil {
		t.Fatal(err)
	}
	// 12 replicas on 4 nodes: d gets 3, one from each.
	if len(moves) != 3 {
		t.Fatalf("moves %+v", moves)
	}
	from := map[string]int{}
	for _, m := range moves {
		if m.To != "d" {
			t.Fatalf("move %+v", m)
		}
		from[m.From]++
	}
	if len(from) != 3 {
		t.Fatalf("moves not spread over a, b, c: %+v", moves)
	}
	// c is gone: its replicas move to d.
	moves, err = PlanRebalance([]Volume{vol}, maps, []string{"a", "b", "d"})
	if err != nil {
		t.Fatal(err)
	}
	if len(moves) != 4 {
		t.Fatalf("moves with c gone %+v", moves)
	}
	for _, m := range moves {
		if m.From != "c" || m.To != "d" {
			t.Fatalf("move %+v", m)
		}
	}
}

// cluster runs nodes in this process against a real etcd.
type testCluster struct {
	t     *testing.T
	etcd  *etcdtest.Etcd
	st    *Store
	nodes map[string]*testNode
}

type testNode struct {
	dir    string
	cancel context.CancelFunc
	done   chan error
}

func newTestCluster(t *testing.T) *testCluster {
	e := etcdtest.Start(t)
	st, err := Connect(context.Background(), ConnectOptions{Endpoints: []string{e.Endpoint}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &testCluster{t: t, etcd: e, st: st, nodes: map[string]*testNode{}}
}

func (c *testCluster) startNode(name string) {
	c.t.Helper()
	n := c.nodes[name]
	if n == nil {
		n = &testNode{dir: c.t.TempDir()}
		c.nodes[name] = n
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	n.cancel, n.done = cancel, make(chan error, 1)
	go func() {
		n.done <- ServeNode(ctx, NodeConfig{Name: name, Listen: "127.0.0.1:0", Dir: n.dir, Store: c.st, TTL: 2,
			Ready: func(string) { close(ready) }})
	}()
	select {
	case <-ready:
	case err := <-n.done:
		c.t.Fatalf("node %s: %v", name, err)
	case <-time.After(30 * time.Second):
		c.t.Fatalf("node %s not ready in 30 s", name)
	}
	c.t.Cleanup(func() { c.stopNode(name) })
}

func (c *testCluster) stopNode(name string) {
	n := c.nodes[name]
	if n.cancel == nil {
		return
	}
	n.cancel()
	if err := <-n.done; err != nil {
		c.t.Errorf("node %s: %v", name, err)
	}
	n.cancel = nil
}

func (c *testCluster) replicaBytes(v *Volume, node string, shard int) []byte {
	b, err := os.ReadFile(filepath.Join(c.nodes[node].dir, v.ID, fmt.Sprintf("%d.raw", shard)))
	if err != nil {
		c.t.Fatal(err)
	}
	return b
}

// TestAttachFailRebuild: a volume on three nodes; one node stops under
// writes (recorded failed in etcd), comes back, and the attachment's
// repair loop rebuilds it until every replica is identical.
func TestAttachFailRebuild(t *testing.T) {
	c := newTestCluster(t)
	for _, n := range []string{"a", "b", "c"} {
		c.startNode(n)
	}
	ctx := context.Background()
	v, err := c.st.CreateVolume(ctx, "vol", CreateOptions{Size: 1 << 20, ShardSize: 256 << 10, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	if v.MinReplicas != 2 || v.Consistency != engine.Strong {
		t.Fatalf("defaults: %+v", v)
	}
	if _, err := c.st.CreateVolume(ctx, "vol", CreateOptions{Size: 1 << 20, ShardSize: 256 << 10, Replicas: 3}); err == nil {
		t.Fatal("created vol twice")
	}
	a, err := Attach(ctx, c.st, "vol", AttachOptions{Holder: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := Attach(ctx, c.st, "vol", AttachOptions{Holder: "second"}); err == nil {
		t.Fatal("attached twice")
	}
	want := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	if _, err := a.Disk.WriteAt(context.Background(), want[:512<<10], 0); err != nil {
		t.Fatal(err)
	}
	c.stopNode("b")
	if _, err := a.Disk.WriteAt(context.Background(), want[512<<10:], 512<<10); err != nil {
		t.Fatal(err)
	}
	shards, _, err := c.st.Shards(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}
	if r := shards[3].Replicas[shards[3].Find("b")]; r.State != engine.Failed || shards[3].Gen != 2 {
		t.Fatalf("shard 3 after b stopped: %+v", shards[3])
	}
	c.startNode("b")
	deadline := time.Now().Add(60 * time.Second)
	for {
		n, err := c.st.Pending(ctx, "vol")
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d replicas still need repair after 60 s", n)
		}
		a.Kick()
		time.Sleep(100 * time.Millisecond) // polling etcd for the repair loop's result
	}
	if err := a.Disk.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		for _, n := range []string{"a", "b", "c"} {
			if !bytes.Equal(c.replicaBytes(v, n, i), want[i*256<<10:(i+1)*256<<10]) {
				t.Errorf("shard %d on %s differs", i, n)
			}
		}
	}
}

// TestRebalanceWhileAttached: a fourth node joins while the volume is
// attached and written; the rebalance is recorded and carried out by the
// attachment's repair loop under the writes; counts end balanced and
// every replica holds the data.
func TestRebalanceWhileAttached(t *testing.T) {
	c := newTestCluster(t)
	for _, n := range []string{"a", "b", "c"} {
		c.startNode(n)
	}
	ctx := context.Background()
	v, err := c.st.CreateVolume(ctx, "vol", CreateOptions{Size: 1 << 20, ShardSize: 256 << 10, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	a, err := Attach(ctx, c.st, "vol", AttachOptions{Holder: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	want := make([]byte, 1<<20)
	stop := make(chan struct{})
	wrote := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				wrote <- nil
				return
			default:
			}
			off := (i * 4096 * 7) % (1 << 20)
			p := bytes.Repeat([]byte{byte(i)}, 4096)
			if _, err := a.Disk.WriteAt(context.Background(), p, int64(off)); err != nil {
				wrote <- err
				return
			}
			copy(want[off:], p)
		}
	}()
	c.startNode("d")
	moves, err := c.st.Plan(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(moves) != 3 {
		t.Fatalf("moves %+v", moves)
	}
	if err := c.st.Apply(ctx, moves); err != nil {
		t.Fatal(err)
	}
	if err := c.st.Repair(ctx, "vol", "test rebalance", nil); err != nil {
		t.Fatal(err)
	}
	close(stop)
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if err := a.Disk.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	ns, err := c.st.NodeStatuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if n.Replicas != 3 || n.Failed != 0 {
			t.Errorf("node %s: %d replicas, %d not healthy", n.Name, n.Replicas, n.Failed)
		}
	}
	shards, _, err := c.st.Shards(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}
	for _, sh := range shards {
		for _, r := range sh.Replicas {
			if !bytes.Equal(c.replicaBytes(v, r.Node, sh.Index), want[sh.Index*256<<10:(sh.Index+1)*256<<10]) {
				t.Errorf("shard %d on %s differs", sh.Index, r.Node)
			}
		}
	}
	// The nodes the replicas left delete their files (they watch the map).
	for _, m := range moves {
		p := filepath.Join(c.nodes[m.From].dir, v.ID, fmt.Sprintf("%d.raw", m.Shard))
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, err := os.Stat(p); os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still holds the replica of shard %d it gave up", m.From, m.Shard)
			}
			time.Sleep(50 * time.Millisecond) // polling the node's reaction to the watch
		}
	}
}

// TestWipedReplicaIsNotRead: a node whose replica files were lost while
// no VM had the volume comes back with empty files; their new replica IDs
// differ from the shard map's, so they are failed at attach and rebuilt,
// never read as if they held the data.
func TestWipedReplicaIsNotRead(t *testing.T) {
	c := newTestCluster(t)
	for _, n := range []string{"a", "b"} {
		c.startNode(n)
	}
	ctx := context.Background()
	v, err := c.st.CreateVolume(ctx, "vol", CreateOptions{Size: 512 << 10, ShardSize: 256 << 10, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("wiped?"), (512<<10)/6+1)[:512<<10]
	a, err := Attach(ctx, c.st, "vol", AttachOptions{Holder: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Disk.WriteAt(context.Background(), want, 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	shards, _, _ := c.st.Shards(ctx, "vol")
	if shards[0].Replicas[0].ID == "" {
		t.Fatal("the replica IDs were not recorded at first attach")
	}
	c.stopNode("b")
	if err := os.RemoveAll(filepath.Join(c.nodes["b"].dir, v.ID)); err != nil {
		t.Fatal(err)
	}
	c.startNode("b")
	a, err = Attach(ctx, c.st, "vol", AttachOptions{Holder: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	for range 4 { // round-robin would reach b's empty replicas
		got := make([]byte, 512<<10)
		if _, err := a.Disk.ReadAt(context.Background(), got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatal("read the wiped replica's zeroes")
		}
	}
	if err := c.st.Repair(ctx, "vol", "test", nil); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if !bytes.Equal(c.replicaBytes(v, "b", i), want[i*256<<10:(i+1)*256<<10]) {
			t.Errorf("shard %d on b was not rebuilt", i)
		}
	}
}

// TestInspectShowsRebuildProgress: a replica being rebuilt shows its
// copied bytes (written by the owner as it goes) and the shard's size.
func TestInspectShowsRebuildProgress(t *testing.T) {
	c := newTestCluster(t)
	for _, n := range []string{"a", "b"} {
		c.startNode(n)
	}
	ctx := context.Background()
	if _, err := c.st.CreateVolume(ctx, "vol", CreateOptions{Size: 512 << 10, ShardSize: 256 << 10, Replicas: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.st.updateShard(ctx, "vol", 1, 0, func(sh *engine.Shard) error {
		sh.MarkFailed("b")
		sh.Replicas[sh.Find("b")].State = engine.Rebuilding
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.st.c.Put(ctx, progressKey("vol", 1, "b"), "65536"); err != nil {
		t.Fatal(err)
	}
	st, err := c.st.Inspect(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}
	r := st.Shards[1].Replicas[1]
	if r.Node != "b" || r.State != engine.Rebuilding || r.Copied != 65536 || r.Of != 256<<10 || st.Degraded != 1 || !strings.Contains(st.State, "degraded") {
		t.Fatalf("inspect: %+v, shard 1 replica b %+v", st, r)
	}
}
