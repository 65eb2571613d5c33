package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults for Config.
const (
	DefaultSealEvery   = 256
	DefaultMaxFileSize = 8 << 20
)

// Errors by category.
var (
	// ErrClosed is returned by appends to a closed Log.
	ErrClosed = errors.New("audit log closed")
	// ErrDamaged means the end of the log cannot be read, so a writer
	// cannot continue its chain; `rayvmm audit verify` says why.
	ErrDamaged = errors.New("audit log damaged")
	// ErrNoLog means there is no log in the directory.
	ErrNoLog = errors.New("no audit log")
)

// Dir is the log directory under a state directory.
func Dir(stateDir string) string { return filepath.Join(stateDir, "audit") }

// KeyDir is the key directory under a state directory.
func KeyDir(stateDir string) string { return filepath.Join(stateDir, "keys") }

// Config says where a log lives and how it is written.
type Config struct {
	// Dir holds the log files and the lock file (Dir(stateDir)).
	Dir string
	// KeyDir holds the key files; it must be outside Dir (KeyDir(stateDir)).
	KeyDir string
	// SealEvery is the most records between two seals (DefaultSealEvery).
	SealEvery int
	// MaxFileSize starts a new file once the current one is this big
	// (DefaultMaxFileSize).
	MaxFileSize int64
	// Actor is the default actor of this Log's records (Self()).
	Actor *Actor
	// Now is the clock (time.Now).
	Now func() time.Time
}

