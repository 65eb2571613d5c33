package tests

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestSpecVMDiskAndNIC: a VM described by a spec file with one disk and
// one NIC passes blktest, answers ping, and its NIC's transmit rate
// follows a rate limit changed through the API while it runs.
func TestSpecVMDiskAndNIC(t *testing.T) {
	requireTool(t, "ping")
	h := newHost(t)
	h.must(t, "net", "create", "lan", "--subnet", "192.0.2.0/24")
	dir := t.TempDir()
	img := sparseFile(t, diskSize)
	sock := filepath.Join(dir, "api.sock")
	cfg := filepath.Join(dir, "vm.yaml")
	doc := fmt.Sprintf(`name: specvm
cmdline: rayguest.ip=192.0.2.2/24 rayguest.run=serve
memory: 64M
disks:
- path: %s
  format: raw
nets:
- network: lan
apiSocket: %s
`, img, sock)
	if err := os.WriteFile(cfg, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}

	// blktest: the flag overrides the file's command line only.
	out := h.must(t, "boot", "--config", cfg, "--cmdline", "rayguest.run=blktest rayguest.seed=5 rayguest.blocks=32")
	want := expectImage(diskSize, 5, 32)
	if s := blkSums(t, out)["vda"]; s != guestSum(want[:32*4096]) {
		t.Fatalf("blktest sum %s, want %s\n%s", s, guestSum(want[:32*4096]), out)
	}
	if got, err := os.ReadFile(img); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the image does not hold the pattern the guest wrote (%v)", err)
	}

	// serve: ping it from the namespace.
	g := startCmd(t, h.command(context.Background(), "boot", "--config", cfg), "rayguest: serving")
	if out, err := h.ns.Run("ping", "-c", "3", "-W", "10", "192.0.2.2"); err != nil || !strings.Contains(out, "3 received") {
		t.Fatalf("ping -c 3 192.0.2.2: %v\n%s", err, out)
	}

	// The guest's transmit rate (its UDP echoes) under a limit set through
	// the API, then under a limit ten times higher, while the namespace
	// sends it more than either lets through (1000-byte datagrams, 250 a
	// second): the NIC's transmitted bytes per second follow the limit.
	var echoed atomic.Int64
	stop := make(chan struct{})
	flooding := make(chan error, 1)
	go func() {
		flooding <- h.ns.Do(func() error {
			c, err := net.Dial("udp4", "192.0.2.2:7")
			if err != nil {
				return err
			}
			defer c.Close()
			go func() {
				buf := make([]byte, 2048)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					echoed.Add(int64(n))
				}
			}()
			payload := bytes.Repeat([]byte{'r'}, 1000)
			tick := time.NewTicker(4 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return nil
				case <-tick.C:
					c.Write(payload)
				}
			}
		})
	}()
	txBytes := func() float64 {
		return sample(t, scrape(t, sock), "rayvmm_net_tx_bytes_total", map[string]string{"nic": "net0"})
	}
	txRate := func(limit int64) float64 {
		curlOK(t, sock, "PATCH", "/network-interfaces/net0", fmt.Sprintf(`{"rateLimit": {"txBps": %d}}`, limit), 204)
		const d = 4 * time.Second
		start, before := time.Now(), txBytes()
		time.Sleep(d) // the measurement window
		return (txBytes() - before) / time.Since(start).Seconds()
	}
	const low, high = 4000, 40000
	slow := txRate(low)
	fast := txRate(high)
	close(stop)
	if err := <-flooding; err != nil {
		t.Fatal(err)
	}
	t.Logf("the NIC sent %.0f B/s under txBps=%d, %.0f B/s under txBps=%d; the namespace got %d bytes of echoes", slow, low, fast, high, echoed.Load())
	// Each bucket starts full (one second's worth), so a window of d
	// seconds may pass up to (d+1)/d times the rate.
	if slow > low*1.5 {
		t.Errorf("%.0f B/s sent under a limit of %d B/s", slow, low)
	}
	if slow == 0 || fast < 2.5*slow {
		t.Errorf("raising the limit from %d to %d B/s took the NIC from %.0f to %.0f B/s", low, high, slow, fast)
	}
	if echoed.Load() == 0 {
		t.Error("no echo reached the namespace")
	}
	fams := scrape(t, sock)
	if s := sample(t, fams, "rayvmm_net_tx_throttled_seconds_total", map[string]string{"nic": "net0"}); s <= 0 {
		t.Errorf("no throttled time counted: %v", s)
	}
	if n := sample(t, fams, "rayvmm_net_tx_frames_total", map[string]string{"nic": "net0"}); n == 0 {
		t.Error("no transmitted frames counted")
	}
	curlOK(t, sock, "PUT", "/actions", `{"action_type": "Shutdown"}`, 204)
	if code := g.wait(t); code != 0 {
		t.Fatalf("exit %d after Shutdown\n%s", code, g.out.String())
	}
	if taps := h.taps(t); len(taps) != 0 {
		t.Fatalf("TAPs left: %v", taps)
	}
}
