/* Shared by bp.S, publish.S and poke.S (concatenated in front of each; each
 * purges the macros it uses at its end, since all global_asm! of a crate
 * form one module: publish.S purges SEALED_VALID, bp.S the others).
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


/* SEALED_VALID fail: may every user trust the sealed area's content (all
 * but its magic word) without checking it again? The publisher runs this
 * with every other writer of the area excluded (the reference kernel's
 * poke.S sc_poke_publish, DESIGN §8.2), so what it accepts is what is live
 * until the batch retires. Reads only the sealed area (its read-only
 * mapping), the read-only tables and linker symbols, each header field
 * once; decides in registers. Requires:
 *  H1 the header is the exact layout SealedBatch::from_raw accepts for
 *     its len (total_len and the magic aside): 1 <= len < 2^32, depth =
 *     the bit length of len (so 1..32), keys_off = the header's size,
 *     slots_off = keys_off + 8 * 2^depth, entries_off = slots_off +
 *     4 * 2^depth (a multiple of 8 for depth >= 1), and entries_off +
 *     ENTRY_SIZE * len <= the area's size (no sum can wrap: each term is
 *     below 2^38); so no part overlaps the header or another part;
 *  H2 every tree node k in [1, 2^depth): its key is PAD_KEY (u64::MAX),
 *     or its slot (u32) < len and entries[slot].site == key;
 *  H3 every entry i < len passes CHECKED_ENTRY (registered site at its
 *     hint, one of the four kinds, a call/jmp target registered at its
 *     hint and the bytes of that call/jmp, a nop/ret with target 0 and its
 *     fixed bytes).
 * Jumps to `fail` otherwise. Clobbers rax, rbx, rcx, rdx, rsi, rdi, r8,
 * r9, r10, r11 (rbx being the only callee-saved one). */
.macro SEALED_VALID fail
    leaq __sealed_start(%rip), %rsi
    movq {SEALED_LEN}(%rsi), %r11       /* len */
    movq {SEALED_DEPTH}(%rsi), %rbx     /* depth */
    movq {SEALED_KEYS_OFF}(%rsi), %r8
    movq {SEALED_SLOTS_OFF}(%rsi), %r9
    movq {SEALED_ENTRIES_OFF}(%rsi), %r10
    movl %r11d, %eax
    cmpq %rax, %r11
    jne \fail                           /* len >= 2^32 */
    bsrq %r11, %rcx
    jz \fail                            /* len == 0 */
    incq %rcx                           /* the bit length of len: 1..32 */
    cmpq %rcx, %rbx
    jne \fail
    movl $1, %edi
    shlq %cl, %rdi                      /* nodes = 2^depth */
    cmpq ${SEALED_HEADER_SIZE}, %r8
    jne \fail
    leaq (%r8,%rdi,8), %rax             /* u64 keys */
    cmpq %rax, %r9
    jne \fail
    leaq (%r9,%rdi,4), %rax             /* u32 slots */
    cmpq %rax, %r10
    jne \fail
    movq %r11, %rax
    shlq ${ENTRY_SHIFT}, %rax
    addq %r10, %rax                     /* the entries' end */
    leaq __sealed_end(%rip), %rcx
    subq %rsi, %rcx                     /* the area's size */
    cmpq %rcx, %rax
    ja \fail
    addq %rsi, %r8                      /* keys */
    addq %rsi, %r9                      /* slots */
    addq %rsi, %r10                     /* entries */
    movq %rdi, %rbx                     /* k, from nodes - 1 down to 1 */
.Lsv_node\@:
    decq %rbx
    jz .Lsv_nodes_done\@
    movq (%r8,%rbx,8), %rax             /* key[k], once */
    cmpq $-1, %rax                      /* PAD_KEY */
    je .Lsv_node\@
    movl (%r9,%rbx,4), %ecx             /* slot[k], once */
    cmpq %r11, %rcx
    jae \fail
    shlq ${ENTRY_SHIFT}, %rcx
    cmpq {ENTRY_SITE}(%r10,%rcx), %rax
    jne \fail
    jmp .Lsv_node\@
.Lsv_nodes_done\@:
    movq %r10, %rdi                     /* entry pointer */
    movq %r11, %rbx
    shlq ${ENTRY_SHIFT}, %rbx
    addq %r10, %rbx                     /* the entries' end (len >= 1) */
.Lsv_entry\@:
    CHECKED_ENTRY %rdi, %r8, %r9, %r10, %r11, \fail
    addq ${ENTRY_SIZE}, %rdi
    cmpq %rbx, %rdi
    jb .Lsv_entry\@
.endm
