package seccap

// haveTrapHandler: strict mode refuses with SECCOMP_RET_TRAP and reports
// through sigsysHandler (sigsys_amd64.s).
const haveTrapHandler = true

// sigsysReportFD is where sigsysHandler writes; read by assembly.
var sigsysReportFD int64 = -1

// Implemented in sigsys_amd64.s; the first two are entered by the kernel,
// never called from Go.
func sigsysHandler()
func sigreturnStub()
func sigsysHandlerAddr() uintptr
func sigreturnStubAddr() uintptr

// installSIGSYSHandler makes SIGSYS report to fd (when > 0) and kill.
func installSIGSYSHandler(fd int) error {
	sigsysReportFD = int64(fd)
	return setSIGSYSAction(sigsysHandlerAddr(), sigreturnStubAddr())
}
