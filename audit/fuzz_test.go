package audit

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rayvmm/rayvmm/internal/seedcorpus"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite testdata/fuzz from the seeds in fuzz_test.go")

// fixedKey is K0 of the fuzz targets' log.
var fixedKey = Hash{0x72, 0x61, 0x79, 0x76, 0x6d, 0x6d}

// fuzzLog is a small sealed log made the same way every time: 10 records
// sealed every 4 and on Close (seals at 5, 10 and 13), and its sealing
// state.
var fuzzLog = sync.OnceValues(func() ([]byte, *sealState) {
	dir, err := os.MkdirTemp("", "audit-fuzz-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	keys := filepath.Join(dir, "keys")
	if err := os.Mkdir(keys, 0o700); err != nil {
		panic(err)
	}
	if err := writeSealState(keys, &sealState{Key: fixedKey}); err != nil {
		panic(err)
	}
	clock := epoch0
	actor := Actor{UID: 0, GID: 0, PID: 42, Command: "rayvmm volume create"}
	l, err := Open(Config{Dir: filepath.Join(dir, "audit"), KeyDir: keys, SealEvery: 4, Actor: &actor,
		Now: func() time.Time { clock = clock.Add(time.Second); return clock }})
	if err != nil {
		panic(err)
	}
	for i := range 10 {
		if _, err := l.Append(context.Background(), entry(i)); err != nil {
			panic(err)
		}
	}
	if err := l.Close(); err != nil {
		panic(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "audit", fileName(1)))
	if err != nil {
		panic(err)
	}
	st, err := readSealState(keys)
	if err != nil {
		panic(err)
	}
	return b, st
})

// verifyBytes verifies data as the log's only file, against the fuzz
// log's sealing state and key.
func verifyBytes(data []byte) (*Summary, error) {
	_, st := fuzzLog()
	k := fixedKey
	return verify(&snapshot{files: []int{1}, last: data, head: st}, VerifyOptions{Key: &k, SealEvery: 4})
}

func logSeeds() []seedcorpus.Seed {
	orig, _ := fuzzLog()
	ls := bytes.SplitAfter(orig, []byte{'\n'})
	ls = ls[:len(ls)-1]
	join := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	swapped := append([][]byte{}, ls...)
	swapped[6], swapped[7] = swapped[7], swapped[6]
	edited := bytes.Replace(orig, []byte(`"vol-3"`), []byte(`"vol-4"`), 1)
	rechained := append([][]byte{}, bytes.SplitAfter(edited, []byte{'\n'})...)
	var prev Hash
	for i, l := range rechained[:len(rechained)-1] {
		r, _ := Parse(l)
		r.Prev = prev
		r.Hash, _ = hashRecord(r, nil)
		rechained[i], prev = Encode(r), r.Hash
	}
	return []seedcorpus.Seed{
		{Name: "intact", Data: orig},
		{Name: "edited", Data: edited},
		{Name: "deleted", Data: join(append(append([][]byte{}, ls[:6]...), ls[7:]...)...)},
		{Name: "swapped", Data: join(swapped...)},
		{Name: "truncated", Data: join(ls[:len(ls)-3]...)},
		{Name: "rechained", Data: join(rechained...)},
		{Name: "torn", Data: join(orig, []byte(`{"action":"vol`))},
		{Name: "empty", Data: nil},
		{Name: "crlf", Data: bytes.ReplaceAll(orig, []byte("\n"), []byte("\r\n"))},
	}
}

func lineSeeds() []seedcorpus.Seed {
	orig, _ := fuzzLog()
	ls := bytes.Split(orig, []byte{'\n'})
	seal := ls[4]
	return []seedcorpus.Seed{
		{Name: "record", Data: ls[0]},
		{Name: "record-with-escapes", Data: ls[5]},
		{Name: "seal", Data: seal},
		{Name: "seal-without-mac", Data: bytes.Replace(seal, []byte(`,"mac":"`), []byte(`,"max":"`), 1)},
		{Name: "escaped-letter", Data: bytes.Replace(ls[0], []byte(`"vol-0"`), []byte(`"\u0076ol-0"`), 1)},
		{Name: "leading-zero", Data: bytes.Replace(ls[0], []byte(`"seq":1,`), []byte(`"seq":01,`), 1)},
		{Name: "params-unordered", Data: bytes.Replace(ls[0], []byte(`"format":"qcow2","size":"0"`), []byte(`"size":"0","format":"qcow2"`), 1)},
		{Name: "not-json", Data: []byte("rayvmm")},
		{Name: "huge-number", Data: bytes.Replace(ls[0], []byte(`"pid":42`), []byte(`"pid":99999999999999999999999`), 1)},
	}
}

func TestSeedCorpus(t *testing.T) {
	seedcorpus.Check(t, "FuzzVerify", logSeeds(), *updateSeeds)
	seedcorpus.Check(t, "FuzzParse", lineSeeds(), *updateSeeds)
}

// FuzzParse: the parser never panics, and anything it accepts is the one
// canonical spelling of a valid record.
func FuzzParse(f *testing.F) {
	for _, s := range lineSeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := Parse(line)
		if err != nil {
			return
		}
		if err := r.validate(); err != nil {
			t.Fatalf("accepted %q: %v", line, err)
		}
		if enc := appendRecord(nil, r, true, true); !bytes.Equal(enc, bytes.TrimSuffix(line, []byte{'\n'})) {
			t.Fatalf("accepted a non-canonical spelling:\n%q\ncanonical:\n%q", line, enc)
		}
	})
}

// FuzzVerify: verification never panics, and accepts no forgery: a log it
// accepts has the original's sealed records byte for byte, and anything
// after them is only unsealed records.
func FuzzVerify(f *testing.F) {
	for _, s := range logSeeds() {
		f.Add(s.Data)
	}
	orig, st := fuzzLog()
	sealedEnd := bytes.Index(orig, []byte(fmt.Sprintf(`"seq":%d,`, st.SealedSeq)))
	sealedEnd += bytes.IndexByte(orig[sealedEnd:], '\n') + 1
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := verifyBytes(data)
		if err != nil {
			if _, ok := err.(*VerifyError); !ok && !strings.Contains(err.Error(), "sealing key") {
				t.Fatalf("verify: %v (not a VerifyError)", err)
			}
			return
		}
		if !bytes.HasPrefix(data, orig[:sealedEnd]) {
			t.Fatalf("verify accepted a log whose sealed part differs from the original:\n%q", data)
		}
		if s.LastSeal != st.SealedSeq || s.LastSeq-s.LastSeal != uint64(s.Unsealed) {
			t.Fatalf("verify accepted %q with summary %+v", data, s)
		}
	})
}

// The seed corpus: the intact log verifies and every changed one is caught.
func TestFuzzSeedsVerify(t *testing.T) {
	for _, s := range logSeeds() {
		_, err := verifyBytes(s.Data)
		if (s.Name == "intact") != (err == nil) {
			t.Errorf("%s: verify: %v", s.Name, err)
		}
	}
}
