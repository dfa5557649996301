/* The crate's check of a sealed batch before publication (feature `entry`;
 * src/entry.rs concatenates it after sealed.S, before bp.S, which purges
 * the other sealed.S macros). A host whose sealed-area writers are asm runs
 * sealed.S SEALED_VALID itself, inside its publisher's critical region,
 * with the other writers excluded (the reference kernel's poke.S
 * sc_poke_publish); a host that writes the area from Rust calls this
 * before it writes the magic word, with no other writer of the area
 * running (the example kernel: one CPU, interrupts off). Its verdict is a
 * return value: it must not cross an interrupt whose trap frame an attacker
 * can write (an NMI with forged registers) between this check and the magic
 * word's write; a host with such interrupts decides in asm, as above
 * (review 11 F3). */

.pushsection .text, "ax"

/* u64 sc_sealed_check(void): 1 if the sealed area's content (all but the
 * magic word) passes SEALED_VALID, else 0. Reads only; System V ABI. */
.globl sc_sealed_check
sc_sealed_check:
    pushq %rbx
    SEALED_VALID 1f
    popq %rbx
    movl $1, %eax
    ret
1:  popq %rbx
    xorl %eax, %eax
    ret

.popsection

.purgem SEALED_VALID
