/* Fault recovery points. Pulled in by kernel/src/interrupts.rs with
 * global_asm!, which substitutes the NAME constants from the Rust side.
 *
 * u64 sc_try_call(u64 (*f)(u64), u64 arg, struct TryCtx *ctx)
 * Saves the callee-saved registers, records RSP, RFLAGS and (for
 * diagnostics only) SSP in *ctx, and calls f(arg) with an indirect call.
 * That call pushes the address `sc_try_marker` on both stacks: on the shadow
 * stack it is the recovery point's **marker**, a fixed code address that only
 * this call can put there. A fault while f runs is unwound by
 * interrupts::fault, which finds the marker by scanning the interrupted
 * shadow stack upward from the faulting frame, pops the shadow stack to just
 * above it (never to an SSP read from ordinary memory), sets RSP to the
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
