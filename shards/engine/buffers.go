package engine

import (
	"math/bits"
	"sync"
)

// Bounce buffers for guest requests whose context can end (see
// Volume.bounded): pooled by power-of-two size from 4 KiB to 1 MiB, so
// that a busy volume does not allocate one per request; larger requests
// get their own.
const (
	minBufShift = 12
	maxBufShift = 20
)

type buf struct{ b []byte }

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

func getBuf(n int) *buf {
	c := bufClass(n)
	if c >= len(bufPools) {
		return &buf{b: make([]byte, n)}
	}
	if b, ok := bufPools[c].Get().(*buf); ok {
		b.b = b.b[:n]
		return b
	}
	return &buf{b: make([]byte, n, 1<<(c+minBufShift))}
}

func putBuf(b *buf) {
	c := bufClass(cap(b.b))
	if c < len(bufPools) && cap(b.b) == 1<<(c+minBufShift) {
		bufPools[c].Put(b)
	}
}
