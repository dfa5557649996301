//! CET supervisor shadow stacks for the example, in one file: one shadow-stack
//! page on the boot CPU, turned on once and never off. (Example-local; the
//! crate's own helpers may replace it.)
//!
//! Order: token written while the page is ordinary data -> its PTE made
//! R/W=0 + Dirty (a shadow-stack page) -> CR4.CET (CR0.WP is set by boot.S)
//! -> IA32_PL0_SSP -> asm `example_cet_enter`: IA32_S_CET, SETSSBSY, and a
//! jump to a continuation on a fresh stack that never returns.

use alloc::format;
use alloc::string::String;
use core::arch::x86_64::__cpuid_count;
use core::ptr::addr_of;

use shadowcall::shstk::{self, TOKEN_BUSY};
use x86_64::instructions::tlb;
use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::registers::model_specific::{CetFlags, Msr, SCet};
use x86_64::VirtAddr;

use crate::{boot_pte, KERNEL_VMA};

/// CPUID.(7,0):ECX[7]: CET supervisor shadow stacks.
const CPUID_EXT_FEATURES: u32 = 7;
const ECX_CET_SS: u32 = 1 << 7;
const MSR_PL0_SSP: u32 = 0x6a4;
/// S_CET: shadow stacks on, WRSS allowed (the call emulation needs it).
pub const S_CET_FLAGS: CetFlags = CetFlags::SS_ENABLE.union(CetFlags::SS_WRITE_ENABLE);
const PAGE_SIZE: u64 = 4096;
/// A shadow-stack PTE: present, R/W=0, Dirty.
const PTE_PRESENT: u64 = 1;
const PTE_DIRTY: u64 = 1 << 6;

#[repr(C, align(4096))]
struct ShadowPage([u64; (PAGE_SIZE / shstk::SLOT) as usize]);
/// The shadow stack: ordinary .bss until `enable_and_continue` remaps it.
static mut SHADOW_STACK: ShadowPage = ShadowPage([0; (PAGE_SIZE / shstk::SLOT) as usize]);

extern "C" {
    fn example_cet_enter(s_cet: u64, cont: extern "C" fn() -> !, rsp: u64) -> !;
    fn example_shstk_top_is_ret() -> bool;
}

/// Does this CPU have supervisor shadow stacks?
pub fn supported() -> bool {
    // An absent leaf 7 reads as zeros on x86-64: no CET.
    __cpuid_count(CPUID_EXT_FEATURES, 0).ecx & ECX_CET_SS != 0
}

/// The shadow-stack page `[lo, hi)`.
pub fn bounds() -> shstk::StackBounds {
    let lo = addr_of!(SHADOW_STACK) as u64;
    shstk::StackBounds { lo, hi: lo + PAGE_SIZE }
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
    // SAFETY: the PTE of our own page; it becomes R/W=0 + Dirty: a shadow-stack page.
    unsafe { boot_pte(b.lo).write_volatile((b.lo - KERNEL_VMA) | PTE_PRESENT | PTE_DIRTY) };
    tlb::flush(VirtAddr::new(b.lo));
    // SAFETY: CR0.WP is set; with S_CET still 0, CR4.CET alone changes nothing.
    unsafe { Cr4::update(|f| f.insert(Cr4Flags::CONTROL_FLOW_ENFORCEMENT)) };
    // SAFETY: PL0_SSP points at the free token of our shadow stack.
    unsafe { Msr::new(MSR_PL0_SSP).write(token) };
    // SAFETY: token, CR4.CET and PL0_SSP are in place; neither function returns.
    unsafe { example_cet_enter(S_CET_FLAGS.bits(), cont, rsp) }
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
    let ssp: u64;
    // SAFETY: CR4.CET and S_CET.SH_STK_EN are set (checked above): RDSSP is defined.
    unsafe { core::arch::asm!("rdsspq {}", out(reg) ssp, options(nomem, nostack)) };
    if !b.holds_slots(ssp, 1) {
        return Err(format!("SSP {ssp:#x} is outside the shadow-stack page {:#x}..{:#x}", b.lo, b.hi));
    }
    let token = shstk::token_addr(b.hi);
    // SAFETY: ordinary loads may read a shadow-stack page.
    let value = unsafe { (token as *const u64).read_volatile() };
    if !shstk::token_is_busy(value, token) {
        return Err(format!("the token at {token:#x} reads {value:#x}, not busy ({:#x})", token | TOKEN_BUSY));
    }
    // SAFETY: shadow stacks are on (checked above).
    if !unsafe { example_shstk_top_is_ret() } {
        return Err("a CALL did not push its return address on the shadow stack".into());
    }
    Ok(format!("SSP {ssp:#x} in {:#x}..{:#x}, token busy, CALL pushes both stacks", b.lo, b.hi))
}
