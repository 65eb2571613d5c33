package audit

import (
	"bytes"
	"math"
	"strings"
	"time"
	"unicode/utf8"
)

// parsed is a line taken apart: the record, and where in the line the
// members left out of the hash and MAC inputs are.
type parsed struct {
	rec Record
	// line[hashFrom:hashTo] is `"hash":"…",`; line[macFrom:macTo] is
	// `,"mac":"…"` (seal records only).
	hashFrom, hashTo int
	macFrom, macTo   int
}

// Parse parses one line of the log (with or without its newline). It
// accepts only the canonical JSON of a valid record: any other spelling,
// an unknown or missing member, or a value out of range is an error
// wrapping ErrInvalid.
func Parse(line []byte) (*Record, error) {
	line = bytes.TrimSuffix(line, []byte{'\n'})
	var p parsed
	if err := parseLine(line, true, &p); err != nil {
		return nil, err
	}
	return &p.rec, nil
}

// scanner walks a line in the one order canonical JSON allows.
type scanner struct {
	b   []byte
	i   int
	err error
}

func (s *scanner) fail(format string, a ...any) {
	if s.err == nil {
		s.err = invalid("byte %d: "+format, append([]any{s.i}, a...)...)
	}
}

// lit consumes the literal l.
func (s *scanner) lit(l string) {
	if s.err != nil {
		return
	}
	if !bytes.HasPrefix(s.b[s.i:], []byte(l)) {
		s.fail("want %s", l)
		return
	}
	s.i += len(l)
}

// peek reports whether the literal l comes next.
func (s *scanner) peek(l string) bool {
	return s.err == nil && bytes.HasPrefix(s.b[s.i:], []byte(l))
}

// str consumes a canonical string and returns its raw contents (between
// the quotes, escapes as written) and its decoded length.
func (s *scanner) str() (raw []byte, n int) {
	if s.err != nil {
		return nil, 0
	}
	if s.i >= len(s.b) || s.b[s.i] != '"' {
		s.fail("want a string")
		return nil, 0
	}
	start := s.i + 1
	for i := start; i < len(s.b); {
		// The common run of printable ASCII first.
		j := i
		for j < len(s.b) && plain[s.b[j]] {
			j++
		}
		n += j - i
		if i = j; i >= len(s.b) {
			break
		}
		c := s.b[i]
		switch {
		case c == '"':
			s.i = i + 1
			return s.b[start:i], n
		case c < 0x20:
			s.fail("control character in a string")
			return nil, 0
		case c == '\\':
			if i+1 >= len(s.b) {
				s.fail("unfinished escape")
				return nil, 0
			}
			switch s.b[i+1] {
			case '"', '\\', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				// Canonical \u escapes are \u00xx for control characters
				// without a short form, in lower-case hex.
				if i+6 > len(s.b) || s.b[i+2] != '0' || s.b[i+3] != '0' || !lowerHex(s.b[i+4]) || !lowerHex(s.b[i+5]) {
					s.fail("non-canonical \\u escape")
					return nil, 0
				}
				v := unhex(s.b[i+4])<<4 | unhex(s.b[i+5])
				if v >= 0x20 || v == '\b' || v == '\f' || v == '\n' || v == '\r' || v == '\t' {
					s.fail("non-canonical \\u escape")
					return nil, 0
				}
				i += 6
			default:
				s.fail("non-canonical escape")
				return nil, 0
			}
			n++
		case c < utf8.RuneSelf:
			i++
			n++
		default:
			r, size := utf8.DecodeRune(s.b[i:])
			if r == utf8.RuneError && size <= 1 {
				s.fail("invalid UTF-8")
				return nil, 0
			}
			i += size
			n += size
		}
	}
	s.fail("unterminated string")
	return nil, 0
}

