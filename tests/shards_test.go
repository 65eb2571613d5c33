package tests

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/shards/etcdtest"
)

// The sharded-volume tests run real processes: Debian's etcd as an
// external cluster, `rayvmm shard serve` storage nodes on 127.0.0.1
// ports, qemu-nbd for interop, and rayguest under `rayvmm boot`. The test
// volume is 1 MiB in four 256 KiB shards, three replicas each; blktest
// with 256 blocks touches all four.
const (
	shVolSize   = 1 << 20
	shShardSize = 256 << 10
	shBlocks    = 256
)

type shardEnv struct {
	t     *testing.T
	etcd  *etcdtest.Etcd
	state string
	nodes map[string]*shardNode
	logs  *lineWatcher // the last boot's stderr
	boots []string     // more flags for rayvmm boot (a jail)
}

type shardNode struct {
	dir  string
	addr string
	cmd  *exec.Cmd
	out  *lineWatcher
}

func newShardEnv(t *testing.T, nodes ...string) *shardEnv {
	requireKVM(t)
	requireTool(t, "etcd")
	requireTool(t, "qemu-img")
	e := &shardEnv{t: t, etcd: etcdtest.Start(t), state: t.TempDir(), nodes: map[string]*shardNode{}}
	for _, n := range nodes {
		e.startNode(n)
	}
	return e
}

func (e *shardEnv) args(a ...string) []string {
	return append([]string{"--state-dir", e.state, "--etcd-endpoints", e.etcd.Endpoint}, a...)
}

