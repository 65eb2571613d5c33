// Command rayvmm-vm is the VM process: it runs one microVM for a control
// plane (rayvmm boot, the rayvmm daemon), which resolved the VM's spec and
// opened every resource it needs, and handed them over as file descriptors
// on its handoff socket (package vmproc). A control plane may start it
// before it knows the VM (package vmproc/spawn); one that then needs no VM
// closes the socket, and rayvmm-vm exits quietly with status 0. It opens
// nothing by path, never touches rayvmm's state directory, and links only
// what running a guest needs: vmm, the virtio devices, the disk backends
// and the network data path.
//
// Run by hand, it says so and exits with status 2.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/rayvmm/rayvmm/vmproc"
	"github.com/rayvmm/rayvmm/vmproc/runner"
)

func main() {
	r, err := vmproc.Receive()
	if errors.Is(err, vmproc.ErrNotNeeded) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "rayvmm-vm: %v\n", err)
		if errors.Is(err, vmproc.ErrNoHandoff) {
			os.Exit(2)
		}
		os.Exit(1)
	}
	os.Exit(runner.Run(r))
}
