package spec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
)

// ErrInvalid is the category of every error Decode and Validate return.
var ErrInvalid = errors.New("invalid VM spec")

// FieldError is a bad value at a path in a spec, such as
// "disks[1].rateLimit.iops: must not be negative".
type FieldError struct {
	Path string // dotted JSON path; "" for the document itself
	Msg  string
}

func (e *FieldError) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

// Is makes every FieldError match ErrInvalid.
func (e *FieldError) Is(target error) bool { return target == ErrInvalid }

func fieldErr(path, format string, args ...any) error {
	return &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)}
}

// maxDocument bounds what Decode reads: a VM spec is a few kilobytes.
const maxDocument = 1 << 20

// Decode parses a JSON document strictly into v, a pointer to a struct
// whose fields carry json tags: an unknown or repeated field, a value of
// the wrong type, a number out of range or trailing data is an error whose
// message names the JSON path (nets[0].colour: unknown field). Anonymous
// struct fields without a tag are inlined, as encoding/json does, so a
// type that embeds VM (a pod's VM entry) decodes with the same rules.
// Types that implement json.Unmarshaler decode themselves; their errors
// get the path prefixed. Decode does not validate: call Validate.
func Decode(data []byte, v any) error {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() {
		return fmt.Errorf("spec: Decode needs a non-nil pointer, not %T", v)
	}
	if len(data) > maxDocument {
		return fieldErr("", "document of %d bytes is larger than %d", len(data), maxDocument)
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		return fieldErr("", "empty document")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return fieldErr("", "not valid JSON: %s", jsonMsg(err))
	}
	if dec.More() {
		return fieldErr("", "trailing data after the document")
	}
	if _, err := dec.Token(); err == nil {
		return fieldErr("", "trailing data after the document")
	}
	return decodeValue(raw, "", rv.Elem())
}

// jsonMsg strips encoding/json's "json: " prefix.
func jsonMsg(err error) string { return strings.TrimPrefix(err.Error(), "json: ") }

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// decodeValue decodes one JSON value (raw, already known to be valid
// JSON) into v.
func decodeValue(raw []byte, path string, v reflect.Value) error {
	if v.CanAddr() && v.Addr().Type().Implements(unmarshalerType) {
		if err := v.Addr().Interface().(json.Unmarshaler).UnmarshalJSON(raw); err != nil {
			var fe *FieldError
			if errors.As(err, &fe) {
				return fieldErr(join(path, fe.Path), "%s", fe.Msg)
			}
			return fieldErr(path, "%s", err.Error())
		}
		return nil
	}
	if string(raw) == "null" {
		v.SetZero()
		return nil
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		return decodeValue(raw, path, v.Elem())
	case reflect.Struct:
		return decodeStruct(raw, path, v)
	case reflect.Slice:
		return decodeSlice(raw, path, v)
	case reflect.Map:
		return decodeMap(raw, path, v)
	case reflect.String:
		if raw[0] != '"' {
			return fieldErr(path, "want a string, got %s", kindOf(raw))
		}
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return fieldErr(path, "%s", jsonMsg(err))
		}
		v.SetString(s)
		return nil
	case reflect.Bool:
		switch string(raw) {
		case "true":
			v.SetBool(true)
		case "false":
			v.SetBool(false)
		default:
			return fieldErr(path, "want true or false, got %s", kindOf(raw))
		}
		return nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if !isNumber(raw) {
			return fieldErr(path, "want a whole number, got %s", kindOf(raw))
		}
		n, err := strconv.ParseInt(string(raw), 10, 64)
		if err != nil || v.OverflowInt(n) {
			return fieldErr(path, "%s is not a whole number in range", raw)
		}
		v.SetInt(n)
		return nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		if !isNumber(raw) {
			return fieldErr(path, "want a whole number, got %s", kindOf(raw))
		}
		if raw[0] == '-' {
			return fieldErr(path, "must not be negative")
		}
		n, err := strconv.ParseUint(string(raw), 10, 64)
		if err != nil || v.OverflowUint(n) {
			return fieldErr(path, "%s is not a whole number in range", raw)
		}
		v.SetUint(n)
		return nil
	}
	return fieldErr(path, "cannot decode into a Go %s", v.Type())
}

