package seccap

// ioctl request numbers the VM process makes once sandboxed, from the
// kernel's headers (include/uapi/linux/kvm.h, asm-generic/ioctls.h). A
// request number encodes its argument's size, so a request with a struct
// of another size is another number, and refused. ioctl_test.go checks
// them against the numbers strace shows for rayvmm.

func kvmIOC(dir, nr, size uint64) uint64 { return dir<<30 | size<<16 | 0xAE<<8 | nr }

const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
)

// KVM requests.
var (
	// On a vCPU fd: the run loop and its exit path.
	kvmRun       = kvmIOC(iocNone, 0x80, 0)
	kvmGetRegs   = kvmIOC(iocRead, 0x81, 144)         // struct kvm_regs
	kvmGetSregs  = kvmIOC(iocRead, 0x83, 312)         // struct kvm_sregs
	kvmTranslate = kvmIOC(iocRead|iocWrite, 0x85, 24) // struct kvm_translation
	// On a vCPU fd: the vCPU's set-up, on its thread before its first run.
	kvmSetRegs   = kvmIOC(iocWrite, 0x82, 144) // struct kvm_regs
	kvmSetSregs  = kvmIOC(iocWrite, 0x84, 312) // struct kvm_sregs
	kvmSetMSRs   = kvmIOC(iocWrite, 0x89, 8)   // struct kvm_msrs (header)
	kvmSetCPUID2 = kvmIOC(iocWrite, 0x90, 8)   // struct kvm_cpuid2 (header)
	kvmGetTSCKHz = kvmIOC(iocNone, 0xa3, 0)
	kvmGetMPSt   = kvmIOC(iocRead, 0x98, 4) // struct kvm_mp_state: the API's pause
	// On the VM fd.
	kvmCreateVCPU   = kvmIOC(iocNone, 0x41, 0)
	kvmIRQLineState = kvmIOC(iocRead|iocWrite, 0x67, 8) // KVM_IRQ_LINE_STATUS, struct kvm_irq_level
	kvmIRQFD        = kvmIOC(iocWrite, 0x76, 32)        // struct kvm_irqfd
	kvmIOEventFD    = kvmIOC(iocWrite, 0x79, 64)        // struct kvm_ioeventfd
)

// Terminal requests: the console's raw mode is restored when the VM ends.
const (
	tcgets     = 0x5401
	tcsets     = 0x5402
	tcsetsw    = 0x5403
	tcsetsf    = 0x5404
	tiocgwinsz = 0x5413
)

// ioctlNames names the requests above, for the allow-list's description.
var ioctlNames = map[uint64]string{
	kvmRun: "KVM_RUN", kvmGetRegs: "KVM_GET_REGS", kvmGetSregs: "KVM_GET_SREGS",
	kvmTranslate: "KVM_TRANSLATE", kvmSetRegs: "KVM_SET_REGS", kvmSetSregs: "KVM_SET_SREGS",
	kvmSetMSRs: "KVM_SET_MSRS", kvmSetCPUID2: "KVM_SET_CPUID2", kvmGetTSCKHz: "KVM_GET_TSC_KHZ",
	kvmGetMPSt: "KVM_GET_MP_STATE", kvmCreateVCPU: "KVM_CREATE_VCPU",
	kvmIRQLineState: "KVM_IRQ_LINE_STATUS", kvmIRQFD: "KVM_IRQFD", kvmIOEventFD: "KVM_IOEVENTFD",
	tcgets: "TCGETS", tcsets: "TCSETS", tcsetsw: "TCSETSW", tcsetsf: "TCSETSF", tiocgwinsz: "TIOCGWINSZ",
}
