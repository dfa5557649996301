/* Exception and interrupt entry, fault recovery, and the switch onto the
 * shadow stack. Pulled in by kernel/src/interrupts.rs with global_asm!, which
 * substitutes the NAME constants from the Rust side (global_asm! const operands). */

.pushsection .text.entry, "ax"

/* ---- Entry stubs -------------------------------------------------------
 * Each stub makes the stack look the same (error code, vector) and jumps to
 * sc_isr_common, which saves the registers, records the SSP and calls
 * sc_exception_dispatch(&mut TrapFrame). #BP has its own entry and exit
 * (below): it is the only vector whose exit writes a shadow stack.
 *
 * Alignment: the CPU aligns RSP down to 16 and pushes 5 words (40 bytes);
 * every stub then adds 152 bytes (vector, error code, 15 registers, 2
 * bookkeeping words): 192 in all, so the Rust handler is called with RSP a
 * multiple of 16 (the ABI's alignment at a call). The #BP stub adds its
 * gap (BP_GAP = 8) and a full 192-byte TrapFrame holding a copy of the
 * hardware frame: 40 + 8 + 192 = 240 = 15 * 16, aligned too. The
 * `frame_alignment` self-test checks both, from both interrupted alignments. */

.macro PUSH_GPRS
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
.endm

/* Restore the registers saved by the stub (RSP at TrapFrame.ssp) and drop
 * the vector and error code (RSP then at the hardware frame's RIP slot). */
.macro POP_GPRS
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
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp                  /* TrapFrame.vector, .error_code */
.endm

/* Return from the exception. */
.macro ISR_EXIT
    POP_GPRS
    iretq
.endm

.macro ISR_NOERR vec
sc_isr_\vec:
    pushq $0
    pushq $\vec
    jmp sc_isr_common
.endm

.macro ISR_ERR vec
sc_isr_\vec:
    pushq $\vec
    jmp sc_isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
/* vector 3 (#BP) has its own stub below */
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR   29
ISR_ERR   30
ISR_NOERR 31
/* 0x20..0x2f: the (masked, remapped) legacy PIC; only spurious ones arrive. */
ISR_NOERR 32
ISR_NOERR 39
ISR_NOERR 47
/* The self-test vector routed through its own IST stack. */
ISR_NOERR {IST_TEST_VECTOR}
/* Local APIC: wake-up, sync, timer, spurious. */
ISR_NOERR {VEC_WAKE}
ISR_NOERR {VEC_SYNC}
ISR_NOERR {VEC_TIMER}
ISR_NOERR {VEC_SPURIOUS}

/* ---- Critical regions and the NMI/#MC register saves ----------------------
 * IRET hands the interrupted code the registers its trap frame holds, and
 * the frame is ordinary memory. Code that holds the operands of a WRSS, a
 * CR3 or a PTE write in registers (a critical region) must never get its
 * registers back that way. The regions:
 *   [sc_bpx_region_start, sc_bpx_region_end)    the #BP exits, the sync words
 *   [sc_poke_region_start, sc_poke_region_end)  the alias writers (poke.S)
 *   [sc_isr_region_start, sc_isr_region_end)    this code: the NMI and #MC
 *     paths (which hold the registers of the region they interrupted, and
 *     decide from RAX/RCX where to restore them from) and the common exit.
 *   [sc_unwind_region_start, sc_unwind_region_end)  the fault unwind's
 *     shadow-stack writes (recover.S sc_unwind_shadow).
 * xtask refuses a production build with a WRSS or INCSSP outside them. 
 * They run with IF=0, so only an NMI or #MC can interrupt them. With shadow
 * stacks on, the IDT's NMI and #MC gates enter through ISR_CET_IST
 * (interrupts::load_cet_idt). If the LIP it interrupted (read from its own
 * shadow frame) lies in a region, the stub stores the interrupted registers
 * with WRSS in its vector's area of this CPU's save page (FS base, an MSR,
 * points at the page; shadow-stack memory: only WRSS writes it), bound to the
 * interrupted SSP, straight from the registers; its exit gives them back from
 * there instead of from the trap frame.
 *
 * One area per vector (NMI: mm::SAVE_AREA_NMI, #MC: mm::SAVE_AREA_MC) and at
 * most one live save in each: NMI and #MC each run on their own IST shadow
 * stack, whose token stays busy until the handler's IRET, so a second
 * delivery of the same vector while its path runs raises #GP instead of
 * entering the stub (besides, NMIs are blocked until an IRET and a #MC while
 * MCIP is set shuts the CPU down). The other vector can nest (a #MC in the
 * NMI path or an NMI in the #MC path): the nested stub finds the outer path's
 * LIP in this region and saves the outer path's registers in its own area.
 * Any other vector that finds a region LIP at its exit has no save: the
 * kernel stops (sc_isr_save_lost). */

