package network

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/rayvmm/rayvmm/spec"
)

// ErrInvalidName is the category of bad network and interface names.
var ErrInvalidName = errors.New("invalid name")

// Interface names rayvmm makes. Network NAME gets the bridge "rv-NAME"; its
// access VLAN N the bridge "rv-NAME.N"; its overlay the VXLAN device
// "rvx-NAME". TAPs are "rvt<pid>-<n>", unique per process.
const (
	bridgePrefix = "rv-"
	vxlanPrefix  = "rvx-"
	tapPrefix    = "rvt"
)

// ValidateName checks a network name (spec.CheckNetworkName: lower-case
// letters, digits, '-' and '_', short enough that its bridge name fits in
// 15 bytes).
func ValidateName(name string) error {
	if err := spec.CheckNetworkName(name); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidName, err)
	}
	return nil
}

// checkIfName checks that name is a usable Linux interface name.
func checkIfName(name, what string) error {
	if err := spec.CheckIfName(name, what); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidName, err)
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
	v, err := strconv.ParseUint(rest, 10, 16)
	if err != nil || v < 1 || v > 4094 || strconv.Itoa(int(v)) != rest {
		return 0, false
	}
	return uint16(v), true
}
