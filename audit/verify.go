package audit

import (
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"sync"
)

// Kind names what verification found wrong.
type Kind string

// The kinds, as `rayvmm audit verify` prints them.
const (
	// Edited: a line does not parse, its hash does not match its content,
	// or it does not chain to the record before it.
	Edited Kind = "edited"
	// Deleted: a seq is missing and does not appear later.
	Deleted Kind = "deleted"
	// Reordered: a seq appears out of order (it does appear later, or it
	// appeared before).
	Reordered Kind = "reordered"
	// Truncated: the sealing key has made seals the log no longer has.
	Truncated Kind = "truncated"
	// BadSeal: a seal's MAC does not verify or its epoch is out of order:
	// the records it seals were rewritten, hash chain and all, by someone
	// without the key.
	BadSeal Kind = "bad seal"
	// Torn: the last line is partial (a writer was killed mid-append);
	// the next append repairs it and records that it did.
	Torn Kind = "torn"
)

// VerifyError names the first bad seq and why.
type VerifyError struct {
	Seq    uint64
	Kind   Kind
	File   string // log file (base name)
	Line   int    // 1-based line in File
	Detail string
}

func (e *VerifyError) Error() string {
	where := ""
	if e.File != "" {
		where = fmt.Sprintf(" (%s line %d)", e.File, e.Line)
	}
	return fmt.Sprintf("seq %d: %s: %s%s", e.Seq, e.Kind, e.Detail, where)
}

// Run is a stretch of records between two seals (or before the first).
type Run struct{ From, To uint64 }

// Summary describes a log that verified.
type Summary struct {
	Files     int
	Records   int // records, seals not counted
	Seals     int
	Repairs   int    // AuditRepair records: torn lines writers dropped
	LastSeq   uint64 // 0: empty log
	LastSeal  uint64 // seq of the last seal; 0: none
	Epoch     int64  // the last seal's epoch; -1: none
	Unsealed  int    // records after the last seal
	LongRuns  []Run  // stretches of more than VerifyOptions.SealEvery records without a seal
	KeyBehind bool   // the sealing key has not yet stepped past the last seal (a writer was killed in between)
}

// VerifyOptions are Verify's inputs besides the log.
type VerifyOptions struct {
	// KeyDir holds audit-seal.key, the log's head (KeyDir(stateDir)).
	KeyDir string
	// Key is K0; nil reads KeyDir/audit-verify.key.
	Key *Hash
	// SealEvery is the longest run of unsealed records not listed in
	// Summary.LongRuns (DefaultSealEvery).
	SealEvery int
}

// verifier walks the log once, in order.
type verifier struct {
	s       *snapshot
	opts    VerifyOptions
	key     *Hash
	keyErr  error
	sum     Summary
	expSeq  uint64
	prev    Hash
	epoch   uint64 // next expected seal epoch
	keyAt   Hash   // the key of epoch keyEpoch
	keyEp   uint64
	keyInit bool
	runFrom uint64
}

// Verify checks the whole log in dir: every line parses, every hash
// matches its record, seqs run 1, 2, 3, ... and each record chains to the
// one before, every seal's MAC verifies under its epoch's key and the
// epochs run 0, 1, 2, ..., and the log still has every seal the sealing
// key has made. The first problem is returned as a *VerifyError.
func Verify(dir string, opts VerifyOptions) (*Summary, error) {
	if opts.SealEvery <= 0 {
		opts.SealEvery = DefaultSealEvery
	}
	s, err := takeSnapshot(dir, opts.KeyDir)
	if errors.Is(err, ErrNoLog) && opts.KeyDir != "" {
		// No log at all, but a sealing state that has sealed: the log was
		// removed, lock file and all.
		if h, herr := readSealState(opts.KeyDir); herr == nil && h.Epoch > 0 {
			return nil, &VerifyError{Seq: 1, Kind: Truncated, Detail: fmt.Sprintf("there is no log in %s, but the sealing key has made %d seal(s), the last at seq %d: the log was removed", dir, h.Epoch, h.SealedSeq)}
		}
	}
	if err != nil {
		return nil, err
	}
	return verify(s, opts)
}

