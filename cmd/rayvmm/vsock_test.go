package main

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseVsockFlag(t *testing.T) {
	wd, _ := os.Getwd()
	for _, tc := range []struct {
		name, in string
		want     vsockSpec
		err      string
	}{
		{"ok", "cid=3,uds=/run/v.sock", vsockSpec{3, "/run/v.sock"}, ""},
		{"order", "uds=/run/v.sock,cid=4294967294", vsockSpec{4294967294, "/run/v.sock"}, ""},
		{"relative", "cid=7,uds=v.sock", vsockSpec{7, filepath.Join(wd, "v.sock")}, ""},
		{"cid 2", "cid=2,uds=/v", vsockSpec{}, "guest CID must be a number from 3"},
		{"cid any", "cid=4294967295,uds=/v", vsockSpec{}, "guest CID"},
		{"cid text", "cid=three,uds=/v", vsockSpec{}, "guest CID"},
		{"no cid", "uds=/v", vsockSpec{}, "cid=N is missing"},
		{"no uds", "cid=3", vsockSpec{}, "uds=PATH is missing"},
		{"twice", "cid=3,cid=4,uds=/v", vsockSpec{}, "cid given twice"},
		{"unknown key", "cid=3,uds=/v,port=5", vsockSpec{}, `unknown key "port"`},
		{"empty value", "cid=,uds=/v", vsockSpec{}, "want cid=N,uds=PATH"},
		{"no equals", "cid3", vsockSpec{}, "want cid=N,uds=PATH"},
		{"too long", "cid=3,uds=/" + strings.Repeat("x", 100), vsockSpec{}, "path too long"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseVsockFlag(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %+v, %v; want an error containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestListenVsock(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "v.sock")

	ln, remove, err := listenVsock(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket file: %v, %v", fi.Mode(), err)
	}
	if c, err := net.Dial("unix", path); err != nil {
		t.Fatalf("connect to the new socket: %v", err)
	} else {
		c.Close()
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("left behind: %v", entries)
	}

	// A live socket is refused and left alone.
	if _, _, err := listenVsock(path); !errors.Is(err, errSocketInUse) {
		t.Fatalf("second listen on a live socket: %v", err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the live socket was removed: %v", err)
	}

	// Closed without removing the file, as after kill -9: reclaimed.
	ln.Close()
	ln2, remove2, err := listenVsock(path)
	if err != nil {
		t.Fatalf("reclaiming a stale socket: %v", err)
	}
	// The first owner's remove must not delete its successor's socket.
	if err := remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the old owner removed the new socket: %v", err)
	}
	if err := remove2(); err != nil {
		t.Fatal(err)
	}
	ln2.Close()
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("left behind: %v", entries)
	}

	// Anything but a socket is refused.
	if err := os.WriteFile(path, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := listenVsock(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "data" {
		t.Fatal("the regular file was touched")
	}
	// A path at the length limit: no room for the private directory's
	// detour, so it is bound in place, still 0600.
	deep := filepath.Join(dir, strings.Repeat("d", 101-len(dir)-1))
	if err := os.Mkdir(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(deep, "v") // 103 bytes; the detour would need at least 108
	ln3, remove3, err := listenVsock(long)
	if err != nil {
		t.Fatalf("listen at the length limit: %v", err)
	}
	if fi, err := os.Lstat(long); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket at the length limit: %v, %v", fi, err)
	}
	remove3()
	ln3.Close()
	if entries, _ := os.ReadDir(deep); len(entries) != 0 {
		t.Fatalf("left behind: %v", entries)
	}
	os.Remove(deep)
	// A directory that does not exist: an error, nothing made.
	if _, _, err := listenVsock(filepath.Join(dir, "nope", "v.sock")); err == nil {
		t.Fatal("listen in a missing directory succeeded")
	}
}
