/* The #BP entry stub and its exits, and the sync words' writers: the
 * crate's asm (feature `entry`; src/entry.rs). The host's memory layout
 * comes from link-time symbols it defines (README "Use it in your kernel",
 * DESIGN §12): sc_stacks, SC_CPU_STACKS_SIZE, SC_MAX_CPUS (the CPU whose
 * stack area holds an SSP), SC_NMI_STACK_OFF, SC_IST_STACK_SIZE (its NMI
 * stack), sc_tramp_records (the record pages), sc_tramp_page, the sealed
 * area and the site/target tables; and the Rust entry points sc_bp_handler
 * and sc_bp_exit_refused. */

.pushsection .text.entry, "ax"

/* ---- #BP ---------------------------------------------------------------
 * Move the hardware frame down by {BP_GAP} bytes before anything else,
 * leaving a gap under the interrupted stack pointer so the handler can
 * emulate a push onto the interrupted stack. The memory operand of a push is
 * computed before RSP drops, so each push copies the next-lower word.
 *
 * In production builds a fast path (sc_bp_fast*, below; DESIGN §6)
 * emulates a live batch's usual sites in the stub itself, from RDSSP, the
 * shadow frame and the sealed batch validated at its publication, and
 * returns; everything else takes the slow path:
 *
 * sc_bp_handler(&mut TrapFrame, F) decides (F = RDSSP here: the base of the
 * 3-slot shadow frame the CPU pushed) and returns (action, argument) in
 * RAX:RDX. Every shadow-stack write of the #BP path happens below, in the
 * exit for that action, from values that come only from
 *   - the shadow stack, found with RDSSP (F, the frame's LIP at [F+8]),
 *   - read-only memory: the sealed batch entry in RDX (checked to lie in
 *     the sealed area, to be live, of the right kind, for the site LIP-1,
 *     and against the read-only site/target tables; each field read once),
 *     the trampoline's fixed addresses, this CPU's trampoline
 *     records (a page mapped as shadow stack: only WRSS writes it),
 * and never from the trap frame or any other ordinary memory. Each action
 * also checks that the saved RIP is the value it derives (a frame changed
 * after the Rust checks is refused, nothing written). With shadow stacks
 * off the handler changes the frame itself and returns BPX_PLAIN. */
/* The fast path's frame (below) is the TrapFrame less its lowest FAST
 * bytes (ssp, shadow_push, r15..r10), not yet pushed: it uses only the
 * registers PUSH_GPRS_LOW saved. */
.set FAST, {FRAME_R9}

/* FAST_LOOKUP fail: rbp = S. The live sealed batch's entry for S: rcx :=
 * its kind word, r8 := its target; `fail` if the batch is not live or has
 * no entry for S. Clobbers rax, rbx, rdx. A live batch was validated in asm
 * when it was published (sealed.S SEALED_VALID, DESIGN §8.2, §11: its
 * header's bounds, every tree node's entry, every entry against the
 * read-only site and target tables) and cannot change while this CPU's
 * in-exit count is raised, so its header, tree and entries are used as
 * they are. The search is SealedBatch::lookup's: `depth` Eytzinger steps,
 * the last `depth` of 32 unrolled ones, entered by a computed jump (a
 * direct jump into this stub's own text). */
.macro FAST_LOOKUP fail
    leaq __sealed_start(%rip), %r8
    movabsq ${SEALED_LIVE}, %rax
    cmpq %rax, {SEALED_STATE}(%r8)
    jne \fail
    movq {SEALED_DEPTH}(%r8), %rcx
    movq {SEALED_KEYS_OFF}(%r8), %rdx
    addq %r8, %rdx                  /* the search tree's keys */
    movl $1, %ebx
    imulq $(.Lfl_step_end\@ - .Lfl_step\@), %rcx
    leaq .Lfl_steps_end\@(%rip), %rax
    subq %rcx, %rax
    jmp *%rax
.Lfl_step\@:
    cmpq %rbp, (%rdx,%rbx,8)        /* CF = key < S */
    adcq %rbx, %rbx                 /* k = 2k + (key < S) */
.Lfl_step_end\@:
    .rept 31
    cmpq %rbp, (%rdx,%rbx,8)
    adcq %rbx, %rbx
    .endr
.Lfl_steps_end\@:
    movq %rbx, %rax                 /* undo the trailing right steps and */
    notq %rax                       /* the last left one: k := the node of */
    bsfq %rax, %rcx                 /* the smallest key >= S (0: none) */
    incl %ecx
    shrq %cl, %rbx
    jz \fail
    cmpq %rbp, (%rdx,%rbx,8)
    jne \fail
    movq {SEALED_SLOTS_OFF}(%r8), %rax
    addq %r8, %rax
    movl (%rax,%rbx,4), %eax        /* the node's entry index */
    shlq ${ENTRY_SHIFT}, %rax
    addq {SEALED_ENTRIES_OFF}(%r8), %rax
    movq {ENTRY_KIND}(%r8,%rax), %rcx
    movq {ENTRY_TARGET}(%r8,%rax), %r8
.endm

/* FAST_PUSH: the emulated call's normal-stack half. The saved RSP R must be
 * one the exits can produce (R-8 .. R inside the window above this frame,
 * 8-aligned), so the slot R-8 lies on this stack above the frame (else the
 * handler); then [R-8] := S+5 (rbp = S), RSP := R-8, RIP := T (r8). rax :=
 * S+5. Clobbers rcx, rdx. */
