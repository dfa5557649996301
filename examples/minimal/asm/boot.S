/* The example's boot path: GRUB's `multiboot2` enters _start32 in 32-bit
 * protected mode, paging off, at the load address (1 MiB). It builds one
 * set of 4-level page tables (4 KiB pages) that maps physical [0, 4 MiB) twice: at 0
 * (only to survive the switch; kmain removes it) and at KERNEL_VMA, where
 * the kernel is linked. Then long mode, a jump into the high half, kmain.
 * Symbols of the high half are reached at (sym - KERNEL_VMA) while paging is off. */

.set KERNEL_VMA, {KERNEL_VMA}
.set MB2_HEADER_MAGIC, 0xE85250D6
.set MB2_ARCH_I386, 0
.set MB2_HEADER_LEN, 24         /* the 16-byte header and the 8-byte end tag */
.set CR0_WP, 1 << 16
.set CR0_PG, 1 << 31
.set CR4_PAE, 1 << 5
.set MSR_EFER, 0xC0000080
.set EFER_LME, 1 << 8
.set PTE_P_W, 0x3
.set PAGE_SHIFT, 12
.set PT_ENTRIES, 1024            /* two page tables: 4 MiB */
.set PAGE_TABLE_SIZE, 4096
.set PML4_HIGH, 511             /* KERNEL_VMA = PML4 511, PDPT 510, PD 0 */
.set PDPT_HIGH, 510
.set BOOT_CS, 0x08

.section .multiboot2, "a"
.align 8
    .long MB2_HEADER_MAGIC
    .long MB2_ARCH_I386
    .long MB2_HEADER_LEN
    .long (1 << 32) - (MB2_HEADER_MAGIC + MB2_ARCH_I386 + MB2_HEADER_LEN)  /* checksum */
    .word 0, 0                  /* end tag: type 0, flags 0, size 8 */
    .long 8

.section .text.boot32, "ax"
.code32
.globl _start32
_start32:
    cli
    movl %eax, %edi             /* the Multiboot2 magic, kmain's first argument */
    movl %ebx, %esi             /* the boot information (physical), its second */
    movl $((boot_pdpt_low - KERNEL_VMA) + PTE_P_W), boot_pml4 - KERNEL_VMA
    movl $((boot_pdpt_high - KERNEL_VMA) + PTE_P_W), boot_pml4 - KERNEL_VMA + PML4_HIGH * 8
    movl $((boot_pd - KERNEL_VMA) + PTE_P_W), boot_pdpt_low - KERNEL_VMA
    movl $((boot_pd - KERNEL_VMA) + PTE_P_W), boot_pdpt_high - KERNEL_VMA + PDPT_HIGH * 8
    movl $((boot_pt - KERNEL_VMA) + PTE_P_W), boot_pd - KERNEL_VMA
    movl $((boot_pt - KERNEL_VMA) + PAGE_TABLE_SIZE + PTE_P_W), boot_pd - KERNEL_VMA + 8
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $PAGE_SHIFT, %eax
    orl $PTE_P_W, %eax
    movl %eax, boot_pt - KERNEL_VMA(,%ecx,8)
    incl %ecx
    cmpl $PT_ENTRIES, %ecx
    jb 1b

    movl $(boot_pml4 - KERNEL_VMA), %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_WP), %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $BOOT_CS, $start64_low

.code64
start64_low:
    movabsq $start64, %rax
    jmp *%rax

.align 16
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    /* 64-bit code, DPL 0 */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

.section .text
start64:
    xorl %eax, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi             /* upper halves are undefined after the switch */
    movl %esi, %esi
    leaq boot_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    call kmain
    ud2

/* Exception vectors 0..{FAULT_VECTORS}-1: one {FAULT_STUB_SIZE}-byte stub each
 * (the IDT points at example_fault_stubs + vector * size), all ending in
 * example_fault(vector, rsp at entry), which reports and never returns. */
.balign {FAULT_STUB_SIZE}
.globl example_fault_stubs
example_fault_stubs:
.set vector, 0
.rept {FAULT_VECTORS}
    .balign {FAULT_STUB_SIZE}
    movl $vector, %edi
    jmp fault_common
.set vector, vector + 1
.endr
fault_common:
    movq %rsp, %rsi
    andq $-16, %rsp
    call example_fault
    ud2

.section .bss.boot, "aw", @nobits
.align 4096
.globl boot_pml4, boot_pt, boot_stack, boot_stack_top
boot_pml4: .skip 4096
boot_pdpt_low: .skip 4096
boot_pdpt_high: .skip 4096
boot_pd: .skip 4096
boot_pt: .skip 2 * 4096
boot_stack: .skip {STACK_SIZE}
boot_stack_top:
