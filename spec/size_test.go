package spec

import (
	"errors"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    int64
		wantErr string
	}{
		{name: "bytes", in: "4096", want: 4096},
		{name: "megabytes", in: "512M", want: 512 << 20},
		{name: "gigabytes", in: "1G", want: 1 << 30},
		{name: "lower case", in: "2g", want: 2 << 30},
		{name: "GiB", in: "3GiB", want: 3 << 30},
		{name: "Kubernetes Mi", in: "96Mi", want: 96 << 20},
		{name: "KB", in: "8KB", want: 8 << 10},
		{name: "terabytes", in: "1T", want: 1 << 40},
		{name: "trailing B", in: "100B", want: 100},
		{name: "largest", in: "7E", want: 7 << 60},
		{name: "zero", in: "0", wantErr: "greater than zero"},
		{name: "zero with unit", in: "0G", wantErr: "greater than zero"},
		{name: "empty", in: "", wantErr: "no number"},
		{name: "unknown trailing unit", in: "12Q", wantErr: `unknown unit "Q"`},
		{name: "negative", in: "-1G", wantErr: "greater than zero"},
		{name: "fraction", in: "1.5G", wantErr: "whole number"},
		{name: "junk", in: "lots", wantErr: "no number"},
		{name: "unknown unit", in: "5X", wantErr: "invalid size"},
		{name: "unit only", in: "G", wantErr: "no number"},
		{name: "overflow by unit", in: "8E", wantErr: "too large"},
		{name: "overflow by digits", in: "99999999999999999999", wantErr: "too large"},
		{name: "overflow just past int64", in: "9223372036854775808", wantErr: "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrInvalidSize) {
					t.Fatalf("ParseSize(%q) = %d, %v; want error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
			}
			if back, err := ParseSize(FormatSize(got)); err != nil || back != got {
				t.Fatalf("FormatSize(%d) = %q does not parse back: %d, %v", got, FormatSize(got), back, err)
			}
		})
	}
}

// FuzzParseSize: any string either parses to a positive size that
// formats back to the same value, or is refused with ErrInvalidSize.
func FuzzParseSize(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidSize) {
				t.Fatalf("ParseSize(%q): error %v does not wrap ErrInvalidSize", s, err)
			}
			return
		}
		if n <= 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
	})
}