/* SHADOW_GAP_REBUILD f, t, cs, ret, tmp: the shadow gap's writes (DESIGN
 * §7.3), for the shadow frame at F (`f`, from RDSSP) of a trap at S: one
 * call with a non-zero displacement takes a shadow slot (SSP = F-8), its
 * normal-stack copy is dropped, and the frame is rebuilt one slot lower:
 *   [F-8] = F+16 (previous SSP)  [F] = T (LIP)  [F+8] = CS
 *   [F+16] = S+5 (`ret`: the emulated call's shadow slot)
 * IRET pops that frame and leaves SSP = F+16 with S+5 on top. Clobbers
 * `tmp`. */
.macro SHADOW_GAP_REBUILD f, t, cs, ret, tmp
    call .Lsg_slot\@
    int3
.Lsg_slot\@:
    addq $8, %rsp
    leaq 16(\f), \tmp
    wrssq \tmp, -8(\f)
    wrssq \t, (\f)
    wrssq \cs, 8(\f)
    wrssq \ret, 16(\f)
.endm

/* HOOK_NMI flag: self-test builds only: a (software) NMI right here, once,
 * if the hook byte `flag` is set (its handler forges the frame). */
.macro HOOK_NMI flag
.if {TEST_HOOKS}
    cmpb $0, \flag(%rip)
    je .Lhook_nmi\@
    movb $0, \flag(%rip)
    int $2
.Lhook_nmi\@:
.endif
.endm

/* RECORD_CLAIM ssp, end, tmp, fail: rdi (a CPU's record page) := its
 * first record that is free or bound to `ssp` (left by an abandoned
 * emulation at the same SSP); `fail` if none. Clobbers `end`, `tmp`. */
.macro RECORD_CLAIM ssp, end, tmp, fail
    leaq {RECORDS_PER_PAGE}*{RECORD_SIZE}(%rdi), \end
.Lrc_next\@:
    movq {REC_SSP}(%rdi), \tmp
    testq \tmp, \tmp
    je .Lrc_done\@
    cmpq \ssp, \tmp
    je .Lrc_done\@
    addq ${RECORD_SIZE}, %rdi
    cmpq \end, %rdi
    jb .Lrc_next\@
    jmp \fail
.Lrc_done\@:
.endm

/* RECORD_FIND ssp, end, fail: rdi (a CPU's record page) := its record
 * bound to `ssp`; `fail` if none. Clobbers `end`. */
.macro RECORD_FIND ssp, end, fail
    leaq {RECORDS_PER_PAGE}*{RECORD_SIZE}(%rdi), \end
.Lrf_next\@:
    cmpq \ssp, {REC_SSP}(%rdi)
    je .Lrf_done\@
    addq ${RECORD_SIZE}, %rdi
    cmpq \end, %rdi
    jb .Lrf_next\@
    jmp \fail
.Lrf_done\@:
.endm

/* FAST_POP shadow: the emulated ret's normal-stack half. The saved RSP R
 * must lie in the window above this frame, 8-aligned (else the handler);
 * with `shadow` = 1 [R] must equal rcx (X, the shadow stack's top), with 0
 * rcx := [R]; then RSP := R+8, RIP := X. Clobbers rax, rdx. */
.macro FAST_POP shadow
    movq {FRAME_RSP}-FAST(%rsp), %rdx
    leaq {BP_RSP_MIN}-FAST(%rsp), %rax
    cmpq %rax, %rdx
    jb sc_bp_slow
    leaq {BP_RSP_MAX}-FAST(%rsp), %rax
    cmpq %rax, %rdx
    ja sc_bp_slow
    testb $7, %dl
    jnz sc_bp_slow
.if \shadow
    cmpq %rcx, (%rdx)
    jne sc_bp_slow
.else
    movq (%rdx), %rcx
.endif
    addq $8, %rdx
    movq %rdx, {FRAME_RSP}-FAST(%rsp)
    movq %rcx, {FRAME_RIP}-FAST(%rsp)
.endm

.macro FAST_PUSH
    movq {FRAME_RSP}-FAST(%rsp), %rax
    leaq -8(%rax), %rcx
    leaq {BP_RSP_MIN}-FAST(%rsp), %rdx
    cmpq %rdx, %rcx
    jb sc_bp_slow
    leaq {BP_RSP_MAX}-FAST(%rsp), %rdx
    cmpq %rdx, %rax
    ja sc_bp_slow
    testb $7, %al
    jnz sc_bp_slow
    movq %rcx, {FRAME_RSP}-FAST(%rsp)
    movq %r8, {FRAME_RIP}-FAST(%rsp)
    leaq {SITE_LEN}(%rbp), %rax     /* S+5 */
    movq %rax, (%rcx)
.endm

/* The host's IDT entry for vector 3: an interrupt gate, no IST. */
.globl sc_isr_3
sc_isr_3:
    subq ${BP_GAP}, %rsp
    pushq {BP_GAP}+32(%rsp)         /* SS */
    pushq {BP_GAP}+32(%rsp)         /* RSP */
    pushq {BP_GAP}+32(%rsp)         /* RFLAGS */
    pushq {BP_GAP}+32(%rsp)         /* CS */
    pushq {BP_GAP}+32(%rsp)         /* RIP */
    pushq $0
    pushq $3
    PUSH_GPRS_LOW
/* From here to sc_bpx_region_end: a critical region (the SSP read, the fast
 * path, the #BP exits and, at its end, the sync words' writers), which hold
 * the operands of their decisions and WRSS in registers. An NMI or #MC taken
 * in between (the only interrupts possible: IF=0) keeps the registers it
 * interrupted on a page only WRSS writes and gives them back from there
 * (the host's NMI/#MC entries; the reference kernel's sc_isr_cet_ist). */
