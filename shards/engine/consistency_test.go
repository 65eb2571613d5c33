package engine

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"testing"
)

// openHeld opens the volume with the first n replica writes to node's
// replicas (n < 0: all of them) held back until release is called: that
// replica lags as far as a test needs, however the goroutines are
// scheduled. arrivals gets a value for every write to node as it
// reaches the hook (before it is held). A test that ends early releases
// them before the volume is closed.
func (c *cluster) openHeld(t *testing.T, node string, n int) (v *Volume, release func(), arrivals <-chan struct{}) {
	t.Helper()
	gate, arrived := make(chan struct{}), make(chan struct{}, 1024)
	var count atomic.Int64
	var once sync.Once
	testHookWrite = func(name string) {
		if name != node {
			return
		}
		select {
		case arrived <- struct{}{}:
		default:
		}
		if i := count.Add(1); n >= 0 && i > int64(n) {
			return
		}
		<-gate
	}
	t.Cleanup(func() { testHookWrite = nil }) // after the volume is closed
	v = c.open(t)
	release = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(release) // before the volume is closed
	return v, release, arrived
}

// pattern is a 4 KiB block filled with b.
func pattern(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

// readBack reads the block at off four times (round-robin reaches every
// replica of an R=2 shard twice) and fails unless each read returns want.
func readBack(t *testing.T, v *Volume, off int64, want []byte, what string) {
	t.Helper()
	for i := range 4 {
		ctx, cancel := context.WithCancel(context.Background()) // as the blk device calls it
		got := make([]byte, len(want))
		_, err := v.ReadAt(ctx, got, off)
		cancel()
		if err != nil {
			t.Fatalf("read %d of %s: %v", i, what, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read %d of %s returned %#x..., not the acknowledged write's %#x...", i, what, got[0], want[0])
		}
	}
}

// TestEventualReadAfterWrite: an Eventual write is acknowledged by one
// replica while the other has not even sent it yet; every read after the
// acknowledgement returns the new data (from the replica that has it,
// without waiting for or failing the lagging one), and after a flush both
// replicas hold it.
func TestEventualReadAfterWrite(t *testing.T) {
	c := newCluster(t, []string{"a", "b"}, 1, shardSize, Eventual, 1)
	v, release, _ := c.openHeld(t, "b", -1)
	want := make([]byte, shardSize)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := v.WriteAt(ctx, pattern(0x5a), 8192); err != nil {
		t.Fatal(err)
	}
	copy(want[8192:], pattern(0x5a))
	readBack(t, v, 8192, pattern(0x5a), "the block just written")
	if n := v.ReplicaFailures.Load(); n != 0 {
		t.Fatalf("%d replicas failed: reads waited for the lagging replica", n)
	}
	release()
	if err := v.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	readBack(t, v, 8192, pattern(0x5a), "the block after the flush")
	c.identical(t, want)
}

// TestOverlappingWritesSameOrder: two writes to the same block, the
// first held back on replica b before it is sent; both replicas must
// apply them in the same order and end with the second one's data.
func TestOverlappingWritesSameOrder(t *testing.T) {
	for _, cons := range []Consistency{Eventual, Strong} {
		t.Run(string(cons), func(t *testing.T) {
			c := newCluster(t, []string{"a", "b"}, 1, shardSize, cons, 1)
			v, release, arrivals := c.openHeld(t, "b", 1)
			first := make(chan error, 1)
			go func() { _, err := v.WriteAt(context.Background(), pattern(0x11), 4096); first <- err }()
			<-arrivals // the first write is held on b
			if cons == Eventual {
				if err := <-first; err != nil { // a acknowledged it
					t.Fatal(err)
				}
			}
			second := make(chan error, 1)
			go func() { _, err := v.WriteAt(context.Background(), pattern(0x22), 4096); second <- err }()
			if cons == Eventual {
				if err := <-second; err != nil {
					t.Fatal(err)
				}
				readBack(t, v, 4096, pattern(0x22), "the block written twice")
			}
			<-arrivals // the second write has reached b too
			release()
			for _, ch := range []chan error{first, second} {
				if cons == Strong {
					if err := <-ch; err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := v.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, shardSize)
			copy(want[4096:], pattern(0x22))
			readBack(t, v, 4096, pattern(0x22), "the block written twice, after the flush")
			c.identical(t, want)
		})
	}
}

// TestEventualWriteBuffers: the bytes of an Eventual write that a lagging
// replica has not sent yet belong to the engine: the caller may change
// its buffer once the write is acknowledged, and the engine's own bounce
// buffers (a context that can end, as the blk device passes) are not
// reused by later requests while a replica still has to send them.
func TestEventualWriteBuffers(t *testing.T) {
	c := newCluster(t, []string{"a", "b"}, 1, shardSize, Eventual, 1)
	v, release, _ := c.openHeld(t, "b", -1)
	want := make([]byte, shardSize)
	p := pattern(0x33)
	if _, err := v.WriteAt(context.Background(), p, 0); err != nil {
		t.Fatal(err)
	}
	copy(want, p)
	copy(p, pattern(0xcc)) // the caller reuses its buffer
	for i := range 32 {
		ctx, cancel := context.WithCancel(context.Background())
		off := int64(i+1) * 4096
		if _, err := v.WriteAt(ctx, pattern(byte(0x40+i)), off); err != nil {
			t.Fatal(err)
		}
		cancel()
		copy(want[off:], pattern(byte(0x40+i)))
	}
	release()
	if err := v.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.identical(t, want)
	for i := range 33 {
		readBack(t, v, int64(i)*4096, want[i*4096:(i+1)*4096], "a block written while b lagged")
	}
}
