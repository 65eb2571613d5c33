package pods

import (
	"fmt"
	"io"
	"os"

	"github.com/rayvmm/rayvmm/spec"
	"github.com/rayvmm/rayvmm/vmproc/control"
)

// MaxDocument bounds a pod document.
const MaxDocument = 1 << 20

// Parse reads a pod document, YAML or JSON, strictly: an unknown or
// repeated field, a wrong type, more than one YAML document or trailing
// data is an error naming its path. It neither applies defaults nor
// validates (Load does both).
func Parse(b []byte) (*Pod, error) {
	if len(b) > MaxDocument {
		return nil, fieldErr("", "document of %d bytes is larger than %d", len(b), MaxDocument)
	}
	j, err := control.YAMLToJSON(b)
	if err != nil {
		return nil, err
	}
	var p Pod
	if err := spec.Decode(j, &p); err != nil {
		return nil, err
	}
	return &p, nil
}

// Load parses a pod document, fills in the defaults and validates it: what
// the daemon does with every apply.
func Load(b []byte) (*Pod, error) {
	p, err := Parse(b)
	if err != nil {
		return nil, err
	}
	p.Defaults()
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p, nil
}

// ReadFile reads a pod document from a file ("-" is stdin) without
// parsing it.
func ReadFile(path string) ([]byte, error) {
	var r io.Reader
	if path == "-" {
		r = os.Stdin
	} else {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, MaxDocument+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(b) > MaxDocument {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, MaxDocument)
	}
	return b, nil
}
