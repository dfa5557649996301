//! CET supervisor shadow stacks: bring-up and the few instructions that
//! touch the shadow stack (RDSSP, WRSS), each in one small, named place.
//!
//! Bring-up order (see DESIGN.md): tokens written while the pages are still
//! ordinary data (mm::write_shadow_tokens) -> page tables mark them R/W=0 +
//! Dirty (mm::init_paging) -> CR4.CET (CR0.WP is already 1) -> IA32_PL0_SSP
//! and the interrupt SSP table -> asm `sc_cet_enter`: IA32_S_CET, SETSSBSY,
//! and a jump to a continuation that never returns.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shadowcall::shstk::{self, SSP_TABLE_ENTRIES};
use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::registers::model_specific::{CetFlags, SCet};

use crate::cpu::{Features, InterruptSspTable, Pl0Ssp, Xss};
use crate::mm;

/// Set by `sc_cet_enter` right after SETSSBSY; read by the asm stubs (a byte)
/// to decide whether RDSSP may run.
#[no_mangle]
pub static SC_SHSTK_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Every WRSS this kernel executes is counted (tests prove "nothing written").
pub static WRSS_WRITES: AtomicU64 = AtomicU64::new(0);

/// The S_CET value: shadow stacks on, WRSS allowed (the emulation needs it).
pub const S_CET_FLAGS: CetFlags = CetFlags::SS_ENABLE.union(CetFlags::SS_WRITE_ENABLE);

#[repr(C, align(64))]
struct SspTable([u64; SSP_TABLE_ENTRIES]);
/// One interrupt SSP table per CPU.
static mut SSP_TABLES: [SspTable; mm::MAX_CPUS] = [const { SspTable([0; SSP_TABLE_ENTRIES]) }; mm::MAX_CPUS];

extern "C" {
    fn sc_cet_enter(s_cet: u64, cont: extern "C" fn() -> !, rsp: u64) -> !;
}

pub fn active() -> bool {
    SC_SHSTK_ACTIVE.load(Ordering::Relaxed)
}

/// Are supervisor shadow stacks enforced, read from the CPU (CR4.CET and
/// IA32_S_CET.SH_STK_EN), not from `SC_SHSTK_ACTIVE` (ordinary memory)?
/// For decisions a forged byte must not steer: which CPUs a sync waits for,
/// freeing trampoline records. Slower than `active` (an MSR read).
pub fn enforced() -> bool {
    Cr4::read().contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT) && SCet::read().0.contains(CetFlags::SS_ENABLE)
}

/// The current SSP, or 0 when shadow stacks are off (RDSSP is never executed then).
pub fn rdssp() -> u64 {
    if !active() {
        return 0;
    }
    let ssp: u64;
    // SAFETY: shadow stacks are enabled, so CPUID enumerated CET_SS and RDSSP is defined.
    unsafe { core::arch::asm!("rdsspq {}", out(reg) ssp, options(nomem, nostack)) };
    ssp
}

/// Read a shadow-stack slot (ordinary loads may read shadow-stack pages).
pub fn read_slot(addr: u64) -> u64 {
    // SAFETY: callers pass 8-byte aligned addresses inside a registered shadow stack.
    unsafe { (addr as *const u64).read_volatile() }
}

/// Write one shadow-stack slot with WRSS. Callers must have verified that
/// `addr` is a slot of a registered shadow stack and that `value` is one
/// they derived themselves (never one read from a stack).
///
/// # Safety
/// Changes what a later RET/IRET on that shadow stack will accept.
pub unsafe fn wrss(addr: u64, value: u64) {
    debug_assert!(active());
    WRSS_WRITES.fetch_add(1, Ordering::Relaxed);
    // SAFETY: S_CET.WR_SHSTK_EN is set; the caller vouches for slot and value.
    unsafe { core::arch::asm!("wrssq {v}, ({a})", a = in(reg) addr, v = in(reg) value, options(att_syntax, nostack)) };
}

/// Point IA32_PL0_SSP and the interrupt SSP table of CPU `cpu` at its free
/// tokens, set CR4.CET, then switch shadow stacks on and continue in `cont`
/// at the top of the CPU's kernel stack. Never returns. Lives in the CET
/// bring-up range (`.text.cet`), where no patch site or target may lie.
#[inline(never)]
#[link_section = ".text.cet"]
pub fn enable_and_continue(features: &Features, cpu: usize, cont: extern "C" fn() -> !) -> ! {
    // SAFETY: CR0.WP is set by the boot code; S_CET is still 0, so CR4.CET alone changes nothing.
    unsafe { Cr4::update(|f| f.insert(Cr4Flags::CONTROL_FLOW_ENFORCEMENT)) };
    Pl0Ssp::write(shstk::token_addr(mm::primary_shadow_stack(cpu).hi));
    // SAFETY: only this CPU writes its table, before the CPU reads it.
    let table = unsafe { &mut (*core::ptr::addr_of_mut!(SSP_TABLES))[cpu] };
    for ist in 1..=mm::IST_COUNT {
        let token = shstk::token_addr(mm::ist_shadow_stack(cpu, ist).hi);
        assert!(shstk::ist_token_well_placed(token));
        table.0[ist] = token;
    }
    InterruptSspTable::write(table.0.as_ptr() as u64);
    if features.xsaves && features.xss_cet_s {
        Xss::write(Xss::read() | Xss::CET_S);
    }
    let rsp = mm::kernel_stack(cpu).hi - 8;
    // SAFETY: everything sc_cet_enter needs is in place (tokens, CR4.CET,
    // PL0_SSP); it never returns and `cont` never returns either.
    unsafe { sc_cet_enter(S_CET_FLAGS.bits(), cont, rsp) }
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
