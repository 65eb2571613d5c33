// Command hookvm stands in for the VM process in seccap's tests of the
// seccaptest hooks: it applies the strict sandbox, reporting to
// descriptor 3, then calls the hooks rayvmm-vm calls, on a goroutine and
// on a locked thread under the vCPU filter (with no vCPU descriptor to
// pin), and exits 0 if nothing ended it.
package main

import (
	"fmt"
	"os"
	"runtime"

	"github.com/rayvmm/rayvmm/seccap"
	"github.com/rayvmm/rayvmm/seccap/forbidden"
)

func main() {
	a, err := seccap.Apply(seccap.Config{Mode: seccap.ModeStrict, ReportFD: 3})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
	forbidden.AfterSandbox()
	done := make(chan error)
	go func() {
		runtime.LockOSThread()
		err := a.VCPUFilter(-1, -1)
		if err == nil {
			forbidden.OnVCPU(0)
		}
		done <- err
	}()
	if err := <-done; err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
	fmt.Println("nothing happened")
}