.globl sc_bpx_region_start, sc_bpx_region_end
sc_bpx_region_start:
    /* The fast path (DESIGN §6). In self-test builds it is off unless a
     * test turns it on (SC_T_FAST): their counters and injection points
     * live in the handler. A live batch's CALL, JMP or NOP for
     * the site S is emulated here, in one pass, with every check the exits
     * make (the entry in the sealed area, live, for S; S a registered site,
     * T a declared target, both from the read-only tables; the interrupted
     * shadow frame), every shadow-stack write derived from RDSSP and
     * read-only data, the registers saved only as far as it uses them
     * (PUSH_GPRS_LOW). Anything else, or any doubt: the handler
     * (sc_bp_slow), which decides from scratch. The sc_bp_fast* labels name
     * its parts for `cargo xtask trace`. */
sc_bp_fast:
.if {TEST_HOOKS}
    cmpb $0, SC_T_FAST(%rip)
    je sc_bp_slow
.endif
    /* A pre-filter, to keep the other traps cheap: no live batch, no fast
     * path. The decision is the look again below, after this CPU's in-exit
     * count is raised. */
    movabsq ${SEALED_LIVE}, %rax
    cmpq %rax, __sealed_start+{SEALED_STATE}(%rip)
    jne sc_bp_fast_idle
    /* Shadow stacks on or off, from CR4.CET (a register, not the ordinary
     * byte SC_SHSTK_ACTIVE: review 8). CR4.CET set implies CET support, so
     * RDSSP is defined (a NOP while S_CET.SH_STK_EN = 0). */
    movq %cr4, %rax
    btq ${CR4_CET_BIT}, %rax
    jnc sc_bp_fast_nocet
    xorl %esi, %esi
    rdsspq %rsi                     /* F */
    testq %rsi, %rsi
    jz sc_bp_fast_nocet
    /* This CPU: the one whose stack area holds F (static layout; SSP cannot
     * be forged), and whether F is on its NMI shadow stack: a #BP inside an
     * NMI handler returns without IRET (sc_bp_fast_return, §8.3). The mark
     * is r9 (a register: review 10 F6), kept to the return. */
    movq %rsi, %rax
    STACK_CPU sc_bp_slow            /* rdx := F's offset in the area */
    subq $SC_NMI_SHSTK_OFF, %rdx
    cmpq $SC_NMI_SHSTK_SIZE, %rdx
    sbbq %r9, %r9                   /* in an NMI: r9 = -1 (no IRET), else 0 */
    shlq ${RECORD_PAGE_SHIFT}, %rax
    leaq sc_tramp_records(%rip), %rdi
    addq %rax, %rdi                 /* this CPU's record page */
    movq 8(%rsi), %rbp
    subq $1, %rbp                   /* S = LIP-1, from the shadow frame */
    jb sc_bp_slow                   /* (never the tree's padding key) */
    leaq sc_tramp_page+{TRAMP_TRAP}(%rip), %rax
    cmpq %rax, %rbp
    je sc_bp_fast_tramp2
    /* This CPU's in-exit count + 1 (WRSS), visible to every CPU before the
     * magic word is read (Dekker with sc_poke_sealed, DESIGN §8.2), until
     * the entry's last read. */
    movq {IN_EXIT}(%rdi), %rax
    incq %rax
    wrssq %rax, {IN_EXIT}(%rdi)
    mfence
sc_bp_fast_lookup:
    FAST_LOOKUP sc_bp_fast_out
sc_bp_fast_kind:
    HOOK_NMI SC_T_FAST_NMI          /* sec_fast_path */
    movq {IN_EXIT}(%rdi), %rax      /* the entry's last read is done */
    decq %rax
    wrssq %rax, {IN_EXIT}(%rdi)
    cmpb ${KIND_CALL}, %cl
    je sc_bp_fast_call
    cmpb ${KIND_JMP}, %cl
    je sc_bp_fast_jmp
    cmpb ${KIND_RET}, %cl
    je sc_bp_fast_ret
    cmpb ${KIND_NOP}, %cl
    jne sc_bp_slow
sc_bp_fast_nop:
    leaq {SITE_LEN}(%rbp), %rax     /* 5-byte NOP: LIP := S+5 */
    movq %rax, {FRAME_RIP}-FAST(%rsp)
    wrssq %rax, 8(%rsi)
    jmp sc_bp_fast_return
sc_bp_fast_jmp:
    movq %r8, {FRAME_RIP}-FAST(%rsp) /* jmp T: LIP := T */
    wrssq %r8, 8(%rsi)
    jmp sc_bp_fast_return
sc_bp_fast_ret:
    /* ret (sc_bpx_ret): pop both stacks. The interrupted SSP right above
     * the frame; the normal stack's top, at the saved RSP R (inside the
     * window above this frame, 8-aligned), must equal the shadow stack's
     * top X = [F+24]; then RIP = LIP := X, RSP := R+8, previous SSP := F+32. */
    leaq 24(%rsi), %rax
    cmpq %rax, (%rsi)
    jne sc_bp_slow
    movq (%rax), %rcx               /* X */
    FAST_POP 1
    leaq 32(%rsi), %rax
    wrssq %rcx, 8(%rsi)
    wrssq %rax, (%rsi)
    jmp sc_bp_fast_return
sc_bp_fast_call:
    /* The interrupted SSP right above the frame (#BP has no IST). */
    leaq 24(%rsi), %rax
    cmpq %rax, (%rsi)
    jne sc_bp_slow
    /* The strategy is ordinary memory: a forged one only chooses between
     * two emulations that are each checked here (or the handler). */
    movzbl SC_CALL_STRATEGY(%rip), %ecx
    cmpl ${CODE_TRAMPOLINE}, %ecx
    je sc_bp_fast_tramp1
    cmpl ${CODE_SHADOW_GAP}, %ecx
    jne sc_bp_slow
    /* Shadow gap (sc_bpx_call_sg, DESIGN §7.3). F the first slot of its
     * page: the slot below may be a guard page (the handler's to refuse). */
    testl $0xff8, %esi
    jz sc_bp_slow
    FAST_PUSH
    movq 16(%rsi), %rdx             /* CS, from the shadow frame */
    SHADOW_GAP_REBUILD %rsi, %r8, %rdx, %rax, %rcx
    jmp sc_bp_fast_return

