package state

import (
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Bucket is one kind of record: JSON-encoded values of type T under
// string keys, checked by the kind's own rules every time one is read.
// Records are read back in key order.
type Bucket[T any] struct {
	name  []byte
	check func(key string, v *T) error
}

// NewBucket declares a bucket. check, if not nil, is called on every
// record read (Get, ForEach, Decode) and written (Put): a record that
// fails it is an error naming the store, bucket and key, so a damaged or
// edited record can never be acted on.
func NewBucket[T any](name string, check func(key string, v *T) error) *Bucket[T] {
	return &Bucket[T]{name: []byte(name), check: check}
}

// Name is the bucket's name.
func (b *Bucket[T]) Name() string { return string(b.name) }

func (b *Bucket[T]) bucket(tx *Tx) *bolt.Bucket {
	if tx.tx == nil {
		return nil
	}
	return tx.tx.Bucket(b.name)
}

// Decode parses a record's bytes as stored under key and checks it. It is
// what every read uses; fuzz targets call it with untrusted bytes.
func (b *Bucket[T]) Decode(key string, raw []byte) (*T, error) {
	v := new(T)
	if err := json.Unmarshal(raw, v); err != nil {
		return nil, fmt.Errorf("%s record %q: %w", b.name, key, err)
	}
	if b.check != nil {
		if err := b.check(key, v); err != nil {
			return nil, fmt.Errorf("%s record %q: %w", b.name, key, err)
		}
	}
	return v, nil
}

// Encode is the bytes Put stores for v.
func (b *Bucket[T]) Encode(v *T) ([]byte, error) {
	return json.Marshal(v)
}

// Get reads the record under key; ok is false if there is none.
func (b *Bucket[T]) Get(tx *Tx, key string) (v *T, ok bool, err error) {
	bk := b.bucket(tx)
	if bk == nil {
		return nil, false, nil
	}
	raw := bk.Get([]byte(key))
	if raw == nil {
		return nil, false, nil
	}
	if v, err = b.Decode(key, raw); err != nil {
		return nil, false, fmt.Errorf("%s: %w", tx.path, err)
	}
	return v, true, nil
}

// Has reports whether a record is stored under key, without decoding it.
func (b *Bucket[T]) Has(tx *Tx, key string) bool {
	bk := b.bucket(tx)
	return bk != nil && bk.Get([]byte(key)) != nil
}

// Put stores v under key. The record must pass the bucket's check.
func (b *Bucket[T]) Put(tx *Tx, key string, v *T) error {
	if !tx.Writable() {
		return fmt.Errorf("%s: put %s record %q: read-only transaction", tx.path, b.name, key)
	}
	if key == "" {
		return fmt.Errorf("%w: %s record with an empty key", ErrInvalid, b.name)
	}
	raw, err := b.Encode(v)
	if err != nil {
		return fmt.Errorf("%s record %q: %w", b.name, key, err)
	}
	if _, err := b.Decode(key, raw); err != nil {
		return fmt.Errorf("refusing to store %w", err)
	}
	bk, err := tx.tx.CreateBucketIfNotExists(b.name)
	if err != nil {
		return fmt.Errorf("%s: bucket %s: %w", tx.path, b.name, err)
	}
	if err := bk.Put([]byte(key), raw); err != nil {
		return fmt.Errorf("%s: put %s record %q: %w", tx.path, b.name, key, err)
	}
	return nil
}

// Delete removes the record under key, if there is one.
func (b *Bucket[T]) Delete(tx *Tx, key string) error {
	if !tx.Writable() {
		return fmt.Errorf("%s: delete %s record %q: read-only transaction", tx.path, b.name, key)
	}
	bk := b.bucket(tx)
	if bk == nil {
		return nil
	}
	if err := bk.Delete([]byte(key)); err != nil {
		return fmt.Errorf("%s: delete %s record %q: %w", tx.path, b.name, key, err)
	}
	return nil
}

// ForEach calls fn for every record in key order. A record that does not
// decode stops it with that error, as does an error from fn.
func (b *Bucket[T]) ForEach(tx *Tx, fn func(key string, v *T) error) error {
	bk := b.bucket(tx)
	if bk == nil {
		return nil
	}
	return bk.ForEach(func(k, raw []byte) error {
		v, err := b.Decode(string(k), raw)
		if err != nil {
			return fmt.Errorf("%s: %w", tx.path, err)
		}
		return fn(string(k), v)
	})
}

// All returns every record in key order.
func (b *Bucket[T]) All(tx *Tx) ([]*T, error) {
	var out []*T
	err := b.ForEach(tx, func(_ string, v *T) error {
		out = append(out, v)
		return nil
	})
	return out, err
}
