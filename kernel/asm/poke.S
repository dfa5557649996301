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

/* r8 := this CPU's alias PTE address, r9 := its private PML4 (from RSP and
 * the static layout: the boot stack is CPU 0's). Clobbers rax, rcx, rdx. */
.macro POKE_TABLES
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
2:  imulq ${POKE_TABLES_SIZE}, %rax
    leaq sc_shared_tables+{POKE_TABLES_OFF}(%rip), %r9
    addq %rax, %r9
    leaq {POKE_PT_OFF}+8*{ALIAS_PT_INDEX}(%r9), %r8
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
 * sealed area at `offset`, past its magic word (published separately):
 * {MAGIC_LEN} <= offset and offset + len <= the area's size. The bytes come
 * from ordinary memory; the patcher verifies the read-only copy before it
 * publishes it, and every user checks each entry against the read-only
 * tables anyway (CHECKED_ENTRY). Never while a #BP exit may still read an
 * entry of the previous batch: every CPU's in-exit count (on its record
 * page, written only with WRSS by its own exits) must be 0; the writer
 * waits for that, at most {SEALED_WAIT_SPINS} rounds, then refuses. */
.globl sc_poke_sealed
sc_poke_sealed:
    SAVE
    pushq %r13
    pushq %r14
    /* Never while a batch is live: its header and entries must not change
     * under the exits and the step writers (the fourth review did). */
    leaq __sealed_start(%rip), %rax
    movabsq ${SEALED_LIVE}, %rcx
    cmpq %rcx, {SEALED_STATE}(%rax)
    je sc_poke_bad
    /* Dekker with BPX_ENTRY (entry.S): the magic word is 0 and visible to
     * all (cleared by sc_poke_unseal, whose CR3 write serialized) before
     * the counts are read; an exit raises its count, fences, then reads the
     * magic word. So either that exit sees no live batch and refuses, or
     * this scan sees its count. */
    mfence
    movq ${SEALED_WAIT_SPINS}, %r8
8:  leaq sc_tramp_records+{IN_EXIT}(%rip), %rax
    movl ${MAX_CPUS}, %ecx
9:  cmpq $0, (%rax)
    jne 10f
    addq ${RECORD_PAGE_SIZE}, %rax
    decl %ecx
    jnz 9b
    jmp 11f
10: pause
    decq %r8
    jnz 8b
    jmp sc_poke_bad                 /* an exit stays in flight: refuse */
11: cmpq ${MAGIC_LEN}, %rdi
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
    POKE_TABLES
    POKE_ENTER
    testq %r14, %r14
    jz 4f
3:  movb (%r13), %bl
    POKE_BYTE
    incq %r12
    incq %r13
    decq %r14
    jnz 3b
4:  POKE_LEAVE
    popq %r14
    popq %r13
    RESTORE
    ret

/* void sc_poke_publish(void) / sc_poke_unseal(void): the sealed batch's
 * magic word := SEALED_MAGIC / 0 (constants). */
.globl sc_poke_publish, sc_poke_unseal
sc_poke_publish:
    movabsq ${SEALED_LIVE}, %rsi
    jmp 5f
sc_poke_unseal:
    xorl %esi, %esi
5:  SAVE
    pushq %r13
    movq %rsi, %r13
    POKE_TABLES
    POKE_ENTER
    leaq __sealed_start+{SEALED_STATE}(%rip), %r12
.rept 8
    movq %r13, %rbx
    POKE_BYTE
    incq %r12
    shrq $8, %r13
.endr
    POKE_LEAVE
    popq %r13
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
.purgem STACK_CPU
