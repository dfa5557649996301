//! CET supervisor shadow stacks for the example, with the engine's helpers
//! (`shadowcall::cet`): one shadow-stack page on the boot CPU (asm/engine.S
//! `sc_stacks`), turned on once and never off.
//!
//! Order: token written while the page is ordinary data -> its PTE made
//! R/W=0 + Dirty (a shadow-stack page) -> `shadowcall::cet::enable`: CR4.CET
//! (CR0.WP is set by boot.S), IA32_PL0_SSP, the (empty) interrupt SSP
//! table, IA32_S_CET, SETSSBSY, and a jump to a continuation on a fresh
//! stack that never returns.

use alloc::format;
use alloc::string::String;

use shadowcall::cet::{self, Bringup, SspTable, Support, S_CET_FLAGS};
use shadowcall::shstk::{self, TOKEN_BUSY};
use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::registers::model_specific::SCet;

use crate::host::{self, PTE_DIRTY, PTE_PRESENT};

/// No IST vector here: every entry stays empty.
static SSP_TABLE: SspTable = SspTable::new();

extern "C" {
    fn example_shstk_top_is_ret() -> bool;
}

/// Does this CPU have supervisor shadow stacks?
pub fn supported() -> bool {
    Support::detect().supervisor_shadow_stacks()
}

/// The shadow-stack page `[lo, hi)` (asm/engine.S `sc_stacks`).
pub fn bounds() -> shstk::StackBounds {
    host::shadow_stack()
}

/// Turn shadow stacks on and continue in `cont` with RSP = `rsp`. Never returns.
///
/// # Safety
/// `rsp` is the top of a stack nothing else uses; the CPU has CET_SS (`supported`).
pub unsafe fn enable_and_continue(cont: extern "C" fn() -> !, rsp: u64) -> ! {
    let b = bounds();
    let token = shstk::token_addr(b.hi);
    // SAFETY: the page is still ordinary writable data; nobody else uses it.
    unsafe { (token as *mut u64).write_volatile(shstk::supervisor_token(token)) };
    host::map(b.lo, PTE_PRESENT | PTE_DIRTY);
    let bringup = Bringup { pl0_token: token, ssp_table: &SSP_TABLE, rsp };
    // SAFETY: the token is free at the top of a page now mapped as a shadow
    // stack; boot.S set CR0.WP; interrupts are off; `rsp` is the caller's.
    unsafe { cet::enable(&bringup, &Support::detect(), cont) }
}

/// Are shadow stacks enforced on this CPU, on our page? Read from the CPU.
pub fn check() -> Result<String, String> {
    let b = bounds();
    if !Cr4::read().contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT) {
        return Err("CR4.CET is clear".into());
    }
    let s_cet = SCet::read().0;
    if s_cet != S_CET_FLAGS {
        return Err(format!("IA32_S_CET reads {s_cet:?}, not {S_CET_FLAGS:?}"));
    }
    let ssp = cet::rdssp();
    if !b.holds_slots(ssp, 1) {
        return Err(format!("SSP {ssp:#x} is outside the shadow-stack page {:#x}..{:#x}", b.lo, b.hi));
    }
    let token = shstk::token_addr(b.hi);
    // SAFETY: the token slot is aligned and mapped (ordinary loads may read a shadow-stack page).
    let value = unsafe { cet::read_slot(token) };
    if !shstk::token_is_busy(value, token) {
        return Err(format!("the token at {token:#x} reads {value:#x}, not busy ({:#x})", token | TOKEN_BUSY));
    }
    // SAFETY: shadow stacks are on (checked above).
    if !unsafe { example_shstk_top_is_ret() } {
        return Err("a CALL did not push its return address on the shadow stack".into());
    }
    Ok(format!("SSP {ssp:#x} in {:#x}..{:#x}, token busy, CALL pushes both stacks", b.lo, b.hi))
}
