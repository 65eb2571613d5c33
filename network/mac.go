package network

import (
	"crypto/sha256"
	"fmt"
	"net"
)

// GenerateMAC derives a locally administered unicast MAC from the VM name
// and the NIC's index, so the same VM gets the same MACs on every boot.
func GenerateMAC(vmName string, index int) net.HardwareAddr {
	sum := sha256.Sum256([]byte(fmt.Sprintf("rayvmm-nic\x00%s\x00%d", vmName, index)))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^1 | 2
	return mac
}
