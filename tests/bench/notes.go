package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

// staticNotes explain how each peer is run and why; latest.json and
// results.md carry them with the numbers.
var staticNotes = []string{
	"Same guest in every VMM: the embedded rayguest (guestkernel/rayguest.elf; rayvmm enters it through the Linux 64-bit boot protocol, QEMU and gokvm through its PVH note), the same memory size, 1 vCPU and an empty command line, so rayguest runs its default job: print `rayguest: ready` and its banner, power off. " +
		"The command line is empty because gokvm's PVH loader writes it into guest memory only when an initrd is given (which it puts at 240 MiB).",
	"QEMU runs as `-M microvm -enable-kvm -cpu host,-cx16,-arch-capabilities -nodefaults -no-user-config -no-reboot -display none -serial stdio`. " +
		"`-cpu host,-cx16` alone dies before the guest starts on this PVM-backed KVM (`failed to set MSR 0x10a`, IA32_ARCH_CAPABILITIES), hence `-arch-capabilities`. " +
		"microvm has no i8042, so rayguest's power-off (0xfe to port 0x64) falls through to a triple fault, which `-no-reboot` turns into a clean QEMU exit (status 0).",
	"gokvm's loader does not zero an ELF segment's BSS (p_memsz > p_filesz) and fills all guest RAM above 1 MiB with a poison pattern first; rayguest keeps its PML4 and PDPT in its BSS, so with rayguest.elf as is the poison ends up in the upper halves of its page-table entries and the CPU triple-faults when rayguest turns paging on (see the next note). " +
		"gokvm's rows therefore boot a copy of rayguest.elf whose BSS is stored as zeros in the file (tests/bench/peers.go, withZeroedBSS): byte for byte the same memory image.",
	"gokvm treats a port with no device behind it as a fatal error: it stops the vCPU at rayguest's boot-timer write to port 0x440 (`unexpected io port 0x440`), right after the ready line. Its boot-to-ready time is real; it has no clean exit, so its process-exit time is shown for information and compared with nothing. " +
		"gokvm runs on a pseudo-terminal: with stdin not a terminal it never reads its console and never returns.",
	"Both times are taken by tests/bench/launcher as it sees the events: ready when the read that completed `rayguest: ready` returned (a goroutine that only reads the console and stamps), exit when the process had been reaped (wait4) and its console output had ended (EOF; on gokvm's pseudo-terminal, EIO once everything written was read). " +
		"Output can arrive after wait4 returns (a terminal's output passes through a kernel work queue), so exit is the later of the two: a line is always read before its console ends, so no run's ready time is later than its exit. wait4's own time is kept as reaped_ns in latest.json.",
	"Peak RSS is wait4's ru_maxrss of the timed runs. \"Peak RSS − touched guest RAM\" comes from separate, untimed runs sampled every millisecond through /proc/PID/status and /proc/PID/smaps of the process holding guest RAM (rayvmm's VM process, rayvmm-vm; QEMU; gokvm): its VmHWM at the last sample before exit, less the resident size of the one mapping exactly the size of guest memory (guest RAM in all three VMMs) then. " +
		"VmHWM rather than ru_maxrss because a process started with vfork+exec (as Go starts rayvmm-vm) begins its ru_maxrss at its parent's peak. " +
		"Guest RAM is mapped without being touched in rayvmm (MAP_NORESERVE) and QEMU, so only pages the loader or the guest wrote count; gokvm writes its poison over all of it.",
	"Process exit includes KVM's teardown of the VM (kvm_destroy_vm): freeing the in-kernel PIT and unregistering the MMU notifier each wait for SRCU grace periods, 1–25 ms on this machine (perf sched_switch stacks). All three VMMs create an in-kernel PIT and pay it: rayvmm when it closes the VM fd, QEMU and gokvm inside exit_group.",
	"KVM here is PVM-backed: guest code runs in KVM's x86 instruction emulator (about 3.6 M guest instructions/s, about 10 µs per port-I/O exit), so guest-side time is far above what hardware KVM gives, and the VMMs' own start-up costs weigh less in every ratio. Only ratios from this run are compared, never absolute numbers from elsewhere.",
}

// gokvmExit: gokvm ends cleanly only if the guest powered off, which it
// does not reach (see staticNotes); the reason is gokvm's own error line.
func gokvmExit(o outcome) (bool, string) {
	out := strings.ReplaceAll(o.Output, "\r", "")
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "err: ") {
			return false, "gokvm stopped the vCPU: " + strings.TrimPrefix(l, "err: ")
		}
	}
	if strings.Contains(out, "rayguest: poweroff") && o.Code == 0 {
		return true, ""
	}
	return false, fmt.Sprintf("exit status %d: %s", o.Code, lastLines(out, 2))
}

// gokvmAsIs boots gokvm once with rayguest.elf unchanged and reports what
// happened, so the reason for the modified copy is measured, not assumed.
func gokvmAsIs(ctx context.Context, gokvm, kernel, mem string) string {
	o := run(ctx, launch.Request{Argv: []string{gokvm, "boot", "-k", kernel, "-m", mem, "-c", "1"}, TTY: true})
	what := "reached the ready line"
	if o.Ready == 0 {
		what = "never printed `rayguest: ready`"
	}
	if o.Err != "" {
		return fmt.Sprintf("gokvm with rayguest.elf as is (this run): %s; %s.", what, o.Err)
	}
	_, why := gokvmExit(o)
	return fmt.Sprintf("gokvm with rayguest.elf as is (this run): %s; exit status %d; %s.", what, o.Code, why)
}