sc_bp_fast_tramp1:
    /* Trampoline, first trap (sc_bpx_tramp1, DESIGN §7.2): claim a record
     * on this CPU's record page (free, or left by an abandoned emulation at
     * the same SSP) bound to P = F+24 (rax) and the saved RSP, holding IF,
     * S and T; LIP := the trampoline entry, IF := 0 until the second trap. */
    RECORD_CLAIM %rax, %rdx, %rcx, sc_bp_slow
    wrssq %rax, {REC_SSP}(%rdi)
    movq {FRAME_RFLAGS}-FAST(%rsp), %rax
    btrq ${RFLAGS_IF_BIT}, %rax
    movq %rax, {FRAME_RFLAGS}-FAST(%rsp)
    setc %al
    movzbl %al, %eax
    orq {FRAME_RSP}-FAST(%rsp), %rax
    wrssq %rax, {REC_RSP_IF}(%rdi)
    wrssq %rbp, {REC_SITE}(%rdi)
    wrssq %r8, {REC_TARGET}(%rdi)
    leaq sc_tramp_page(%rip), %rax
    movq %rax, {FRAME_RIP}-FAST(%rsp)
    wrssq %rax, 8(%rsi)
    jmp sc_bp_fast_return

sc_bp_fast_tramp2:
    /* Trampoline, second trap (sc_bpx_tramp2 and the handler's second_trap,
     * DESIGN §7.2): the interrupted SSP P = [F] right above the frame, both
     * the trampoline's return addresses on top of it and of the normal
     * stack (R = the saved RSP, inside the window above this frame), and a
     * record of this CPU bound to P+16 and R+16. Then [P], [R] := T and
     * [P+8], [R+8] := S+5 (from the record), the record freed, IF as it was
     * at the first trap; LIP stays (the trampoline's ret). */
    leaq 24(%rsi), %rdx             /* P */
    cmpq %rdx, (%rsi)
    jne sc_bp_slow
    leaq sc_tramp_page+{TRAMP_RET2}(%rip), %rax
    cmpq %rax, (%rdx)
    jne sc_bp_slow
    leaq sc_tramp_page+{TRAMP_RET1}(%rip), %rbx
    cmpq %rbx, 8(%rdx)
    jne sc_bp_slow
    movq {FRAME_RSP}-FAST(%rsp), %rbp   /* R */
    leaq {BP_RSP_MIN}-FAST(%rsp), %rcx
    cmpq %rcx, %rbp
    jb sc_bp_slow
    leaq {BP_RSP_MAX}-8-FAST(%rsp), %rcx
    cmpq %rcx, %rbp                 /* R and R+8 inside the window */
    ja sc_bp_slow
    testl $7, %ebp
    jnz sc_bp_slow
    cmpq %rax, (%rbp)
    jne sc_bp_slow
    cmpq %rbx, 8(%rbp)
    jne sc_bp_slow
    leaq 16(%rdx), %rax             /* P+16: the first trap's SSP */
    RECORD_FIND %rax, %rcx, sc_bp_slow
    movq {REC_RSP_IF}(%rdi), %rbx
    leaq 16(%rbp), %rcx
    movq %rbx, %rax
    andq $-2, %rax
    cmpq %rcx, %rax                 /* bound to this normal stack too */
    jne sc_bp_slow
    movq {REC_TARGET}(%rdi), %rax
    movq {REC_SITE}(%rdi), %rcx
    addq ${SITE_LEN}, %rcx
    wrssq %rax, (%rdx)
    wrssq %rcx, 8(%rdx)
    xorl %r8d, %r8d
    wrssq %r8, {REC_SSP}(%rdi)
    movq %rax, (%rbp)
    movq %rcx, 8(%rbp)
    andl $1, %ebx
    shlq ${RFLAGS_IF_BIT}, %rbx
    orq %rbx, {FRAME_RFLAGS}-FAST(%rsp)
    jmp sc_bp_fast_return

sc_bp_fast_nocet:
    /* Without shadow stacks (classic): S from the saved RIP (there is no
     * shadow stack to protect); inside an NMI or not from RSP (on this
     * CPU's NMI stack: the same test as sc_bp_return). */
    xorl %r9d, %r9d
    movq %rsp, %rax
    STACK_CPU 1f                    /* outside the area: not an NMI stack */
    subq $SC_NMI_STACK_OFF, %rdx
    cmpq $SC_IST_STACK_SIZE, %rdx
    sbbq %r9, %r9                   /* in an NMI: -1 */
1:  movq {FRAME_RIP}-FAST(%rsp), %rbp
    subq $1, %rbp                   /* S (never the padding key) */
    jb sc_bp_slow
sc_bp_fast_nocet_lookup:
    FAST_LOOKUP sc_bp_slow
sc_bp_fast_nocet_kind:
    cmpb ${KIND_CALL}, %cl
    je 3f
    cmpb ${KIND_JMP}, %cl
    je 2f
    cmpb ${KIND_RET}, %cl
    je 4f
    cmpb ${KIND_NOP}, %cl
    jne sc_bp_slow
    leaq {SITE_LEN}(%rbp), %r8      /* NOP: RIP := S+5 */
