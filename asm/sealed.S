/* Shared by entry.S and poke.S (concatenated in front of each; each purges
 * the macros at its end, since all global_asm! of the crate form one module).
 *
 * LIVE_ENTRY ptr, fail: is `ptr` one of the live sealed batch's entries?
 * `ptr` lies inside the sealed area past its header, the batch is live (its
 * magic word) and `ptr` indexes the entry array its read-only header
 * describes (aligned, index < len): no stale entry beyond it, no entry
 * forged elsewhere. Jumps to `fail` otherwise. Clobbers rax,
 * rcx, rsi; `ptr` must be none of them. */
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
    movq \ptr, %rsi
    subq %rax, %rsi
    subq {SEALED_ENTRIES_OFF}(%rax), %rsi
    testq ${ENTRY_SIZE}-1, %rsi
    jnz \fail
    shrq ${ENTRY_SHIFT}, %rsi
    cmpq {SEALED_LEN}(%rax), %rsi
    jae \fail
.endm

/* TABLE_HAS start, end, key, fail: is the register `key` one of the u64s of
 * the read-only table [start, end) (linker symbols)? A binary search of
 * fixed length (ceil(log2 n) halvings, no early exit, one compare each): the
 * last word <= key is kept in [base, base + n); at the end it must equal
 * key. The tables are sorted at build time (xtask post-link step) and
 * checked at boot (patching::init). On an unsorted table the search can
 * only miss: it succeeds on an equal word, never otherwise, so the worst is
 * a refusal. Jumps to `fail` when absent. Clobbers rax, rcx, rdx, rsi; `key`
 * must be none of them. */
.macro TABLE_HAS start, end, key, fail
    leaq \start(%rip), %rax        /* base */
    leaq \end(%rip), %rcx
    subq %rax, %rcx
    shrq $3, %rcx                   /* n: words in [base, base + n) */
    jz \fail
    cmpq $1, %rcx
    jbe .Lth_last\@
.Lth_loop\@:
    movq %rcx, %rsi
    shrq $1, %rsi                   /* half */
    subq %rsi, %rcx                 /* n -= half */
    leaq (%rax,%rsi,8), %rdx        /* base + half */
    cmpq \key, (%rdx)
    cmovbeq %rdx, %rax              /* [base + half] <= key: base += half */
    cmpq $1, %rcx
    ja .Lth_loop\@
.Lth_last\@:
    cmpq \key, (%rax)
    jne \fail
.endm

/* CHECKED_ENTRY ptr, site, target, kind, bytes, fail: read the entry
 * `ptr` (after LIVE_ENTRY) once, each field into its register, and check
 * those values against the read-only data alone, not against what `seal`
 * concluded in ordinary memory (DESIGN §11): the site is in
 * .shadowcall_sites; the kind is known; a call/jmp has its target in
 * .shadowcall_targets and the bytes opcode | rel32 << 8 with
 * rel32 = target - (site + 5) in 32 signed bits; a nop/ret has target 0 and
 * the fixed bytes. The caller uses only these registers afterwards, never
 * the entry again: what is checked is what is used, even if the sealed area
 * changed meanwhile. Jumps to `fail` otherwise. Clobbers rax, rcx, rdx,
 * rsi; `ptr` and the four outputs must be none of them, and distinct. */
.macro CHECKED_ENTRY ptr, site, target, kind, bytes, fail
    movq {ENTRY_SITE}(\ptr), \site
    movq {ENTRY_TARGET}(\ptr), \target
    movq {ENTRY_KIND}(\ptr), \kind
    movq {ENTRY_BYTES}(\ptr), \bytes
    movabsq ${NOP5_WORD}, %rcx
    cmpq ${KIND_NOP}, \kind
    je .Lce_fixed\@
    movabsq ${RET_WORD}, %rcx
    cmpq ${KIND_RET}, \kind
    je .Lce_fixed\@
    movl ${OPC_CALL_REL32}, %ecx
    cmpq ${KIND_CALL}, \kind
    je .Lce_rel\@
    movl ${OPC_JMP_REL32}, %ecx
    cmpq ${KIND_JMP}, \kind
    jne \fail
.Lce_rel\@:
    movq \target, %rax
    subq \site, %rax
    subq ${SITE_LEN}, %rax          /* rel = target - (site + 5) */
    movslq %eax, %rsi
    cmpq %rsi, %rax
    jne \fail                       /* not a rel32 */
    movl %eax, %eax
    shlq $8, %rax
    orq %rax, %rcx
    cmpq %rcx, \bytes
    jne \fail
    TABLE_HAS __targets_start, __targets_end, \target, \fail
    jmp .Lce_site\@
.Lce_fixed\@:
    testq \target, \target
    jnz \fail
    cmpq %rcx, \bytes
    jne \fail
.Lce_site\@:
    TABLE_HAS __sites_start, __sites_end, \site, \fail
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
