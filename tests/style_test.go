package tests

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// goDirs returns the repository's Go package directories.
func goDirs(t *testing.T) map[string][]string {
	t.Helper()
	dirs := map[string][]string{}
	err := filepath.WalkDir(repoRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "build" || d.Name() == "bin") && p != repoRoot {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".go") {
			dirs[filepath.Dir(p)] = append(dirs[filepath.Dir(p)], p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return dirs
}

// TestPackageDocs checks that every package has a doc comment.
func TestPackageDocs(t *testing.T) {
	for dir, files := range goDirs(t) {
		documented, hasNonTest := false, false
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			hasNonTest = true
			af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.PackageClauseOnly|parser.ParseComments)
			if err != nil {
				t.Fatal(err)
			}
			if af.Doc != nil && strings.TrimSpace(af.Doc.Text()) != "" {
				documented = true
			}
		}
		if hasNonTest && !documented {
			rel, _ := filepath.Rel(repoRoot, dir)
			t.Errorf("package %s has no doc comment", rel)
		}
	}
}

// TestUnsafeOnlyInUnsafeFiles checks that package unsafe is imported only
// by files named *_unsafe.go (or *_unsafe_test.go), gVisor's rule.
func TestUnsafeOnlyInUnsafeFiles(t *testing.T) {
	for _, files := range goDirs(t) {
		for _, f := range files {
			af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			for _, imp := range af.Imports {
				if imp.Path.Value == `"unsafe"` && !strings.HasSuffix(f, "_unsafe.go") && !strings.HasSuffix(f, "_unsafe_test.go") {
					rel, _ := filepath.Rel(repoRoot, f)
					t.Errorf("%s imports unsafe; move that code to a *_unsafe.go file", rel)
				}
			}
		}
	}
	if _, err := os.Stat(filepath.Join(repoRoot, "vmm", "memory", "memory_unsafe.go")); err != nil {
		t.Fatal("the walk found nothing to check")
	}
}

// TestNoFlakyPatterns guards against two causes of flaky tests found in
// this repository: `select {}` as a way to block for ever (with nothing
// else to run, the Go runtime ends the process: "all goroutines are asleep
// - deadlock!"; a helper process blocks in testenv.Hold instead), and skips
// that bypass internal/testenv (CI, with RAYVMM_REQUIRE_KVM=1, must fail
// rather than quietly skip).
func TestNoFlakyPatterns(t *testing.T) {
	testenvDir := filepath.Join(repoRoot, "internal", "testenv")
	checked := 0
	for dir, files := range goDirs(t) {
		for _, f := range files {
			af, err := parser.ParseFile(token.NewFileSet(), f, nil, 0)
			if err != nil {
				t.Fatal(err)
			}
			checked++
			rel, _ := filepath.Rel(repoRoot, f)
			ast.Inspect(af, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.SelectStmt:
					if len(n.Body.List) == 0 {
						t.Errorf("%s: select {} blocks until the runtime calls it a deadlock; block on something that cannot end by itself (testenv.Hold in a helper process)", rel)
					}
				case *ast.SelectorExpr:
					if s := n.Sel.Name; (s == "Skip" || s == "Skipf" || s == "SkipNow") && dir != testenvDir {
						t.Errorf("%s: %s outside internal/testenv: skip with testenv.Need (or RequireRoot, RequireKVM, RequireTool, Short) so CI fails instead", rel, s)
					}
				}
				return true
			})
		}
	}
	if checked == 0 {
		t.Fatal("the walk found nothing to check")
	}
}
