/* Constants shared by boot.S, link.ld and the C code. */
#ifndef RAYGUEST_LAYOUT_H
#define RAYGUEST_LAYOUT_H

#define KERNEL_BASE	0x100000	/* load and link address (1 MiB) */
#define STUB_BASE	KERNEL_BASE	/* interrupt stubs come first */
#define NVEC		96		/* IDT entries: 32 exceptions + 64 */

#define KERNEL_CS32	0x08
#define KERNEL_CS64	0x10
#define KERNEL_DS	0x18

#define BOOT_LINUX	1		/* kmain(info = boot_params, ...) */
#define BOOT_PVH	2		/* kmain(info = hvm_start_info, ...) */

#define BOOT_STACK_SIZE	16384
#define TRAMPOLINE_ADDR	0x10000		/* SIPI vector 0x10 */

/* Interrupt vectors: 0x20 + GSI for GSIs 0..47, then local sources. */
#define VEC_GSI_BASE	0x20
#define MAX_GSI		48
#define VEC_TIMER	0x50
#define VEC_WAKE	0x51
#define VEC_SPURIOUS	0x5f

#endif