// rv runs a rayvmm command that must succeed.
func (e *shardEnv) rv(a ...string) string {
	e.t.Helper()
	r := run(e.t, nil, 2*time.Minute, e.args(a...)...)
	if r.code != 0 {
		e.t.Fatalf("rayvmm %v: exit %d\n%s%s", a, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// startNode starts (or restarts, on a new port, with its old directory)
// a storage node and waits for its "serving on" line.
func (e *shardEnv) startNode(name string) {
	e.t.Helper()
	n := e.nodes[name]
	if n == nil {
		n = &shardNode{dir: e.t.TempDir()}
		e.nodes[name] = n
	}
	n.out = newLineWatcher()
	n.cmd = exec.Command(rayvmm, e.args("shard", "serve", "--listen", "127.0.0.1:0", "--dir", n.dir, "--node", name)...)
	n.cmd.Stdout, n.cmd.Stderr = n.out, n.out
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	cmd, out := n.cmd, n.out
	go func() { cmd.Wait(); out.close() }()
	e.t.Cleanup(func() { e.stopNode(cmd, out) })
	n.out.waitFor(e.t, "serving on ", 30*time.Second)
	m := regexp.MustCompile(`serving on (\S+)`).FindStringSubmatch(n.out.String())
	n.addr = m[1]
}

func (e *shardEnv) stopNode(cmd *exec.Cmd, out *lineWatcher) {
	cmd.Process.Signal(syscall.SIGTERM)
	out.waitClosed(e.t, 20*time.Second)
	checkNoPanic(e.t, out.String())
}

// kill9 kills a node with SIGKILL and waits until it is gone.
func (e *shardEnv) kill9(name string) {
	e.t.Helper()
	n := e.nodes[name]
	n.cmd.Process.Signal(syscall.SIGKILL)
	n.out.waitClosed(e.t, 10*time.Second)
}

// boot starts rayvmm boot on the sharded volume in the background; the
// watcher gets the guest's console (stdout), e.logs rayvmm's log
// (stderr), kept apart so that log lines cannot split a guest line.
func (e *shardEnv) boot(cmdline string) (*exec.Cmd, *lineWatcher) {
	e.t.Helper()
	cmd := exec.Command(rayvmm, e.args(append(append([]string{"boot", "-v", "--sandbox", "strict"}, e.boots...), "--disk", "volume=vol", "--cmdline", cmdline)...)...)
	w := newLineWatcher()
	e.logs = newLineWatcher()
	cmd.Stdout, cmd.Stderr = w, e.logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { cmd.Wait(); w.close() }()
	e.t.Cleanup(func() { cmd.Process.Kill(); w.waitClosed(e.t, 20*time.Second) })
	return cmd, w
}

// bootWait boots and waits for the VM to exit, returning its output.
func (e *shardEnv) bootWait(cmdline string) (string, int) {
	e.t.Helper()
	cmd, w := e.boot(cmdline)
	w.waitClosed(e.t, 3*time.Minute)
	return w.String(), cmd.ProcessState.ExitCode()
}

type shardInspect struct {
	State    string `json:"state"`
	Degraded int    `json:"degraded_shards"`
	Shards   []struct {
		Gen      uint64 `json:"generation"`
		Replicas []struct {
			Node   string `json:"node"`
			Export string `json:"export"`
			State  string `json:"state"`
			Gen    uint64 `json:"generation"`
		} `json:"replicas"`
	} `json:"shards"`
}

func (e *shardEnv) inspect() shardInspect {
	e.t.Helper()
	var v shardInspect
	out := e.rv("volume", "inspect", "vol")
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		e.t.Fatalf("%v\n%s", err, out)
	}
	return v
}

// replica reads one replica through qemu-img convert nbd://node/export.
func (e *shardEnv) replica(addr, export string) []byte {
	e.t.Helper()
	out := filepath.Join(e.t.TempDir(), "r.raw")
	qemuImg(e.t, "convert", "-f", "raw", "-O", "raw", "nbd://"+addr+"/"+export, out)
	b, err := os.ReadFile(out)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// identical checks every replica of every shard, read over NBD by
// qemu-img, against want; static nodes are looked up in addrs.
func (e *shardEnv) identical(want []byte, addrs map[string]string) {
	e.t.Helper()
	v := e.inspect()
	for i, sh := range v.Shards {
		for _, r := range sh.Replicas {
			if r.State != "healthy" || r.Gen != sh.Gen {
				e.t.Errorf("shard %d replica on %s is %s at generation %d (shard at %d)", i, r.Node, r.State, r.Gen, sh.Gen)
				continue
			}
			addr := addrs[r.Node]
			if n := e.nodes[r.Node]; n != nil {
				addr = n.addr
			}
			if !bytes.Equal(e.replica(addr, r.Export), want[i*shShardSize:(i+1)*shShardSize]) {
				e.t.Errorf("shard %d replica on %s differs from what the guest wrote", i, r.Node)
			}
		}
	}
}

func blktest(seed int, extra string) string {
	return fmt.Sprintf("rayguest.run=blktest rayguest.seed=%d rayguest.blocks=%d %s", seed, shBlocks, extra)
}

func (e *shardEnv) guestOK(out string, code int, want []byte) {
	e.t.Helper()
	checkNoPanic(e.t, e.logs.String())
	if code != 0 {
		e.t.Fatalf("rayvmm boot exited %d:\n%s\nlog:\n%s", code, out, e.logs.String())
	}
	if s := blkSums(e.t, out)["vda"]; s != guestSum(want[:shBlocks*4096]) {
		e.t.Fatalf("guest sum %q, want %s\n%s", s, guestSum(want[:shBlocks*4096]), out)
	}
}

// TestShardsBaseline: an R=3 strong volume of 4 shards passes blktest and
// all three replicas of each shard are byte-identical.
func TestShardsBaseline(t *testing.T) {
	e := newShardEnv(t, "a", "b", "c")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "3")
	if list := e.rv("volume", "list"); !strings.Contains(list, "sharded (4 x 256K, R=3, strong)") {
		t.Fatalf("volume list:\n%s", list)
	}
	out, code := e.bootWait(blktest(7, ""))
	want := expectImage(shVolSize, 7, shBlocks)
	e.guestOK(out, code, want)
	e.identical(want, nil)
	nodes := e.rv("shard", "nodes")
	for _, n := range []string{"a", "b", "c"} {
		if !regexp.MustCompile(`(?m)^` + n + `\s+\S+\s+live\s+4\s+0$`).MatchString(nodes) {
			t.Errorf("shard nodes does not show %s live with 4 replicas:\n%s", n, nodes)
		}
	}
}

// TestShardsNodeKilled: kill -9 one node in the middle of blktest. The
// guest finishes with every block correct, the node's replicas are
// recorded failed, and once it is back a rebuild makes them identical.
func TestShardsNodeKilled(t *testing.T) {
	e := newShardEnv(t, "a", "b", "c")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "3")
	_, w := e.boot(blktest(3, "rayguest.flushevery=16"))
	w.waitFor(t, "flushed blocks=64\n", 2*time.Minute)
	e.kill9("b")
	w.waitClosed(t, 2*time.Minute)
	want := expectImage(shVolSize, 3, shBlocks)
	e.guestOK(w.String(), 0, want)
	v := e.inspect()
	failed := 0
	for _, sh := range v.Shards {
		for _, r := range sh.Replicas {
			// failed, or rebuilding if the VM's repair loop tried it
			// before the node's lease ran out: never readable again.
			if r.Node == "b" && r.State != "healthy" && r.Gen < sh.Gen {
				failed++
			}
		}
	}
	if failed == 0 || !strings.Contains(v.State, "degraded") {
		t.Fatalf("no replica of b recorded failed (state %q):\n%+v", v.State, v)
	}
	e.startNode("b")
	e.rv("volume", "rebuild", "vol")
	e.identical(want, nil)
	out, code := e.bootWait("rayguest.run=blksum rayguest.blocks=256")
	e.guestOK(out, code, want)
}

// TestShardsTwoNodesDown: with two of three nodes gone, the guest's
// writes fail with an I/O error (a strong volume needs a majority), not a
// hang; after the nodes return and are rebuilt every block the guest saw
// acknowledged is on every replica.
func TestShardsTwoNodesDown(t *testing.T) {
	e := newShardEnv(t, "a", "b", "c")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "3")
	_, w := e.boot(blktest(5, "rayguest.flushevery=16"))
	w.waitFor(t, "flushed blocks=48\n", 2*time.Minute)
	e.kill9("a")
	e.kill9("b")
	w.waitClosed(t, 2*time.Minute)
	out := w.String()
	m := regexp.MustCompile(`blk vda FAIL block (\d+) write status (\d+)`).FindStringSubmatch(out)
	if m == nil || strings.Contains(out, "timeout") {
		t.Fatalf("the guest did not see a write I/O error:\n%s", out)
	}
	failedAt, _ := strconv.Atoi(m[1])
	t.Logf("first failed write: block %d (status %s)", failedAt, m[2])
	e.startNode("a")
	e.startNode("b")
	e.rv("volume", "rebuild", "vol")
	v := e.inspect()
	for i, sh := range v.Shards {
		for _, r := range sh.Replicas {
			got := e.replica(e.nodes[r.Node].addr, r.Export)
			for b := 0; b < shShardSize/4096; b++ {
				blk := i*shShardSize/4096 + b
				if blk >= failedAt {
					break
				}
				if !bytes.Equal(got[b*4096:(b+1)*4096], pattern(5, uint64(blk))) {
					t.Fatalf("block %d was acknowledged but replica %s of shard %d lacks it", blk, r.Node, i)
				}
			}
		}
	}
}

