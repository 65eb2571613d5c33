/*
 * rayguest entry code: the Linux 64-bit boot entry (ELF e_entry), the PVH
 * 32-bit entry (Xen ELF note), the AP real-mode trampoline, interrupt stubs,
 * and the static GDT, IDT and page directories.
 *
 * Everything that can be computed at link time is: the IDT gates point at
 * stubs placed at a fixed address (STUB_BASE, checked by link.ld) and the
 * page directories identity-map 0-4 GiB with 2 MiB pages, so boot runs no
 * table-building loops. Only PML4[0] and PDPT[0..3] are filled at entry.
 */
#include "layout.h"

#define CR0_PE		0x00000001
#define CR0_PG		0x80000000
#define CR4_PAE		0x00000020
#define MSR_EFER	0xc0000080
#define EFER_LME	0x00000100

/* Exceptions that push an error code. */
#define ERRMASK ((1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | \
		 (1 << 14) | (1 << 17) | (1 << 21) | (1 << 29) | (1 << 30))

/* PVH entry point note (XEN_ELFNOTE_PHYS32_ENTRY = 18). The descriptor is
 * 8 bytes so loaders that read a 32-bit or a 64-bit value both get it. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4
	.long 8
	.long 18
	.asciz "Xen"
	.balign 4
	.quad pvh_start

/* One 16-byte stub per vector at STUB_BASE + 16 * vector. Each pushes a
 * dummy error code where the CPU pushes none, then the vector. */
	.section .stubs, "ax"
	.code64
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept NVEC
	.balign 16
	.if vec < 32
	.if ((ERRMASK >> vec) & 1) == 0
	pushq $0
	.endif
	pushq $vec
	jmp exc_common
	.else
	pushq $0
	pushq $vec
	jmp irq_common
	.endif
	.set vec, vec + 1
	.endr
	.balign 16
	.globl isr_stubs_end
isr_stubs_end:

	.text
exc_common:
	mov %rsp, %rdi
	call exception_handler		/* does not return */

irq_common:
	push %rax
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	mov 72(%rsp), %edi
	call irq_handler
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rax
	add $16, %rsp
	iretq

/* Fill the PML4 and PDPT (in BSS, zeroed by the loader). */
.macro FILL_TABLES
	movl $(pdpt + 0x23), pml4
	movl $(pd + 0x0000 + 0x23), pdpt
	movl $(pd + 0x1000 + 0x23), pdpt + 8
	movl $(pd + 0x2000 + 0x23), pdpt + 16
	movl $(pd + 0x3000 + 0x23), pdpt + 24
.endm

/* Data segments from our GDT; FS and GS null. Same bytes in 32-bit and
 * 64-bit mode. */
.macro LOAD_DATA_SEGS
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
.endm

	.text
/* Linux x86 64-bit boot protocol: long mode, paging on, interrupts off,
 * RSI = zero page. */
	.code64
	.globl _start
_start:
	cli
	FILL_TABLES
	lgdt gdt_desc
	mov $pml4, %eax
	mov %rax, %cr3
	LOAD_DATA_SEGS
	mov $boot_stack_top, %esp
	lidt idt_desc
	mov %rsi, %rdi
	mov $BOOT_LINUX, %esi
	call kmain
	jmp halt_forever

/* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info. */
	.code32
	.globl pvh_start
pvh_start:
	cli
	lgdt gdt_desc
	LOAD_DATA_SEGS
	FILL_TABLES
	mov %ebx, %edi
	mov $pvh64, %ebp
	jmp enter_long

/* APs arrive here from the trampoline in 32-bit protected mode. */
ap_start32:
	LOAD_DATA_SEGS
	mov $ap64, %ebp
	/* fall through */

/* 32-bit protected mode -> long mode on our tables; continue at EBP. */
enter_long:
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $(CR0_PG | CR0_PE), %eax
	mov %eax, %cr0
	ljmp $KERNEL_CS64, $long_common

	.code64
long_common:
	LOAD_DATA_SEGS
	mov %ebp, %ebp
	jmp *%rbp

pvh64:
	mov $boot_stack_top, %esp
	lidt idt_desc
	mov %edi, %edi
	mov $BOOT_PVH, %esi
	call kmain
	jmp halt_forever

ap64:
	mov ap_stack_top, %rsp
	lidt idt_desc
	call ap_main
	/* fall through */

	.globl halt_forever
halt_forever:
	cli
	hlt
	jmp halt_forever

/* AP real-mode trampoline, copied to TRAMPOLINE_ADDR (SIPI vector
 * TRAMPOLINE_ADDR >> 12). CS = TRAMPOLINE_ADDR >> 4, IP = 0. */
	.code16
	.globl trampoline_start, trampoline_end
trampoline_start:
	cli
	lgdtl %cs:(tramp_gdtr - trampoline_start)
	mov %cr0, %eax
	orl $CR0_PE, %eax
	mov %eax, %cr0
	ljmpl $KERNEL_CS32, $ap_start32
	.balign 4
tramp_gdtr:
	.word gdt_end - gdt - 1
	.long gdt
trampoline_end:
	.code64

	.data
	.balign 16
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08: 32-bit code, flat */
	.quad 0x00af9b000000ffff	/* 0x10: 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x18: data, flat */
gdt_end:
	.balign 8
	.word 0, 0, 0
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	.balign 8
	.word 0, 0, 0
	.globl idt_desc
idt_desc:
	.word idt_end - idt - 1
	.quad idt

	.balign 16
idt:
	.set vec, 0
	.rept NVEC
	.set h, STUB_BASE + 16 * vec
	.quad (h & 0xffff) | (KERNEL_CS64 << 16) | (0x8e << 40) | ((h >> 16) << 48)
	.quad 0
	.set vec, vec + 1
	.endr
idt_end:

/* Page directories: 2048 2 MiB pages identity-mapping 0-4 GiB; the top GiB
 * (MMIO: LAPIC, IOAPIC, virtio) uncached. Accessed/dirty preset. */
	.section .data.pd, "aw"
	.balign 4096
pd:
	.set i, 0
	.rept 2048
	.if i >= 1536
	.quad (i << 21) | 0xfb
	.else
	.quad (i << 21) | 0xe3
	.endif
	.set i, i + 1
	.endr

	.bss
	.balign 4096
	.globl pml4
pml4:
	.skip 4096
pdpt:
	.skip 4096
boot_stack:
	.skip BOOT_STACK_SIZE
boot_stack_top:
