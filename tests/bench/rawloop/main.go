// Command rawloop is the floor rayvmm's exit path is measured against: a
// minimal KVM loop with no device model. It sets the guest up the way rayvmm
// does (same memory layout, zero page, page tables, MP table, CPUID template
// and long-mode entry, through vmm/kvm, vmm/memory and vmm/boot) and runs
// rayguest with rayguest.run=pio:N, handling only the port exits it must:
// writes to 0x441 are ignored, COM1 output is collected (its status register
// always reads "transmitter empty"), 0xfe to port 0x64 ends the run. Every
// other port read returns zero and every other write is dropped.
//
//	rawloop -n 20000 [-memory 128M] [-kernel rayguest.elf]
//
// The guest's serial output goes to stdout; one JSON line with the number of
// exits and the time from the first KVM_RUN to the reset goes to stderr.
// tests/bench runs it beside `rayvmm boot --cmdline rayguest.run=pio:N`.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/guestkernel"
	"github.com/rayvmm/rayvmm/vmm/boot"
	"github.com/rayvmm/rayvmm/vmm/cpuid"
	"github.com/rayvmm/rayvmm/vmm/kvm"
	"github.com/rayvmm/rayvmm/vmm/memory"
)

// Ports the loop knows about.
const (
	portPIO     = 0x441 // rayguest's pio:N target
	portCOM1    = 0x3f8 // transmit holding register
	portCOM1IIR = 0x3fa // interrupt identification: FIFO on, nothing pending
	portCOM1LSR = 0x3fd // line status: transmitter empty
	portReset   = 0x64  // i8042 command: 0xfe resets
)

// Stats is what rawloop reports on stderr.
type Stats struct {
	Exits    uint64 `json:"exits"`
	PIOExits uint64 `json:"pio_exits"`
	RunNS    int64  `json:"run_ns"` // first KVM_RUN to the reset write
}

func main() {
	n := flag.Int("n", 20000, "port writes the guest does (rayguest.run=pio:N)")
	memSize := flag.Uint64("memory", 128<<20, "guest memory in bytes")
	kernelPath := flag.String("kernel", "", "guest kernel (default: the embedded rayguest)")
	flag.Parse()
	img := guestkernel.ELF
	if *kernelPath != "" {
		var err error
		if img, err = os.ReadFile(*kernelPath); err != nil {
			fmt.Fprintf(os.Stderr, "rawloop: -kernel: %v\n", err)
			os.Exit(1)
		}
	}
	st, out, err := run(*n, *memSize, img)
	os.Stdout.Write(out)
	if err == nil {
		err = json.NewEncoder(os.Stderr).Encode(st)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "rawloop: %v\n", err)
		os.Exit(1)
	}
}

