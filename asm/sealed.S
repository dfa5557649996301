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

/* TABLE_AT start, end, idx, key, fail: is the register `key` the u64 at
 * index `idx` (a register, an untrusted hint from the sealed entry) of the
 * read-only table [start, end) (linker symbols)? `idx < n` and
 * `table[idx] == key`: exactly membership, whatever `idx` says (a wrong
 * hint can only refuse), in O(1) instead of a binary search. Jumps to
 * `fail` otherwise. Clobbers rcx, rdx; `idx` and `key` must be neither. */
.macro TABLE_AT start, end, idx, key, fail
    leaq \start(%rip), %rcx
    leaq \end(%rip), %rdx
    subq %rcx, %rdx
    shrq $3, %rdx                   /* n */
    cmpq %rdx, \idx
    jae \fail
    cmpq \key, (%rcx,\idx,8)
    jne \fail
.endm

/* CHECKED_ENTRY ptr, site, target, kind, bytes, fail: read the entry
 * `ptr` (after LIVE_ENTRY) once, each field into its register, and check
 * those values against the read-only data alone, not against what `seal`
 * concluded in ordinary memory (DESIGN §11): the site is in
 * .shadowcall_sites; the kind is known; a call/jmp has its target in
 * .shadowcall_targets (each found at the index the entry's kind word
 * hints, TABLE_AT: a forged hint can only refuse) and the bytes opcode | rel32 << 8 with
 * rel32 = target - (site + 5) in 32 signed bits; a nop/ret has target 0 and
 * the fixed bytes. The caller uses only these registers afterwards, never
 * the entry again: what is checked is what is used, even if the sealed area
 * changed meanwhile. Jumps to `fail` otherwise. Clobbers rax, rcx, rdx,
 * rsi; `ptr` and the four outputs must be none of them, and distinct. */
.macro CHECKED_ENTRY ptr, site, target, kind, bytes, fail
    movq {ENTRY_SITE}(\ptr), \site
    movq {ENTRY_TARGET}(\ptr), \target
    movq {ENTRY_KIND}(\ptr), %rsi  /* kind | site index << 8 | target index << 36 */
    movq {ENTRY_BYTES}(\ptr), \bytes
    movq %rsi, \kind
    andq ${KIND_MASK}, \kind
    movq %rsi, %rax
    shrq ${SITE_INDEX_SHIFT}, %rax
    andq ${INDEX_MASK}, %rax
    TABLE_AT __sites_start, __sites_end, %rax, \site, \fail
    cmpq ${KIND_NOP}, \kind
    je .Lce_nop\@
    cmpq ${KIND_RET}, \kind
    je .Lce_ret\@
    cmpq ${KIND_CALL}, \kind
    je .Lce_rel\@
    cmpq ${KIND_JMP}, \kind
    jne \fail
.Lce_rel\@:
    shrq ${TARGET_INDEX_SHIFT}, %rsi
    TABLE_AT __targets_start, __targets_end, %rsi, \target, \fail
    movl ${OPC_CALL_REL32}, %ecx
    cmpq ${KIND_CALL}, \kind
    je .Lce_op\@
    movl ${OPC_JMP_REL32}, %ecx
.Lce_op\@:
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
    jmp .Lce_done\@
.Lce_nop\@:
    movabsq ${NOP5_WORD}, %rcx
    jmp .Lce_fixed\@
.Lce_ret\@:
    movabsq ${RET_WORD}, %rcx
.Lce_fixed\@:
    testq \target, \target
    jnz \fail
    cmpq %rcx, \bytes
    jne \fail
.Lce_done\@:
.endm

