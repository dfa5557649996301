//! This kernel's use of the engine's CET bring-up (`shadowcall::cet`): which
//! stacks each CPU gets, and a counted WRSS for the self-tests.
//!
//! Bring-up order (see DESIGN.md): tokens written while the pages are still
//! ordinary data (mm::write_shadow_tokens) -> page tables mark them R/W=0 +
//! Dirty (mm::init_paging) -> `shadowcall::cet::enable`: CR4.CET (CR0.WP is
//! already 1), IA32_PL0_SSP, the interrupt SSP table, IA32_S_CET, SETSSBSY,
//! and a jump to a continuation that never returns.

#[cfg(feature = "test-hooks")]
use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall::cet::{Bringup, SspTable};
use shadowcall::shstk;
use x86_64::registers::model_specific::{CetFlags, SCet};

use crate::cpu::Features;
use crate::mm;

pub use shadowcall::cet::{active, enforced, rdssp};

/// Every WRSS this kernel executes is counted (tests prove "nothing written").
#[cfg(feature = "test-hooks")]
pub static WRSS_WRITES: AtomicU64 = AtomicU64::new(0);

/// One interrupt SSP table per CPU.
static mut SSP_TABLES: [SspTable; mm::MAX_CPUS] = [const { SspTable::new() }; mm::MAX_CPUS];

/// Read a shadow-stack slot (ordinary loads may read shadow-stack pages).
pub fn read_slot(addr: u64) -> u64 {
    // SAFETY: callers pass 8-byte aligned addresses inside a registered shadow stack.
    unsafe { shadowcall::cet::read_slot(addr) }
}

/// Write one shadow-stack slot with WRSS. Self-tests only (test-hooks
/// builds): the production build has no WRSS in compiled Rust, whose
/// operands the compiler may spill to the normal stack (DESIGN §11); its
/// WRSS are all in asm (the #BP exits, the unwind, the sync words). Callers must have verified that
/// `addr` is a slot of a registered shadow stack and that `value` is one
/// they derived themselves (never one read from a stack).
///
/// # Safety
/// Changes what a later RET/IRET on that shadow stack will accept.
#[cfg(feature = "test-hooks")]
pub unsafe fn wrss(addr: u64, value: u64) {
    debug_assert!(active());
    WRSS_WRITES.fetch_add(1, Ordering::Relaxed);
    // SAFETY: S_CET.WR_SHSTK_EN is set; the caller vouches for slot and value.
    unsafe { shadowcall::cet::wrss(addr, value) };
}

/// Point IA32_PL0_SSP and the interrupt SSP table of CPU `cpu` at its free
/// tokens, set CR4.CET, then switch shadow stacks on and continue in `cont`
/// at the top of the CPU's kernel stack. Never returns. Lives in the CET
/// bring-up range (`.text.cet`), where no patch site or target may lie.
#[inline(never)]
#[link_section = ".text.cet"]
pub fn enable_and_continue(features: &Features, cpu: usize, cont: extern "C" fn() -> !) -> ! {
    // SAFETY: only this CPU writes its table, before the CPU reads it.
    let table = unsafe { &mut (*core::ptr::addr_of_mut!(SSP_TABLES))[cpu] };
    for ist in 1..=mm::IST_COUNT {
        let token = shstk::token_addr(mm::ist_shadow_stack(cpu, ist).hi);
        table.set(ist, token).expect("IST token at a 32-byte aligned top");
    }
    let bringup = Bringup {
        pl0_token: shstk::token_addr(mm::primary_shadow_stack(cpu).hi),
        ssp_table: table,
        rsp: mm::kernel_stack(cpu).hi - 8,
    };
    // SAFETY: mm wrote the tokens before mapping the pages as shadow stacks
    // (R/W=0, D=1), boot set CR0.WP, interrupts are off, and each stack and
    // table belongs to this CPU only.
    unsafe { shadowcall::cet::enable(&bringup, &features.cet, cont) }
}

/// Read S_CET.
pub fn s_cet() -> CetFlags {
    SCet::read().0
}

/// The running CPU's SSP table entry for IST `ist`.
pub fn ssp_table_entry(ist: usize) -> u64 {
    let cpu = crate::percpu::this_cpu().index;
    // SAFETY: plain read of a table written once when the CPU came up.
    unsafe { (*core::ptr::addr_of!(SSP_TABLES))[cpu].0[ist] }
}
