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
	num := strings.TrimRight(t, "KMGTPEkmgtpeiIbB")
	suffix := strings.ToUpper(t[len(num):])
	shift := uint(0)
	switch {
	case suffix == "" || suffix == "B":
	case len(suffix) <= 3:
		u, ok := sizeUnits[suffix[0]]
		rest := suffix[1:]
		if !ok || (rest != "" && rest != "B" && rest != "IB") {
			return 0, fmt.Errorf("%w %q: unknown unit %q (want K, M, G, T, P or E)", ErrInvalidSize, s, t[len(num):])
		}
		shift = 10 * u
	default:
		return 0, fmt.Errorf("%w %q: unknown unit %q (want K, M, G, T, P or E)", ErrInvalidSize, s, t[len(num):])
	}
	if num == "" {
		return 0, fmt.Errorf("%w %q: no number", ErrInvalidSize, s)
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		var ne *strconv.NumError
		if errors.As(err, &ne) && errors.Is(ne.Err, strconv.ErrRange) {
			return 0, fmt.Errorf("%w %q: too large", ErrInvalidSize, s)
		}
		return 0, fmt.Errorf("%w %q: want a whole number of bytes with an optional K, M, G, T, P or E suffix", ErrInvalidSize, s)
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