2:  movq %r8, {FRAME_RIP}-FAST(%rsp) /* jmp T */
    jmp sc_bp_fast_return
3:  cmpb ${CODE_CLASSIC}, SC_CALL_STRATEGY(%rip)
    jne sc_bp_slow
    FAST_PUSH
    jmp sc_bp_fast_return
4:  FAST_POP 0                      /* ret: RIP := [R], RSP := R+8 */
    jmp sc_bp_fast_return

/* No live batch: the host's probe (the optional symbol sc_bp_probe, an int3
 * that is no site: the benchmark's bare trap) is returned from at once;
 * anything else goes to the handler. The saved RIP is compared: with shadow
 * stacks IRET resumes only at LIP, so a forged RIP cannot make another
 * trap return here (#CP); the probe is no registered site (Layout::check).
 * Inside an NMI it returns without IRET (sc_bp_fast_return). */
sc_bp_fast_idle:
    movq sc_bp_probe_ref(%rip), %rax
    incq %rax
    cmpq %rax, {FRAME_RIP}-FAST(%rsp)
    jne sc_bp_slow
    movq %cr4, %rax
    btq ${CR4_CET_BIT}, %rax
    jnc 2f
    xorl %eax, %eax
    rdsspq %rax
    testq %rax, %rax
    jz 2f
    STACK_CPU sc_bp_slow
    subq $SC_NMI_SHSTK_OFF, %rdx
    cmpq $SC_NMI_SHSTK_SIZE, %rdx
    sbbq %r9, %r9                   /* in an NMI: -1 */
    jmp sc_bp_fast_return
2:  xorl %r9d, %r9d
    movq %rsp, %rax
    STACK_CPU sc_bp_fast_return     /* outside the area: not an NMI stack */
    subq $SC_NMI_STACK_OFF, %rdx
    cmpq $SC_IST_STACK_SIZE, %rdx
    sbbq %r9, %r9

/* The end of the fast path: IRET, or inside an NMI handler (r9 non-zero,
 * above) the return without IRET that keeps NMIs blocked
 * (sc_bp_return_in_nmi, §8.3), from the whole TrapFrame. */
sc_bp_fast_return:
    testq %r9, %r9
    jnz sc_bp_fast_return_nmi
    POP_GPRS_LOW
    addq $16, %rsp                  /* vector, error code */
    iretq
sc_bp_fast_return_nmi:
    PUSH_GPRS_HIGH
    subq $16, %rsp                  /* TrapFrame.ssp, .shadow_push (unused) */
    jmp sc_bp_return_in_nmi

/* A miss after the in-exit count was raised: lower it, then the handler. */
sc_bp_fast_out:
    movq {IN_EXIT}(%rdi), %rax
    decq %rax
    wrssq %rax, {IN_EXIT}(%rdi)
sc_bp_slow:
    PUSH_GPRS_HIGH
    subq $16, %rsp                  /* TrapFrame.ssp, TrapFrame.shadow_push */
    movq $0, 8(%rsp)
    xorl %esi, %esi
    movq %cr4, %rax
    btq ${CR4_CET_BIT}, %rax
    jnc 1f
    rdsspq %rsi
1:  movq %rsi, (%rsp)
    movq %rsp, %rdi
    cld
    call sc_bp_handler
/* The handler's answer (RAX: an action, RDX: its argument). */
sc_bpx_dispatch:
    cmpq ${BPX_COUNT}, %rax
    jae sc_bpx_plain
    jmp *sc_bpx_table(,%rax,8)

/* IRET as the frame is. With shadow stacks that resumes at LIP: not at a
 * registered site's second byte (review 8 F1: a handler answering PLAIN for
 * a live site, from forged data). If LIP-1 holds an int3, it must not be a
 * registered site: RDX (the handler's hint, Patcher::plain_at) must be its
 * position in the read-only site table, sites[RDX-1] < LIP-1 < sites[RDX];
 * a wrong hint only refuses. */
sc_bpx_plain:
    movq %cr4, %rax
    btq ${CR4_CET_BIT}, %rax
    jnc sc_bp_return
    xorl %r8d, %r8d
    rdsspq %r8                      /* F; a NOP while SH_STK_EN = 0 */
    testq %r8, %r8
    jz sc_bp_return
    movq 8(%r8), %r10
    decq %r10                       /* LIP-1 */
    cmpb ${INT3}, (%r10)
    jne sc_bp_return
    leaq __sites_start(%rip), %rcx
    leaq __sites_end(%rip), %rax
    subq %rcx, %rax
    shrq $3, %rax                   /* n */
    cmpq %rax, %rdx
    ja sc_bpx_refuse
    testq %rdx, %rdx
    jz 1f
    cmpq %r10, -8(%rcx,%rdx,8)
    jae sc_bpx_refuse               /* sites[RDX-1] >= LIP-1 */
1:  cmpq %rax, %rdx
    je sc_bp_return
    cmpq %r10, (%rcx,%rdx,8)
    jbe sc_bpx_refuse               /* sites[RDX] <= LIP-1 */
    jmp sc_bp_return

/* r8 := F (SSP is F again: the handler's calls are popped), r9 := LIP. */
.macro BPX_FRAME
    rdsspq %r8
    movq 8(%r8), %r9
.endm

/* The entry in RDX, checked: one of the live batch's entries (sealed.S
 * LIVE_ENTRY) and what the read-only tables allow (sealed.S CHECKED_ENTRY),
 * of kind \kind, site + 1 == LIP. Its fields are read once: r12 := site,
 * r13 := target (r14 kind, r15 bytes); the exit uses only these registers
 * after. Meanwhile this CPU's in-exit count is raised (WRSS, on its record
 * page: rdi := that page), from before the magic word is read to after the
 * last read of the entry, so the sealed area is not rewritten in between
 * (poke.S sc_poke_sealed; DESIGN §8.2). Clobbers rax, rcx, rdx, rsi, r10. */
.macro BPX_ENTRY kind
    movq %rdx, %r10
    BPX_RECORD_PAGE
    movq {IN_EXIT}(%rdi), %rax
    incq %rax
    wrssq %rax, {IN_EXIT}(%rdi)
    /* The raised count is visible to every CPU before this CPU reads the
     * magic word (a store, then a load: Dekker with sc_poke_sealed). */
    mfence
    LIVE_ENTRY %r10, sc_bpx_refuse_entry
    CHECKED_ENTRY %r10, %r12, %r13, %r14, %r15, sc_bpx_refuse_entry
    BPX_LEAVE
    cmpq $\kind, %r14
    jne sc_bpx_refuse
    leaq 1(%r12), %rax
    cmpq %rax, %r9
    jne sc_bpx_refuse
.endm

/* The exit has read the entry for the last time: lower this CPU's in-exit
 * count (rdi: its record page). The loads before stay before this store
 * (x86 does not pass a load with a later store). */
.macro BPX_LEAVE
    movq {IN_EXIT}(%rdi), %rax
    decq %rax
    wrssq %rax, {IN_EXIT}(%rdi)
.endm

/* The interrupted SSP must be right above the frame (#BP has no IST). */
.macro BPX_SAME_STACK
    leaq 24(%r8), %r11
    cmpq %r11, (%r8)
    jne sc_bpx_refuse
.endm

/* RECORD_PAGE dst, fail: dst := the trampoline-record page of the CPU whose
 * stack area holds the address in rax (static layout arithmetic, no per-CPU
 * data); `fail` outside the area. Clobbers rax, rcx, rdx. */
.macro RECORD_PAGE dst, fail
    STACK_CPU \fail
    shlq ${RECORD_PAGE_SHIFT}, %rax
    leaq sc_tramp_records(%rip), \dst
    addq %rax, \dst
.endm

/* rdi := this CPU's trampoline-record page: the CPU whose stack area holds
 * F. Clobbers rax, rcx, rdx. */
.macro BPX_RECORD_PAGE
    movq %r8, %rax
    RECORD_PAGE %rdi, sc_bpx_refuse
.endm

/* Shadow gap: emulate `call T` at site S with one trap: after the checks,
 * SHADOW_GAP_REBUILD; the handler stored the same S+5 on the normal stack,
 * in the stub's gap. */
sc_bpx_call_sg:
    BPX_FRAME
    BPX_ENTRY {KIND_CALL}
    BPX_SAME_STACK
    movq %r13, %rcx                 /* T */
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    leaq 4(%r9), %rax               /* S+5 = LIP+4 */
    movq 16(%r8), %rdx              /* CS, from the shadow frame */
    HOOK_NMI SC_T_EXIT_NMI          /* sec_exit_nmi_regs */
    SHADOW_GAP_REBUILD %r8, %rcx, %rdx, %rax, %rsi
    jmp sc_bp_return

/* `jmp T`, and `call T` the classic way (the negative control: shadow stack
 * untouched, so T's ret raises #CP): LIP := T. */
sc_bpx_jmp:
    BPX_FRAME
    BPX_ENTRY {KIND_JMP}
    jmp 2f
sc_bpx_classic:
    BPX_FRAME
    BPX_ENTRY {KIND_CALL}
2:  movq %r13, %rcx                 /* T */
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    wrssq %rcx, 8(%r8)
    jmp sc_bp_return

/* 5-byte NOP: LIP := S+5. */
sc_bpx_nop:
    BPX_FRAME
    BPX_ENTRY {KIND_NOP}
    leaq 4(%r9), %rcx
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    wrssq %rcx, 8(%r8)
    jmp sc_bp_return

/* `ret`: pop both stacks. The return address is the top of the interrupted
 * shadow stack (the handler checked the normal stack's top equals it):
 * LIP := [F+24], previous SSP := F+32. */
sc_bpx_ret:
    BPX_FRAME
    BPX_ENTRY {KIND_RET}
    BPX_SAME_STACK
    movq (%r11), %rcx
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    wrssq %rcx, 8(%r8)
    addq $8, %r11
    wrssq %r11, (%r8)
    jmp sc_bp_return

/* Trampoline, first trap: claim a record on this CPU's record page (free,
 * or left by an abandoned emulation at the same SSP), bound to the
 * interrupted SSP (F+24) and RSP, holding IF, the site and the target; then
 * LIP := the trampoline entry and IF := 0 until the second trap. The SSP
 * word is written first, so a nested first trap (NMI) never picks a slot
 * being filled. */
sc_bpx_tramp1:
    BPX_FRAME
    BPX_ENTRY {KIND_CALL}
    BPX_SAME_STACK
    leaq sc_tramp_page(%rip), %rax
    cmpq %rax, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    RECORD_CLAIM %r11, %rsi, %rax, sc_bpx_refuse
    wrssq %r11, {REC_SSP}(%rdi)
    movq {FRAME_RFLAGS}(%rsp), %rax
    shrq ${RFLAGS_IF_BIT}, %rax
    andl $1, %eax
    orq {FRAME_RSP}(%rsp), %rax
    wrssq %rax, {REC_RSP_IF}(%rdi)
    wrssq %r12, {REC_SITE}(%rdi)
    wrssq %r13, {REC_TARGET}(%rdi)
    leaq sc_tramp_page(%rip), %rax
    wrssq %rax, 8(%r8)
    andq $~(1 << {RFLAGS_IF_BIT}), {FRAME_RFLAGS}(%rsp)
    jmp sc_bp_return

