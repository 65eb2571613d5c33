package audit

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// The tampering table: a log of 34 records sealed every 8 (seals at seqs
// 9, 18, 27 and 36, and 39 on Close: 39 lines, line i is seq i+1), then
// one change made the way someone with the files but without the key
// could, and the seq and kind verify must name.
func TestVerifyTampering(t *testing.T) {
	type lines = [][]byte
	edit := func(ls lines, seq int, old, new string) lines {
		i := seq - 1
		if !bytes.Contains(ls[i], []byte(old)) {
			panic("no " + old + " in line")
		}
		ls[i] = bytes.Replace(ls[i], []byte(old), []byte(new), 1)
		return ls
	}
	flip := func(ls lines, seq int, field string) lines {
		ls[seq-1][bytes.Index(ls[seq-1], []byte(field))+len(field)] ^= 1
		return ls
	}
	tests := []struct {
		name string
		do   func(t *testing.T, ls lines) lines
		seq  uint64
		kind Kind
	}{
		{"one byte of a name", func(t *testing.T, ls lines) lines { return edit(ls, 20, `"vol-17"`, `"vol-19"`) }, 20, Edited},
		{"one byte of the result", func(t *testing.T, ls lines) lines { return edit(ls, 20, `"result":"ok"`, `"result":"oK"`) }, 20, Edited},
		{"one byte of the hash", func(t *testing.T, ls lines) lines { return flip(ls, 20, `"hash":"`) }, 20, Edited},
		{"one byte of prev", func(t *testing.T, ls lines) lines { return flip(ls, 20, `"prev":"`) }, 20, Edited},
		{"one byte of a seal's MAC", func(t *testing.T, ls lines) lines { return flip(ls, 27, `"mac":"`) }, 27, Edited},
		{"one digit of seq", func(t *testing.T, ls lines) lines { return edit(ls, 20, `"seq":20`, `"seq":21`) }, 20, Edited},
		{"a byte that breaks the JSON", func(t *testing.T, ls lines) lines { return edit(ls, 20, `"level":`, `"level";`) }, 20, Edited},
		{"an escape spelled differently", func(t *testing.T, ls lines) lines { return edit(ls, 23, `\"quoted\"`, `\u0022quoted\"`) }, 23, Edited},
		{"a line deleted", func(t *testing.T, ls lines) lines { return append(ls[:19:19], ls[20:]...) }, 20, Deleted},
		{"the first line deleted", func(t *testing.T, ls lines) lines { return ls[1:] }, 1, Deleted},
		{"a seal deleted", func(t *testing.T, ls lines) lines { return append(ls[:17:17], ls[18:]...) }, 18, Deleted},
		{"two lines swapped", func(t *testing.T, ls lines) lines { ls[19], ls[20] = ls[20], ls[19]; return ls }, 20, Reordered},
		{"a line moved to the end", func(t *testing.T, ls lines) lines {
			l := ls[19]
			return append(append(ls[:19:19], ls[20:]...), l)
		}, 20, Reordered},
		{"a line duplicated", func(t *testing.T, ls lines) lines {
			return append(append(ls[:20:20], ls[19]), ls[20:]...)
		}, 21, Reordered},
		{"the last 3 records cut off, the seal with them", func(t *testing.T, ls lines) lines { return ls[:36] }, 37, Truncated},
		{"the last record and the seal cut off", func(t *testing.T, ls lines) lines { return ls[:37] }, 38, Truncated},
		{"everything cut off", func(t *testing.T, ls lines) lines { return nil }, 1, Truncated},
		{"an edit with the hash chain recomputed without the key", func(t *testing.T, ls lines) lines {
			return rechain(t, edit(ls, 20, `"vol-17"`, `"vol-99"`), 20)
		}, 27, BadSeal},
		{"an edit after the last seal but one, chain recomputed", func(t *testing.T, ls lines) lines {
			return rechain(t, edit(ls, 37, `"vol-32"`, `"vol-99"`), 37)
		}, 39, BadSeal},
		{"a line deleted and the seqs and chain redone without the key", func(t *testing.T, ls lines) lines {
			return rechain(t, append(ls[:19:19], ls[20:]...), 20)
		}, 26, BadSeal},
		{"a seal deleted and the seqs and chain redone", func(t *testing.T, ls lines) lines {
			return rechain(t, append(ls[:17:17], ls[18:]...), 18)
		}, 26, BadSeal},
		{"the last record's time changed, chain recomputed", func(t *testing.T, ls lines) lines {
			return rechain(t, edit(ls, 38, `"time":"20`, `"time":"19`), 38)
		}, 39, BadSeal},
		{"the last seal's time changed and its hash recomputed", func(t *testing.T, ls lines) lines {
			return rechain(t, edit(ls, 39, `"time":"20`, `"time":"19`), 39)
		}, 39, BadSeal},
		{"an edited record rehashed, the chain not", func(t *testing.T, ls lines) lines {
			ls = edit(ls, 20, `"vol-17"`, `"vol-99"`)
			r, err := Parse(ls[19])
			if err != nil {
				t.Fatal(err)
			}
			r.Hash, _ = hashRecord(r, nil)
			ls[19] = Encode(r)
			return ls
		}, 20, Edited},
		{"a partial last line", func(t *testing.T, ls lines) lines {
			return append(ls, []byte(`{"action":"volume.rm","actor":{"comm`))
		}, 40, Torn},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLog(t)
			tl.fill(t, 34, 8)
			if s := tl.mustVerify(t); s.LastSeq != 39 || s.Seals != 5 || s.Records != 34 {
				t.Fatalf("before tampering: %+v", s)
			}
			tl.setLines(t, 1, tc.do(t, tl.lines(t, 1)))
			_, err := tl.verify()
			expectKind(t, err, tc.seq, tc.kind)
		})
	}
}

