package audit

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testLog is a log in a temporary state directory.
type testLog struct {
	state, dir, keys string
}

func newTestLog(t testing.TB) *testLog {
	st := t.TempDir()
	return &testLog{state: st, dir: Dir(st), keys: KeyDir(st)}
}

func (tl *testLog) open(t testing.TB, sealEvery int, maxSize int64) *Log {
	t.Helper()
	l, err := Open(Config{Dir: tl.dir, KeyDir: tl.keys, SealEvery: sealEvery, MaxFileSize: maxSize})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// entry is the i-th test entry: a volume's life, with text that needs
// escaping now and then.
func entry(i int) Entry {
	e := Entry{Action: VolumeCreate, Object: Object{KindVolume, fmt.Sprintf("vol-%d", i)}, Params: Params{"size": fmt.Sprint(i << 20), "format": "qcow2"}}
	if i%5 == 0 {
		e.Err = fmt.Errorf("volume vol-%d: \"quoted\"\tand\nnewline \x01 ünïcode", i)
	}
	return e
}

// fill appends n records one by one and closes the log (a clean stop).
func (tl *testLog) fill(t testing.TB, n, sealEvery int) {
	t.Helper()
	l := tl.open(t, sealEvery, 0)
	for i := range n {
		if _, err := l.Append(context.Background(), entry(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

func (tl *testLog) verify() (*Summary, error) {
	return Verify(tl.dir, VerifyOptions{KeyDir: tl.keys})
}

// mustVerify fails the test unless the log verifies.
func (tl *testLog) mustVerify(t testing.TB) *Summary {
	t.Helper()
	s, err := tl.verify()
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	return s
}

func (tl *testLog) file(n int) string { return filepath.Join(tl.dir, fileName(n)) }

// lines returns file n's lines, newlines kept.
func (tl *testLog) lines(t testing.TB, n int) [][]byte {
	t.Helper()
	b, err := os.ReadFile(tl.file(n))
	if err != nil {
		t.Fatal(err)
	}
	return bytes.SplitAfter(b, []byte{'\n'})[:bytes.Count(b, []byte{'\n'})]
}

func (tl *testLog) setLines(t testing.TB, n int, ls [][]byte) {
	t.Helper()
	if err := os.WriteFile(tl.file(n), bytes.Join(ls, nil), 0o600); err != nil {
		t.Fatal(err)
	}
}

// expectKind checks that err is a VerifyError of kind k at seq.
func expectKind(t testing.TB, err error, seq uint64, k Kind) {
	t.Helper()
	ve, ok := err.(*VerifyError)
	if !ok {
		t.Fatalf("verify: got %v, want %s at seq %d", err, k, seq)
	}
	if ve.Seq != seq || ve.Kind != k {
		t.Fatalf("verify: got %v, want %s at seq %d", ve, k, seq)
	}
}

var epoch0 = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
