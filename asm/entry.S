/* Exception and interrupt entry, fault recovery, and the switch onto the
 * shadow stack. Pulled in by kernel/src/interrupts.rs with global_asm!, which
 * substitutes the NAME constants from the Rust side (global_asm! const operands). */

.pushsection .text.entry, "ax"

/* ---- Entry stubs -------------------------------------------------------
 * Each stub makes the stack look the same (error code, vector) and jumps to
 * sc_isr_common, which saves the registers, records the SSP and calls
 * sc_exception_dispatch(&mut TrapFrame). */

/* Restore the registers saved by sc_isr_common and return from the exception. */
.macro ISR_EXIT
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

/* #BP: move the hardware frame down by {BP_GAP} bytes before anything else,
 * leaving a gap under the interrupted stack pointer so the handler can
 * emulate a push onto the interrupted stack. The memory operand of a push is
 * computed before RSP drops, so each push copies the next-lower word. */
sc_isr_3:
    subq ${BP_GAP}, %rsp
    pushq {BP_GAP}+32(%rsp)         /* SS */
    pushq {BP_GAP}+32(%rsp)         /* RSP */
    pushq {BP_GAP}+32(%rsp)         /* RFLAGS */
    pushq {BP_GAP}+32(%rsp)         /* CS */
    pushq {BP_GAP}+32(%rsp)         /* RIP */
    pushq $0
    pushq $3
    jmp sc_isr_common

sc_isr_common:
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
    cmpq $0, 8(%rsp)
    jne sc_shadow_gap_exit
sc_isr_exit:
    ISR_EXIT

/* Shadow-gap exit: the #BP handler emulated a call and left its return
 * address in TrapFrame.shadow_push (it checked that the CPU's shadow frame
 * F = TrapFrame.ssp sits right under the interrupted SSP, F+24, with room
 * below). The handler's own calls are popped, so SSP == F again. One call
 * with a non-zero displacement takes a shadow slot (SSP = F-8); its
 * normal-stack copy is dropped; the frame is rebuilt one slot lower:
 *   [F-8] = F+16 (previous SSP)  [F] = target (LIP)  [F+8] = CS
 *   [F+16] = return address (the emulated call's shadow slot)
 * IRET pops that frame and leaves SSP = F+16 with the return address on top;
 * the normal stack got the same address in the entry stub's gap. */
sc_shadow_gap_exit:
    call 1f
    int3
1:  addq $8, %rsp
    movq 0(%rsp), %rax
    leaq 16(%rax), %rcx
    wrssq %rcx, -8(%rax)
    movq {FRAME_RIP}(%rsp), %rcx
    wrssq %rcx, (%rax)
    movq {FRAME_CS}(%rsp), %rcx
    wrssq %rcx, 8(%rax)
    movq 8(%rsp), %rcx
    wrssq %rcx, 16(%rax)
    /* The common exit, repeated here to spare a jump on the hot path. */
    ISR_EXIT

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
.globl SC_ISR_APIC
SC_ISR_APIC:
    .quad sc_isr_{VEC_WAKE}, sc_isr_{VEC_SYNC}, sc_isr_{VEC_TIMER}, sc_isr_{VEC_SPURIOUS}

.section .text.entry, "ax"

/* ---- Fault recovery ----------------------------------------------------
 * u64 sc_try_call(u64 (*f)(u64), u64 arg, struct TryCtx *ctx)
 * Calls f(arg) and returns its value. If a fault is taken meanwhile, the
 * dispatcher rewinds both stacks to what this function saved in *ctx (the
 * normal stack in the IRET frame, the shadow stack through the frame's
 * previous-SSP slot) and resumes at sc_try_recover, which returns ~0. */
.globl sc_try_call, sc_try_recover
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
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 1f
    rdsspq %rax
1:  movq %rax, {TRY_SSP}(%rdx)
    movq %rdi, %rax
    movq %rsi, %rdi
    call *%rax
2:  addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret
sc_try_recover:
    movq $-1, %rax
    jmp 2b

/* ---- Turning shadow stacks on ------------------------------------------
 * noreturn sc_cet_enter(u64 s_cet, void (*cont)(void) noreturn, u64 rsp)
 * CR4.CET and IA32_PL0_SSP are already set. From the write to IA32_S_CET
 * until SETSSBSY, SSP is 0: no call or ret may run. SETSSBSY claims the
 * token PL0_SSP points at and loads SSP; this function then never returns
 * (its own return address was never pushed on the shadow stack): it resets
 * RSP and jumps to the continuation. */
.pushsection .text.cet, "ax"
.globl sc_cet_enter
sc_cet_enter:
    movq %rsi, %r12
    movq %rdx, %r13
    movl ${MSR_S_CET}, %ecx
    movq %rdi, %rax
    movq %rdi, %rdx
    shrq $32, %rdx
    wrmsr
    setssbsy
    movb $1, SC_SHSTK_ACTIVE(%rip)
    movq %r13, %rsp
    xorl %ebp, %ebp
    jmp *%r12
.popsection
.popsection
