/* Writes through this CPU's private text alias (kernel/src/mm.rs), in asm so
 * that no address, byte or length passes through memory another CPU could
 * change between its check and its store (the third review raced spilled
 * Rust locals of the earlier writer). Each routine derives everything from
 * its register arguments, read-only data (the live sealed batch, linker
 * symbols) and the static stack layout, checks it, and writes: loads this
 * CPU's private poking tables, maps each target page at the alias, stores,
 * and goes back to the shared tables. The caller holds the poke lock with
 * interrupts off (mm::PokeWindow). An exception taken meanwhile switches the
 * CPU to the shared tables for good (entry.S `sc_isr_common`): the stores
 * that follow fault and the caller redoes the write (patching::poke_retrying).
 * Pulled in by kernel/src/mm.rs with global_asm!. */

.section .text.entry, "ax"

/* rax := this CPU's index (from SSP with shadow stacks, else from RSP and
 * the static layout: the boot stack is CPU 0's). Clobbers rcx, rdx. */
.macro POKE_CPU
    /* With shadow stacks: the CPU whose stack area holds SSP (RSP may come
     * back from a trap frame; SSP cannot be forged). */
    movq %cr4, %rax
    btq ${CR4_CET_BIT}, %rax
    jnc 0f
    rdsspq %rax
    jmp 1f
0:  movq %rsp, %rax
    leaq boot_stack_bottom(%rip), %rcx
    cmpq %rcx, %rax
    jb 1f
    leaq boot_stack_top(%rip), %rcx
    cmpq %rcx, %rax
    ja 1f
    xorl %eax, %eax
    jmp 2f
1:  STACK_CPU sc_poke_bad
2:
.endm

/* r8 := the alias PTE address, r9 := the private PML4 of CPU rax (from
 * POKE_CPU). Clobbers rax. */
.macro POKE_TABLES_OF
    imulq ${POKE_TABLES_SIZE}, %rax
    leaq sc_shared_tables+{POKE_TABLES_OFF}(%rip), %r9
    addq %rax, %r9
    leaq {POKE_PT_OFF}+8*{ALIAS_PT_INDEX}(%r9), %r8
.endm

/* r8 := this CPU's alias PTE address, r9 := its private PML4. Clobbers
 * rax, rcx, rdx. */
.macro POKE_TABLES
    POKE_CPU
    POKE_TABLES_OF
.endm

/* Map the sealed area's page that holds the magic word at the alias (PTE
 * at r8; inside the private tables): rdx := the magic word's address
 * there. Clobbers rax, rcx. A `lock cmpxchg` through it is an atomic
 * compare-and-swap on the magic word itself (one physical word, whatever
 * the mapping), the only read-modify-write any CPU does on it. */
.macro ALIAS_MAGIC
    leaq __sealed_start+{SEALED_STATE}(%rip), %rdx
    movq %rdx, %rax
    andq $-4096, %rax
    movabsq ${ALIAS_FLAGS}, %rcx
    orq %rcx, %rax
    movq %rax, (%r8)
    movabsq ${ALIAS_VA}, %rcx
    invlpg (%rcx)
    andl $4095, %edx
    addq %rcx, %rdx
.endm

/* r15 := the address of the writer word (emul::record::WRITER_WORD) on the
 * record page of CPU rax (from POKE_CPU; rax kept), or 0 without shadow
 * stacks (CR4.CET clear: no WRSS, and no threat model to exclude).
 * Clobbers rcx. */
.macro WRITER_WORD_OF
    xorl %r15d, %r15d
    movq %cr4, %rcx
    btq ${CR4_CET_BIT}, %rcx
    jnc 7f
    movq %rax, %r15
    imulq ${RECORD_PAGE_SIZE}, %r15
    leaq sc_tramp_records+{WRITER}(%rip), %rcx
    addq %rcx, %r15
7:
.endm

/* This CPU's writer word (r15, if any) := \value (0 or 1), with WRSS. */
.macro WRITER_SET value
    testq %r15, %r15
    jz 7f
    movl $\value, %ecx
    wrssq %rcx, (%r15)
