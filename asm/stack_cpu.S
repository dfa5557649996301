/* The CPU of a stack address, from the host's static stack layout (no
 * per-CPU data): the link-time symbols sc_stacks, SC_CPU_STACKS_SIZE and
 * SC_MAX_CPUS, which the host defines. Used by the crate's bp.S and by a
 * host's own asm (the reference kernel's poke.S and recover.S). Each
 * includer purges it at its end. */

/* STACK_CPU fail: rax (an address in the static stack area: an SSP, or an
 * RSP on an AP or IST stack) := the CPU whose stack area holds it. Jumps to
 * `fail` outside the area; rdx := its offset in that area. Clobbers rcx. */
.macro STACK_CPU fail
    .pushsection .rodata
    .balign 8
.Lstack_cpu_size\@:                /* the DIV's memory operand */
    .quad SC_CPU_STACKS_SIZE
    .popsection
    leaq sc_stacks(%rip), %rcx
    subq %rcx, %rax
    jb \fail
    xorl %edx, %edx
    divq .Lstack_cpu_size\@(%rip)
    cmpq $SC_MAX_CPUS, %rax
    jae \fail
.endm
