/* Code the self-tests execute: patch sites, call targets that record what
 * they see on both stacks, and probes for the CET rules. Pulled in by
 * kernel/src/selftest/mod.rs; the braced names are constants from the Rust side
 * (SC_TLOG field offsets, vector numbers, counts). */

/* A registered patch site: its address goes into .shadowcall_sites (the
 * table the patcher validates against, like Linux's static-call sites). */
.macro SITE name
    .pushsection .shadowcall_sites, "a"
    .quad \name
    .popsection
.globl \name
\name:
.endm

/* A registered patch target: its address goes into .shadowcall_targets (the
 * read-only table a call/jmp target of a patch must be in). */
.macro TARGET_REG name
    .pushsection .shadowcall_targets, "a"
    .quad \name
    .popsection
.endm

/* TARGET_REG, then a global label there. */
.macro TARGET_FN name
    TARGET_REG \name
.globl \name
\name:
.endm

/* A call target: logs the return address it sees on the normal stack and on
 * the shadow stack, RFLAGS, and bumps its own counter. */
.macro TARGET name, idx
    TARGET_FN \name
    movq (%rsp), %rax
    movq %rax, SC_TLOG+{LOG_RET}(%rip)
    addq %rax, SC_TLOG+{LOG_SUM}(%rip)
    xorl %eax, %eax
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 1f
    rdsspq %rax
    movq (%rax), %rax
1:  movq %rax, SC_TLOG+{LOG_SHRET}(%rip)
    pushfq
    popq SC_TLOG+{LOG_RFLAGS}(%rip)
    incq SC_TLOG+{LOG_COUNT}+8*\idx(%rip)
    ret
.endm

/* A function whose first instruction is a site holding `call sc_t_target_a`;
 * the instruction after the site counts in SC_TLOG.after. */
.macro SITE_FN fn, site
.globl \fn
\fn:
    SITE \site
    call sc_t_target_a
    incq SC_TLOG+{LOG_AFTER}(%rip)
    ret
.endm

.section .text
.align 16

TARGET sc_t_target_a, 0
TARGET sc_t_target_b, 1
TARGET sc_t_target_c, 2

SITE_FN sc_t_fn_call, sc_t_site_call
SITE_FN sc_t_fn_jmp, sc_t_site_jmp
SITE_FN sc_t_fn_nop, sc_t_site_nop
SITE_FN sc_t_fn_ret, sc_t_site_ret
SITE_FN sc_t_fn_irq, sc_t_site_irq
SITE_FN sc_t_fn_roundtrip, sc_t_site_roundtrip
SITE_FN sc_t_fn_outer, sc_t_site_outer
SITE_FN sc_t_fn_naive, sc_t_site_naive
SITE_FN sc_t_fn_bad, sc_t_site_bad

/* The nested test patches sc_t_site_outer to call this function, which holds
 * a second site of the same batch. */
TARGET_FN sc_t_nest_target
    SITE sc_t_site_inner
    call sc_t_target_a
    incq SC_TLOG+{LOG_NEST}(%rip)
    ret

/* u64 sc_t_rec(u64 depth): the site is patched from `call sc_t_rec_leaf` to
 * `call sc_t_rec`, so during the window every level is an emulated call. */
TARGET_FN sc_t_rec
    testq %rdi, %rdi
    jz 1f
    decq %rdi
    SITE sc_t_site_rec
    call sc_t_rec_leaf
    incq SC_TLOG+{LOG_REC}(%rip)
1:  ret
TARGET_FN sc_t_rec_leaf
    ret

/* Bad patch sites for patch_bad_input: registered, but not patchable. */
.globl sc_t_fn_unsupported
sc_t_fn_unsupported:
    SITE sc_t_site_unsupported
    movl $1, %eax                   /* 5 bytes: b8 01 00 00 00 */
    ret
SITE sc_t_site_undecodable
    .byte 0x06, 0x90, 0x90, 0x90, 0x90  /* push %es: invalid in 64-bit mode */
/* A call that is not a registered site. */
.globl sc_t_unregistered
sc_t_unregistered:
    call sc_t_target_a
    ret

/* A block of {SITE_BLOCK_LEN} sites, each `call sc_t_target_a; ret`,
 * {LARGE_STRIDE} bytes apart (patch_batch_large and the benchmarks); site i
 * is called as a function. */
.align 16
.globl sc_t_large_base
sc_t_large_base:
.rept {SITE_BLOCK_LEN}
    .pushsection .shadowcall_sites, "a"
    .quad 1f
    .popsection
1:  call sc_t_target_a
    ret
.endr

/* u64 sc_call_checked(f, u64 out[4], arg): calls f(arg) and records RSP and
 * SSP before and after (out = rsp0, ssp0, rsp1, ssp1); returns f's value.
 * sc_call_checked_ret is the return address f sees. */
