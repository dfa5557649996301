/* The CPU of a stack address, from the static stack layout (no per-CPU
 * data): one macro for every asm file that needs it (entry.S, poke.S,
 * recover.S). Each includer purges it at its end. */

/* STACK_CPU fail: rax (an address in the static stack area: an SSP, or an
 * RSP on an AP or IST stack) := the CPU whose stack area holds it. Jumps to
 * `fail` outside the area. Clobbers rcx, rdx. */
.macro STACK_CPU fail
    leaq sc_stacks(%rip), %rcx
    subq %rcx, %rax
    jb \fail
    xorl %edx, %edx
    movq ${CPU_STACKS_SIZE}, %rcx
    divq %rcx
    cmpq ${MAX_CPUS}, %rax
    jae \fail
.endm
