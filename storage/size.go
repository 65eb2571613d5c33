package storage

import (
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
// lower case and followed by "B" or "iB". Zero, negative numbers, fractions,
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
		if rest := u[1:]; !ok || (rest != "" && rest != "B" && rest != "IB") {
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

// FormatSize renders a byte count the way ParseSize reads it back, using
// the largest unit that divides it exactly, or one decimal otherwise.
func FormatSize(n int64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatInt(n, 10)
	}
	for i := len(units); i >= 1; i-- {
		u := int64(1) << (10 * uint(i))
		if n >= u {
			if n%u == 0 {
				return fmt.Sprintf("%d%c", n/u, units[i-1])
			}
			return fmt.Sprintf("%.1f%c", float64(n)/float64(u), units[i-1])
		}
	}
	return strconv.FormatInt(n, 10)
}
