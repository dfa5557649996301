/* Fault recovery points. Pulled in by kernel/src/recover.rs with
 * global_asm!, which substitutes the NAME constants from the Rust side.
 *
 * u64 sc_try_call(u64 (*f)(u64), u64 arg, struct TryCtx *ctx)
 * Saves the callee-saved registers, records RSP, RFLAGS and (for
 * diagnostics only) SSP in *ctx, and calls f(arg) with an indirect call.
 * That call pushes the address `sc_try_marker` on both stacks: on the shadow
 * stack it is the recovery point's **marker**, a fixed code address that only
 * this call can put there. A fault while f runs is unwound by
 * recover::fault: its shadow-stack side entirely by sc_unwind_shadow below,
 * which finds the marker by scanning the interrupted shadow stack upward
 * from the faulting frame and pops the shadow stack to just above it (never
 * to an SSP read from ordinary memory); recover::fault sets RSP to the
 * recorded value (checked against the marker and the return address on the
 * shadow stack) and resumes at sc_try_recover, which returns ~0 through the
 * same epilogue as a normal return. The final RET compares the return address
 * on both stacks, so the shadow stack decides where control goes.
 *
 * Normal-stack layout at the recorded RSP (TRY_RET_OFFSET = 7 words):
 *   [rsp-8] = sc_try_marker while f runs, [rsp] = padding, [rsp+8..+56] =
 *   r15 r14 r13 r12 rbp rbx, [rsp+56] = the caller's return address. */

.section .text.entry, "ax"
.globl sc_try_call, sc_try_recover, sc_try_marker
sc_try_call:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp                   /* keep the callee's stack 16-byte aligned */
    movq %rsp, {TRY_RSP}(%rdx)
    pushfq
    popq {TRY_RFLAGS}(%rdx)
    xorl %eax, %eax
    /* RDSSP only when shadow stacks are on (some hypervisors do not treat
     * it as a NOP on CPUs without CET). */
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 1f
    rdsspq %rax
1:  movq %rax, {TRY_SSP}(%rdx)
    movq %rdi, %rax
    movq %rsi, %rdi
    call *%rax
sc_try_marker:
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret
sc_try_recover:
    movq $-1, %rax
    jmp sc_try_marker

/* ---- The unwind's shadow-stack writes -------------------------------------
 * u64 sc_unwind_shadow(void)
 * Every shadow-stack write of a fault recovery, done here with operands that
 * never pass through memory: each address and value is derived in registers
 * from RDSSP, from shadow-stack slots (only WRSS writes them), from the CS
 * register, and from read-only text and link-time symbols. Nothing is read
 * from ordinary memory, so no other CPU can change what is written
 * (DESIGN §4, §11). Called by recover::fault with shadow stacks on; only
 * caller-saved registers are used.
 *
 * A slot s "is a token" when [s] & ~1 == s (a free or busy supervisor token):
 * the topmost slot of every shadow stack holds one, and no return address,
 * SSP or CS can equal its own slot's address. Every scan below stops at a
 * token before reading past it, and after at most UNWIND_MAX_SLOTS slots.
 *
 * 1. F, the faulting exception's shadow frame: the first slot at or above
 *    RDSSP holding the kernel CS is its CS slot (the handler's own frames
 *    below it hold only return addresses).
 * 2. P := [F] (the interrupted SSP): slot-aligned, in the stack area of the
 *    same CPU as F (static layout: sc_stacks + cpu * CPU_STACKS_SIZE).
 * 3. If the LIP [F+8] is an IRETQ of kernel text and [P+16] holds CS, the
 *    fault came from that IRETQ and the frame at P is dead: continue at its
 *    previous SSP U = [P], which must lie at or above P+24 on the same stack
 *    (reached from P+24 without crossing a token).
 * 4. The marker M: scanning up from P (or U), the first slot holding
 *    sc_try_marker whose next slot is not CS. A slot holding CS first means
 *    the recovery point lies across another exception frame: refused.
 * 5. WRSS [F+8] := sc_try_recover, [F] := M+8 (the recovery SSP).
 * 6. Free (WRSS 0) the trampoline records on the record page of F's CPU
 *    whose bound SSP lies in [P, M+8): emulations between the fault and the
 *    recovery point, on the stack the scan walked (the interrupted one,
 *    also when F is on an IST stack).
 * Returns M+8, or one of the UNWIND_ERR_* codes (all below a page) with
 * nothing written. */
.globl sc_unwind_shadow, sc_unwind_region_start, sc_unwind_region_end
sc_unwind_region_start:
sc_unwind_shadow:
    xorl %r9d, %r9d
    movw %cs, %r9w                  /* r9 := the kernel CS */
    rdsspq %r10                     /* r10 := SSP */
    movq %r10, %rdi
    movl ${UNWIND_MAX_SLOTS}, %ecx
.Lsu_frame:                         /* 1. */
    movq (%rdi), %rax
    cmpq %r9, %rax
    je .Lsu_frame_found
    andq $~1, %rax
    cmpq %rdi, %rax
    je .Lsu_no_frame
    addq $8, %rdi
    decq %rcx
    jnz .Lsu_frame
    jmp .Lsu_no_frame