// TestShardsEtcdRestart: the external etcd stops in the middle of a run;
// guest I/O goes on without it, a node killed meanwhile is recorded
// failed once etcd is back, and the guest finishes correct.
func TestShardsEtcdRestart(t *testing.T) {
	e := newShardEnv(t, "a", "b", "c")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "3")
	_, w := e.boot(blktest(9, "rayguest.flushevery=16"))
	w.waitFor(t, "flushed blocks=32\n", 2*time.Minute)
	e.etcd.Stop()
	w.waitFor(t, "flushed blocks=96\n", 2*time.Minute) // I/O goes on without etcd
	e.kill9("c")
	e.etcd.Restart()
	w.waitClosed(t, 2*time.Minute)
	want := expectImage(shVolSize, 9, shBlocks)
	e.guestOK(w.String(), 0, want)
	v := e.inspect()
	for i, sh := range v.Shards {
		for _, r := range sh.Replicas {
			if r.Node == "c" && (r.State == "healthy" || r.Gen == sh.Gen) {
				t.Errorf("shard %d: c is %s after etcd came back", i, r.State)
			}
		}
	}
	e.startNode("c")
	e.rv("volume", "rebuild", "vol")
	e.identical(want, nil)
}

// TestShardsRebalance: a fourth node joins and shard rebalance moves
// replicas to it: counts are balanced (3 each) and blksum is unchanged.
func TestShardsRebalance(t *testing.T) {
	e := newShardEnv(t, "a", "b", "c")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "3")
	out, code := e.bootWait(blktest(11, ""))
	want := expectImage(shVolSize, 11, shBlocks)
	e.guestOK(out, code, want)
	e.startNode("d")
	plan := e.rv("shard", "rebalance", "--dry-run")
	if strings.Count(plan, " -> d ") != 3 {
		t.Fatalf("rebalance plan:\n%s", plan)
	}
	e.rv("shard", "rebalance")
	nodes := e.rv("shard", "nodes")
	for _, n := range []string{"a", "b", "c", "d"} {
		if !regexp.MustCompile(`(?m)^` + n + `\s+\S+\s+live\s+3\s+0$`).MatchString(nodes) {
			t.Errorf("after rebalance %s does not hold 3 healthy replicas:\n%s", n, nodes)
		}
	}
	if again := e.rv("shard", "rebalance", "--dry-run"); !strings.Contains(again, "balanced") {
		t.Errorf("a second rebalance still moves:\n%s", again)
	}
	e.identical(want, nil)
	e.rv("volume", "rebuild", "vol")
	out, code = e.bootWait("rayguest.run=blksum rayguest.blocks=256")
	e.guestOK(out, code, want)

	// The audit log has the sharded volume's whole history, in order, as
	// for a local volume: rayvmmd records its commands, rayvmm boot the
	// attaches.
	e.rv("volume", "rm", "vol")
	rs := parseAuditList(t, e.rv("audit", "list", "--json", "--object", "volume/vol"))
	wantActs := []string{"volume.create volume/vol", "volume.attach volume/vol", "volume.detach volume/vol",
		"shard.rebalance volume/vol", "volume.rebuild volume/vol", "volume.attach volume/vol", "volume.detach volume/vol", "volume.rm volume/vol"}
	if got := actionsOf(rs); !slices.Equal(got, wantActs) {
		t.Fatalf("audit list --object volume/vol:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantActs, "\n"))
	}
	for _, r := range rs {
		switch r.Action {
		case "volume.create", "shard.rebalance", "volume.rebuild", "volume.rm":
			if r.Params["sharded"] != "true" || r.Params["replicas"] != "3" || r.Params["consistency"] != "strong" || !r.OK() {
				t.Errorf("%s record: params %v, result %q", r.Action, r.Params, r.Result)
			}
		}
		if r.Action == "shard.rebalance" && strings.Count(r.Params["moves"], "->d") != 3 {
			t.Errorf("shard.rebalance record's moves: %q", r.Params["moves"])
		}
	}
	// A create that fails (five replicas on four nodes) is recorded
	// with its error; bad flags are not actions and are not recorded.
	if r := run(t, nil, 2*time.Minute, e.args("volume", "create", "wide", "--size", "1M", "--shard-size", "256K", "--replicas", "5")...); r.code == 0 {
		t.Fatal("volume create with 5 replicas on 4 nodes succeeded")
	}
	if r := run(t, nil, 2*time.Minute, e.args("volume", "create", "odd", "--size", "1M", "--shard-size", "300K", "--replicas", "3")...); r.code == 0 {
		t.Fatal("volume create with a shard size that does not divide the size succeeded")
	}
	if got := actionsOf(parseAuditList(t, e.rv("audit", "list", "--json", "--result", "error"))); !slices.Equal(got, []string{"volume.create volume/wide"}) {
		t.Errorf("audit list --result error: %q, want the failed create of wide only", got)
	}
	if out := e.rv("audit", "verify"); !strings.Contains(out, "intact") {
		t.Fatalf("audit verify: %s", out)
	}
}

