//go:build seccaptest

package forbidden

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Enabled says this is a seccaptest build: the hooks below make the call
// Env asks for.
const Enabled = true

// AfterSandbox is called by the VM process right after the sandbox is
// applied: it makes the call Env asks for, unless it is for a vCPU
// thread. A call that returns (refused with an error, as landlock does,
// or allowed) ends the process with status 3 and one line saying so. A
// call asked for with @repeat is made every 100 ms while the VM runs on,
// one asked for with @sigusr2 when the process receives SIGUSR2.
func AfterSandbox() {
	if call, onVCPU, ok := Requested(); ok && !onVCPU {
		returned(call, Try(call))
	}
	if call, ok := Signalled(); ok {
		c := make(chan os.Signal, 1)
		signal.Notify(c, syscall.SIGUSR2)
		go func() {
			<-c
			returned(call, Try(call))
		}()
	}
	if call, ok := Repeated(); ok {
		go func() {
			for {
				Try(call)
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
}

// OnVCPU is called on each vCPU's thread after its filter is installed
// and before its first KVM_RUN: vCPU 0 makes the call Env asks for with
// @vcpu.
func OnVCPU(id int) {
	if call, onVCPU, ok := Requested(); ok && onVCPU && id == 0 {
		returned(call, Try(call))
	}
}

func returned(call string, err error) {
	fmt.Fprintf(os.Stderr, "rayvmm: seccaptest: %s returned: %v\n", call, err)
	os.Exit(3)
}
