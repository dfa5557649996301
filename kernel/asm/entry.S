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
    /* The interrupted arithmetic flags, in registers (delivery left them
     * as they were), before anything changes them: the exit gives them back
     * from here, not from the frame (review 10 F1). */
    lahf
    seto %al
    wrssq %rax, %fs:\area+{SAVE_FLAGS}
    movq %fs:\area+{SAVE_SCRATCH}, %rax
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
    /* IRET's frame, built in the area (only WRSS writes it): RIP = LIP and
     * CS from this interrupt's shadow frame (RAX), RFLAGS the frame's with
     * the arithmetic flags saved at entry, RSP and SS the frame's. IRET then
     * reads nothing an attacker can write (review 10 F1). */
    movq 8(%rax), %rcx
    wrssq %rcx, %fs:\area+{SAVE_IRET}
    movq 16(%rax), %rcx
    wrssq %rcx, %fs:\area+{SAVE_IRET}+8
    movq %fs:\area+{SAVE_FLAGS}, %rax
    movq %rax, %rdx
    shrq $8, %rax
    andl ${LAHF_FLAGS}, %eax
    andl $1, %edx
    shlq ${OF_BIT}, %rdx
    orq %rdx, %rax
    movq {FRAME_RFLAGS}(%rsp), %rcx
    andq $~{ARITH_FLAGS}, %rcx
    /* No region runs with DF, TF, AC or NT set (nor calls Rust so): never
     * from the frame (review 11 F1: a forged DF reached the Rust handlers
     * a region calls right after its CLD). */
    andq $~{REGION_CLEAR_FLAGS}, %rcx
    orq %rax, %rcx
    wrssq %rcx, %fs:\area+{SAVE_IRET}+16
    /* RSP the frame's, unless this event interrupted the other vector's
     * final IRETQ (its RSP then points at that vector's WRSS-built IRET
     * frame, and a forged one would hand its region forged flags: review
     * 11 F2): then that pointer, from its area. */
    movq {FRAME_RSP}(%rsp), %rcx
    movq %fs:\area+{SAVE_IRET}, %rdx  /* the interrupted LIP */
    cmpq $sc_isr_cet_iret_{VEC_NMI}, %rdx
    jne 3f
    movq %fs:{SAVE_AREA_NMI}+{SAVE_IRET_PTR}, %rcx
3:  cmpq $sc_isr_cet_iret_{VEC_MC}, %rdx
    jne 4f
    movq %fs:{SAVE_AREA_MC}+{SAVE_IRET_PTR}, %rcx
4:  wrssq %rcx, %fs:\area+{SAVE_IRET}+24
    movq {FRAME_SS}(%rsp), %rcx
    wrssq %rcx, %fs:\area+{SAVE_IRET}+32
    movl ${MSR_FS_BASE}, %ecx
    rdmsr
    shlq $32, %rdx
    orq %rdx, %rax
    addq $\area+{SAVE_IRET}, %rax
    wrssq %rax, %fs:\area+{SAVE_IRET_PTR}
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
    movq %fs:\area+{SAVE_IRET_PTR}, %rsp
    NESTED_TEST_HOOK \vec, {NESTED_AT_IRET}
sc_isr_cet_iret_\vec:
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

/* sec_region_flags (review 10 PoC): u64 sc_t_flags_probe(void): ZF := 1,
 * a software NMI inside this critical region (its handler flips ZF in its
 * trap frame, as an attacker who writes the NMI stack would), then return
 * the ZF that came back (1: kept, 0: the forged one). The caller keeps IF=0. */
.globl sc_t_flags_probe
sc_t_flags_probe:
    xorl %eax, %eax                 /* ZF = 1 */
    int ${VEC_NMI}
    setz %al
    movzbl %al, %eax
    ret

/* sec_nested_iret_rsp (review 11 PoC): u64 sc_t_flags_probe_mc(void): as
 * sc_t_flags_probe, with a software #MC instead of an NMI. */
.globl sc_t_flags_probe_mc
sc_t_flags_probe_mc:
    xorl %eax, %eax                 /* ZF = 1 */
    int ${VEC_MC}
    setz %al
    movzbl %al, %eax
    ret

/* sec_region_df (review 11 PoC): u64 sc_t_df_probe(u64 mc): DF := 0, a
 * software NMI (mc = 0) or #MC (mc != 0) inside this critical region (its
 * handler sets DF in its trap frame, as an attacker who writes the IST
 * stack would), then return the RFLAGS that came back, with DF cleared
 * again. The caller keeps IF=0. */
.globl sc_t_df_probe
sc_t_df_probe:
    cld
    testq %rdi, %rdi
    jnz 1f
    int ${VEC_NMI}
    jmp 2f
1:  int ${VEC_MC}
2:  pushfq
    popq %rax
    cld
    ret
.endif
sc_isr_region_end:


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

.popsection

.purgem PUSH_GPRS
.purgem POP_GPRS
.purgem PUSH_GPRS_LOW
.purgem PUSH_GPRS_HIGH
.purgem POP_GPRS_LOW
.purgem ISR_EXIT
