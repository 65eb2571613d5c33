package network

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// ErrInvalidName is the category of bad network and interface names.
var ErrInvalidName = errors.New("invalid name")

// ifNameMax is the longest interface name Linux accepts (IFNAMSIZ - 1).
const ifNameMax = 15

// Interface names rayvmm makes. Network NAME gets the bridge "rv-NAME"; its
// access VLAN N the bridge "rv-NAME.N"; its overlay the VXLAN device
// "rvx-NAME". TAPs are "rvt<pid>-<n>", unique per process.
const (
	bridgePrefix = "rv-"
	vxlanPrefix  = "rvx-"
	tapPrefix    = "rvt"
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]*$`)

// ValidateName checks a network name: lower-case letters, digits, '-' and
// '_', and short enough that its bridge name fits in 15 bytes.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: network name %q: use lower-case letters, digits, '-' and '_', starting with a letter or digit", ErrInvalidName, name)
	}
	if err := checkIfName(BridgeName(name), "network "+name+": bridge"); err != nil {
		return fmt.Errorf("%w (network names have at most %d characters)", err, ifNameMax-len(bridgePrefix))
	}
	return nil
}

// checkIfName checks that name is a usable Linux interface name.
func checkIfName(name, what string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: %s name is empty", ErrInvalidName, what)
	case len(name) > ifNameMax:
		return fmt.Errorf("%w: %s name %q is %d bytes, longer than Linux's limit of %d", ErrInvalidName, what, name, len(name), ifNameMax)
	case name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n") || strings.ContainsRune(name, 0):
		return fmt.Errorf("%w: %s name %q contains a character Linux refuses", ErrInvalidName, what, name)
	}
	return nil
}

// BridgeName is the bridge of network name's untagged segment.
func BridgeName(network string) string { return bridgePrefix + network }

// VLANBridgeName is the bridge of network's access VLAN vlan.
func VLANBridgeName(network string, vlan uint16) string {
	return bridgePrefix + network + "." + strconv.Itoa(int(vlan))
}

// VXLANName is the VXLAN device of network's overlay.
func VXLANName(network string) string { return vxlanPrefix + network }

// vlanOfBridge returns the VLAN of a bridge name made by VLANBridgeName for
// network, or false.
func vlanOfBridge(network, ifname string) (uint16, bool) {
	rest, ok := strings.CutPrefix(ifname, BridgeName(network)+".")
	if !ok {
		return 0, false
	}
	v, err := parseVLAN(rest)
	if err != nil || strconv.Itoa(int(v)) != rest {
		return 0, false
	}
	return v, true
}
