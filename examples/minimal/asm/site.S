/* The example's patch site: a 5-byte call in a function, its address
 * registered in .shadowcall_sites; the targets a patch may call, registered
 * in .shadowcall_targets. Each target counts its calls. */
.section .text
.balign 16
.globl example_site_fn, example_site
example_site_fn:
    .pushsection .shadowcall_sites, "a"
    .quad example_site
    .popsection
example_site:
    call example_target_a
    ret

.macro TARGET name, counter
    .pushsection .shadowcall_targets, "a"
    .quad \name
    .popsection
    .balign 16
    .globl \name
\name:
    lock incq \counter(%rip)
    ret
.endm

TARGET example_target_a, EXAMPLE_CALLS_A
TARGET example_target_b, EXAMPLE_CALLS_B