/* Continue if \lip lies in a critical region; else jump to \out. */
.macro IN_CRITICAL_REGION lip, out
    cmpq $sc_bpx_region_start, \lip
    jb 7f
    cmpq $sc_bpx_region_end, \lip
    jb 8f
7:  cmpq $sc_poke_region_start, \lip
    jb 6f
    cmpq $sc_poke_region_end, \lip
    jb 8f
6:  cmpq $sc_isr_region_start, \lip
    jb 5f
    cmpq $sc_isr_region_end, \lip
    jb 8f
5:  cmpq $sc_unwind_region_start, \lip
    jb \out
    cmpq $sc_unwind_region_end, \lip
    jae \out
8:
.endm

/* sec_nested_save (test-hooks builds only): at point \at
 * (selftest::sec_nested::NESTED_AT_*), once, when the test armed it, the NMI
 * path raises a software #MC, or the #MC path (points + NESTED_MC_OUTER) a
 * software NMI; that nested handler forges the GPRs of its trap frame. */
.macro NESTED_TEST_HOOK vec, at
.if {TEST_HOOKS}
.if \vec == {VEC_NMI}
    cmpb $\at, SC_T_NESTED(%rip)
    jne 9f
    movb $0, SC_T_NESTED(%rip)
    int ${VEC_MC}
9:
.else
    cmpb $\at+{NESTED_MC_OUTER}, SC_T_NESTED(%rip)
    jne 9f
    movb $0, SC_T_NESTED(%rip)
    int ${VEC_NMI}
9:
.endif
.endif
.endm

/* Store the interrupted registers (RAX in the area's scratch word) in
 * \area, bound to the interrupted SSP (this interrupt's shadow frame). */
.macro SAVE_REGS_WRSS area, vec
    wrssq %rbx, %fs:\area+{SAVE_RBX}
    wrssq %rcx, %fs:\area+{SAVE_RCX}
    wrssq %rdx, %fs:\area+{SAVE_RDX}
    wrssq %rsi, %fs:\area+{SAVE_RSI}
    wrssq %rdi, %fs:\area+{SAVE_RDI}
    wrssq %rbp, %fs:\area+{SAVE_RBP}
    wrssq %r8, %fs:\area+{SAVE_R8}
    NESTED_TEST_HOOK \vec, {NESTED_IN_SAVE}
    wrssq %r9, %fs:\area+{SAVE_R9}
    wrssq %r10, %fs:\area+{SAVE_R10}
    wrssq %r11, %fs:\area+{SAVE_R11}
    wrssq %r12, %fs:\area+{SAVE_R12}
    wrssq %r13, %fs:\area+{SAVE_R13}
    wrssq %r14, %fs:\area+{SAVE_R14}
    wrssq %r15, %fs:\area+{SAVE_R15}
    movq %fs:\area+{SAVE_SCRATCH}, %rbx
    wrssq %rbx, %fs:\area+{SAVE_RAX}
    rdsspq %rbx
    movq (%rbx), %rbx               /* the interrupted SSP: the binding */
    wrssq %rbx, %fs:\area+{SAVE_BOUND}
    movq %fs:\area+{SAVE_RBX}, %rbx
.endm

/* The entry every stub shares: registers into the TrapFrame, then
 * sc_exception_dispatch(&mut TrapFrame). */
.macro ISR_ENTRY
    PUSH_GPRS
    /* Taken inside this CPU's private poking window (an NMI, #MC or fault
     * while the patching CPU held the text alias: CR3 is not the shared
     * tables)? Leave the window for good: the handler runs, and the
     * interrupted writer resumes, on the shared tables, where the alias does
     * not exist. Whatever registers the writer gets back from this
     * (ordinary) frame, it can no longer write text; its next store to the
     * alias faults and the patcher redoes the step (mm::poke_aborted). */
    movq %cr3, %rax
    leaq sc_shared_tables(%rip), %rcx
    cmpq %rcx, %rax
    je 1f
    movq %rcx, %cr3
    movb $1, SC_POKE_ABORTED(%rip)
1:
    subq $16, %rsp                  /* TrapFrame.ssp, TrapFrame.shadow_push */
    movq $0, 8(%rsp)
    xorl %eax, %eax
    /* RDSSP only when shadow stacks are on: on CPUs without CET some
     * hypervisors do not treat it as a NOP. */
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 1f
    rdsspq %rax
