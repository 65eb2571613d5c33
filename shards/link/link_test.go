package link

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/internal/seedcorpus"
	"github.com/rayvmm/rayvmm/shards/engine"
	"github.com/rayvmm/rayvmm/shards/nbd"
	"github.com/rayvmm/rayvmm/storage/raw"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the fuzz seed corpus in testdata/fuzz")

// nodes are NBD servers on 127.0.0.1 with one export "v/0" each; the
// control side's dial looks their current address up, as etcd would.
type nodes struct {
	mu    sync.Mutex
	addrs map[string]string
	srvs  map[string]*nbd.Server
	files map[string]*raw.File
}

func startNodes(t *testing.T, size int64, names ...string) *nodes {
	n := &nodes{addrs: map[string]string{}, srvs: map[string]*nbd.Server{}, files: map[string]*raw.File{}}
	for _, name := range names {
		f, err := raw.Create(filepath.Join(t.TempDir(), name), size)
		if err != nil {
			t.Fatal(err)
		}
		n.files[name] = f
		t.Cleanup(func() { f.Close() })
		n.start(t, name)
	}
	return n
}

func (n *nodes) start(t *testing.T, name string) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &nbd.Server{Exports: nbd.StaticExports{"v/0": {Name: "v/0", Backend: n.files[name]}}}
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	n.mu.Lock()
	n.addrs[name], n.srvs[name] = l.Addr().String(), s
	n.mu.Unlock()
}

func (n *nodes) stop(name string) {
	n.mu.Lock()
	s := n.srvs[name]
	n.mu.Unlock()
	s.Close()
}

func (n *nodes) dial(ctx context.Context, shard int, r engine.Replica) (net.Conn, nbd.Info, error) {
	n.mu.Lock()
	addr := n.addrs[r.Node]
	n.mu.Unlock()
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nbd.Info{}, err
	}
	info, err := nbd.Handshake(ctx, conn, r.Export, true)
	if err != nil {
		conn.Close()
	}
	return conn, info, err
}

// reporter keeps the shard map.
type reporter struct {
	mu sync.Mutex
	sh engine.Shard
}

func (r *reporter) Failed(_ context.Context, _ int, node, _ string) (engine.Shard, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sh.MarkFailed(node)
	return r.copy(), nil
}

func (r *reporter) Rebuilt(_ context.Context, _ int, node string) (engine.Shard, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	i := r.sh.Find(node)
	r.sh.Replicas[i].State, r.sh.Replicas[i].Gen = engine.Healthy, r.sh.Gen
	return r.copy(), nil
}

func (r *reporter) Progress(int, string, int64) {}

func (r *reporter) copy() engine.Shard {
	s := r.sh
	s.Replicas = append([]engine.Replica(nil), s.Replicas...)
	return s
}

// session serves a fixed layout and records the detach.
type session struct {
	layout  engine.Layout
	resync  bool
	clean   chan bool
	layouts atomic.Int32 // layout requests answered
}

func newSession(l engine.Layout) *session { return &session{layout: l, clean: make(chan bool, 1)} }

func (s *session) Layout() (engine.Layout, bool) {
	s.layouts.Add(1)
	l := s.layout
	l.Shards = append([]engine.Shard(nil), l.Shards...)
	return l, s.resync
}

func (s *session) Detached(clean bool) {
	select {
	case s.clean <- clean:
	default: // the fuzzer detaches again and again
	}
}

func guardFor(rep *reporter) Guard {
	return func(shard int, node, export string) error {
		rep.mu.Lock()
		defer rep.mu.Unlock()
		if shard != 0 || rep.sh.Find(node) < 0 || (export != "" && export != "v/0") {
			return fmt.Errorf("not a replica of this volume: shard %d node %s export %q", shard, node, export)
		}
		return nil
	}
}