/* Trampoline, second trap at its int3: both the trampoline's return
 * addresses must be on top of the interrupted shadow stack P, and a record
 * of this CPU must be bound to P+16 (the SSP of its first trap). Then
 * [P] := target, [P+8] := site+5 (from the record), and the record is freed.
 * The handler rewrote the normal stack's two slots from the same record. */
sc_bpx_tramp2:
    BPX_FRAME
    leaq sc_tramp_page+{TRAMP_TRAP}+1(%rip), %rax
    cmpq %rax, %r9
    jne sc_bpx_refuse
    cmpq %rax, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    BPX_SAME_STACK
    leaq sc_tramp_page+{TRAMP_RET2}(%rip), %rax
    cmpq %rax, (%r11)
    jne sc_bpx_refuse
    leaq sc_tramp_page+{TRAMP_RET1}(%rip), %rax
    cmpq %rax, 8(%r11)
    jne sc_bpx_refuse
    leaq 16(%r11), %r10
    BPX_RECORD_PAGE
    RECORD_FIND %r10, %rsi, sc_bpx_refuse
    movq {REC_TARGET}(%rdi), %rax
    wrssq %rax, (%r11)
    movq {REC_SITE}(%rdi), %rax
    addq $5, %rax
    wrssq %rax, 8(%r11)
    xorl %eax, %eax
    wrssq %rax, {REC_SSP}(%rdi)
    jmp sc_bp_return

/* Resume at the site itself (LIP := LIP-1): an int3 at a registered site
 * that is not (yet) in the live batch is executed again, never resumed in
 * the middle of the instruction. */
sc_bpx_resume_site:
    BPX_FRAME
    leaq -1(%r9), %rcx
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    wrssq %rcx, 8(%r8)
    jmp sc_bp_return

/* Self-test probe `iret_rip_and_lip`: only the probe's own int3 can be sent
 * to the probe's own landing (both fixed addresses). */
sc_bpx_test_landing:
.if {TEST_HOOKS}
    BPX_FRAME
    leaq sc_t_iret_int3+1(%rip), %rax
    cmpq %rax, %r9
    jne sc_bpx_refuse
    leaq sc_t_iret_landing(%rip), %rcx
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    wrssq %rcx, 8(%r8)
    jmp sc_bp_return
.else
    jmp sc_bpx_refuse
.endif

/* ---- The end of every #BP exit --------------------------------------------
 * Outside an NMI handler: IRET. Inside one (the stub's frame lies on this
 * CPU's NMI stack: RSP against the static layout), IRET would end the CPU's
 * NMI blocking before the NMI handler has finished, and a second NMI would
 * find the NMI stack's shadow-stack token busy (#GP). So return without
 * IRET, as the CPU state after IRET would be, with NMIs still blocked:
 *   shadow stack (B = RDSSP, the frame IRET would pop; P' = [B], the SSP IRET
 *   would restore; X = [B+8], its LIP, which must equal the saved RIP):
 *     the slot RET will pop, P'-8, must hold X: it does for an emulated
 *     `ret` (the interrupted top); otherwise it is this frame's own CS slot
 *     B+16, rewritten to X with WRSS; INCSSP (P'-8-B)/8 slots (1..3).
 *   normal stack (R' = the saved RSP): [R'-8] := X, [R'-16] := RFLAGS.
 *   pop the registers, RSP := R'-16, POPFQ (IF, TF, DF, AC... as saved; RF
 *   cleared), RET: pops X from both stacks and compares them.
 * End state: RIP = X, RSP = R', SSP = P', RFLAGS as saved, NMIs still
 * blocked until the NMI handler's own IRET. R' is checked to be one the
 * exits can produce (interrupted RSP - 8 .. + 8, right above this frame), so
 * the stores below it land in the CPU's own (copied, dead) frame or above. */
sc_bp_return:
    movq %rsp, %rax
    STACK_CPU 9f                    /* rdx := RSP's offset in the CPU's area */
    subq $SC_NMI_STACK_OFF, %rdx
    cmpq $SC_IST_STACK_SIZE, %rdx
    jb sc_bp_return_in_nmi
9:  ISR_EXIT

sc_bp_return_in_nmi:
    /* R': only a return RSP the emulation can produce, right above this
     * frame (the saved RSP is ordinary memory: a forged one must not aim
     * the stores below, nor RSP itself, anywhere else). */
    movq {FRAME_RSP}(%rsp), %rcx
    leaq {BP_RSP_MIN}(%rsp), %rax
    cmpq %rax, %rcx
    jb 9b
    leaq {BP_RSP_MAX}(%rsp), %rax
    cmpq %rax, %rcx
    ja 9b
    testb $7, %cl
    jnz 9b
    movq {FRAME_RIP}(%rsp), %r9
    movq %cr4, %rax
    btq ${CR4_CET_BIT}, %rax
    jnc 2f
    xorl %r8d, %r8d
    rdsspq %r8                      /* a NOP while S_CET.SH_STK_EN = 0 */
    testq %r8, %r8
    jz 2f
    cmpq %r9, 8(%r8)
    jne 9b
    movq (%r8), %r10
    leaq -8(%r10), %r11
    cmpq %r9, (%r11)
    je 1f
    leaq 16(%r8), %rax
    cmpq %rax, %r11
    jne 9b
    wrssq %r9, (%r11)
1:  movq %r11, %rax
    subq %r8, %rax
    shrq $3, %rax
    jz 9b
    cmpq $3, %rax
    ja 9b
    incsspq %rax
    /* [R'-8] = X, [R'-16] = RFLAGS, [R'-24] = the saved RCX; RCX keeps
     * R'-24 (checked above) through the register pops: RSP is never loaded
     * from the frame again. */
