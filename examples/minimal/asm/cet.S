/* Turning supervisor shadow stacks on (see src/cet.rs).
 *
 * noreturn example_cet_enter(u64 s_cet, void (*cont)(void) noreturn, u64 rsp)
 * CR4.CET and IA32_PL0_SSP are set. From the write to IA32_S_CET until
 * SETSSBSY, SSP is 0: no call or ret may run. This function never returns
 * (its return address is not on the shadow stack): it switches to `rsp`
 * and jumps to `cont`. */
.set MSR_S_CET, 0x6A2

.section .text
.globl example_cet_enter
example_cet_enter:
    movq %rdx, %r8              /* rsp: WRMSR takes EDX */
    movl $MSR_S_CET, %ecx
    movq %rdi, %rax
    movq %rdi, %rdx
    shrq $32, %rdx
    wrmsr
    setssbsy
    movq %r8, %rsp
    xorl %ebp, %ebp
    jmp *%rsi

/* bool example_shstk_top_is_ret(void): does the shadow-stack top hold the
 * return address the call to this function pushed on the normal stack?
 * Only with shadow stacks on (RDSSP is a no-op otherwise: SSP reads 0). */
.globl example_shstk_top_is_ret
example_shstk_top_is_ret:
    xorl %eax, %eax
    rdsspq %rax
    movq (%rax), %rax
    cmpq (%rsp), %rax
    sete %al
    movzbl %al, %eax
    ret
