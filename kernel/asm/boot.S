/* Multiboot entry: 32-bit protected mode -> 64-bit long mode -> kmain.
 *
 * The boot page tables identity-map the first 1 GiB with 2 MiB pages; the
 * kernel replaces them with fine-grained tables (W^X, shadow stacks, guard
 * pages) before it runs any test. */

.set MB_MAGIC, 0x1BADB002
/* bit 1: give us the memory map fields; bit 16: use the address fields below
 * (lets QEMU -kernel load this ELF64 too). */
.set MB_FLAGS, 0x00010002

.set CR0_PE, 1 << 0
.set CR0_WP, 1 << 16
.set CR0_PG, 1 << 31
.set CR4_PAE, 1 << 5
.set MSR_EFER, 0xC0000080
.set EFER_LME, 1 << 8
.set EFER_NXE, 1 << 11
.set PTE_P_W, 0x3
.set PDE_P_W_PS, 0x83
.set BOOT_CS, 0x08
.set BOOT_DS, 0x10

/* 32-bit protected mode (paging off) -> long mode with the page tables
 * whose address is in %eax, then a far jump to the 64-bit `target`. */
.macro ENTER_LONG_MODE target
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $(EFER_LME | EFER_NXE), %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PE | CR0_WP | CR0_PG), %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $BOOT_CS, $\target
.endm

/* First thing in 64-bit mode: flat data segments, FS = GS = 0. */
.macro LOAD_DATA_SEGMENTS
    movw $BOOT_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
.endm

.section .multiboot, "a"
.align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header         /* header_addr */
    .long __kernel_start    /* load_addr */
    .long __data_end        /* load_end_addr */
    .long __bss_end         /* bss_end_addr */
    .long _start32          /* entry_addr */

.section .text.boot, "ax"
.code32
.globl _start32
_start32:
    cli
    cld
    movl $boot_stack_top, %esp
    movl %eax, %edi                 /* Multiboot magic */
    movl %ebx, %esi                 /* Multiboot info (physical) */

    movl $boot_pdpt, %eax
    orl $PTE_P_W, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $PTE_P_W, %eax
    movl %eax, boot_pdpt
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $PDE_P_W_PS, %eax
    movl %eax, boot_pd(,%ecx,8)
    movl $0, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 1b

    movl $boot_pml4, %eax
    ENTER_LONG_MODE start64

.code64
start64:
    LOAD_DATA_SEGMENTS
    /* The upper halves are undefined after the mode switch. */
    movl %edi, %edi
    movl %esi, %esi
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    call kmain
2:  cli
    hlt
    jmp 2b

.section .rodata.boot, "a"
.align 16
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 64-bit code, DPL0 */
    .quad 0x00CF92000000FFFF        /* data, DPL0 */
boot_gdt_end:
.align 4
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

/* The kernel stack (the boot CPU runs on it for good) with a guard page below
 * it that the final page tables leave unmapped. */
.section .bss.boot_stack, "aw", @nobits
.align 4096
.globl boot_stack_guard, boot_stack_bottom, boot_stack_top
boot_stack_guard:
    .skip 4096
boot_stack_bottom:
    .skip 65536
boot_stack_top:

.section .bss.boot_pt, "aw", @nobits
.align 4096
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4096
