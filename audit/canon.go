package audit

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"
)

// The canonical JSON of a record is RFC 8785 (JCS) applied to the record's
// JSON object, which for the values a record can hold comes down to:
//
//   - members sorted by key (all keys are ASCII, so byte order is JCS's
//     UTF-16 order), no insignificant white space;
//   - strings escaped as JCS (ECMAScript JSON.stringify) does: \" \\ \b
//     \f \n \r \t, other code points below U+0020 as \u00xx (lower-case
//     hex), everything else, '/' and non-ASCII included, as is; strings
//     must be valid UTF-8;
//   - numbers are integers below 2^53 written in decimal;
//   - time is a string in one fixed layout, timeLayout (UTC, nanoseconds,
//     always 9 fraction digits); hashes and MACs are 64 lower-case hex
//     digits;
//   - every member is always present except "seal", which only seal
//     records have; "params" is {} when empty.
//
// A line of the log is exactly the canonical JSON of the whole record and
// a newline. The parser accepts nothing else (not even a different escape
// of the same string), so a record has exactly one spelling.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

// appendRecord appends r's canonical JSON: with the "hash" member when
// withHash, and with the seal's "mac" member when withMAC.
func appendRecord(b []byte, r *Record, withHash, withMAC bool) []byte {
	b = append(b, `{"action":`...)
	b = appendString(b, r.Action)
	b = append(b, `,"actor":{"command":`...)
	b = appendString(b, r.Actor.Command)
	b = append(b, `,"gid":`...)
	b = strconv.AppendUint(b, uint64(r.Actor.GID), 10)
	b = append(b, `,"pid":`...)
	b = strconv.AppendUint(b, uint64(r.Actor.PID), 10)
	b = append(b, `,"uid":`...)
	b = strconv.AppendUint(b, uint64(r.Actor.UID), 10)
	b = append(b, `},"decision":`...)
	b = appendString(b, string(r.Decision))
	if withHash {
		b = append(b, `,"hash":`...)
		b = appendHex(b, r.Hash)
	}
	b = append(b, `,"level":`...)
	b = appendString(b, string(r.Level))
	b = append(b, `,"object":{"kind":`...)
	b = appendString(b, r.Object.Kind)
	b = append(b, `,"name":`...)
	b = appendString(b, r.Object.Name)
	b = append(b, `},"params":{`...)
	keys := make([]string, 0, len(r.Params))
	for k := range r.Params {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, k)
		b = append(b, ':')
		b = appendString(b, r.Params[k])
	}
	b = append(b, `},"prev":`...)
	b = appendHex(b, r.Prev)
	b = append(b, `,"result":`...)
	b = appendString(b, r.Result)
	if r.Seal != nil {
		b = append(b, `,"seal":{"epoch":`...)
		b = strconv.AppendUint(b, r.Seal.Epoch, 10)
		if withMAC {
			b = append(b, `,"mac":`...)
			b = appendHex(b, r.Seal.MAC)
		}
		b = append(b, '}')
	}
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, r.Seq, 10)
	b = append(b, `,"time":"`...)
	b = r.Time.UTC().AppendFormat(b, timeLayout)
	return append(b, `"}`...)
}

func appendHex(b []byte, h Hash) []byte {
	b = append(b, '"')
	b = hex.AppendEncode(b, h[:])
	return append(b, '"')
}

// appendString appends s as a JCS string; s is valid UTF-8 (validate
// checked it).
func appendString(b []byte, s string) []byte {
	const hexdigits = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\b':
			b = append(b, '\\', 'b')
		case '\f':
			b = append(b, '\\', 'f')
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hexdigits[c>>4], hexdigits[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// Encode returns r's line: its canonical JSON and a newline.
func Encode(r *Record) []byte {
	return append(appendRecord(nil, r, true, true), '\n')
}

// hashRecord computes r's Hash: SHA-256 of the 32 bytes of r.Prev and the
// canonical JSON of r without its "hash" member. scratch is reused.
func hashRecord(r *Record, scratch []byte) (Hash, []byte) {
	scratch = appendRecord(scratch[:0], r, false, true)
	h := sha256.New()
	h.Write(r.Prev[:])
	h.Write(scratch)
	var out Hash
	h.Sum(out[:0])
	return out, scratch
}

// sealMAC computes a seal record's MAC under the epoch's key:
// HMAC-SHA-256(key, canonical JSON of the seal record without "hash" and
// without the seal's "mac"). That JSON holds the seal's seq and prev (the
// hash of the last record it seals) and its epoch, time and actor.
func sealMAC(key Hash, r *Record, scratch []byte) (Hash, []byte) {
	scratch = appendRecord(scratch[:0], r, false, false)
	m := hmac.New(sha256.New, key[:])
	m.Write(scratch)
	var out Hash
	m.Sum(out[:0])
	return out, scratch
}

// validUTF8 is utf8.Valid, named for the parser's checks.
func validUTF8(b []byte) bool { return utf8.Valid(b) }

// formatTime is the canonical spelling of t.
func formatTime(t time.Time) string { return t.UTC().Format(timeLayout) }
