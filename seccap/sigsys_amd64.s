#include "textflag.h"

// sigsysHandler is SIGSYS's handler in strict mode. The kernel enters it
// with the C ABI (DI = signal, SI = *siginfo_t, DX = *ucontext_t) on the
// thread's signal stack, with SIGSYS blocked. It uses no Go stack, heap or
// runtime: it writes the refused call's number and audit architecture
// (siginfo's _sigsys._syscall at offset 24 and _arch at 28) as 8 bytes to
// sigsysReportFD, then asks for rt_sigaction(SIGSYS), which the filter
// refuses: a refusal while SIGSYS is blocked makes the kernel reset SIGSYS
// to its default action and deliver it, and the process dies of SIGSYS.
TEXT ·sigsysHandler(SB),NOSPLIT|NOFRAME,$0-0
	SUBQ	$16, SP
	MOVL	24(SI), AX
	MOVL	AX, 0(SP)
	MOVL	28(SI), AX
	MOVL	AX, 4(SP)
	MOVQ	·sigsysReportFD(SB), DI
	CMPQ	DI, $0
	JLE	refuse
	MOVQ	SP, SI
	MOVQ	$8, DX
	MOVQ	$1, AX // write
	SYSCALL
refuse:
	MOVQ	$31, DI // SIGSYS
	XORQ	SI, SI
	XORQ	DX, DX
	MOVQ	$8, R10
	MOVQ	$13, AX // rt_sigaction
	SYSCALL
	// Not reached. Were it allowed, end the process all the same.
	MOVQ	$159, DI // 128 + SIGSYS
	MOVQ	$231, AX // exit_group
	SYSCALL
	RET

// sigreturnStub is the SA_RESTORER x86-64 requires: the handler above
// never returns, but the kernel refuses to deliver a signal without one.
TEXT ·sigreturnStub(SB),NOSPLIT|NOFRAME,$0-0
	MOVQ	$15, AX // rt_sigreturn
	SYSCALL
	RET

// func sigsysHandlerAddr() uintptr
TEXT ·sigsysHandlerAddr(SB),NOSPLIT,$0-8
	LEAQ	·sigsysHandler(SB), AX
	MOVQ	AX, ret+0(FP)
	RET

// func sigreturnStubAddr() uintptr
TEXT ·sigreturnStubAddr(SB),NOSPLIT,$0-8
	LEAQ	·sigreturnStub(SB), AX
	MOVQ	AX, ret+0(FP)
	RET
