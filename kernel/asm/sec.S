/* Probes of the threat-model self-tests (kernel/src/selftest/sec_tests.rs).
 * Pulled in with global_asm!; braced names are constants from the Rust side. */

.section .text

/* frame_alignment: raise vector `which` (rdi: 0 = int3, 1 = the IST test
 * vector, 2 = #UD, 3 = #PF with an error code, 4 = the spurious APIC
 * vector) with RSP at 0 (rsi = 0) or 8 (rsi = 1) mod 16. The faults are
 * caught by the caller's recovery point. Returns 1 when it ran to the end. */
.globl sc_t_align_probe, sc_t_align_int3
sc_t_align_probe:
    pushq %rbp
    movq %rsp, %rbp
    andq $-16, %rsp
    testq %rsi, %rsi
    jz 1f
    subq $8, %rsp
1:  cmpq $0, %rdi
    jne 2f
sc_t_align_int3:
    int3
    jmp 9f
2:  cmpq $1, %rdi
    jne 3f
    int ${IST_TEST_VECTOR}
    jmp 9f
3:  cmpq $2, %rdi
    jne 4f
    ud2
4:  cmpq $3, %rdi
    jne 5f
    movq 0, %rax
5:  int ${VEC_SPURIOUS}
9:  movl $1, %eax
    leave
    ret

/* sec_exit_forged_frame: raise the APIC spurious vector (the dispatcher's
 * test hook forges its saved frame when the test arms it). Returns 1 when
 * it ran to the end. */
.globl sc_t_sec_int
sc_t_sec_int:
    int ${VEC_SPURIOUS}
    movl $1, %eax
    ret

/* sec_tramp_record_bound: call the trampoline's entry directly (as a
 * corrupted function pointer would): its two calls push their return
 * addresses on both stacks and its int3 is a second trap with no first trap
 * on this stack. */
.globl sc_t_call_tramp
sc_t_call_tramp:
    call *%rdi
    movl $1, %eax
    ret