2:  movq %r9, -8(%rcx)
    movq {FRAME_RFLAGS}(%rsp), %rax
    movq %rax, -16(%rcx)
    movq {FRAME_RCX}(%rsp), %rax
    movq %rax, -24(%rcx)
    subq $24, %rcx
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    addq $8, %rsp                   /* RCX: restored from R'-24 below */
    popq %rbx
    popq %rax
    movq %rcx, %rsp
    popq %rcx
    popfq
    retq

/* A check above failed: the frame or the state changed after the handler's
 * checks. Nothing was written; the handler reports it and refuses. Inside
 * BPX_ENTRY (rdi: the record page), the in-exit count is lowered first. */
sc_bpx_refuse_entry:
    BPX_LEAVE
sc_bpx_refuse:
    movq %rsp, %rdi
    movq %r8, %rsi                  /* F, from RDSSP */
    call sc_bp_exit_refused
    jmp sc_bp_return

/* ---- The sync protocol's words (DESIGN §8.2, §11) ----------------------
 * With shadow stacks on, which CPUs a sync waits for and whether they have
 * serialized are decided here, in registers, from shadow-stack pages only:
 * the generation on CPU 0's record page and each CPU's sync word on its own
 * record page (shadowcall::emul::record). Callers check that shadow stacks
 * are enforced first and call with IF=0: these lie in the #BP exits'
 * critical region, so an NMI or #MC that interrupts them hands their
 * registers back from the WRSS-only save page, not from its trap frame. */

/* void sc_sync_bump(void): a new generation, after the writes of the step it
 * follows (MFENCE on both sides): the round count + 1 in the high bits and
 * this CPU in the low GEN_CPU_BITS, so no two patchers ever write the same
 * value; also into this CPU's own-generation word, which its wait compares
 * with. */
.globl sc_sync_bump
sc_sync_bump:
    mfence
    rdsspq %rax
    STACK_CPU sc_sync_bad
    movq %rax, %rsi                 /* this CPU */
    shlq ${RECORD_PAGE_SHIFT}, %rax
    leaq sc_tramp_records(%rip), %rdi
    addq %rax, %rdi
    movq sc_tramp_records+{SYNC_GEN}(%rip), %rax
    shrq ${GEN_CPU_BITS}, %rax
    incq %rax
    shlq ${GEN_CPU_BITS}, %rax
    orq %rsi, %rax                  /* unique to this CPU's round */
    wrssq %rax, sc_tramp_records+{SYNC_GEN}(%rip)
    wrssq %rax, {MY_GEN}(%rdi)
    mfence
    ret

/* void sc_sync_ack(void): this CPU's sync word := generation + 1. The CPU
 * is the one whose stack area holds SSP (static layout); #UD outside it. */
.globl sc_sync_ack
sc_sync_ack:
    rdsspq %rax
    RECORD_PAGE %rdi, sc_sync_bad
    movq sc_tramp_records+{SYNC_GEN}(%rip), %rax
    incq %rax
    wrssq %rax, {SYNC_WORD}(%rdi)
    ret
sc_sync_bad:
    ud2

/* void sc_sync_wait_all(void): return once every online CPU's sync word
 * (non-zero) is the generation this CPU's last bump wrote, + 1 (its
 * own-generation word, re-read each time): each has acknowledged this very
 * round. If the shared generation no longer equals it, another patcher
 * bumped meanwhile (forged locks): #UD. */
.globl sc_sync_wait_all
sc_sync_wait_all:
    rdsspq %rax
    RECORD_PAGE %r8, sc_sync_bad    /* this CPU's record page */
    leaq sc_tramp_records+{SYNC_WORD}(%rip), %rdx
    movl $SC_MAX_CPUS, %ecx
1:  movq (%rdx), %rax
    testq %rax, %rax
    jz 3f
2:  movq {MY_GEN}(%r8), %rsi
    cmpq sc_tramp_records+{SYNC_GEN}(%rip), %rsi
    jne sc_sync_bad
    incq %rsi
    cmpq %rsi, %rax                 /* acknowledged exactly this round */
    je 3f
    pause
    movq (%rdx), %rax
    jmp 2b
3:  addq ${RECORD_PAGE_BYTES}, %rdx
    decl %ecx
    jnz 1b
    ret

sc_bpx_region_end:

.popsection

/* #BP exit actions, indexed by shadowcall::engine::Action (Plain = 0). */
.pushsection .rodata
.align 8
/* The host's optional probe int3 (0 without one: no trap is at 0+1). */
.weak sc_bp_probe
.globl sc_bp_probe_ref
sc_bp_probe_ref:
    .quad sc_bp_probe
sc_bpx_table:
    .quad sc_bpx_plain, sc_bpx_call_sg, sc_bpx_jmp, sc_bpx_classic, sc_bpx_nop
    .quad sc_bpx_ret, sc_bpx_tramp1, sc_bpx_tramp2, sc_bpx_resume_site, sc_bpx_test_landing
.popsection

.purgem PUSH_GPRS
.purgem POP_GPRS
.purgem PUSH_GPRS_LOW
.purgem PUSH_GPRS_HIGH
.purgem POP_GPRS_LOW
.purgem ISR_EXIT
.purgem LIVE_ENTRY
.purgem TABLE_AT
.purgem CHECKED_ENTRY
.purgem STACK_CPU
.purgem RECORD_PAGE
.purgem FAST_PUSH
.purgem FAST_POP
.purgem RECORD_CLAIM
.purgem RECORD_FIND
.purgem SHADOW_GAP_REBUILD
.purgem HOOK_NMI
.purgem FAST_LOOKUP