// verify checks a snapshot.
func verify(s *snapshot, opts VerifyOptions) (*Summary, error) {
	v := &verifier{s: s, opts: opts, expSeq: 1, runFrom: 1}
	v.sum.Epoch = -1
	v.sum.Files = len(s.files)
	if opts.Key != nil {
		v.key = opts.Key
	}
	var partial []byte
	var partialFile string
	var facts []fact
	for i := range s.files {
		data, err := s.read(i)
		if err != nil {
			return nil, err
		}
		ls, part := lines(data)
		if part != nil {
			if i < len(s.files)-1 {
				ls = append(ls, part) // a partial line that is not last: it is a bad line
			} else {
				partial, partialFile = part, fileName(s.files[i])
			}
		}
		facts = checkLines(ls, facts)
		file := fileName(s.files[i])
		for j := range ls {
			if err := v.line(i, j, ls, file, &facts[j]); err != nil {
				return nil, err
			}
		}
	}
	last := v.expSeq - 1
	v.sum.LastSeq = last
	v.sum.Unsealed = int(last - v.sum.LastSeal)
	if v.sum.Unsealed > opts.SealEvery {
		v.sum.LongRuns = append(v.sum.LongRuns, Run{v.runFrom, last})
	}
	if err := v.head(); err != nil {
		return nil, err
	}
	if partial != nil {
		return nil, &VerifyError{Seq: last + 1, Kind: Torn, File: partialFile, Line: int(countLines(s.last)) + 1,
			Detail: fmt.Sprintf("the last line is partial (%d bytes, no newline): a writer was killed while appending; the next append removes it and records a repair", len(partial))}
	}
	return &v.sum, nil
}

func countLines(b []byte) int {
	n := 0
	for _, c := range b {
		if c == '\n' {
			n++
		}
	}
	return n
}

// fact is what can be learnt from one line alone: whether it parses and
// whether its hash matches. Files' lines are checked in parallel.
type fact struct {
	p      parsed
	err    error
	hashOK bool
}

// checkLines parses and hashes lines on every CPU, into facts (reused).
func checkLines(ls [][]byte, facts []fact) []fact {
	if cap(facts) < len(ls) {
		facts = make([]fact, len(ls))
	}
	facts = facts[:len(ls)]
	workers := min(runtime.GOMAXPROCS(0), max(1, len(ls)/256))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			sha := sha256.New()
			var h Hash
			for j := w * len(ls) / workers; j < (w+1)*len(ls)/workers; j++ {
				f, line := &facts[j], ls[j]
				if f.err = parseLine(line, false, &f.p); f.err != nil {
					continue
				}
				sha.Reset()
				sha.Write(f.p.rec.Prev[:])
				sha.Write(line[:f.p.hashFrom])
				sha.Write(line[f.p.hashTo:])
				sha.Sum(h[:0])
				f.hashOK = h == f.p.rec.Hash
			}
		})
	}
	wg.Wait()
	return facts
}

// line checks line j of file i in order (ls are the file's lines, f what
// checkLines found).
func (v *verifier) line(i, j int, ls [][]byte, file string, f *fact) error {
	fail := func(seq uint64, k Kind, format string, a ...any) error {
		return &VerifyError{Seq: seq, Kind: k, File: file, Line: j + 1, Detail: fmt.Sprintf(format, a...)}
	}
	if f.err != nil {
		return fail(v.expSeq, Edited, "the line is not a valid record: %v", errors.Unwrap(f.err))
	}
	r := &f.p.rec
	if !f.hashOK {
		return fail(v.expSeq, Edited, "the record's content does not match its hash")
	}
	if r.Seq != v.expSeq {
		if r.Seq < v.expSeq {
			return fail(v.expSeq, Reordered, "found seq %d where seq %d belongs: it came before", r.Seq, v.expSeq)
		}
		if v.appearsLater(i, j, ls) {
			return fail(v.expSeq, Reordered, "found seq %d where seq %d belongs, which comes later", r.Seq, v.expSeq)
		}
		return fail(v.expSeq, Deleted, "the log goes from seq %d to seq %d", v.expSeq-1, r.Seq)
	}
	if r.Prev != v.prev {
		if v.expSeq == 1 {
			return fail(1, Edited, "the first record's prev is not zero")
		}
		return fail(v.expSeq-1, Edited, "seq %d does not chain to it (its prev is not seq %d's hash): seq %d was changed and its hash recomputed", v.expSeq, v.expSeq-1, v.expSeq-1)
	}
	if r.Seal != nil {
		if err := v.seal(ls[j], &f.p, fail); err != nil {
			return err
		}
	} else {
		v.sum.Records++
		if r.Action == AuditRepair {
			v.sum.Repairs++
		}
	}
	v.prev = r.Hash
	v.expSeq++
	return nil
}