7:
.endm

/* Store byte %bl at text/rodata/sealed address %r12 through the alias (PTE
 * at r8). Clobbers rax, rcx, rdx. */
.macro POKE_BYTE
    movq %r12, %rax
    andq $-4096, %rax
    movabsq ${ALIAS_FLAGS}, %rcx
    orq %rcx, %rax
    movq %rax, (%r8)
    movabsq ${ALIAS_VA}, %rdx
    invlpg (%rdx)
    movq %r12, %rcx
    andl $4095, %ecx
    movb %bl, (%rdx,%rcx)
.endm

/* Enter / leave the private tables. */
.macro POKE_ENTER
    movq %r9, %cr3
.endm
.macro POKE_LEAVE
    movq $0, (%r8)
    leaq sc_shared_tables(%rip), %rax
    movq %rax, %cr3
.endm

/* rdi = a sealed entry: it must be one of the live batch's entries (index <
 * len of the array the read-only header describes) and what the read-only
 * tables allow (sealed.S CHECKED_ENTRY: registered site and target, bytes
 * of its kind; each field read once, only those values used). r10 := site,
 * r11 := its new bytes; the site and its 5 bytes must lie in kernel text.
 * Clobbers rax, rcx, rdx, rsi, r8, r9. */
.macro POKE_ENTRY
    LIVE_ENTRY %rdi, sc_poke_bad
    CHECKED_ENTRY %rdi, %r10, %r9, %r8, %r11, sc_poke_bad
    leaq __text_start(%rip), %rax
    cmpq %rax, %r10
    jb sc_poke_bad
    leaq __text_end-{SITE_LEN}(%rip), %rax
    cmpq %rax, %r10
    ja sc_poke_bad
.endm

.macro SAVE
    pushq %rbx
    pushq %r12
.endm
.macro RESTORE
    popq %r12
    popq %rbx
.endm

/* One patching CPU at a time, decided in asm: r8 := this CPU's alias PTE
 * (POKE_TABLES) is set to the site's page before the text check (it stays
 * non-zero until POKE_LEAVE), then, after a full fence, every other CPU's
 * alias PTE must be 0 (Dekker: of two step writers racing, at least one
 * sees the other's PTE and refuses). The alias PTEs lie in the page tables,
 * which no ordinary store reaches (threat model), and the patcher's own
 * lock (mm::POKE_LOCK, ordinary memory) keeps them 0 whenever another CPU
 * may poke: a second step writer only runs with that lock forged. So the
 * text check that follows and the stores after it are not interleaved
 * with another CPU's. Clobbers rax, rcx. */
.macro POKE_CLAIM
    movq %r10, %rax
    andq $-4096, %rax
    movabsq ${ALIAS_FLAGS}, %rcx
    orq %rcx, %rax
    movq %rax, (%r8)
    mfence
    leaq sc_shared_tables+{POKE_TABLES_OFF}+{POKE_PT_OFF}+8*{ALIAS_PT_INDEX}(%rip), %rax
    movl ${MAX_CPUS}, %ecx
.Lclaim_cpu\@:
    cmpq %r8, %rax
    je .Lclaim_next\@
    cmpq $0, (%rax)
    jne sc_poke_bad                 /* another CPU is poking: refuse */
.Lclaim_next\@:
    addq ${POKE_TABLES_SIZE}, %rax
    decl %ecx
    jnz .Lclaim_cpu\@
.endm

/* The start of the three step writers: checks (the entry; this CPU alone
 * pokes), then `check`, a macro that reads the site's text (readable
 * through the normal mapping, r10 = site, r11 = its new bytes; may clobber
 * rax, rcx, rdx) and jumps to sc_poke_bad unless the step may go ahead from
 * what text holds now; then the private tables, r12 := the site, rbx := its
 * new bytes. */
.macro POKE_STEP_BEGIN check
    SAVE
    POKE_ENTRY
    POKE_TABLES
    POKE_CLAIM
    \check
    POKE_ENTER
    movq %r10, %r12
    movq %r11, %rbx