1:  movq %rax, (%rsp)
    movq %rsp, %rdi
    cld
    call sc_exception_dispatch
.endm

/* RAX := this exception's shadow frame (RDSSP), RCX := its LIP, and
 * continue if that LIP lies in a critical region; else jump to \out
 * (also without shadow stacks: CR4.CET clear, or before SETSSBSY, when
 * RDSSP is a NOP and RAX stays 0; RDSSP never runs without CR4.CET, which
 * some hypervisors do not treat as a NOP). */
.macro EXIT_IN_CRITICAL_REGION out
    movq %cr4, %rax
    btq ${CR4_CET_BIT}, %rax
    jnc \out
    xorl %eax, %eax
    rdsspq %rax
    testq %rax, %rax
    jz \out
    movq 8(%rax), %rcx
    IN_CRITICAL_REGION %rcx, \out
.endm

/* NMI (\vec 2) or #MC (\vec 18) with shadow stacks on: the whole path, from
 * the IDT gate to IRET, with its own save area \area and its own exit. */
.macro ISR_CET_IST vec, area
sc_isr_cet_\vec:
    wrssq %rax, %fs:\area+{SAVE_SCRATCH}
    NESTED_TEST_HOOK \vec, {NESTED_AT_ENTRY}
    rdsspq %rax
    movq 8(%rax), %rax
    IN_CRITICAL_REGION %rax, 1f
    SAVE_REGS_WRSS \area, \vec
1:  movq %fs:\area+{SAVE_SCRATCH}, %rax
    pushq $0
    pushq $\vec
    ISR_ENTRY
    /* A critical region interrupted: its registers come back from the area,
     * which must be bound to the SSP it interrupted; the binding is then
     * cleared. This CET IDT is loaded only once shadow stacks are on. */
    EXIT_IN_CRITICAL_REGION 2f
    movq (%rax), %rcx
    cmpq %rcx, %fs:\area+{SAVE_BOUND}
    jne sc_isr_save_lost
    xorl %ecx, %ecx
    wrssq %rcx, %fs:\area+{SAVE_BOUND}
    addq $16 + 15 * 8, %rsp         /* ssp, shadow_push, the frame's copies of the registers */
    movq %fs:\area+{SAVE_R15}, %r15
    movq %fs:\area+{SAVE_R14}, %r14
    movq %fs:\area+{SAVE_R13}, %r13
    movq %fs:\area+{SAVE_R12}, %r12
    movq %fs:\area+{SAVE_R11}, %r11
    movq %fs:\area+{SAVE_R10}, %r10
    movq %fs:\area+{SAVE_R9}, %r9
    movq %fs:\area+{SAVE_R8}, %r8
    NESTED_TEST_HOOK \vec, {NESTED_IN_RESTORE}
    movq %fs:\area+{SAVE_RBP}, %rbp
    movq %fs:\area+{SAVE_RDI}, %rdi
    movq %fs:\area+{SAVE_RSI}, %rsi
    movq %fs:\area+{SAVE_RDX}, %rdx
    movq %fs:\area+{SAVE_RCX}, %rcx
    movq %fs:\area+{SAVE_RBX}, %rbx
    movq %fs:\area+{SAVE_RAX}, %rax
    addq $16, %rsp                  /* TrapFrame.vector, .error_code */
    iretq
2:  ISR_EXIT
.endm

.globl sc_isr_region_start, sc_isr_region_end
sc_isr_region_start:
ISR_CET_IST {VEC_NMI}, {SAVE_AREA_NMI}
ISR_CET_IST {VEC_MC}, {SAVE_AREA_MC}

/* Every other vector but #BP. Its exit never writes a shadow stack: whatever
 * a handler (or an attacker who rewrote the saved frame) left in the frame,
 * IRET itself checks RIP/CS against the shadow frame's LIP/CS (#CP). Having
 * no save area, it must not return into a critical region. */
sc_isr_common:
    ISR_ENTRY
    EXIT_IN_CRITICAL_REGION 2f
    jmp sc_isr_save_lost
2:  ISR_EXIT

/* A critical region interrupted without a save bound to its SSP (a vector
 * other than NMI/#MC, e.g. after a forged RFLAGS.IF or TF, or a save lost).
 * Stop rather than return forged or foreign registers. */
sc_isr_save_lost:
    movq %rsp, %rdi
    call sc_isr_save_lost_report