// plain marks the bytes a string holds as they are: printable ASCII
// other than '"' and '\\'.
var plain = func() (t [256]bool) {
	for c := 0x20; c < 0x80; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

func lowerHex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' }

func unhex(c byte) byte {
	if c <= '9' {
		return c - '0'
	}
	return c - 'a' + 10
}

// text consumes a string of at most max decoded bytes (at least one
// unless empty) and decodes it when decode is set.
func (s *scanner) text(field string, max int, empty, decode bool) string {
	raw, n := s.str()
	if s.err != nil {
		return ""
	}
	if n > max || n == 0 && !empty {
		s.fail("%s: length %d out of range", field, n)
		return ""
	}
	if !decode {
		return ""
	}
	return unescape(raw)
}

// tok consumes a token string (action, kind, param key); it has no
// escapes, so its raw bytes are its value.
func (s *scanner) tok(field string, underscore bool) []byte {
	raw, _ := s.str()
	if s.err != nil {
		return nil
	}
	if !tokenBytes(raw, underscore) {
		s.fail("%s %q", field, raw)
		return nil
	}
	return raw
}

// num consumes a canonical unsigned integer no larger than max.
func (s *scanner) num(max uint64) uint64 {
	if s.err != nil {
		return 0
	}
	start := s.i
	var v uint64
	for s.i < len(s.b) && '0' <= s.b[s.i] && s.b[s.i] <= '9' && s.i-start < 17 {
		v = v*10 + uint64(s.b[s.i]-'0')
		s.i++
	}
	switch d := s.i - start; {
	case d == 0:
		s.fail("want a number")
	case d > 1 && s.b[start] == '0':
		s.fail("number with a leading zero")
	case v > max:
		s.fail("number %d out of range", v)
	}
	return v
}

// hexval maps a lower-case hex digit to its value, anything else to 0xff.
var hexval = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for i, c := range "0123456789abcdef" {
		t[c] = byte(i)
	}
	return t
}()

// hash consumes a string of 64 lower-case hex digits.
func (s *scanner) hash() (h Hash) {
	if s.err != nil {
		return h
	}
	if s.i+66 > len(s.b) || s.b[s.i] != '"' || s.b[s.i+65] != '"' {
		s.fail("want 64 hex digits")
		return h
	}
	d := s.b[s.i+1 : s.i+65]
	var bad byte
	for k := range h {
		hi, lo := hexval[d[2*k]], hexval[d[2*k+1]]
		bad |= hi | lo
		h[k] = hi<<4 | lo&0xf
	}
	if bad&0xf0 != 0 {
		s.fail("want lower-case hex")
		return h
	}
	s.i += 66
	return h
}

// canonTime checks the fixed layout 2006-01-02T15:04:05.000000000Z and
// the ranges of its fields, and returns the time when decode is set.
func canonTime(b []byte, decode bool) (time.Time, bool) {
	if len(b) != len(timeLayout) {
		return time.Time{}, false
	}
	num := func(from, to int) int {
		v := 0
		for _, c := range b[from:to] {
			if c < '0' || c > '9' {
				return -1
			}
			v = v*10 + int(c-'0')
		}
		return v
	}
	if b[4] != '-' || b[7] != '-' || b[10] != 'T' || b[13] != ':' || b[16] != ':' || b[19] != '.' || b[29] != 'Z' {
		return time.Time{}, false
	}
	y, mo, d, h, mi, sec, ns := num(0, 4), num(5, 7), num(8, 10), num(11, 13), num(14, 16), num(17, 19), num(20, 29)
	if y < 0 || mo < 1 || mo > 12 || d < 1 || h < 0 || h > 23 || mi < 0 || mi > 59 || sec < 0 || sec > 59 || ns < 0 {
		return time.Time{}, false
	}
	if d > daysIn(mo, y) {
		return time.Time{}, false
	}
	if !decode {
		return time.Time{}, true
	}
	return time.Date(y, time.Month(mo), d, h, mi, sec, ns, time.UTC), true
}