.endm

/* The text preconditions of the steps (DESIGN §5): what each writer may
 * write onto, read from text (read-only data), never from the patcher's
 * choice of step (ordinary memory). Text at a site of the live batch is
 * then always its old instruction, int3 followed by anything, or the
 * entry's whole new instruction. */

/* Step 1: int3 over anything is an instruction boundary the #BP handler
 * owns: no precondition. */
.macro TEXT_ANY
.endm

/* Step 2: only behind step 1's int3 (writing the tails again is fine). */
.macro TEXT_INT3
    cmpb ${INT3}, (%r10)
    jne sc_poke_bad
.endm

/* Step 3: bytes 1..4 are the entry's new tails, and byte 0 is step 1's
 * int3, or already the new first byte (the whole new instruction: the
 * rewrite of REWRITE_STEPS or of a redone step, which writes the same byte
 * again). Never the new first byte over other tails. */
.macro TEXT_TAILS_WRITTEN
    movq %r11, %rax
    shrq $8, %rax
    cmpl %eax, 1(%r10)
    jne sc_poke_bad
    movzbl (%r10), %eax
    cmpb ${INT3}, %al
    je .Ltails_ok\@
    cmpb %r11b, %al
    jne sc_poke_bad
.Ltails_ok\@:
.endm

/* From here to sc_poke_region_end: an NMI or #MC taken here gives the
 * interrupted registers back from the WRSS-only save page (entry.S
 * ISR_CET_IST), not from its trap frame. */
.globl sc_poke_region_start, sc_poke_region_end
sc_poke_region_start:

/* void sc_poke_int3(const SealedEntry *e): step 1 at e's site. */
.globl sc_poke_int3
sc_poke_int3:
    POKE_STEP_BEGIN TEXT_ANY
    movb ${INT3}, %bl
    POKE_BYTE
    POKE_LEAVE
    RESTORE
    ret


/* void sc_poke_tails(const SealedEntry *e): step 2, bytes 1..4, only
 * behind an int3. */
.globl sc_poke_tails
sc_poke_tails:
    POKE_STEP_BEGIN TEXT_INT3
.rept {SITE_LEN}-1
    incq %r12
    shrq $8, %rbx
    POKE_BYTE
.endr
    POKE_LEAVE
    RESTORE
    ret

/* void sc_poke_head(const SealedEntry *e): step 3, byte 0, only onto the
 * int3 before the entry's own new tails. */
.globl sc_poke_head
sc_poke_head:
    POKE_STEP_BEGIN TEXT_TAILS_WRITTEN
    POKE_BYTE
    POKE_LEAVE
    RESTORE
    ret

/* void sc_poke_sealed(u64 offset, const u8 *src, u64 len): copy into the
 * sealed area at `offset`, past its magic word: {MAGIC_LEN} <= offset and
 * offset + len <= the area's size. The bytes come from ordinary memory;
 * the publisher validates the area in asm before the batch goes live
 * (sc_poke_publish, sealed.S SEALED_VALID). Inside the private tables,
 * this CPU's writer word (its record page, WRSS) is raised, then, after a
 * full fence, the magic word must be 0: neither live nor claimed by a
 * publisher (Dekker with sc_poke_publish's claim and scan: either this
 * writer sees the claim and refuses, or the publisher sees this word and
 * waits for it to drop, which it does only after the last store). Never
 * while a #BP exit may still read an entry of the previous batch: every
 * CPU's in-exit count (on its record page, written only with WRSS by its
 * own exits) must be 0; the writer waits for that, at most
 * {SEALED_WAIT_SPINS} rounds, then refuses. Every refusal leaves the
 * window and lowers the writer word first. An exception inside the window
 * takes this CPU out of it for good (entry.S): the stores after fault, and
 * the word stays raised until the patcher redoes the write. */
