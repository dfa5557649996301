/* The example's CET probe (the enable sequence is the engine's: shadowcall::cet). */
.section .text
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