// TestShardsQemuNBDNode: qemu-nbd serves one replica as a static node;
// blktest passes, it is killed mid-run and rebuilt after it returns, and
// all replicas are identical. qemu-io's writes into rayvmm's export are
// what the guest reads.
func TestShardsQemuNBDNode(t *testing.T) {
	e := newShardEnv(t, "a", "b")
	requireTool(t, "qemu-nbd")
	requireTool(t, "qemu-io")
	qfile := filepath.Join(t.TempDir(), "q.raw")
	if err := os.WriteFile(qfile, make([]byte, shShardSize), 0o644); err != nil {
		t.Fatal(err)
	}
	port := freeTCPPort(t)
	qaddr := "127.0.0.1:" + strconv.Itoa(port)
	qpid := startQemuNBD(t, qfile, "vol/0", port)
	e.rv("shard", "nodes", "add", "q", "--address", qaddr)
	e.rv("volume", "create", "vol", "--size", "256K", "--shard-size", "256K", "--replicas", "3", "--nodes", "a,b,q")
	_, w := e.boot("rayguest.run=blktest rayguest.seed=4 rayguest.blocks=64 rayguest.flushevery=8")
	w.waitFor(t, "flushed blocks=16\n", 2*time.Minute)
	syscall.Kill(qpid, syscall.SIGKILL)
	w.waitClosed(t, 2*time.Minute)
	want := expectImage(shShardSize, 4, 64)
	if s := blkSums(t, w.String())["vda"]; s != guestSum(want) {
		t.Fatalf("guest sum %q, want %s\n%s", s, guestSum(want), w.String())
	}
	startQemuNBD(t, qfile, "vol/0", port)
	e.rv("volume", "rebuild", "vol")
	e.identical(want, map[string]string{"q": qaddr})
	if b, _ := os.ReadFile(qfile); !bytes.Equal(b, want) {
		t.Fatal("qemu-nbd's file does not hold the rebuilt replica")
	}

	// qemu-io writes into rayvmm's exports (all three replicas, as the
	// engine would) and the guest reads what it wrote.
	for _, addr := range []string{e.nodes["a"].addr, e.nodes["b"].addr, qaddr} {
		out, err := exec.Command("qemu-io", "-f", "raw", "nbd://"+addr+"/vol/0", "-c", "write -P 0x5a 0 64k").CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") {
			t.Fatalf("qemu-io on %s: %v\n%s", addr, err, out)
		}
	}
	copy(want, bytes.Repeat([]byte{0x5a}, 64<<10))
	out, code := e.bootWait("rayguest.run=blksum rayguest.blocks=64")
	if code != 0 || blkSums(t, out)["vda"] != guestSum(want) {
		t.Fatalf("the guest does not read qemu-io's writes (exit %d):\n%s", code, out)
	}
}

