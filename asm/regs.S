/* The general registers of a trap frame (shadowcall::frame::TrapFrame):
 * saved by the entry stubs, restored by their exits. The crate's #BP stub
 * (bp.S) uses them; a host's own stubs may include this file too, and purge
 * its macros at the end of its asm (PUSH_GPRS, PUSH_GPRS_LOW,
 * PUSH_GPRS_HIGH, POP_GPRS, POP_GPRS_LOW, ISR_EXIT: all global_asm! of a
 * crate form one module). */

.macro PUSH_GPRS
    PUSH_GPRS_LOW
    PUSH_GPRS_HIGH
.endm

/* The two halves of PUSH_GPRS: the #BP stub's fast path saves only the
 * first (the registers it uses), its slow path then the second. */
.macro PUSH_GPRS_LOW
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
.endm
.macro PUSH_GPRS_HIGH
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
.endm

/* Undo PUSH_GPRS_LOW (RSP at the saved R9). */
.macro POP_GPRS_LOW
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
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
    POP_GPRS_LOW
    addq $16, %rsp                  /* TrapFrame.vector, .error_code */
.endm

/* Return from the exception. */
.macro ISR_EXIT
    POP_GPRS
    iretq
.endm
