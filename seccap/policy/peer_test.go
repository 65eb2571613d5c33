package policy

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/testenv"
)

// dialEnv makes this test binary a caller: it connects to the socket
// named, waits for the other side to close, and exits.
const dialEnv = "RAYVMM_POLICY_TEST_DIAL"

func TestMain(m *testing.M) {
	if sock := os.Getenv(dialEnv); sock != "" {
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c.Read(make([]byte, 1))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestPeerCred: a caller started as another uid, gid and groups (setpriv,
// no passwd entries needed) is seen by the listening side as exactly that,
// from the kernel, whatever it sends.
func TestPeerCred(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "setpriv")
	dir, err := os.MkdirTemp("", "rayvmm-peercred-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	os.Chmod(sock, 0o777)

	// The caller is this test binary, copied where the other uid can run
	// it, started by setpriv as that uid.
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "caller")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	const uid, gid, g1, g2 = 64021, 64022, 64023, 64024
	cmd := exec.Command("setpriv", "--reuid="+strconv.Itoa(uid), "--regid="+strconv.Itoa(gid),
		"--groups="+strconv.Itoa(g1)+","+strconv.Itoa(g2), "--", bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), dialEnv+"="+sock)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	l.SetDeadline(time.Now().Add(30 * time.Second))
	c, err := l.AcceptUnix()
	if err != nil {
		t.Fatalf("no connection from the setpriv'd socat in 30 s: %v", err)
	}
	defer c.Close()
	got, err := PeerCred(c)
	if err != nil {
		t.Fatal(err)
	}
	// setpriv execs the caller: same pid.
	if got.UID != uid || got.GID != gid || got.PID != int32(cmd.Process.Pid) {
		t.Errorf("caller %+v, want uid %d gid %d pid %d", got, uid, gid, cmd.Process.Pid)
	}
	slices.Sort(got.Groups)
	if !slices.Equal(got.Groups, []uint32{g1, g2}) {
		t.Errorf("groups %v, want [%d %d]", got.Groups, g1, g2)
	}
	s := got.Subject()
	if s.UID != uid || s.Name != "" || len(s.Groups) != 3 || s.Groups[0].GID != gid {
		t.Errorf("subject %+v", s)
	}
	if s.String() != strconv.Itoa(uid) {
		t.Errorf("subject named %q, want its uid", s)
	}
}

func TestLookupSubject(t *testing.T) {
	s, err := LookupSubject("root")
	if err != nil {
		t.Fatal(err)
	}
	if s.UID != 0 || s.Name != "root" || len(s.Groups) == 0 || s.Groups[0].Name != "root" {
		t.Errorf("root: %+v", s)
	}
	if s, err := LookupSubject("0"); err != nil || s.Name != "root" {
		t.Errorf("uid 0: %+v %v", s, err)
	}
	if s, err := LookupSubject("64999"); err != nil || s.UID != 64999 || s.Name != "" {
		t.Errorf("uid without an entry: %+v %v", s, err)
	}
	if _, err := LookupSubject("no-such-user-here"); err == nil {
		t.Error("an unknown name resolved")
	}
}