// TestShardsHostilePeers: a "node" that answers the handshake and then
// sends garbage fails its replica, and the VM carries on; a client that
// sends garbage to a node loses its connection while the node keeps
// serving the guest.
func TestShardsHostilePeers(t *testing.T) {
	e := newShardEnv(t, "a", "b")
	fake := fakeNBDNode(t, shShardSize)
	e.rv("shard", "nodes", "add", "f", "--address", fake)
	e.rv("volume", "create", "vol", "--size", "256K", "--shard-size", "256K", "--replicas", "3", "--min-replicas", "2", "--nodes", "a,b,f")
	_, w := e.boot("rayguest.run=blktest rayguest.seed=6 rayguest.blocks=64 rayguest.flushevery=8")
	// Garbage to node a while the guest uses it.
	c, err := net.Dial("tcp", e.nodes["a"].addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(bytes.Repeat([]byte("garbage!"), 512))
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Fatalf("node a did not close the garbage connection: %v", err)
	}
	c.Close()
	w.waitClosed(t, 2*time.Minute)
	want := expectImage(shShardSize, 6, 64)
	if s := blkSums(t, w.String())["vda"]; s != guestSum(want) {
		t.Fatalf("guest sum %q, want %s\n%s", s, guestSum(want), w.String())
	}
	if logs := e.logs.String(); !strings.Contains(logs, "replica failed") || !strings.Contains(logs, "node=f") {
		t.Fatalf("the garbage node's replica was not failed:\n%s", logs)
	}
	v := e.inspect()
	for _, r := range v.Shards[0].Replicas {
		if (r.Node == "f") != (r.State != "healthy") {
			t.Errorf("replica on %s is %s", r.Node, r.State)
		}
	}
}

// fakeNBDNode negotiates like an NBD server (NBD_OPT_GO with a size) and
// answers every request with garbage.
func fakeNBDNode(t *testing.T, size int64) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	be := binary.BigEndian
	reply := func(opt, typ uint32, data []byte) []byte {
		b := be.AppendUint64(nil, 0x3e889045565a9)
		b = be.AppendUint32(be.AppendUint32(be.AppendUint32(b, opt), typ), uint32(len(data)))
		return append(b, data...)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Minute))
				c.Write(be.AppendUint16(be.AppendUint64(be.AppendUint64(nil, 0x4e42444d41474943), 0x49484156454F5054), 3))
				var h [16]byte
				io.ReadFull(c, h[:4])
				for {
					if _, err := io.ReadFull(c, h[:]); err != nil {
						return
					}
					opt := be.Uint32(h[8:])
					io.CopyN(io.Discard, c, int64(be.Uint32(h[12:])))
					if opt != 7 { // not NBD_OPT_GO: refuse it
						c.Write(reply(opt, 1<<31+1, nil))
						continue
					}
					info := be.AppendUint16(be.AppendUint64(be.AppendUint16(nil, 0), uint64(size)), 1|4)
					c.Write(append(reply(opt, 3, info), reply(opt, 1, nil)...))
					break
				}
				buf := make([]byte, 64<<10)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
					c.Write(bytes.Repeat([]byte{0xee}, 100))
				}
			}()
		}
	}()
	return l.Addr().String()
}