.if {TEST_HOOKS}
/* sec_nested_save: void sc_t_nested_probe(u64 out[15], u64 mc). Loads
 * NESTED_PATTERN + i into GPR i (RAX, RBX, RCX, RDX, RSI, RDI, RBP, R8..R15),
 * takes a software NMI (mc = 0) or #MC (mc != 0) inside this critical
 * region, and stores the registers it got back in out[i]. The caller keeps
 * IF=0. */
.globl sc_t_nested_probe
sc_t_nested_probe:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rdi
    cmpq $0, %rsi                   /* MOVABS leaves the flags alone */
    movabsq ${NESTED_PATTERN}+0, %rax
    movabsq ${NESTED_PATTERN}+1, %rbx
    movabsq ${NESTED_PATTERN}+2, %rcx
    movabsq ${NESTED_PATTERN}+3, %rdx
    movabsq ${NESTED_PATTERN}+4, %rsi
    movabsq ${NESTED_PATTERN}+5, %rdi
    movabsq ${NESTED_PATTERN}+6, %rbp
    movabsq ${NESTED_PATTERN}+7, %r8
    movabsq ${NESTED_PATTERN}+8, %r9
    movabsq ${NESTED_PATTERN}+9, %r10
    movabsq ${NESTED_PATTERN}+10, %r11
    movabsq ${NESTED_PATTERN}+11, %r12
    movabsq ${NESTED_PATTERN}+12, %r13
    movabsq ${NESTED_PATTERN}+13, %r14
    movabsq ${NESTED_PATTERN}+14, %r15
    jne 1f
    int ${VEC_NMI}
    jmp 2f
1:  int ${VEC_MC}
2:  pushq %rax
    movq 8(%rsp), %rax              /* out */
    movq %rbx, 8(%rax)
    movq %rcx, 16(%rax)
    movq %rdx, 24(%rax)
    movq %rsi, 32(%rax)
    movq %rdi, 40(%rax)
    movq %rbp, 48(%rax)
    movq %r8, 56(%rax)
    movq %r9, 64(%rax)
    movq %r10, 72(%rax)
    movq %r11, 80(%rax)
    movq %r12, 88(%rax)
    movq %r13, 96(%rax)
    movq %r14, 104(%rax)
    movq %r15, 112(%rax)
    popq %rbx                       /* the RAX it got back */
    movq %rbx, (%rax)
    popq %rdi
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret
.endif
sc_isr_region_end:

/* ---- #BP ---------------------------------------------------------------
 * Move the hardware frame down by {BP_GAP} bytes before anything else,
 * leaving a gap under the interrupted stack pointer so the handler can
 * emulate a push onto the interrupted stack. The memory operand of a push is
 * computed before RSP drops, so each push copies the next-lower word.
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
sc_isr_3:
    subq ${BP_GAP}, %rsp
    pushq {BP_GAP}+32(%rsp)         /* SS */
    pushq {BP_GAP}+32(%rsp)         /* RSP */
    pushq {BP_GAP}+32(%rsp)         /* RFLAGS */
    pushq {BP_GAP}+32(%rsp)         /* CS */
    pushq {BP_GAP}+32(%rsp)         /* RIP */
    pushq $0
    pushq $3
    PUSH_GPRS
    subq $16, %rsp                  /* TrapFrame.ssp, TrapFrame.shadow_push */
    movq $0, 8(%rsp)
    xorl %esi, %esi
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 1f
    rdsspq %rsi
1:  movq %rsi, (%rsp)
    movq %rsp, %rdi
    cld
    call sc_bp_handler
/* From here to sc_bpx_region_end: the #BP exits (and, at its end, the sync
 * words' writers), which hold the operands of their WRSS in registers. An NMI or #MC taken in between (the only
 * interrupts possible: IF=0) keeps the registers it interrupted on a page
 * only WRSS writes and gives them back from there (sc_isr_cet_ist below). */
.globl sc_bpx_region_start, sc_bpx_region_end
sc_bpx_region_start:
    cmpq ${BPX_COUNT}, %rax
    jae sc_bpx_plain
    jmp *sc_bpx_table(,%rax,8)

sc_bpx_plain:
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

/* Shadow gap: emulate `call T` at site S with one trap. After the checks,
 * one call with a non-zero displacement takes a shadow slot (SSP = F-8),
 * its normal-stack copy is dropped, and the frame is rebuilt one slot
 * lower:
 *   [F-8] = F+16 (previous SSP)  [F] = T (LIP)  [F+8] = CS
 *   [F+16] = S+5 (the emulated call's shadow slot)
 * IRET pops that frame and leaves SSP = F+16 with S+5 on top; the handler
 * stored the same S+5 on the normal stack, in the stub's gap. */