func isNumber(raw []byte) bool { return raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9') }

// kindOf names the JSON kind of raw for error messages.
func kindOf(raw []byte) string {
	switch raw[0] {
	case '{':
		return "an object"
	case '[':
		return "a list"
	case '"':
		return "a string (" + abbreviate(string(raw)) + ")"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "the number " + abbreviate(string(raw))
}

func abbreviate(s string) string {
	if len(s) > 40 {
		return s[:37] + "..."
	}
	return s
}

// members walks a JSON object, calling fn for each member in order. A key
// given twice is an error.
func members(raw []byte, path string, fn func(key string, val []byte) error) error {
	if raw[0] != '{' {
		return fieldErr(path, "want an object, got %s", kindOf(raw))
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if _, err := dec.Token(); err != nil {
		return fieldErr(path, "%s", jsonMsg(err))
	}
	seen := map[string]bool{}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return fieldErr(path, "%s", jsonMsg(err))
		}
		key, _ := t.(string)
		if seen[key] {
			return fieldErr(join(path, key), "given twice")
		}
		seen[key] = true
		var val json.RawMessage
		if err := dec.Decode(&val); err != nil {
			return fieldErr(join(path, key), "%s", jsonMsg(err))
		}
		if err := fn(key, val); err != nil {
			return err
		}
	}
	return nil
}

// fieldInfo is where a JSON member goes in a struct: the index path
// through inlined anonymous structs.
type fieldInfo struct {
	index []int
}

var fieldCache sync.Map // reflect.Type -> map[string]fieldInfo

// fieldsOf lists the JSON members of struct type t by name.
func fieldsOf(t reflect.Type) map[string]fieldInfo {
	if f, ok := fieldCache.Load(t); ok {
		return f.(map[string]fieldInfo)
	}
	out := map[string]fieldInfo{}
	var walk func(t reflect.Type, prefix []int)
	walk = func(t reflect.Type, prefix []int) {
		for i := range t.NumField() {
			f := t.Field(i)
			idx := append(append([]int(nil), prefix...), i)
			tag, hasTag := f.Tag.Lookup("json")
			name, _, _ := strings.Cut(tag, ",")
			if f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct {
				walk(f.Type, idx)
				continue
			}
			if !f.IsExported() || !hasTag || name == "-" || name == "" {
				continue
			}
			if _, dup := out[name]; !dup {
				out[name] = fieldInfo{index: idx}
			}
		}
	}
	walk(t, nil)
	fieldCache.Store(t, out)
	return out
}

func decodeStruct(raw []byte, path string, v reflect.Value) error {
	fields := fieldsOf(v.Type())
	return members(raw, path, func(key string, val []byte) error {
		fi, ok := fields[key]
		if !ok {
			return fieldErr(join(path, key), "unknown field")
		}
		return decodeValue(val, join(path, key), v.FieldByIndex(fi.index))
	})
}

func decodeMap(raw []byte, path string, v reflect.Value) error {
	if v.Type().Key().Kind() != reflect.String {
		return fieldErr(path, "cannot decode into a Go %s", v.Type())
	}
	if v.IsNil() {
		v.Set(reflect.MakeMap(v.Type()))
	}
	return members(raw, path, func(key string, val []byte) error {
		e := reflect.New(v.Type().Elem()).Elem()
		if err := decodeValue(val, join(path, key), e); err != nil {
			return err
		}
		v.SetMapIndex(reflect.ValueOf(key).Convert(v.Type().Key()), e)
		return nil
	})
}

// maxListLen bounds a list; no VM has more devices than this.
const maxListLen = 4096

func decodeSlice(raw []byte, path string, v reflect.Value) error {
	if raw[0] != '[' {
		return fieldErr(path, "want a list, got %s", kindOf(raw))
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if _, err := dec.Token(); err != nil {
		return fieldErr(path, "%s", jsonMsg(err))
	}
	out := reflect.MakeSlice(v.Type(), 0, 0)
	for i := 0; dec.More(); i++ {
		p := fmt.Sprintf("%s[%d]", path, i)
		if i >= maxListLen {
			return fieldErr(p, "list longer than %d", maxListLen)
		}
		var val json.RawMessage
		if err := dec.Decode(&val); err != nil {
			return fieldErr(p, "%s", jsonMsg(err))
		}
		e := reflect.New(v.Type().Elem()).Elem()
		if err := decodeValue(val, p, e); err != nil {
			return err
		}
		out = reflect.Append(out, e)
	}
	if out.Len() == 0 {
		v.SetZero() // an empty list is no list, as omitempty writes it
		return nil
	}
	v.Set(out)
	return nil
}

// nonNegative checks a count or rate that may be zero.
func nonNegative(path string, n int64) error {
	if n < 0 {
		return fieldErr(path, "must not be negative")
	}
	return nil
}