func freeTCPPort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startQemuNBD serves file as export on port with qemu-nbd --fork (its
// exit is the readiness signal) and returns its pid.
func startQemuNBD(t *testing.T, file, export string, port int) int {
	t.Helper()
	pidFile := filepath.Join(t.TempDir(), "pid")
	out, err := exec.Command("qemu-nbd", "--fork", "--persistent", "--shared=8", "--pid-file", pidFile, "-f", "raw",
		"-x", export, "-b", "127.0.0.1", "-p", strconv.Itoa(port), file).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-nbd: %v\n%s", err, out)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	return pid
}

// shardStatus is the part of volume inspect about ownership.
type shardStatus struct {
	Owner *struct {
		Holder string `json:"holder"`
		PID    int    `json:"pid"`
	} `json:"owner"`
	Dirty bool `json:"dirty"`
}

func (e *shardEnv) status() shardStatus {
	e.t.Helper()
	var st shardStatus
	if err := json.Unmarshal([]byte(e.rv("volume", "inspect", "vol")), &st); err != nil {
		e.t.Fatal(err)
	}
	return st
}

// bootMidBlktest starts blktest (seed) on an R=3 volume of 4 shards and
// returns once the guest has flushed flushed blocks, with the pids of
// rayvmm boot's VM process and of its sharded volume's agent.
func bootMidBlktest(t *testing.T, seed, flushed int) (e *shardEnv, cmd *exec.Cmd, w *lineWatcher, vm, agent int) {
	t.Helper()
	e = newShardEnv(t, "a", "b", "c")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "3")
	cmd, w = e.boot(blktest(seed, "rayguest.flushevery=16"))
	w.waitFor(t, fmt.Sprintf("flushed blocks=%d\n", flushed), 2*time.Minute)
	return e, cmd, w, childRunning(t, cmd.Process.Pid, "rayvmm-vm"), childRunning(t, cmd.Process.Pid, "rayvmmd")
}

// TestShardsVMKilled: the VM process (the data path) is killed with
// SIGKILL in the middle of blktest, after 64 blocks were flushed. rayvmm
// boot says so, the agent gives the volume up and exits; the volume can
// be attached again at once, it is marked dirty, the next attachment
// resyncs the replicas, every block flushed before the kill holds the
// guest's data, and all replicas end identical.
func TestShardsVMKilled(t *testing.T) {
	e, cmd, w, vm, agent := bootMidBlktest(t, 13, 64)
	syscall.Kill(vm, syscall.SIGKILL)
	w.waitClosed(t, time.Minute)
	waitGone(t, agent, "the agent")
	if code := cmd.ProcessState.ExitCode(); code == 0 || !strings.Contains(e.logs.String(), "killed") {
		t.Fatalf("rayvmm boot after its VM process was killed: exit %d\n%s", code, e.logs.String())
	}
	if st := e.status(); !st.Dirty || st.Owner != nil {
		t.Fatalf("a volume whose VM process was killed: %+v, want dirty and no owner", st)
	}
	out, code := e.bootWait("rayguest.run=blksum rayguest.blocks=256")
	if code != 0 || !strings.Contains(out, "blk vda ok") {
		t.Fatalf("re-attaching after the kill (exit %d):\n%s", code, out)
	}
	e.rv("volume", "rebuild", "vol")
	if st := e.status(); st.Dirty {
		t.Fatal("still dirty after the resync and a clean detach")
	}
	v := e.inspect()
	for i, sh := range v.Shards {
		var first []byte
		for _, r := range sh.Replicas {
			got := e.replica(e.nodes[r.Node].addr, r.Export)
			if first == nil {
				first = got
			} else if !bytes.Equal(got, first) {
				t.Fatalf("shard %d: replica on %s differs from %s after the resync", i, r.Node, sh.Replicas[0].Node)
			}
			for b := 0; b < shShardSize/4096 && i*shShardSize/4096+b < 64; b++ {
				if !bytes.Equal(got[b*4096:(b+1)*4096], pattern(13, uint64(i*shShardSize/4096+b))) {
					t.Fatalf("flushed block %d lost on %s", i*shShardSize/4096+b, r.Node)
				}
			}
		}
	}
}