.globl sc_poke_sealed
sc_poke_sealed:
    SAVE
    pushq %r13
    pushq %r14
    pushq %r15
    cmpq ${MAGIC_LEN}, %rdi
    jb sc_poke_bad
    leaq __sealed_end(%rip), %rax
    leaq __sealed_start(%rip), %rcx
    subq %rcx, %rax                 /* the area's size */
    cmpq %rax, %rdi
    ja sc_poke_bad
    subq %rdi, %rax
    cmpq %rax, %rdx
    ja sc_poke_bad
    leaq (%rcx,%rdi), %r12          /* first destination byte */
    movq %rsi, %r13                 /* source */
    movq %rdx, %r14                 /* bytes left */
    POKE_CPU
    WRITER_WORD_OF
    POKE_TABLES_OF
    POKE_ENTER
    WRITER_SET 1
    /* The raised word is visible to every CPU before the magic word is
     * read. */
    mfence
    cmpq $0, __sealed_start+{SEALED_STATE}(%rip)
    jne 12f                         /* live or claimed: refuse */
    /* Dekker with BPX_ENTRY (asm/bp.S): the magic word is 0 and visible to
     * all (cleared by sc_poke_unseal's locked compare-and-swap) before the
     * counts are read; an exit raises its count, fences, then reads the
     * magic word. So either that exit sees no live batch and refuses, or
     * this scan sees its count. */
    movq ${SEALED_WAIT_SPINS}, %rbx
8:  leaq sc_tramp_records+{IN_EXIT}(%rip), %rax
    movl ${MAX_CPUS}, %ecx
9:  cmpq $0, (%rax)
    jne 10f
    addq ${RECORD_PAGE_SIZE}, %rax
    decl %ecx
    jnz 9b
    jmp 11f
10: pause
    decq %rbx
    jnz 8b
    jmp 12f                         /* an exit stays in flight: refuse */
11: testq %r14, %r14
    jz 4f
3:  movb (%r13), %bl
    POKE_BYTE
    incq %r12
    incq %r13
    decq %r14
    jnz 3b
    /* Every store is globally visible before the word drops: the CR3
     * write of POKE_LEAVE serializes. */
4:  POKE_LEAVE
    WRITER_SET 0
    popq %r15
    popq %r14
    popq %r13
    RESTORE
    ret
12: POKE_LEAVE
    WRITER_SET 0
    jmp sc_poke_bad

/* void sc_poke_publish(void): make the sealed batch live, decided here:
 *  1. claim: compare-and-swap the magic word 0 -> SEALED_PENDING | this
 *     CPU (through the alias: atomic). Found this CPU's own claim: an
 *     earlier attempt that an exception cut short (the patcher redoes the
 *     write), taken over. Found SEALED_MAGIC: an earlier attempt that
 *     completed before an exception made the patcher redo it; nothing to
 *     do (a live batch is a validated one). Anything else (another CPU's
 *     claim): refuse, nothing written.
 *  2. exclude: every CPU's writer word must be 0 (waits at most
 *     {SEALED_WAIT_SPINS} rounds). The claim's locked instruction orders
 *     it before these loads; a writer raises its word, fences, then reads
 *     the magic word: a writer that is not seen here sees the claim and
 *     refuses, and one seen here has finished (its stores visible) once
 *     its word is 0. No other CPU writes the area from here on while the
 *     word is claimed or live.
 *  3. validate: sealed.S SEALED_VALID on the area as it now is.
 *  4. publish: compare-and-swap SEALED_PENDING | this CPU -> SEALED_MAGIC.
 * A failed step 2 or 3 swaps the claim back to 0 and refuses. All of it
 * runs in one window: an exception inside takes this CPU out of it for
 * good (entry.S), so the final swap (an alias store) happens only if
 * nothing else ran on this CPU since the claim; and only this CPU's
 * publisher ever swaps this CPU's claim. Hence SEALED_MAGIC in the word
 * implies the area passed SEALED_VALID and no writer has stored since. */