// TestEngineOverLink: the engine at the VM end of a link gets its
// replica sockets from the control end; a node that fails is reported
// through the link; after it comes back at a new address, the control
// plane's Rebuild over the link reconnects to it (a socket passed again)
// and the replicas are identical.
func TestEngineOverLink(t *testing.T) {
	const size = 256 << 10
	ns := startNodes(t, size, "a", "b")
	rep := &reporter{sh: engine.Shard{Gen: 1, Replicas: []engine.Replica{
		{Node: "a", Export: "v/0", State: engine.Healthy, Gen: 1}, {Node: "b", Export: "v/0", State: engine.Healthy, Gen: 1}}}}
	ctlEnd, vmEnd, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	rep.mu.Lock()
	sess := newSession(engine.Layout{Size: size, ShardSize: size, Consistency: engine.Strong, MinReplicas: 1, Shards: []engine.Shard{rep.copy()}})
	rep.mu.Unlock()
	ctl, err := NewControl(ctlEnd, ns.dial, rep, guardFor(rep), sess)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	ctx := context.Background()
	vol, err := OpenDisk(ctx, vmEnd, engine.Config{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	vm := vol.vm
	closed := false
	defer func() {
		if !closed {
			vol.Close()
		}
	}()
	want := bytes.Repeat([]byte("link"), size/4)
	if _, err := vol.WriteAt(context.Background(), want[:size/2], 0); err != nil {
		t.Fatal(err)
	}
	ns.stop("b")
	if _, err := vol.WriteAt(context.Background(), want[size/2:], size/2); err != nil {
		t.Fatal(err)
	}
	rep.mu.Lock()
	if r := rep.sh.Replicas[1]; r.State != engine.Failed || rep.sh.Gen != 2 {
		t.Fatalf("b after it stopped: %+v (shard generation %d)", r, rep.sh.Gen)
	}
	rep.sh.Replicas[1].State = engine.Rebuilding
	r := rep.sh.Replicas[1]
	rep.mu.Unlock()
	if got := ctl.Replicas(0); len(got) != 1 || got[0].Node != "a" {
		t.Fatalf("replicas in service: %+v", got)
	}
	ns.start(t, "b") // a new address: only the control plane knows it
	if err := ctl.Rebuild(ctx, 0, r); err != nil {
		t.Fatal(err)
	}
	if err := vol.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		got := make([]byte, size)
		if _, err := ns.files[name].ReadAt(context.Background(), got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("replica on %s differs", name)
		}
	}
	// The guard: the VM process cannot have sockets to other exports.
	if _, err := vm.Dial(ctx, 0, engine.Replica{Node: "a", Export: "other/0"}); err == nil {
		t.Fatal("dialled an export of another volume")
	}
	if _, err := vm.Dial(ctx, 3, engine.Replica{Node: "a", Export: "v/0"}); err == nil {
		t.Fatal("dialled a shard the volume does not have")
	}
	// Close flushes and tells the control plane the detach was clean.
	closed = true
	if err := vol.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case clean := <-sess.clean:
		if !clean {
			t.Fatal("a detach after a good flush reported unclean")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no detach reached the control plane")
	}
}

// TestLayoutPagesAndFence: a layout too large for one packet arrives in
// pages; when the control end goes away (its agent killed) the engine
// refuses I/O with ErrControlGone instead of writing on without an owner.
func TestLayoutPagesAndFence(t *testing.T) {
	const shards, shardSize = 3000, 64 << 10
	l := engine.Layout{Size: shards * shardSize, ShardSize: shardSize, Consistency: engine.Strong, MinReplicas: 1}
	for i := range shards {
		// Replicas on nodes that do not exist: Open reports them failed.
		l.Shards = append(l.Shards, engine.Shard{Index: i, Gen: 1, Replicas: []engine.Replica{
			{Node: "gone", Export: fmt.Sprintf("v/%d", i), State: engine.Healthy, Gen: 1, Error: strings.Repeat("e", 100)}}})
	}
	sess := newSession(l)
	rep := &reporter{}
	ctlEnd, vmEnd, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	dial := func(context.Context, int, engine.Replica) (net.Conn, nbd.Info, error) {
		return nil, nbd.Info{}, errors.New("no such node")
	}
	ctl, err := NewControl(ctlEnd, dial, rep, func(int, string, string) error { return nil }, sess)
	if err != nil {
		t.Fatal(err)
	}
	d, err := OpenDisk(context.Background(), vmEnd, engine.Config{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if got := d.Layout(); len(got.Shards) != shards || got.Shards[shards-1].Index != shards-1 {
		t.Fatalf("the engine opened %d shards", len(got.Shards))
	}
	if n := sess.layouts.Load(); n < 2 {
		t.Fatalf("a %d-shard layout came in %d reply", shards, n)
	}
	ctl.Close() // the agent is gone
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := d.ReadAt(context.Background(), make([]byte, 512), 0)
		if errors.Is(err, ErrControlGone) && errors.Is(err, engine.ErrIO) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("I/O after the control end closed: %v, want ErrControlGone", err)
		}
		time.Sleep(10 * time.Millisecond) // the fence follows the link's EOF; poll, bounded
	}
}

// TestHostileVM: packets that are not messages, oversized ones, and ones
// that carry file descriptors with requests end the link (or are
// refused) without a panic; the descriptors are closed.
func TestHostileVM(t *testing.T) {
	for name, send := range map[string]func(fd int) error{
		"garbage": func(fd int) error { _, err := unix.Write(fd, []byte("\x00\xffnot json")); return err },
		"oversized": func(fd int) error {
			_, err := unix.Write(fd, bytes.Repeat([]byte("x"), maxMessage+100))
			return err
		},
		"fds with a request": func(fd int) error {
			r, w, _ := os.Pipe()
			defer r.Close()
			defer w.Close()
			return unix.Sendmsg(fd, []byte(`{"id":1,"op":"bogus"}`), unix.UnixRights(int(r.Fd()), int(w.Fd())), nil, 0)
		},
	} {
		t.Run(name, func(t *testing.T) {
			ctlEnd, vmEnd, err := Pair()
			if err != nil {
				t.Fatal(err)
			}
			defer vmEnd.Close()
			ctl, err := NewControl(ctlEnd, func(context.Context, int, engine.Replica) (net.Conn, nbd.Info, error) {
				return nil, nbd.Info{}, errors.New("no")
			}, &reporter{}, func(int, string, string) error { return nil }, newSession(engine.Layout{}))
			if err != nil {
				t.Fatal(err)
			}
			defer ctl.Close()
			if err := send(int(vmEnd.Fd())); err != nil {
				t.Fatal(err)
			}
			select {
			case <-ctl.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the control side did not end the link")
			}
		})
	}
}

func messageSeeds() []seedcorpus.Seed {
	return []seedcorpus.Seed{
		{Name: "dial", Data: []byte(`{"id":1,"op":"dial","shard":0,"replica":{"node":"a","export":"v/0","state":"healthy","generation":1}}`)},
		{Name: "failed", Data: []byte(`{"id":2,"op":"failed","shard":0,"node":"a","reason":"timeout"}`)},
		{Name: "rebuilt", Data: []byte(`{"id":3,"op":"rebuilt","shard":0,"node":"b"}`)},
		{Name: "progress", Data: []byte(`{"id":4,"op":"progress","shard":0,"node":"b","copied":4096}`)},
		{Name: "reply", Data: []byte(`{"id":9,"reply":true,"replicas":[{"node":"a"}]}`)},
		{Name: "layout", Data: []byte(`{"id":5,"op":"layout","shard":0}`)},
		{Name: "layout-past-end", Data: []byte(`{"id":6,"op":"layout","shard":99}`)},
		{Name: "detach", Data: []byte(`{"id":7,"op":"detach","clean":true}`)},
		{Name: "bad", Data: []byte(`{"id":"x","op":7}`)},
	}
}

// FuzzControlMessages feeds one packet from the VM process to the
// control side's parser and handler.
func FuzzControlMessages(f *testing.F) {
	for _, s := range messageSeeds() {
		f.Add(s.Data)
	}
	rep := &reporter{sh: engine.Shard{Gen: 1, Replicas: []engine.Replica{{Node: "a", State: engine.Healthy, Gen: 1}, {Node: "b", State: engine.Rebuilding}}}}
	c := &Control{rep: rep, guard: guardFor(rep), dial: func(context.Context, int, engine.Replica) (net.Conn, nbd.Info, error) {
		return nil, nbd.Info{}, errors.New("no nodes in the fuzzer")
	}, sess: newSession(engine.Layout{Size: 4096, ShardSize: 4096, Consistency: engine.Strong, MinReplicas: 1,
		Shards: []engine.Shard{{Gen: 1, Replicas: []engine.Replica{{Node: "a", State: engine.Healthy, Gen: 1}}}}})}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, fd, err := parse(data, nil, 0)
		if fd != nil {
			t.Fatal("a file descriptor from no ancillary data")
		}
		if err != nil {
			return
		}
		if r, fd := c.handle(context.Background(), m); fd != nil {
			t.Fatalf("a socket for %+v: %+v", m, r)
		}
	})
}

func TestSeedCorpus(t *testing.T) {
	seedcorpus.Check(t, "FuzzControlMessages", messageSeeds(), *updateSeeds)
}