// TestShardsBootKilled: rayvmm boot is killed with SIGKILL in the middle
// of blktest. Its VM process stops (its lifeline), flushing and detaching
// the volume cleanly through the agent, and the agent exits: nothing is
// left running, the volume has no owner and needs no resync, and every
// block the guest flushed is there.
func TestShardsBootKilled(t *testing.T) {
	e, cmd, w, vm, agent := bootMidBlktest(t, 19, 64)
	cmd.Process.Signal(syscall.SIGKILL)
	w.waitClosed(t, time.Minute)
	waitGone(t, vm, "the VM process")
	waitGone(t, agent, "the agent")
	if st := e.status(); st.Dirty || st.Owner != nil {
		t.Fatalf("after rayvmm boot was killed: %+v, want a clean detach and no owner", st)
	}
	out, code := e.bootWait("rayguest.run=blksum rayguest.blocks=64")
	if code != 0 || blkSums(t, out)["vda"] != guestSum(expectImage(64*4096, 19, 64)) {
		t.Fatalf("the flushed blocks after rayvmm boot was killed (exit %d):\n%s", code, out)
	}
}

// TestShardsAgentKilled: the agent (rayvmmd shard attach) is killed with
// SIGKILL in the middle of blktest. Nobody keeps the volume's ownership
// lease any more, so the VM process's engine fences itself: the guest
// gets I/O errors at once (not a hang, and no write after another
// process could own the volume), rayvmm boot says what happened and exits
// non-zero when the guest is done, and nothing is left running. The
// volume is dirty; the next attach takes it over at once and resyncs.
func TestShardsAgentKilled(t *testing.T) {
	e, cmd, w, vm, agent := bootMidBlktest(t, 23, 32)
	syscall.Kill(agent, syscall.SIGKILL)
	w.waitClosed(t, 2*time.Minute)
	out := w.String()
	if !regexp.MustCompile(`blk vda FAIL block \d+ (write|read|flush) status`).MatchString(out) || strings.Contains(out, "timeout") {
		t.Fatalf("the guest did not see an I/O error after the agent was killed:\n%s", out)
	}
	waitGone(t, vm, "the VM process")
	logs := e.logs.String()
	if code := cmd.ProcessState.ExitCode(); code == 0 || !strings.Contains(logs, "its agent") {
		t.Fatalf("rayvmm boot after its agent was killed: exit %d\n%s", code, logs)
	}
	if st := e.status(); !st.Dirty {
		t.Fatalf("after the agent was killed: %+v, want dirty", st)
	}
	out, code := e.bootWait("rayguest.run=blksum rayguest.blocks=32")
	if code != 0 || blkSums(t, out)["vda"] != guestSum(expectImage(32*4096, 23, 32)) {
		t.Fatalf("re-attaching after the agent was killed (exit %d):\n%s", code, out)
	}
}

// TestShardsRebuildWhileAttached: a VM has the volume attached (idle, in
// rayguest's echo job) and its VM process is sandboxed (strict); a node
// is killed and its replicas are recorded failed without any guest I/O;
// when it restarts, the VM's agent and engine rebuild them by themselves
// (new sockets reach the sandboxed engine over its link), and the
// replicas are identical again.
func TestShardsRebuildWhileAttached(t *testing.T) {
	e := newShardEnv(t, "a", "b", "c")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "3")
	out, code := e.bootWait(blktest(21, ""))
	want := expectImage(shVolSize, 21, shBlocks)
	e.guestOK(out, code, want)

	cmd := exec.Command(rayvmm, e.args("boot", "-v", "--sandbox", "strict", "--disk", "volume=vol", "--cmdline", "rayguest.run=echo")...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	w, logs := newLineWatcher(), newLineWatcher()
	cmd.Stdout, cmd.Stderr = w, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); w.close() }()
	t.Cleanup(func() { cmd.Process.Kill(); w.waitClosed(t, 20*time.Second) })
	w.waitFor(t, "rayguest: ready", time.Minute)
	// The engine runs in the sandboxed VM process: the rebuild below
	// gets its sockets to the restarted node over the link, after the
	// sandbox was applied.
	checkSandboxed(t, childRunning(t, cmd.Process.Pid, "rayvmm-vm"), 1)

	e.kill9("b")
	e.waitReplicas(t, "b", func(state string) bool { return state != "healthy" }, "recorded failed", logs)
	e.startNode("b")
	e.waitReplicas(t, "b", func(state string) bool { return state == "healthy" }, "rebuilt by the VM's agent", logs)
	if !strings.Contains(logs.String(), "replica rebuilt") {
		t.Fatalf("the VM's agent did not log the rebuilds:\n%s", logs.String())
	}
	io.WriteString(stdin, "quit\n")
	w.waitFor(t, "rayguest: bye", time.Minute)
	w.waitClosed(t, time.Minute)
	e.identical(want, nil)
}

