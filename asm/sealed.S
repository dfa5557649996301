/* Shared by entry.S and poke.S (concatenated in front of each; each purges
 * the macros at its end, since all global_asm! of the crate form one module).
 *
 * LIVE_ENTRY ptr, fail: is `ptr` one of the live sealed batch's entries?
 * `ptr` lies inside the sealed area past its header, the batch is live (its
 * magic word) and `ptr` indexes the entry array its read-only header
 * describes (aligned, index < len): no stale entry beyond it, no entry
 * forged elsewhere. Jumps to `fail` otherwise. Clobbers rax,
 * rcx, r10; `ptr` must be none of them. */
.macro LIVE_ENTRY ptr, fail
    leaq __sealed_start+{SEALED_HEADER_SIZE}(%rip), %rax
    cmpq %rax, \ptr
    jb \fail
    leaq __sealed_end-{ENTRY_SIZE}(%rip), %rax
    cmpq %rax, \ptr
    ja \fail
    leaq __sealed_start(%rip), %rax
    movabsq ${SEALED_LIVE}, %rcx
    cmpq %rcx, {SEALED_STATE}(%rax)
    jne \fail
    movq \ptr, %r10
    subq %rax, %r10
    subq {SEALED_ENTRIES_OFF}(%rax), %r10
    testq ${ENTRY_SIZE}-1, %r10
    jnz \fail
    shrq ${ENTRY_SHIFT}, %r10
    cmpq {SEALED_LEN}(%rax), %r10
    jae \fail
.endm

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
