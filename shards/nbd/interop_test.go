package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestQemuClientsAgainstServer drives rayvmm's server with qemu-io,
// qemu-img and qemu-nbd --list: every command, with and without FUA, and
// checks the bytes in the file behind the export.
func TestQemuClientsAgainstServer(t *testing.T) {
	const size = 4 << 20
	exp, path := rawExport(t, "vol/0", size)
	other, _ := rawExport(t, "vol/1", size)
	_, addr := startServer(t, StaticExports{exp.Name: exp, other.Name: other})
	url := "nbd://" + addr + "/vol/0"

	out := runTool(t, "qemu-io", "-f", "raw", url,
		"-c", "write -P 0xab 0 64k",
		"-c", "write -f -P 0xcd 1M 8k", // FUA
		"-c", "write -z 64k 4k", // WRITE_ZEROES
		"-c", "write -P 0x11 2M 4k",
		"-c", "discard 2M 4k", // TRIM
		"-c", "flush",
		"-c", "read -P 0xab 0 60k",
		"-c", "read -P 0 64k 4k",
		"-c", "read -P 0xcd 1M 8k")
	if strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want, bytes.Repeat([]byte{0xab}, 64<<10))
	clear(want[64<<10 : 68<<10])
	copy(want[1<<20:], bytes.Repeat([]byte{0xcd}, 8<<10))
	if !bytes.Equal(got, want) {
		t.Fatal("the export's file does not hold what qemu-io wrote")
	}

	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(runTool(t, "qemu-img", "info", "--output=json", url)), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != size {
		t.Fatalf("qemu-img info: virtual size %d, want %d", info.VirtualSize, size)
	}
	conv := filepath.Join(t.TempDir(), "copy.raw")
	runTool(t, "qemu-img", "convert", "-O", "raw", url, conv)
	if b, _ := os.ReadFile(conv); !bytes.Equal(b, want) {
		t.Fatal("qemu-img convert from the export differs from the file")
	}

	host, port, _ := strings.Cut(addr, ":")
	list := runTool(t, "qemu-nbd", "--list", "--bind", host, "--port", port)
	for _, name := range []string{"vol/0", "vol/1"} {
		if !strings.Contains(list, "export: '"+name+"'") {
			t.Errorf("qemu-nbd --list does not show %s:\n%s", name, list)
		}
	}
	if !strings.Contains(list, "description: test export vol/0") || !strings.Contains(list, "size:  4194304") {
		t.Errorf("qemu-nbd --list lacks the description or size (NBD_OPT_INFO):\n%s", list)
	}
}

// TestQemuIOWritesClientReads: qemu-io writes into rayvmm's export and
// rayvmm's client reads the writes back.
func TestQemuIOWritesClientReads(t *testing.T) {
	exp, _ := rawExport(t, "e", 1<<20)
	_, addr := startServer(t, StaticExports{"e": exp})
	runTool(t, "qemu-io", "-f", "raw", "nbd://"+addr+"/e", "-c", "write -P 0x5a 4096 12288")
	c := dial(t, addr, "e")
	got := make([]byte, 16384)
	if err := c.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(make([]byte, 4096), bytes.Repeat([]byte{0x5a}, 12288)...)
	if !bytes.Equal(got, want) {
		t.Fatal("client read does not see qemu-io's write")
	}
}

// TestClientAgainstQemuNBD runs the client against qemu-nbd: concurrent
// writes and reads, then qemu-img reads what the client wrote.
func TestClientAgainstQemuNBD(t *testing.T) {
	for _, structured := range []bool{true, false} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "q.raw")
			if err := os.WriteFile(p, make([]byte, 2<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			addr := QemuNBD(t, p, "q")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c := dialOpts(t, ctx, addr, "q", structured)
			if got := c.Info(); got.Size != 2<<20 || got.Structured != structured || got.Flags&FlagSendFlush == 0 {
				t.Fatalf("negotiated %+v", got)
			}
			want := exercise(t, ctx, c, 2<<20)
			if err := c.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			c.Close()
			if b, _ := os.ReadFile(p); !bytes.Equal(b, want) {
				t.Fatal("qemu-nbd's file does not hold what the client wrote")
			}
		})
	}
}

// TestClientAgainstServer is the same exercise against rayvmm's server.
func TestClientAgainstServer(t *testing.T) {
	for _, structured := range []bool{true, false} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			m := &memBackend{b: make([]byte, 2<<20)}
			_, addr := startServer(t, StaticExports{"m": {Name: "m", Backend: m}})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c := dialOpts(t, ctx, addr, "m", structured)
			want := exercise(t, ctx, c, 2<<20)
			if err := c.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(m.b, want) || m.flushes == 0 {
				t.Fatal("the backend does not hold what the client wrote, or saw no flush")
			}
			// Out of range and unknown exports are errors, not hangs.
			if err := c.ReadAt(ctx, make([]byte, 10), 2<<20-5); err == nil {
				t.Fatal("read past the end succeeded")
			}
			if _, err := Dial(ctx, addr, "nope"); err == nil || !strings.Contains(err.Error(), "no such export") {
				t.Fatalf("dial of an unknown export: %v", err)
			}
		})
	}
}

func dialOpts(t *testing.T, ctx context.Context, addr, export string, structured bool) *Client {
	t.Helper()
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	info, err := Handshake(ctx, conn, export, structured)
	if err != nil {
		t.Fatal(err)
	}
	c := NewClient(conn, info)
	t.Cleanup(func() { c.Close() })
	return c
}

// exercise writes random blocks from 8 goroutines at once (each its own
// region), zeroes and trims some, reads everything back, and returns the
// expected contents.
func exercise(t *testing.T, ctx context.Context, c *Client, size int) []byte {
	t.Helper()
	want := make([]byte, size)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	region := size / 8
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			base := g * region
			for i := 0; i < 40; i++ {
				off := base + rng.IntN(region/4096)*4096
				n := min(4096*(1+rng.IntN(8)), base+region-off)
				switch i % 10 {
				case 7:
					if err := c.WriteZeroes(ctx, int64(off), int64(n), false); err != nil {
						errs <- err
						return
					}
					clear(want[off : off+n])
				default:
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(rng.Uint32())
					}
					if err := c.WriteAt(ctx, p, int64(off), i%5 == 0); err != nil {
						errs <- err
						return
					}
					copy(want[off:], p)
				}
				got := make([]byte, n)
				if err := c.ReadAt(ctx, got, int64(off)); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, want[off:off+n]) {
					errs <- fmt.Errorf("goroutine %d: read at %d+%d differs from what was written", g, off, n)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		if err := c.ReadAt(ctx, got[off:off+1<<20], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatal("full read-back differs")
	}
	return want
}