// rechain recomputes every hash from seq from on, renumbering seqs, as
// someone without the key would; seals keep their MACs.
func rechain(t *testing.T, ls [][]byte, from int) [][]byte {
	t.Helper()
	var prev Hash
	for i, l := range ls {
		r, err := Parse(l)
		if err != nil {
			t.Fatal(err)
		}
		if i+1 >= from {
			r.Seq, r.Prev = uint64(i+1), prev
			r.Hash, _ = hashRecord(r, nil)
			ls[i] = Encode(r)
		}
		prev = r.Hash
	}
	return ls
}

// Verifying with another log's key fails at the first seal; without any
// key a sealed log cannot be verified.
func TestVerifyKeys(t *testing.T) {
	tl := newTestLog(t)
	tl.fill(t, 20, 8)
	other := newTestLog(t)
	other.fill(t, 1, 8)
	k, err := ReadVerifyKey(filepath.Join(other.keys, VerifyKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Verify(tl.dir, VerifyOptions{KeyDir: tl.keys, Key: &k})
	expectKind(t, err, 9, BadSeal)

	// The verification key moved off the host: verify needs --key.
	mine, err := ReadVerifyKey(filepath.Join(tl.keys, VerifyKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(tl.keys, VerifyKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := tl.verify(); err == nil {
		t.Fatal("a sealed log verified without a key")
	}
	if _, err := Verify(tl.dir, VerifyOptions{KeyDir: tl.keys, Key: &mine}); err != nil {
		t.Fatalf("with the key given: %v", err)
	}
	// Writers go on without K0: they only need the sealing state.
	tl.fill(t, 5, 8)
	if _, err := Verify(tl.dir, VerifyOptions{KeyDir: tl.keys, Key: &mine}); err != nil {
		t.Fatalf("after more appends without K0 on the host: %v", err)
	}
}

// The sealing state cannot be rolled back to hide a cut-off tail: an old
// copy of audit-seal.key is caught, and so is one from another log.
func TestVerifySealStateRollback(t *testing.T) {
	tl := newTestLog(t)
	tl.fill(t, 16, 8)
	old, err := os.ReadFile(filepath.Join(tl.keys, SealKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	oldLines := tl.lines(t, 1)
	tl.fill(t, 16, 8)
	tl.mustVerify(t)

	// Cut the log back to what it was and put the old state back.
	tl.setLines(t, 1, oldLines)
	if err := os.WriteFile(filepath.Join(tl.keys, SealKeyFile), old, 0o600); err != nil {
		t.Fatal(err)
	}
	// This is the one thing root with an old copy of the sealing state
	// can do: the log verifies as it was then. Everything written since
	// is gone, which only an off-host copy of the state could show.
	tl.mustVerify(t)

	// A forged state that claims fewer seals with the current key fails.
	cur := newTestLog(t)
	cur.fill(t, 32, 8)
	st, err := readSealState(cur.keys)
	if err != nil {
		t.Fatal(err)
	}
	st.Epoch--
	if err := os.WriteFile(filepath.Join(cur.keys, SealKeyFile), st.encode(), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := cur.verify(); err == nil {
		t.Fatal("a sealing state with its epoch lowered verified")
	}
}

// A log removed whole, lock file and all, is a cut-off log, not "no log".
func TestVerifyLogRemoved(t *testing.T) {
	tl := newTestLog(t)
	tl.fill(t, 10, 8)
	if err := os.RemoveAll(tl.dir); err != nil {
		t.Fatal(err)
	}
	_, err := tl.verify()
	expectKind(t, err, 1, Truncated)
}
