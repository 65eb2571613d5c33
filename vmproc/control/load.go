package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	yamlv2 "go.yaml.in/yaml/v2"
	"sigs.k8s.io/yaml"

	"github.com/rayvmm/rayvmm/spec"
)

// YAML is read with sigs.k8s.io/yaml, as Kubernetes reads manifests: it
// converts the YAML to JSON, and the one strict JSON decoder (spec.Decode)
// does the rest, so a YAML file and a JSON file give the same errors, each
// naming its field's path. Keys repeated in a mapping are refused, and so
// is a file of more than one document.

// maxSpecFile bounds a spec file.
const maxSpecFile = 1 << 20

// LoadSpec reads a VM spec file, YAML or JSON (JSON is YAML). It neither
// applies defaults nor validates.
func LoadSpec(path string) (*spec.VM, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSpecFile+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(b) > maxSpecFile {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, maxSpecFile)
	}
	v, err := ParseSpec(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

// ParseSpec reads a VM spec document, YAML or JSON, strictly.
func ParseSpec(b []byte) (*spec.VM, error) {
	j, err := YAMLToJSON(b)
	if err != nil {
		return nil, err
	}
	return spec.Parse(j)
}

// YAMLToJSON converts one YAML document to JSON strictly (no repeated
// keys, one document), with sigs.k8s.io/yaml's errors on one line.
func YAMLToJSON(b []byte) ([]byte, error) {
	if n, err := countDocuments(b); err == nil && n > 1 {
		return nil, &spec.FieldError{Msg: fmt.Sprintf("the file holds %d YAML documents, want one", n)}
	}
	j, err := yaml.YAMLToJSONStrict(b)
	if err != nil {
		// "yaml: unmarshal errors:\n  line 2: key ..." -> "line 2: key ..."
		var lines []string
		for _, l := range strings.Split(err.Error(), "\n") {
			l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "yaml:"))
			if l != "" && l != "unmarshal errors:" {
				lines = append(lines, l)
			}
		}
		return nil, &spec.FieldError{Msg: "not valid YAML: " + strings.Join(lines, "; ")}
	}
	if bytes.Equal(bytes.TrimSpace(j), []byte("null")) {
		return nil, &spec.FieldError{Msg: "empty document"}
	}
	return j, nil
}

// countDocuments counts the YAML documents in b.
func countDocuments(b []byte) (int, error) {
	dec := yamlv2.NewDecoder(bytes.NewReader(b))
	n := 0
	for {
		var v any
		err := dec.Decode(&v)
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		n++
	}
}

// SpecYAML renders a spec as YAML (what `rayvmm boot --print-config`
// prints): the JSON form converted, so keys are sorted, as kubectl prints.
func SpecYAML(v *spec.VM) ([]byte, error) {
	j, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return yaml.JSONToYAML(j)
}