// seal checks a seal record's epoch and MAC.
func (v *verifier) seal(line []byte, p *parsed, fail func(uint64, Kind, string, ...any) error) error {
	r := &p.rec
	if r.Seal.Epoch != v.epoch {
		return fail(r.Seq, BadSeal, "seal epoch %d, want %d: seals were removed or replayed", r.Seal.Epoch, v.epoch)
	}
	k, err := v.epochKey(r.Seal.Epoch)
	if err != nil {
		return err
	}
	m := hmac.New(sha256.New, k[:])
	m.Write(line[:p.hashFrom])
	m.Write(line[p.hashTo:p.macFrom])
	m.Write(line[p.macTo:])
	if !hmac.Equal(m.Sum(nil), r.Seal.MAC[:]) {
		return fail(r.Seq, BadSeal, "the MAC does not verify: seqs %d to %d were changed and the hash chain recomputed without the key (or --key is not this log's key)", v.runFrom, r.Seq)
	}
	if run := r.Seq - v.runFrom; run > uint64(v.opts.SealEvery) {
		v.sum.LongRuns = append(v.sum.LongRuns, Run{v.runFrom, r.Seq - 1})
	}
	v.sum.Seals++
	v.sum.LastSeal = r.Seq
	v.sum.Epoch = int64(r.Seal.Epoch)
	v.runFrom = r.Seq + 1
	v.epoch++
	return nil
}

// epochKey returns epoch e's key, stepping forward from the last one.
func (v *verifier) epochKey(e uint64) (Hash, error) {
	if v.key == nil && v.keyErr == nil {
		k, err := ReadVerifyKey(filepath.Join(v.opts.KeyDir, VerifyKeyFile))
		if err != nil {
			v.keyErr = fmt.Errorf("no verification key to check the seals with (%w): give it with --key", err)
		} else {
			v.key = &k
		}
	}
	if v.keyErr != nil {
		return Hash{}, v.keyErr
	}
	if !v.keyInit || e < v.keyEp {
		v.keyAt, v.keyEp, v.keyInit = *v.key, 0, true
	}
	for v.keyEp < e {
		v.keyAt = evolve(v.keyAt)
		v.keyEp++
	}
	return v.keyAt, nil
}

// appearsLater reports whether the expected seq is somewhere after line j
// of file i.
func (v *verifier) appearsLater(i, j int, ls [][]byte) bool {
	var p parsed
	for _, l := range ls[j+1:] {
		if parseLine(l, false, &p) == nil && p.rec.Seq == v.expSeq {
			return true
		}
	}
	for k := i + 1; k < len(v.s.files); k++ {
		data, err := v.s.read(k)
		if err != nil {
			return false
		}
		more, _ := lines(data)
		for _, l := range more {
			if parseLine(l, false, &p) == nil && p.rec.Seq == v.expSeq {
				return true
			}
		}
	}
	return false
}

// head compares the end of the log with the sealing state: the key's
// epoch says how many seals were made, and a log that lost its last seals
// (cut off, or rewritten without the key) has fewer.
func (v *verifier) head() error {
	h := v.s.head
	last := v.sum.LastSeq
	if h == nil {
		if v.sum.Seals > 0 {
			return fmt.Errorf("audit: the log is sealed, but %s is missing: the end of the log cannot be checked", filepath.Join(v.opts.KeyDir, SealKeyFile))
		}
		return nil
	}
	k, err := v.epochKey(h.Epoch)
	if err != nil {
		return err
	}
	if !keysEqual(k, h.Key) {
		return fmt.Errorf("audit: %s does not derive from the verification key: it was replaced, or --key belongs to another log", filepath.Join(v.opts.KeyDir, SealKeyFile))
	}
	logEpoch := v.sum.Epoch // -1: no seal
	switch {
	case logEpoch+1 < int64(h.Epoch):
		detail := fmt.Sprintf("the sealing key has made %d seal(s), the last at seq %d, but the log ends at seq %d", h.Epoch, h.SealedSeq, last)
		if v.sum.Seals > 0 {
			detail += fmt.Sprintf(" with seal epoch %d (seq %d) its last", logEpoch, v.sum.LastSeal)
		}
		return &VerifyError{Seq: last + 1, Kind: Truncated, Detail: detail + ": its tail was cut off"}
	case logEpoch > int64(h.Epoch):
		return fmt.Errorf("audit: the sealing key is at epoch %d, behind the log's seal epoch %d: %s was restored from an older copy", h.Epoch, logEpoch, filepath.Join(v.opts.KeyDir, SealKeyFile))
	case logEpoch == int64(h.Epoch):
		v.sum.KeyBehind = true
	case h.Epoch > 0 && (h.SealedSeq != v.sum.LastSeal):
		return &VerifyError{Seq: last + 1, Kind: Truncated, Detail: fmt.Sprintf("the sealing key's last seal is seq %d, the log's is seq %d", h.SealedSeq, v.sum.LastSeal)}
	}
	return nil
}
