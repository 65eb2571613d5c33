package spec

import (
	"fmt"
	"regexp"
	"strings"
)

// IfNameMax is the longest interface name Linux accepts (IFNAMSIZ - 1).
const IfNameMax = 15

// MaxNetworkName is the longest network name: its bridge, "rv-NAME",
// must fit in IfNameMax.
const MaxNetworkName = IfNameMax - 3

var networkNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]*$`)

// CheckNetworkName reports why name cannot name a network: lower-case
// letters, digits, '-' and '_', starting with a letter or digit, at most
// MaxNetworkName bytes.
func CheckNetworkName(name string) error {
	if !networkNameRE.MatchString(name) {
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

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// checkID reports why s cannot be a device id (it appears in API paths).
func checkID(s string) error {
	if !idRE.MatchString(s) {
		return fmt.Errorf("%q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", s)
	}
	return nil
}

var vmNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// CheckVMName reports why s cannot name a VM.
func CheckVMName(s string) error {
	if !vmNameRE.MatchString(s) {
		return fmt.Errorf("%q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", s)
	}
	return nil
}