// run boots img with rayguest.run=pio:n and returns the loop's counts and
// the guest's serial output.
func run(n int, memSize uint64, img []byte) (Stats, []byte, error) {
	if n < 0 {
		return Stats{}, nil, fmt.Errorf("-n %d: want a count >= 0", n)
	}
	if err := boot.CheckMemorySize(memSize); err != nil {
		return Stats{}, nil, fmt.Errorf("-memory: %w", err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return runVM(n, memSize, img)
}

func runVM(n int, memSize uint64, img []byte) (Stats, []byte, error) {

	sys, err := kvm.Open("/dev/kvm")
	if err != nil {
		return Stats{}, nil, err
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		return Stats{}, nil, err
	}
	defer vm.Close()
	if err := vm.SetTSSAddr(boot.TSSAddr); err != nil {
		return Stats{}, nil, err
	}
	if err := vm.SetIdentityMapAddr(boot.IdentityMap); err != nil {
		return Stats{}, nil, err
	}
	// KVM's own LAPIC, IOAPIC and PIT: rayguest programs them during boot,
	// and they cost nothing on the port-write path measured here.
	if err := vm.CreateIRQChip(); err != nil {
		return Stats{}, nil, err
	}
	if err := vm.CreatePIT2(); err != nil {
		return Stats{}, nil, err
	}
	mem, err := memory.New(boot.RAMRanges(memSize)...)
	if err != nil {
		return Stats{}, nil, err
	}
	defer mem.Close()
	for _, r := range mem.Regions() {
		if err := vm.SetMemoryRegion(uint64(r.Base), r.Size, r.HostAddr()); err != nil {
			return Stats{}, nil, err
		}
	}
	k, err := boot.Load(mem, img)
	if err != nil {
		return Stats{}, nil, err
	}
	cmdline := fmt.Sprintf("rayguest.run=pio:%d", n)
	if err := boot.WriteZeroPage(mem, k, cmdline, boot.Initrd{}, boot.E820(memSize)); err != nil {
		return Stats{}, nil, err
	}
	if err := boot.WriteGDT(mem); err != nil {
		return Stats{}, nil, err
	}
	if err := boot.WritePageTables(mem); err != nil {
		return Stats{}, nil, err
	}
	if err := boot.WriteMPTable(mem, 1); err != nil {
		return Stats{}, nil, err
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		return Stats{}, nil, err
	}
	defer cpu.Close()
	if err := setupBSP(sys, cpu, k.Entry); err != nil {
		return Stats{}, nil, err
	}
	return loop(cpu)
}

// setupBSP gives the boot CPU rayvmm's CPUID template and puts it in 64-bit
// mode at the kernel's entry with the zero page in RSI.
func setupBSP(sys *kvm.System, cpu *kvm.VCPU, entry uint64) error {
	sup, err := sys.SupportedCPUID()
	if err != nil {
		return err
	}
	template, err := cpuid.Resolve(cpuid.Auto)
	if err != nil {
		return err
	}
	tsc, err := cpu.TSCKHz()
	if err != nil {
		tsc = 0
	}
	if err := cpu.SetCPUID(cpuid.Apply(sup, template, cpuid.Topology{CPU: 0, CPUs: 1, TSCKHz: tsc})); err != nil {
		return err
	}
	if err := cpu.SetMSRs([]kvm.MSR{{Index: 0x1a0, Data: 1}}); err != nil { // IA32_MISC_ENABLE: fast strings
		return err
	}
	s, err := cpu.Sregs()
	if err != nil {
		return err
	}
	boot.LongModeSregs(s)
	if err := cpu.SetSregs(s); err != nil {
		return err
	}
	return cpu.SetRegs(boot.EntryRegs(entry))
}

// loop runs the vCPU until the guest writes 0xfe to port 0x64.
func loop(cpu *kvm.VCPU) (Stats, []byte, error) {
	var st Stats
	out := make([]byte, 0, 4096)
	start := time.Now()
	for {
		err := cpu.Run()
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue // the Go runtime's preemption signal
		}
		if err != nil {
			return st, out, fmt.Errorf("KVM_RUN: %w", err)
		}
		st.Exits++
		switch r := cpu.ExitReason(); r {
		case kvm.ExitIO:
			io, err := cpu.IO()
			if err != nil {
				return st, out, err
			}
			switch {
			case io.Port == portPIO:
				st.PIOExits++
			case io.Out && io.Port == portCOM1:
				out = append(out, io.Data...)
			case io.Out && io.Port == portReset && io.Data[0] == 0xfe:
				st.RunNS = time.Since(start).Nanoseconds()
				return st, out, nil
			case !io.Out && io.Port == portCOM1IIR:
				fill(io.Data, 0xc1)
			case !io.Out && io.Port == portCOM1LSR:
				fill(io.Data, 0x60)
			case !io.Out:
				fill(io.Data, 0)
			}
		case kvm.ExitMMIO:
			m, err := cpu.MMIO()
			if err != nil {
				return st, out, err
			}
			if !m.Write {
				fill(m.Data, 0)
			}
		case kvm.ExitIntr:
		default:
			return st, out, fmt.Errorf("unexpected KVM exit %d after %d exits (rawloop handles only port and MMIO exits)", r, st.Exits)
		}
	}
}

func fill(b []byte, v byte) {
	for i := range b {
		b[i] = v
	}
}
