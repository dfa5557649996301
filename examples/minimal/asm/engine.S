/* What the engine's #BP stub and exits (the shadowcall crate, feature
 * `entry`) take from this kernel's layout, as link-time symbols. One CPU:
 * its stack area is its one shadow-stack page (the exits find a CPU from
 * RDSSP), it has no NMI IST stack (nor its shadow stack), and one record
 * page. */
.globl SC_MAX_CPUS, SC_CPU_STACKS_SIZE, SC_NMI_STACK_OFF, SC_IST_STACK_SIZE
.globl SC_NMI_SHSTK_OFF, SC_NMI_SHSTK_SIZE
.set SC_MAX_CPUS, 1
.set SC_CPU_STACKS_SIZE, {PAGE_SIZE}
.set SC_NMI_STACK_OFF, 0
.set SC_IST_STACK_SIZE, 0
.set SC_NMI_SHSTK_OFF, 0
.set SC_NMI_SHSTK_SIZE, 0

/* The trampoline's text page: int3 until the engine writes it (once). */
.section .text.tramp, "ax"
.balign {PAGE_SIZE}
.globl sc_tramp_page
sc_tramp_page:
    .fill {PAGE_SIZE}, 1, 0xcc

/* Zero at boot; kmain maps each page as the comment says. */
.section .bss.engine, "aw", @nobits
.balign {PAGE_SIZE}
.globl sc_stacks, sc_tramp_records, __sealed_start, __sealed_end, example_poke_window
sc_stacks:                  /* the shadow stack (cet.rs: R/W=0, Dirty) */
    .skip {PAGE_SIZE}
sc_tramp_records:           /* the record page (shadow-stack page, too) */
    .skip {PAGE_SIZE}
__sealed_start:             /* the sealed batch (read-only) */
    .skip {PAGE_SIZE}
__sealed_end:
example_poke_window:        /* the text window (unmapped but while poking) */
    .skip {PAGE_SIZE}