.globl sc_poke_publish
sc_poke_publish:
    SAVE
    pushq %r13
    pushq %r14
    pushq %r15
    POKE_CPU
    movabsq ${SEALED_PENDING}, %r14
    orq %rax, %r14                  /* this CPU's claim */
    POKE_TABLES_OF
    movq %r8, %r12                  /* SEALED_VALID clobbers r8 */
    POKE_ENTER
    ALIAS_MAGIC
    xorl %eax, %eax
    lock cmpxchgq %r14, (%rdx)
    je 13f
    cmpq %r14, %rax
    je 13f                          /* this CPU's own claim: take it over */
    movabsq ${SEALED_LIVE}, %rcx
    cmpq %rcx, %rax
    jne 16f                         /* another claim: refuse */
    jmp 15f                         /* already live: done */
13: movq ${SEALED_WAIT_SPINS}, %rbx
8:  leaq sc_tramp_records+{WRITER}(%rip), %rax
    movl ${MAX_CPUS}, %ecx
9:  cmpq $0, (%rax)
    jne 10f
    addq ${RECORD_PAGE_SIZE}, %rax
    decl %ecx
    jnz 9b
    jmp 11f
10: pause
    decq %rbx
    jnz 8b
    jmp 14f                         /* a writer stays: unclaim, refuse */
11: SEALED_VALID 14f
    movq %r12, %r8
    ALIAS_MAGIC
    movq %r14, %rax
    movabsq ${SEALED_LIVE}, %rcx
    lock cmpxchgq %rcx, (%rdx)
    jne 16f                         /* the claim is gone: refuse */
15: POKE_LEAVE
    popq %r15
    popq %r14
    popq %r13
    RESTORE
    ret
14: movq %r12, %r8
    ALIAS_MAGIC
    movq %r14, %rax
    xorl %ecx, %ecx
    lock cmpxchgq %rcx, (%rdx)      /* unclaim (only this CPU's claim) */
16: POKE_LEAVE
    jmp sc_poke_bad

/* void sc_poke_unseal(void): retire the live batch, magic word
 * SEALED_MAGIC -> 0 (compare-and-swap through the alias). Already 0: an
 * earlier attempt completed before an exception made the patcher redo it.
 * Anything else (a publisher's claim: the area is being validated) is
 * refused, nothing written. */
.globl sc_poke_unseal
sc_poke_unseal:
    SAVE
    POKE_TABLES
    POKE_ENTER
    ALIAS_MAGIC
    movabsq ${SEALED_LIVE}, %rax
    xorl %ecx, %ecx
    lock cmpxchgq %rcx, (%rdx)
    je 5f
    testq %rax, %rax
    je 5f
    POKE_LEAVE
    jmp sc_poke_bad
5:  POKE_LEAVE
    RESTORE
    ret

/* void sc_poke_tramp(void): the trampoline's bytes, copied from the
 * read-only symbol {TRAMP_SRC} ({TRAMP_LEN} bytes, a build-time constant:
 * shadowcall::tramp::TRAMP_BYTES) into the trampoline page (a linker
 * symbol), once only: onto the page's build-time int3 fill. No argument:
 * nothing the copy uses passes through memory an attacker writes. The rest
 * of the page keeps its int3 fill; the patcher proves the whole page by
 * decoding text after (patching::init). */
.globl sc_poke_tramp
sc_poke_tramp:
    SAVE
    pushq %r13
    pushq %r14
    leaq sc_tramp_page(%rip), %r12
    cmpb ${INT3}, (%r12)
    jne sc_poke_bad
    leaq {TRAMP_SRC}(%rip), %r13
    movl ${TRAMP_LEN}, %r14d
    POKE_TABLES
    POKE_ENTER
6:  movb (%r13), %bl
    POKE_BYTE
    incq %r12
    incq %r13
    decq %r14
    jnz 6b
    POKE_LEAVE
    popq %r14
    popq %r13
    RESTORE
    ret

/* A check failed: never write. */
sc_poke_bad:
    ud2
sc_poke_region_end:

.purgem LIVE_ENTRY
.purgem TABLE_AT
.purgem CHECKED_ENTRY
.purgem SEALED_VALID
.purgem STACK_CPU
