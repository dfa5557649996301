/* shadowcall engine: the last step of CET supervisor shadow-stack bring-up.
 *
 * noreturn sc_cet_enter(u64 s_cet, void (*cont)(void) noreturn, u64 rsp)
 *
 * CR4.CET, IA32_PL0_SSP and the interrupt SSP table are already set. From
 * the write to IA32_S_CET until SETSSBSY, SSP is 0: no call or ret may run.
 * SETSSBSY claims the token PL0_SSP points at and loads SSP; the function
 * never returns (its own return address was never pushed on the shadow
 * stack): it records that shadow stacks are active, resets RSP and jumps to
 * the continuation. It lies in .text.cet, the bring-up range a host kernel
 * keeps free of patch sites and targets. */
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
