package spec

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ErrInvalidSize is the category of every size that ParseSize refuses.
var ErrInvalidSize = errors.New("invalid size")

// sizeUnits maps a suffix letter to its power of 1024.
var sizeUnits = map[byte]uint{'K': 1, 'M': 2, 'G': 3, 'T': 4, 'P': 5, 'E': 6}

// ParseSize parses a byte count such as "4096", "512M", "1G" or "2GiB".
// Suffixes K, M, G, T, P and E are powers of 1024 (as in qemu-img) and may be
// lower case and followed by "B", "i" (Kubernetes' "64Mi") or "iB". Zero, negative numbers, fractions,
// junk and values that overflow int64 are refused with an error wrapping
// ErrInvalidSize.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return r < '0' || r > '9' })
	if i < 0 {
		i = len(t)
	}
	num, unit := t[:i], t[i:]
	if num == "" {
		if strings.HasPrefix(unit, "-") {
			return 0, fmt.Errorf("%w %q: must be greater than zero", ErrInvalidSize, s)
		}
		return 0, fmt.Errorf("%w %q: no number (want bytes, or a number with a K, M, G, T, P or E suffix)", ErrInvalidSize, s)
	}
	shift := uint(0)
	switch u := strings.ToUpper(unit); {
	case u == "" || u == "B":
	case strings.HasPrefix(u, ".") || strings.HasPrefix(u, ","):
		return 0, fmt.Errorf("%w %q: want a whole number of bytes or units", ErrInvalidSize, s)
	default:
		p, ok := sizeUnits[u[0]]
		if rest := u[1:]; !ok || (rest != "" && rest != "B" && rest != "I" && rest != "IB") {
			return 0, fmt.Errorf("%w %q: unknown unit %q (want K, M, G, T, P or E)", ErrInvalidSize, s, unit)
		}
		shift = 10 * p
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w %q: too large", ErrInvalidSize, s)
	}
	if n == 0 {
		return 0, fmt.Errorf("%w %q: must be greater than zero", ErrInvalidSize, s)
	}
	if n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("%w %q: too large", ErrInvalidSize, s)
	}
	return int64(n << shift), nil
}

const sizeUnitLetters = "KMGTPE"

// FormatSize renders a byte count for display: in the largest unit it
// reaches, exactly when that unit divides it ("64M", which ParseSize
// reads back), else with one decimal ("1.1M", which it does not). Size's
// canonical form (String) is exact instead.
func FormatSize(n int64) string {
	if n < 1024 {
		return strconv.FormatInt(n, 10)
	}
	for i := len(sizeUnitLetters); i >= 1; i-- {
		u := int64(1) << (10 * uint(i))
		if n >= u {
			if n%u == 0 {
				return fmt.Sprintf("%d%c", n/u, sizeUnitLetters[i-1])
			}
			return fmt.Sprintf("%.1f%c", float64(n)/float64(u), sizeUnitLetters[i-1])
		}
	}
	return strconv.FormatInt(n, 10)
}

// exactSize renders n with the largest unit that divides it, if any.
func exactSize(n int64) (string, bool) {
	if n < 1024 {
		return strconv.FormatInt(n, 10), true
	}
	for i := len(sizeUnitLetters); i >= 1; i-- {
		u := int64(1) << (10 * uint(i))
		if n >= u && n%u == 0 {
			return fmt.Sprintf("%d%c", n/u, sizeUnitLetters[i-1]), true
		}
	}
	return "", false
}

// Size is a byte count in a spec. It reads a string in ParseSize's form
// ("128M", "1G", "4096") or a whole number of bytes, and always writes the
// canonical form: a string with the largest binary unit that divides it
// exactly ("128M"), or the plain number of bytes as a string ("1000").
type Size int64

// String is the canonical form.
func (s Size) String() string {
	if t, ok := exactSize(int64(s)); ok {
		return t
	}
	return strconv.FormatInt(int64(s), 10)
}

// MarshalJSON writes the canonical form.
func (s Size) MarshalJSON() ([]byte, error) { return json.Marshal(s.String()) }

// UnmarshalJSON reads a size string or a whole number of bytes.
func (s *Size) UnmarshalJSON(b []byte) error {
	if len(b) == 0 {
		return errors.New("empty size")
	}
	var text string
	switch {
	case b[0] == '"':
		if err := json.Unmarshal(b, &text); err != nil {
			return err
		}
	case b[0] == '-' || (b[0] >= '0' && b[0] <= '9'):
		text = string(b)
		if strings.ContainsAny(text, ".eE") {
			return fmt.Errorf("%s is not a whole number of bytes", text)
		}
	default:
		return fmt.Errorf("want a size such as \"128M\" or a number of bytes, got %s", kindOf(b))
	}
	n, err := ParseSize(text)
	if err != nil {
		return err
	}
	*s = Size(n)
	return nil
}