// waitReplicas polls volume inspect until every replica on node is in a
// state ok accepts.
func (e *shardEnv) waitReplicas(t *testing.T, node string, ok func(string) bool, what string, logs *lineWatcher) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		all := true
		for _, sh := range e.inspect().Shards {
			for _, r := range sh.Replicas {
				if r.Node == node && !ok(r.State) {
					all = false
				}
			}
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's replicas not %s within 90 s:\n%+v\nlog:\n%s", node, what, e.inspect(), logs.String())
		}
		time.Sleep(200 * time.Millisecond) // polling etcd through volume inspect
	}
}

// TestShardsEventual: an eventual volume (R=2) passes blktest with its
// VM process jailed as nobody (the engine needs no path: its sockets come
// over the link), and once the VM has flushed and detached both replicas
// hold every block; the jail goes with the VM.
func TestShardsEventual(t *testing.T) {
	e := newShardEnv(t, "a", "b")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "2", "--consistency", "eventual")
	dir, jail := jailFlags(t)
	e.boots = jail
	out, code := e.bootWait(blktest(17, ""))
	want := expectImage(shVolSize, 17, shBlocks)
	e.guestOK(out, code, want)
	if !strings.Contains(e.logs.String(), "jailed in") {
		t.Fatalf("the VM process was not jailed:\n%s", e.logs.String())
	}
	e.identical(want, nil)
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("jail left behind: %v", ents)
	}
}

// TestShardsUnknownVolume: rayvmm boot links no etcd, so a volume name
// that is no local volume is handed to a sharded-volume agent when a
// cluster is configured: a name etcd does not have either gets one line
// saying so, a non-zero exit, and leaves no agent and no owner behind.
// Without a cluster it is the local "no such volume".
func TestShardsUnknownVolume(t *testing.T) {
	e := newShardEnv(t, "a")
	e.rv("volume", "create", "vol", "--size", "1M", "--shard-size", "256K", "--replicas", "1")
	for _, tc := range []struct{ disk, want string }{
		{"volume=nope", `no such sharded volume "nope"`},
		{"volume=vol,format=raw", "format=raw does not apply"},
	} {
		r := run(t, nil, time.Minute, e.args("boot", "--disk", tc.disk)...)
		msg := strings.TrimSpace(r.stderr)
		if r.code == 0 || strings.Contains(msg, "\n") || !strings.Contains(msg, tc.want) {
			t.Errorf("boot --disk %s: exit %d, stderr %q; want one line with %q", tc.disk, r.code, r.stderr, tc.want)
		}
	}
	if pids := processesWith(e.state, "shard\x00attach"); len(pids) > 0 {
		t.Fatalf("agents left behind: %v", pids)
	}
	if st := e.status(); st.Owner != nil || st.Dirty {
		t.Fatalf("a failed boot left the volume %+v", st)
	}
	r := run(t, nil, time.Minute, "--state-dir", t.TempDir(), "boot", "--disk", "volume=nope")
	if r.code == 0 || !strings.Contains(r.stderr, `no such volume "nope"`) || strings.Contains(r.stderr, "sharded") {
		t.Fatalf("without a cluster: exit %d, stderr %q; want the local volume error", r.code, r.stderr)
	}
}

// processesWith lists the pids whose command line (arguments separated
// by NULs) contains every one of subs.
func processesWith(subs ...string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		all := err == nil
		for _, s := range subs {
			all = all && bytes.Contains(b, []byte(s))
		}
		if all && alive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}