sc_bpx_call_sg:
    BPX_FRAME
    BPX_ENTRY {KIND_CALL}
    BPX_SAME_STACK
    movq %r13, %rcx                 /* T */
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    leaq 4(%r9), %rax               /* S+5 = LIP+4 */
    movq 16(%r8), %rdx              /* CS, from the shadow frame */
.if {TEST_HOOKS}
    /* sec_exit_nmi_regs: an NMI right here, whose frame the test forges. */
    cmpb $0, SC_T_EXIT_NMI(%rip)
    je 8f
    movb $0, SC_T_EXIT_NMI(%rip)
    int $2
8:
.endif
    call 1f
    int3
1:  addq $8, %rsp
    leaq 16(%r8), %rsi
    wrssq %rsi, -8(%r8)
    wrssq %rcx, (%r8)
    wrssq %rdx, 8(%r8)
    wrssq %rax, 16(%r8)
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
    leaq {RECORDS_PER_PAGE}*{RECORD_SIZE}(%rdi), %rsi
1:  movq {REC_SSP}(%rdi), %rax
    testq %rax, %rax
    je 2f
    cmpq %r11, %rax
    je 2f
    addq ${RECORD_SIZE}, %rdi
    cmpq %rsi, %rdi
    jb 1b
    jmp sc_bpx_refuse
2:  wrssq %r11, {REC_SSP}(%rdi)
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
    leaq {RECORDS_PER_PAGE}*{RECORD_SIZE}(%rdi), %rsi
1:  cmpq %r10, {REC_SSP}(%rdi)
    je 2f
    addq ${RECORD_SIZE}, %rdi
    cmpq %rsi, %rdi
    jb 1b
    jmp sc_bpx_refuse
2:  movq {REC_TARGET}(%rdi), %rax
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
    BPX_FRAME
    leaq sc_t_iret_int3+1(%rip), %rax
    cmpq %rax, %r9
    jne sc_bpx_refuse
    leaq sc_t_iret_landing(%rip), %rcx
    cmpq %rcx, {FRAME_RIP}(%rsp)
    jne sc_bpx_refuse
    wrssq %rcx, 8(%r8)
    jmp sc_bp_return

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
    subq ${NMI_STACK_OFF}, %rdx
    cmpq ${IST_STACK_SIZE}, %rdx
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
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 2f
    rdsspq %r8
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
    movl ${MAX_CPUS}, %ecx
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

/* Stub addresses for the IDT, indexed by vector (0 = no stub). */
.section .rodata
.align 8
.globl SC_ISR_TABLE
SC_ISR_TABLE:
    .quad sc_isr_0, sc_isr_1, sc_isr_2, sc_isr_3, sc_isr_4, sc_isr_5, sc_isr_6, sc_isr_7
    .quad sc_isr_8, sc_isr_9, sc_isr_10, sc_isr_11, sc_isr_12, sc_isr_13, sc_isr_14, sc_isr_15
    .quad sc_isr_16, sc_isr_17, sc_isr_18, sc_isr_19, sc_isr_20, sc_isr_21, sc_isr_22, sc_isr_23
    .quad sc_isr_24, sc_isr_25, sc_isr_26, sc_isr_27, sc_isr_28, sc_isr_29, sc_isr_30, sc_isr_31
.globl SC_ISR_PIC_SPURIOUS
SC_ISR_PIC_SPURIOUS:
    .quad sc_isr_32, sc_isr_39, sc_isr_47
.globl SC_ISR_IST_TEST
SC_ISR_IST_TEST:
    .quad sc_isr_{IST_TEST_VECTOR}
.globl SC_ISR_CET_IST
SC_ISR_CET_IST:
    .quad sc_isr_cet_2, sc_isr_cet_18
.globl SC_ISR_APIC
SC_ISR_APIC:
    .quad sc_isr_{VEC_WAKE}, sc_isr_{VEC_SYNC}, sc_isr_{VEC_TIMER}, sc_isr_{VEC_SPURIOUS}

/* #BP exit actions, indexed by patching::BpAction (BPX_PLAIN = 0). */
.align 8
sc_bpx_table:
    .quad sc_bpx_plain, sc_bpx_call_sg, sc_bpx_jmp, sc_bpx_classic, sc_bpx_nop
    .quad sc_bpx_ret, sc_bpx_tramp1, sc_bpx_tramp2, sc_bpx_resume_site, sc_bpx_test_landing

.popsection

.purgem LIVE_ENTRY
.purgem TABLE_AT
.purgem CHECKED_ENTRY
.purgem STACK_CPU
.purgem RECORD_PAGE
