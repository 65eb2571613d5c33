package virtio

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// RateLimited returns a logger that passes at most burst records at once
// and one record per every on average to l's handler, dropping the rest.
// The next record that passes carries a "suppressed" attribute counting the
// records dropped before it. Devices log everything a guest can trigger
// through such a logger, so a hostile guest cannot flood the host's logs.
// A nil l discards everything.
func RateLimited(l *slog.Logger, every time.Duration, burst int) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(&rateHandler{
		next: l.Handler(),
		st:   &rateState{lim: rate.NewLimiter(rate.Every(every), burst)},
	})
}

type rateState struct {
	lim     *rate.Limiter
	dropped atomic.Uint64
}

// rateHandler is a slog.Handler that drops records beyond a token bucket.
// Handlers derived with WithAttrs/WithGroup share the bucket.
type rateHandler struct {
	next slog.Handler
	st   *rateState
}

func (h *rateHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h *rateHandler) Handle(ctx context.Context, r slog.Record) error {
	if !h.st.lim.Allow() {
		h.st.dropped.Add(1)
		return nil
	}
	if n := h.st.dropped.Swap(0); n > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Uint64("suppressed", n))
	}
	return h.next.Handle(ctx, r)
}

func (h *rateHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &rateHandler{next: h.next.WithAttrs(as), st: h.st}
}

func (h *rateHandler) WithGroup(name string) slog.Handler {
	return &rateHandler{next: h.next.WithGroup(name), st: h.st}
}
