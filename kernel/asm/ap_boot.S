/* Application-processor start-up.
 *
 * The boot CPU copies [sc_ap_tramp_start, sc_ap_tramp_end) to AP_TRAMPOLINE
 * (below 1 MiB) and sends INIT-SIPI-SIPI with vector AP_TRAMPOLINE >> 12.
 * The AP starts there in real mode with CS = AP_TRAMPOLINE >> 4, IP = 0; the
 * code only uses offsets from its start and the absolute AP_TRAMPOLINE, so
 * it runs wherever it was assembled. It enters 32-bit protected mode
 * (paging still off, so the page's NX mapping does not matter) and jumps to
 * sc_ap_start32 in kernel text, which turns on long mode with the kernel's
 * page tables (sc_ap_cr3) and calls ap_main(sc_ap_index) on sc_ap_stack.
 * These start variables are shared by all APs: after an AP misses its
 * start-up timeout, smp::start_aps starts no further AP (a slow AP may
 * still read them). */

.set AP_TRAMPOLINE, {AP_TRAMPOLINE}

.section .rodata
.globl sc_ap_tramp_start, sc_ap_tramp_end
.code16
sc_ap_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - sc_ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(AP_TRAMPOLINE + ap_pm - sc_ap_tramp_start)
.code32
ap_pm:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $sc_ap_start32, %eax
    jmp *%eax
.align 8
ap_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF        /* 32-bit code, flat */
    .quad 0x00CF92000000FFFF        /* data, flat */
ap_gdt_end:
ap_gdt_ptr:
    .word ap_gdt_end - ap_gdt - 1
    .long AP_TRAMPOLINE + ap_gdt - sc_ap_tramp_start
sc_ap_tramp_end:

.section .text.boot, "ax"
.code32
sc_ap_start32:
    movl sc_ap_cr3, %eax
    ENTER_LONG_MODE sc_ap_start64
.code64
sc_ap_start64:
    LOAD_DATA_SEGMENTS
    movq sc_ap_stack(%rip), %rsp
    movq sc_ap_index(%rip), %rdi
    xorl %ebp, %ebp
    call ap_main
1:  cli
    hlt
    jmp 1b

.section .data
.align 8
.globl sc_ap_cr3, sc_ap_stack, sc_ap_index
sc_ap_cr3:   .quad 0
sc_ap_stack: .quad 0
sc_ap_index: .quad 0
