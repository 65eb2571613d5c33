package virtio

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestRateLimited(t *testing.T) {
	tests := []struct {
		name     string
		burst    int
		logs     int
		wantLine int
	}{
		{"under the burst", 5, 3, 3},
		{"flood", 3, 1000, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			l := RateLimited(slog.New(slog.NewTextHandler(&buf, nil)), time.Hour, tc.burst).With("device", "test")
			for i := range tc.logs {
				l.Warn("bad request", "i", i)
			}
			if got := strings.Count(buf.String(), "\n"); got != tc.wantLine {
				t.Fatalf("%d lines logged, want %d:\n%s", got, tc.wantLine, buf.String())
			}
			if !strings.Contains(buf.String(), "device=test") {
				t.Fatal("attributes lost")
			}
		})
	}
}

func TestRateLimitedReportsSuppressed(t *testing.T) {
	var buf bytes.Buffer
	l := RateLimited(slog.New(slog.NewTextHandler(&buf, nil)), 200*time.Millisecond, 1)
	l.Warn("first")
	for range 10 {
		l.Warn("dropped")
	}
	time.Sleep(250 * time.Millisecond) // one token refills
	l.Warn("after")
	out := buf.String()
	if strings.Contains(out, "dropped") || !strings.Contains(out, "msg=after suppressed=10") {
		t.Fatalf("log:\n%s", out)
	}
	RateLimited(nil, time.Second, 1).Warn("nil logger discards")
}
