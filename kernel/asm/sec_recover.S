/* Helpers of the sec_try_forged_ssp self-test (kernel/src/selftest/sec_recover.rs),
 * pulled in there with global_asm!.
 *
 * void sc_r_dig(u64 depth): recurses `depth` calls deep, then calls
 * sc_r_probe, which records where its return address sc_r_after_probe sits
 * on both stacks (RSP and SSP at its entry) in SC_R_SEEN. After the return
 * those slots are dead but still hold sc_r_after_probe: "an older slot
 * holding a return address once pushed on this CPU", what an attacker would
 * point a forged recovery context at. sc_r_after_probe returns normally
 * unless SC_R_ARMED is set: then it was reached through a forged recovery,
 * and it calls sc_r_forged_landing (Rust, reports and stops). */

.section .text
.globl sc_r_dig, sc_r_after_probe
sc_r_dig:
    testq %rdi, %rdi
    jz 1f
    decq %rdi
    call sc_r_dig
    ret
1:  call sc_r_probe
sc_r_after_probe:
    cmpb $0, SC_R_ARMED(%rip)
    jne 2f
    ret
2:  andq $-16, %rsp
    call sc_r_forged_landing
    ud2

sc_r_probe:
    movq %rsp, SC_R_SEEN(%rip)
    xorl %eax, %eax
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 3f
    rdsspq %rax
3:  movq %rax, SC_R_SEEN+8(%rip)
    ret

/* u64 sc_r_int1(void) (sec_fault_ist_records): raise vector 1 (#DB, on its
 * IST stack) with `int $1`; the test's recovery point unwinds it, so the
 * return below runs only if the interrupt returned normally. */
.globl sc_r_int1
sc_r_int1:
    int $1
    xorl %eax, %eax
    ret
