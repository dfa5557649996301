/* Benchmark loops and sites (kernel/src/bench.rs). Times are RDTSC deltas:
 * retired instructions on Bochs with `clock: sync=none`, cycles elsewhere. */

.section .text
.align 16

/* u64 sc_b_loop(void (*f)(void), u64 n): TSC ticks for n calls of f. */
.globl sc_b_loop
sc_b_loop:
    pushq %rbx
    pushq %r12
    pushq %r13
    movq %rdi, %r12
    movq %rsi, %r13
    lfence
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %rbx
1:  call *%r12
    decq %r13
    jnz 1b
    lfence
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq %rbx, %rax
    popq %r13
    popq %r12
    popq %rbx
    ret

/* The floor: a call to a function that only returns (also a patch target). */
TARGET_FN sc_b_ret
    ret

/* The price of one trap: an int3 the #BP handler recognises and returns from
 * (the crate's stub at once, as its probe sc_bp_probe, while no batch is
 * live; the kernel's sc_bp_handler otherwise). */
.globl sc_b_int3_fn, sc_b_int3, sc_bp_probe
sc_b_int3_fn:
sc_b_int3:
sc_bp_probe:
    int3
    ret

/* One site per emulated instruction kind; each starts as `call sc_b_ret`. */
.macro BENCH_SITE fn, site
.globl \fn
\fn:
    SITE \site
    call sc_b_ret
    ret
.endm

BENCH_SITE sc_b_fn_call, sc_b_site_call
BENCH_SITE sc_b_fn_jmp, sc_b_site_jmp
BENCH_SITE sc_b_fn_nop, sc_b_site_nop
BENCH_SITE sc_b_fn_ret, sc_b_site_ret
/* The 1-site batch (emul_call_1site): a call site of its own. */
BENCH_SITE sc_b_fn_call1, sc_b_site_call1

/* The call target of the emulated call (a separate function, same cost as sc_b_ret). */
TARGET_FN sc_b_target
    ret