.globl sc_call_checked, sc_call_checked_ret
sc_call_checked:
    pushq %rbx
    pushq %r12
    subq $8, %rsp
    movq %rsi, %rbx
    movq %rdi, %r12
    movq %rdx, %rdi
    movq %rsp, 0(%rbx)
    xorl %eax, %eax
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 1f
    rdsspq %rax
1:  movq %rax, 8(%rbx)
    call *%r12
sc_call_checked_ret:
    movq %rsp, 16(%rbx)
    xorl %ecx, %ecx
    cmpb $0, SC_SHSTK_ACTIVE(%rip)
    je 1f
    rdsspq %rcx
1:  movq %rcx, 24(%rbx)
    addq $8, %rsp
    popq %r12
    popq %rbx
    ret

/* cp_near_ret: the inner function swaps its return address on the normal
 * stack for sc_t_evil; its ret (sc_t_tamper_ret_insn) must raise #CP(1). */
.globl sc_t_tamper_ret, sc_t_tamper_ret_insn
sc_t_tamper_ret:
    call 1f
    ret
1:  leaq sc_t_evil(%rip), %rax
    movq %rax, (%rsp)
sc_t_tamper_ret_insn:
    ret
sc_t_evil:
    incq SC_TLOG+{LOG_EVIL}(%rip)
    ret

/* zero_disp_call_shadow: SSP after minus SSP before a call to the next
 * instruction (0: no shadow push) ... */
.globl sc_t_zero_disp_call, sc_t_zero_disp_call_insn
sc_t_zero_disp_call:
    rdsspq %rcx
sc_t_zero_disp_call_insn:
    call 1f
1:  popq %rax
    rdsspq %rax
    subq %rcx, %rax
    ret
/* ... and the control: a call with displacement 1 (over the one-byte RET
 * it returns to) moves SSP by -8; its RET pops both stacks again and lands
 * on that RET, which returns to our caller. No INCSSP: nothing here adjusts
 * SSP by a register value (an NMI could hand back a forged one). */
.globl sc_t_one_disp_call
sc_t_one_disp_call:
    rdsspq %rcx
    call 1f
    ret
1:  rdsspq %rax
    subq %rcx, %rax
    ret

/* cp_iret_rip_only / iret_rip_and_lip: returns 1 when execution resumes
 * after the int3, 2 when the #BP handler redirected it to the landing. */
.globl sc_t_iret_probe, sc_t_iret_int3, sc_t_iret_landing
sc_t_iret_probe:
    xorl %eax, %eax
sc_t_iret_int3:
    int3
    movl $1, %eax
    ret
sc_t_iret_landing:
    movl $2, %eax
    ret

/* breakpoint_not_emulated: a stray int3; returns 8 when the code after it ran. */
.globl sc_t_stray_probe, sc_t_stray_int3
sc_t_stray_probe:
    movl $7, %eax
sc_t_stray_int3:
    int3
    movl $8, %eax
    ret

/* ist_shstk: raise the IST test vector. */
.globl sc_t_ist_int
sc_t_ist_int:
    int ${IST_TEST_VECTOR}
    ret

/* wrss_guard: reach the trampoline's trap int3 (rdi) without going through
 * the trampoline, with two return addresses of our own on both stacks;
 * sc_t_forge_normal also forges the normal-stack slots to the trampoline's
 * (rsi = ret2, rdx = ret1), as an attacker who can write the stack would. */
.globl sc_t_forge_plain, sc_t_forge_normal
sc_t_forge_plain:
    xorl %ecx, %ecx
    jmp 3f
sc_t_forge_normal:
    movl $1, %ecx
3:  call 1f
    ret
1:  call 2f
    ret
2:  testl %ecx, %ecx
    jz 4f
    movq %rsi, (%rsp)
    movq %rdx, 8(%rsp)
4:  jmp *%rdi

/* The page the boot code emits the trampoline into (int3-filled until then). */
.section .shadowcall_tramp, "ax"
.globl sc_tramp_page
sc_tramp_page:
    .fill 4096, 1, 0xcc

.section .text
/* SMP stress and interrupt tests: a site whose targets count with locked
 * increments (several CPUs call it at once), and a second site the NMI
 * handler calls (nested emulation from NMI context). */
.macro STRESS_TARGET name, idx
    TARGET_FN \name
    lock incq SC_STRESS_COUNTS+8*\idx(%rip)
    ret
.endm

STRESS_TARGET sc_s_target_0, 0
STRESS_TARGET sc_s_target_1, 1
STRESS_TARGET sc_s_target_2, 2

.globl sc_s_fn
sc_s_fn:
    SITE sc_s_site
    call sc_s_target_0
    ret

.globl sc_s_nmi_fn
sc_s_nmi_fn:
    SITE sc_s_nmi_site
    call sc_s_target_0
    ret