.Lsu_frame_found:
    leaq -{SF_CS}(%rdi), %r8        /* r8 := F */
    cmpq %r10, %r8
    jb .Lsu_no_frame                /* the frame straddles the SSP */
    movq %r8, %rax
    STACK_CPU .Lsu_bad_prev
    movq %rax, %r11                 /* r11 := F's CPU */
    movq {SF_PREV_SSP}(%r8), %rsi   /* 2. rsi := P */
    testq $7, %rsi
    jnz .Lsu_bad_prev
    movq %rsi, %rax
    STACK_CPU .Lsu_bad_prev
    cmpq %r11, %rax
    jne .Lsu_bad_prev
    movq %rsi, %rdi                 /* rdi := where the marker scan starts */
    movq {SF_LIP}(%r8), %rax        /* 3. the LIP: IRETQ in kernel text? */
    leaq __text_start(%rip), %rdx
    cmpq %rdx, %rax
    jb .Lsu_scan
    leaq __text_end-{IRETQ_LEN}(%rip), %rdx
    cmpq %rdx, %rax
    ja .Lsu_scan
    movzwl (%rax), %eax
    cmpl ${IRETQ_WORD}, %eax
    jne .Lsu_scan
    movq %rsi, %rdx                 /* P, P+8 must not be tokens to read P+16 */
    movl ${SF_SLOTS}, %ecx
1:  movq (%rdx), %rax
    andq $~1, %rax
    cmpq %rdx, %rax
    je .Lsu_scan                    /* no frame fits at P: not a dead frame */
    addq $8, %rdx
    decq %rcx
    jnz 1b
    cmpq %r9, {SF_CS}(%rsi)
    jne .Lsu_scan
    movq {SF_PREV_SSP}(%rsi), %rax  /* rax := U */
    testq $7, %rax
    jnz .Lsu_ist_iret
    /* rdx = P+24: walk up to U without crossing a token. */
    movl ${UNWIND_MAX_SLOTS}, %ecx
2:  cmpq %rax, %rdx
    je 3f
    ja .Lsu_ist_iret                /* U below P+24 */
    movq (%rdx), %rdi
    andq $~1, %rdi
    cmpq %rdx, %rdi
    je .Lsu_ist_iret                /* U is on another stack (IST) */
    addq $8, %rdx
    decq %rcx
    jnz 2b
    jmp .Lsu_ist_iret
3:  movq %rax, %rdi                 /* the scan starts at U */
.Lsu_scan:                          /* 4. rdi: the slot scanned */
    leaq sc_try_marker(%rip), %rdx
    movl ${UNWIND_MAX_SLOTS}, %ecx
1:  movq (%rdi), %rax
    cmpq %r9, %rax
    je .Lsu_across
    cmpq %rdx, %rax
    je 3f
    andq $~1, %rax
    cmpq %rdi, %rax
    je .Lsu_no_marker
2:  addq $8, %rdi
    decq %rcx
    jnz 1b
    jmp .Lsu_no_marker
3:  cmpq %r9, 8(%rdi)               /* not a token: rdi+8 is on the stack */
    je 2b                           /* the LIP slot of a frame: its CS is next */
    /* 5. rdi = M. */
    leaq sc_try_recover(%rip), %rax
    wrssq %rax, {SF_LIP}(%r8)
    leaq 8(%rdi), %rdx              /* rdx := M+8, the recovery SSP */
    wrssq %rdx, {SF_PREV_SSP}(%r8)
    /* 6. rdi := F's CPU's record page; free records bound in [P, M+8). */
    movq %r11, %rdi
    shlq ${RECORD_PAGE_SHIFT}, %rdi
    leaq sc_tramp_records(%rip), %rax
    addq %rax, %rdi
    leaq {RECORDS_PER_PAGE}*{RECORD_SIZE}(%rdi), %rcx
    xorl %r8d, %r8d
1:
.if {TEST_HOOKS}
    /* Self-test sec_unwind_nmi_regs: a software NMI lands here once (the
     * record-free loop, its WRSS operands in registers). */
    cmpb $0, sc_t_unwind_nmi(%rip)
    je 9f
    movb $0, sc_t_unwind_nmi(%rip)
    int $2
9:
.endif
    movq {REC_SSP}(%rdi), %rax
    cmpq %rsi, %rax
    jb 2f                           /* also a free record (0): P is never 0 */
    cmpq %rdx, %rax
    jae 2f
    wrssq %r8, {REC_SSP}(%rdi)
2:  addq ${RECORD_SIZE}, %rdi
    cmpq %rcx, %rdi
    jb 1b
    movq %rdx, %rax
    ret
.Lsu_no_frame:
    movl ${UNWIND_ERR_NO_FRAME}, %eax
    ret
.Lsu_bad_prev:
    movl ${UNWIND_ERR_BAD_PREV}, %eax
    ret
.Lsu_ist_iret:
    movl ${UNWIND_ERR_IST_IRET}, %eax
    ret
.Lsu_across:
    movl ${UNWIND_ERR_ACROSS_FRAME}, %eax
    ret
.Lsu_no_marker:
    movl ${UNWIND_ERR_NO_MARKER}, %eax
    ret
sc_unwind_region_end:

.purgem STACK_CPU

.if {TEST_HOOKS}
.section .data
.globl sc_t_unwind_nmi
sc_t_unwind_nmi: .byte 0
.endif