func (c *Config) defaults() error {
	if c.Dir == "" || c.KeyDir == "" {
		return errors.New("audit: Config needs Dir and KeyDir")
	}
	d, _ := filepath.Abs(c.Dir)
	k, _ := filepath.Abs(c.KeyDir)
	if d == k || strings.HasPrefix(k, d+string(filepath.Separator)) {
		return fmt.Errorf("audit: key directory %s is inside the log directory %s", c.KeyDir, c.Dir)
	}
	if c.SealEvery <= 0 {
		c.SealEvery = DefaultSealEvery
	}
	if c.MaxFileSize <= 0 {
		c.MaxFileSize = DefaultMaxFileSize
	}
	if c.Actor == nil {
		a := Self()
		c.Actor = &a
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

// Entry is what a writer appends; the Log fills in seq, time (unless
// given), actor (unless given), prev and hash.
type Entry struct {
	Action   string
	Object   Object
	Params   Params
	Decision Decision
	// Err is the action's error; nil records ResultOK.
	Err error
	// Level defaults to Info, or Warning when Err is set.
	Level Level
	// Actor defaults to the Log's.
	Actor *Actor
	// Time defaults to when the record is written.
	Time time.Time
}

// record turns e into a record without seq, prev or hash. Free text that
// is too long is cut, invalid UTF-8 replaced; names and keys are checked.
func (e *Entry) record(actor *Actor, now time.Time) (*Record, error) {
	r := &Record{Action: e.Action, Object: e.Object, Decision: e.Decision, Level: e.Level, Time: e.Time, Seq: 1}
	if e.Actor != nil {
		actor = e.Actor
	}
	r.Actor = *actor
	r.Actor.Command = truncate(strings.ToValidUTF8(r.Actor.Command, "\uFFFD"), MaxCommand)
	if r.Time.IsZero() {
		r.Time = now
	}
	r.Time = r.Time.UTC()
	r.Result = ResultOK
	if e.Err != nil {
		r.Result = e.Err.Error()
		if r.Result == "" || r.Result == ResultOK {
			r.Result = "error: " + r.Result
		}
		r.Result = truncate(strings.ToValidUTF8(r.Result, "\uFFFD"), MaxValue)
	}
	if r.Level == "" {
		r.Level = Info
		if e.Err != nil {
			r.Level = Warning
		}
	}
	if len(e.Params) > 0 {
		r.Params = make(Params, len(e.Params))
		for k, v := range e.Params {
			r.Params[k] = truncate(strings.ToValidUTF8(v, "\uFFFD"), MaxValue)
		}
	}
	if err := r.validate(); err != nil {
		return nil, err
	}
	if r.Action == AuditSeal || r.Action == AuditRepair {
		return nil, invalid("action %s is written by the log itself", r.Action)
	}
	return r, nil
}

// Log appends to the audit log in a directory. Any number of processes
// may have it open: appends are serialized by an flock on Dir/lock, and
// within one process concurrent Appends are committed together (one
// write and one fdatasync for all the records waiting).
type Log struct {
	c     Config
	lockf *os.File

	mu      sync.Mutex
	queue   []*pending
	leading bool
	closed  bool
	dirty   bool // this Log wrote records after its last seal

	// Owned by the committing goroutine.
	cur     *os.File
	curNum  int
	buf     []byte
	scratch []byte
}

// pending is one Append waiting to be committed.
type pending struct {
	entries []*Record
	seal    bool
	recs    []Record
	err     error
	done    chan struct{}
}

// Open opens (creating it, mode 0700) the log directory. It reads and
// writes nothing else: the key is made when the first seal needs it.
func Open(c Config) (*Log, error) {
	if err := c.defaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(c.Dir, lockName), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return &Log{c: c, lockf: f}, nil
}

// Append writes es as consecutive records and returns them once they are
// on disk (fdatasync).
func (l *Log) Append(ctx context.Context, es ...Entry) ([]Record, error) {
	return l.submit(ctx, es, false)
}

// AppendSealed is Append followed by a seal, in the same write: a writer
// that stops after this append (a CLI command) needs no other.
func (l *Log) AppendSealed(ctx context.Context, es ...Entry) ([]Record, error) {
	return l.submit(ctx, es, true)
}

// Seal writes a seal record if any record is unsealed.
func (l *Log) Seal(ctx context.Context) error {
	_, err := l.submit(ctx, nil, true)
	return err
}

// Close seals what this Log appended, if the last seal does not cover it
// already (a clean stop), and closes the files. Call it after the last
// Append has returned.
func (l *Log) Close() error {
	l.mu.Lock()
	dirty, closed := l.dirty, l.closed
	l.mu.Unlock()
	if closed {
		return nil
	}
	var err error
	if dirty {
		err = l.Seal(context.Background())
	}
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	if l.cur != nil {
		err = errors.Join(err, l.cur.Close())
	}
	return errors.Join(err, l.lockf.Close())
}

func (l *Log) submit(ctx context.Context, es []Entry, seal bool) ([]Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p := &pending{seal: seal, done: make(chan struct{})}
	now := l.c.Now()
	for i := range es {
		r, err := es[i].record(l.c.Actor, now)
		if err != nil {
			return nil, fmt.Errorf("audit: %s: %w", es[i].Action, err)
		}
		if es[i].Time.IsZero() {
			r.Time = time.Time{} // stamped when committed
		}
		p.entries = append(p.entries, r)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, ErrClosed
	}
	l.queue = append(l.queue, p)
	if l.leading {
		l.mu.Unlock()
		<-p.done
		return p.recs, p.err
	}
	// This goroutine commits: its own append and whatever queues up
	// behind it while it writes.
	l.leading = true
	for len(l.queue) > 0 {
		batch := l.queue
		l.queue = nil
		l.mu.Unlock()
		dirty, err := l.commit(batch)
		l.mu.Lock()
		if err == nil {
			l.dirty = dirty
		}
		for _, q := range batch {
			if err != nil {
				q.recs, q.err = nil, err
			}
			close(q.done)
		}
	}
	l.leading = false
	l.mu.Unlock()
	return p.recs, p.err
}

// Files: audit-00000001.jsonl, audit-00000002.jsonl, ...; the highest
// number is the one written.
const (
	filePrefix = "audit-"
	fileSuffix = ".jsonl"
	lockName   = "lock"
)

func fileName(n int) string { return fmt.Sprintf("%s%08d%s", filePrefix, n, fileSuffix) }

// fileNumber parses a log file's name; ok is false for anything else.
func fileNumber(name string) (int, bool) {
	s, ok := strings.CutPrefix(name, filePrefix)
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, fileSuffix)
	if !ok || len(s) != 8 {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	return n, err == nil && n > 0
}

// listFiles returns the log files' numbers in order.
func listFiles(dir string) ([]int, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ns []int
	for _, e := range ents {
		if n, ok := fileNumber(e.Name()); ok {
			ns = append(ns, n)
		}
	}
	slices.Sort(ns)
	return ns, nil
}

// tail is what a writer needs to know about the end of the log. The lock
// file caches it between appends (not synced: it is checked against the
// files and rebuilt from them when stale).
type tail struct {
	file  int    // current file number; 0: no file yet
	size  int64  // its size
	seq   uint64 // last seq; 0: empty log
	hash  Hash   // last hash
	since uint64 // records after the last seal
	epoch int64  // the last seal's epoch; -1: none found
}

const tailHeader = "rayvmm-audit-tail-v1"

func (t *tail) encode() []byte {
	b := fmt.Appendf(nil, "%s file=%d size=%d seq=%d hash=%s since=%d epoch=%d", tailHeader, t.file, t.size, t.seq, t.hash, t.since, t.epoch)
	sum := sha256.Sum256(b)
	return fmt.Appendf(b, " sum=%x\n", sum[:8])
}

func decodeTail(b []byte) (tail, bool) {
	line, _, ok := bytes.Cut(b, []byte{'\n'})
	if !ok {
		return tail{}, false
	}
	body, sumHex, ok := bytes.Cut(line, []byte(" sum="))
	sum := sha256.Sum256(body)
	if !ok || fmt.Sprintf("%x", sum[:8]) != string(sumHex) {
		return tail{}, false
	}
	var t tail
	var h string
	if _, err := fmt.Sscanf(string(body), tailHeader+" file=%d size=%d seq=%d hash=%s since=%d epoch=%d", &t.file, &t.size, &t.seq, &h, &t.since, &t.epoch); err != nil {
		return tail{}, false
	}
	var err error
	if t.hash, err = decodeHash(h); err != nil {
		return tail{}, false
	}
	return t, true
}

// torn is a partial last line found by a writer: the bytes from off to
// end of file `file` are dropped, and a Repair record says so.
type torn struct {
	file     int
	off, end int64
	sum      Hash
}

// loadTail finds the end of the log: from the cache when it matches the
// files, else by reading the last files.
func (l *Log) loadTail() (tail, *torn, error) {
	buf := make([]byte, 512)
	n, _ := l.lockf.ReadAt(buf, 0)
	if t, ok := decodeTail(buf[:n]); ok && t.file > 0 {
		fi, err := os.Stat(filepath.Join(l.c.Dir, fileName(t.file)))
		_, nerr := os.Stat(filepath.Join(l.c.Dir, fileName(t.file+1)))
		if err == nil && fi.Size() == t.size && errors.Is(nerr, fs.ErrNotExist) {
			return t, nil, nil
		}
	}
	return rescan(l.c.Dir)
}

// rescan rebuilds the tail from the files: the last file, and the one
// before it when the last holds no seal. A partial last line is reported
// as torn; the line before it must parse.
func rescan(dir string) (tail, *torn, error) {
	t := tail{epoch: -1}
	files, err := listFiles(dir)
	if err != nil || len(files) == 0 {
		return t, nil, err
	}
	t.file = files[len(files)-1]
	var tr *torn
	sealFound, haveLast := false, false
	var after uint64 // records after the last seal seen, in the files read so far
	for i := len(files) - 1; i >= 0 && i >= len(files)-2 && !sealFound; i-- {
		path := filepath.Join(dir, fileName(files[i]))
		data, err := os.ReadFile(path)
		if err != nil {
			return t, nil, fmt.Errorf("audit: %w", err)
		}
		if i == len(files)-1 {
			end := int64(len(data))
			if len(data) > 0 && data[len(data)-1] != '\n' {
				cut := bytes.LastIndexByte(data, '\n') + 1
				tr = &torn{file: files[i], off: int64(cut), end: end, sum: sha256.Sum256(data[cut:])}
				data = data[:cut]
			}
			t.size = int64(len(data))
		}
		lines := bytes.Split(bytes.TrimSuffix(data, []byte{'\n'}), []byte{'\n'})
		if len(data) == 0 {
			lines = nil
		}
		var p parsed
		for j := len(lines) - 1; j >= 0; j-- {
			err := parseLine(lines[j], false, &p)
			if !haveLast {
				if err != nil {
					return t, nil, fmt.Errorf("%w: the last record of %s does not parse (%v): run rayvmm audit verify", ErrDamaged, path, err)
				}
				t.seq, t.hash, haveLast = p.rec.Seq, p.rec.Hash, true
			}
			if err == nil && p.rec.Seal != nil {
				t.epoch, sealFound = int64(p.rec.Seal.Epoch), true
				break
			}
			after++
		}
	}
	t.since = after
	return t, tr, nil
}

// commit writes one batch under the lock and reports whether records are
// left unsealed after it.
func (l *Log) commit(batch []*pending) (dirty bool, err error) {
	if err := flock(l.lockf, unix.LOCK_EX); err != nil {
		return false, fmt.Errorf("audit: lock: %w", err)
	}
	defer flock(l.lockf, unix.LOCK_UN)
	t, tr, err := l.loadTail()
	if err != nil {
		return false, err
	}
	off := t.size
	if t.file == 0 || t.size >= l.c.MaxFileSize && tr == nil {
		t.file, t.size, off = t.file+1, 0, 0
		if err := l.openFile(t.file, true); err != nil {
			return false, err
		}
	} else if err := l.openFile(t.file, false); err != nil {
		return false, err
	}

	now := l.c.Now().UTC()
	var key *sealState
	w := &batchWriter{l: l, t: &t, now: now, buf: l.buf[:0]}
	if tr != nil {
		w.add(&Record{Action: AuditRepair, Object: Object{Kind: KindAudit, Name: "log"}, Level: Warning, Result: ResultOK,
			Actor: *l.c.Actor, Params: Params{
				"file": fileName(tr.file), "offset": strconv.FormatInt(tr.off, 10),
				"dropped_bytes": strconv.FormatInt(tr.end-tr.off, 10), "dropped_sha256": Hash(tr.sum).String()}})
	}
	wantSeal := false
	for _, p := range batch {
		wantSeal = wantSeal || p.seal
		for _, r := range p.entries {
			p.recs = append(p.recs, *w.add(r))
			if t.since >= uint64(l.c.SealEvery) {
				if key, err = w.seal(key); err != nil {
					return false, err
				}
			}
		}
	}
	if t.since > 0 && (wantSeal || off+int64(len(w.buf)) >= l.c.MaxFileSize) {
		if key, err = w.seal(key); err != nil {
			return false, err
		}
	}
	l.buf = w.buf
	if len(w.buf) == 0 {
		return false, nil
	}

	if err := l.write(w.buf, off, tr); err != nil {
		return false, err
	}
	t.size = off + int64(len(w.buf))
	if key != nil {
		if testHookSynced != nil {
			testHookSynced()
		}
		if err := writeSealState(l.c.KeyDir, key); err != nil {
			return false, fmt.Errorf("audit: records written, but the sealing key was not advanced: %w", err)
		}
	}
	l.lockf.WriteAt(t.encode(), 0)
	return t.since > 0, nil
}

// batchWriter builds a batch's lines, advancing the tail.
type batchWriter struct {
	l   *Log
	t   *tail
	now time.Time
	buf []byte
}

// add stamps r as the next record and appends its line.
func (w *batchWriter) add(r *Record) *Record {
	r.Seq, r.Prev = w.t.seq+1, w.t.hash
	if r.Time.IsZero() {
		r.Time = w.now
	}
	r.Hash, w.l.scratch = hashRecord(r, w.l.scratch)
	w.buf = appendRecord(w.buf, r, true, true)
	w.buf = append(w.buf, '\n')
	w.t.seq, w.t.hash = r.Seq, r.Hash
	if r.Seal == nil {
		w.t.since++
	} else {
		w.t.since, w.t.epoch = 0, int64(r.Seal.Epoch)
	}
	return r
}

// seal appends a seal record under key (loaded on first use) and returns
// the key advanced past it.
func (w *batchWriter) seal(key *sealState) (*sealState, error) {
	if key == nil {
		var err error
		if key, err = w.l.sealKey(w.t); err != nil {
			return nil, err
		}
	}
	r := &Record{Action: AuditSeal, Object: Object{Kind: KindAudit, Name: "log"}, Level: Info, Result: ResultOK,
		Actor: *w.l.c.Actor, Seal: &Seal{Epoch: key.Epoch}, Seq: w.t.seq + 1, Prev: w.t.hash, Time: w.now}
	r.Seal.MAC, w.l.scratch = sealMAC(key.Key, r, w.l.scratch)
	w.add(r)
	return &sealState{Epoch: key.Epoch + 1, Key: evolve(key.Key), SealedSeq: r.Seq, SealedHash: r.Hash}, nil
}

// sealKey loads the sealing state, making the keys on first use, and
// steps it past any seal the log has that it does not know of (a writer
// killed between syncing a seal and advancing the key).
func (l *Log) sealKey(t *tail) (*sealState, error) {
	removeStaleTemps(l.c.KeyDir)
	s, err := readSealState(l.c.KeyDir)
	switch {
	case errors.Is(err, fs.ErrNotExist) && t.epoch < 0:
		if s, err = createKeys(l.c.KeyDir); err != nil {
			return nil, err
		}
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w: %s is missing, but the log has seals: restore it from a backup", ErrKey, filepath.Join(l.c.KeyDir, SealKeyFile))
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrKey, err)
	}
	for t.epoch >= 0 && uint64(t.epoch) >= s.Epoch {
		s = &sealState{Epoch: s.Epoch + 1, Key: evolve(s.Key)}
	}
	return s, nil
}

// openFile makes file n current, creating it (and syncing the directory)
// when create is set.
func (l *Log) openFile(n int, create bool) error {
	path := filepath.Join(l.c.Dir, fileName(n))
	if !create && l.cur != nil && l.curNum == n {
		a, aerr := l.cur.Stat()
		b, berr := os.Stat(path)
		if aerr == nil && berr == nil && os.SameFile(a, b) {
			return nil
		}
		// The file was replaced under us: write to the one there now.
	}
	if l.cur != nil {
		l.cur.Close()
		l.cur = nil
	}
	flags := os.O_RDWR | unix.O_CLOEXEC
	if create {
		flags |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	if create {
		if err := syncDir(l.c.Dir); err != nil {
			f.Close()
			return fmt.Errorf("audit: %w", err)
		}
	}
	l.cur, l.curNum = f, n
	return nil
}

// Test hooks: testHookWrite writes a batch in place of one WriteAt (a
// test splits it to leave a torn line for kill -9); testHookSynced runs
// after a batch with a seal is synced, before the sealing key is advanced.
var (
	testHookWrite  func(f *os.File, b []byte, off int64) error
	testHookSynced func()
)

// write puts a batch at off and syncs it. Over a torn line it writes
// first and cuts what is left of the torn bytes after, so a crash in
// between leaves a torn line again, never a silent repair.
func (l *Log) write(b []byte, off int64, tr *torn) error {
	var err error
	if testHookWrite != nil {
		err = testHookWrite(l.cur, b, off)
	} else {
		_, err = l.cur.WriteAt(b, off)
	}
	if err != nil {
		if tr == nil {
			l.cur.Truncate(off) // a torn line is left for the next writer to repair
		}
		return fmt.Errorf("audit: write %s: %w", l.cur.Name(), err)
	}
	if end := off + int64(len(b)); tr != nil && end < tr.end {
		if err := l.cur.Truncate(end); err != nil {
			return fmt.Errorf("audit: %w", err)
		}
	}
	if err := unix.Fdatasync(int(l.cur.Fd())); err != nil {
		return fmt.Errorf("audit: fdatasync %s: %w", l.cur.Name(), err)
	}
	countSync(&syncs.log)
	return nil
}

func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// syncs counts this process's fsync and fdatasync calls, by file.
var syncs struct{ log, key, dir atomic.Int64 }

func countSync(c *atomic.Int64) { c.Add(1) }

// SyncCounts is how many fsync/fdatasync calls this process made.
type SyncCounts struct {
	Log int64 // of log files: one per committed batch
	Key int64 // of the sealing key file: one per batch with a seal
	Dir int64 // of directories: one per new log file, and at key creation
}

// Syncs returns this process's counts so far.
func Syncs() SyncCounts {
	return SyncCounts{Log: syncs.log.Load(), Key: syncs.key.Load(), Dir: syncs.dir.Load()}
}

// syncFile syncs a key file.
func syncFile(f *os.File) error {
	countSync(&syncs.key)
	return f.Sync()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	countSync(&syncs.dir)
	return d.Sync()
}
