package spec

import (
	"fmt"
	"strings"
)

// The name checks are loops, not regular expressions: both processes
// link this package, and compiling expressions at start-up showed as its
// largest package initializer (GODEBUG=inittrace=1).

// nameOK reports whether s is 1 to max bytes, starts with a byte first
// accepts and continues with bytes rest accepts.
func nameOK(s string, max int, first, rest func(byte) bool) bool {
	if len(s) == 0 || len(s) > max || !first(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if !rest(s[i]) {
			return false
		}
	}
	return true
}

func isLowerOrDigit(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }
func isAlnum(c byte) bool        { return isLowerOrDigit(c) || c >= 'A' && c <= 'Z' }

// IfNameMax is the longest interface name Linux accepts (IFNAMSIZ - 1).
const IfNameMax = 15

// MaxNetworkName is the longest network name: its bridge, "rv-NAME",
// must fit in IfNameMax.
const MaxNetworkName = IfNameMax - 3

// CheckNetworkName reports why name cannot name a network: lower-case
// letters, digits, '-' and '_', starting with a letter or digit, at most
// MaxNetworkName bytes.
func CheckNetworkName(name string) error {
	if !nameOK(name, len(name)+1, isLowerOrDigit, func(c byte) bool { return isLowerOrDigit(c) || c == '_' || c == '-' }) {
		return fmt.Errorf("network name %q: use lower-case letters, digits, '-' and '_', starting with a letter or digit", name)
	}
	if len(name) > MaxNetworkName {
		return fmt.Errorf("network name %q is %d bytes; network names have at most %d characters (its bridge rv-%s must fit Linux's %d)", name, len(name), MaxNetworkName, name, IfNameMax)
	}
	return nil
}

// CheckIfName reports why name is not a usable Linux interface name; what
// says what it names, for the message.
func CheckIfName(name, what string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s name is empty", what)
	case len(name) > IfNameMax:
		return fmt.Errorf("%s name %q is %d bytes, longer than Linux's limit of %d", what, name, len(name), IfNameMax)
	case name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n") || strings.ContainsRune(name, 0):
		return fmt.Errorf("%s name %q contains a character Linux refuses", what, name)
	}
	return nil
}

// idOK: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter
// or digit.
func idOK(s string) bool {
	return nameOK(s, 64, isAlnum, func(c byte) bool { return isAlnum(c) || c == '.' || c == '_' || c == '-' })
}

// checkID reports why s cannot be a device id (it appears in API paths).
func checkID(s string) error {
	if !idOK(s) {
		return fmt.Errorf("%q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", s)
	}
	return nil
}

// CheckVMName reports why s cannot name a VM.
func CheckVMName(s string) error {
	if !idOK(s) {
		return fmt.Errorf("%q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", s)
	}
	return nil
}