func daysIn(m, y int) int {
	switch m {
	case 2:
		if y%4 == 0 && (y%100 != 0 || y%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}

// parseLine parses a line without its newline into p. With full unset it
// checks everything but decodes only what verification needs: seq, prev,
// hash, action and seal.
func parseLine(line []byte, full bool, p *parsed) error {
	*p = parsed{}
	if len(line) >= MaxLine {
		return invalid("line of %d bytes, more than %d", len(line), MaxLine-1)
	}
	r := &p.rec
	s := scanner{b: line}
	s.lit(`{"action":`)
	action := s.tok("action", false)
	switch string(action) { // verification needs only these, without allocating
	case AuditSeal:
		r.Action = AuditSeal
	case AuditRepair:
		r.Action = AuditRepair
	default:
		if full {
			r.Action = string(action)
		}
	}
	s.lit(`,"actor":{"command":`)
	r.Actor.Command = s.text("command", MaxCommand, true, full)
	s.lit(`,"gid":`)
	r.Actor.GID = uint32(s.num(math.MaxUint32))
	s.lit(`,"pid":`)
	r.Actor.PID = uint32(s.num(math.MaxUint32))
	s.lit(`,"uid":`)
	r.Actor.UID = uint32(s.num(math.MaxUint32))
	s.lit(`},"decision":`)
	switch raw, _ := s.str(); string(raw) {
	case "", "allow", "deny":
		r.Decision = Decision(raw)
	default:
		s.fail("decision %q", raw)
	}
	s.lit(`,`)
	p.hashFrom = s.i
	s.lit(`"hash":`)
	r.Hash = s.hash()
	s.lit(`,`)
	p.hashTo = s.i
	s.lit(`"level":`)
	raw, _ := s.str()
	if r.Level = Level(raw); s.err == nil && r.Level.Rank() < 0 {
		s.fail("level %q", raw)
	}
	s.lit(`,"object":{"kind":`)
	kind := s.tok("object kind", false)
	if full {
		r.Object.Kind = string(kind)
	}
	s.lit(`,"name":`)
	r.Object.Name = s.text("object name", MaxName, false, full)
	s.lit(`},"params":{`)
	var last []byte
	for i := 0; s.err == nil && !s.peek("}"); i++ {
		if i > 0 {
			s.lit(",")
		}
		if i == MaxParams {
			s.fail("more than %d params", MaxParams)
			break
		}
		k := s.tok("param key", true)
		if s.err == nil && i > 0 && bytes.Compare(last, k) >= 0 {
			s.fail("param keys out of order")
		}
		last = k
		s.lit(":")
		v := s.text("param value", MaxValue, true, full)
		if full && s.err == nil {
			if r.Params == nil {
				r.Params = Params{}
			}
			r.Params[string(k)] = v
		}
	}
	s.lit(`},"prev":`)
	r.Prev = s.hash()
	s.lit(`,"result":`)
	r.Result = s.text("result", MaxValue, false, full)
	if s.peek(`,"seal":`) {
		s.lit(`,"seal":{"epoch":`)
		r.Seal = &Seal{Epoch: s.num(maxSeq)}
		p.macFrom = s.i
		s.lit(`,"mac":`)
		r.Seal.MAC = s.hash()
		p.macTo = s.i
		s.lit(`}`)
	}
	s.lit(`,"seq":`)
	r.Seq = s.num(maxSeq)
	s.lit(`,"time":`)
	traw, _ := s.str()
	s.lit(`}`)
	if s.err != nil {
		return s.err
	}
	if s.i != len(line) {
		return invalid("byte %d: trailing data", s.i)
	}
	t, ok := canonTime(traw, full)
	if !ok {
		return invalid("time %q: want the layout %s", traw, timeLayout)
	}
	r.Time = t
	if r.Seq == 0 {
		return invalid("seq 0")
	}
	if (string(action) == AuditSeal) != (r.Seal != nil) {
		return invalid("a seal record must be action %s and only it", AuditSeal)
	}
	return nil
}

// unescape decodes a canonical string's raw contents.
func unescape(raw []byte) string {
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw)
	}
	var b strings.Builder
	b.Grow(len(raw))
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c != '\\' {
			b.WriteByte(c)
			continue
		}
		i++
		switch raw[i] {
		case 'b':
			b.WriteByte('\b')
		case 'f':
			b.WriteByte('\f')
		case 'n':
			b.WriteByte('\n')
		case 'r':
			b.WriteByte('\r')
		case 't':
			b.WriteByte('\t')
		case 'u':
			b.WriteByte(unhex(raw[i+3])<<4 | unhex(raw[i+4]))
			i += 4
		default: // '"', '\\'
			b.WriteByte(raw[i])
		}
	}
	return b.String()
}
