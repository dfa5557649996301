//! CET supervisor shadow-stack bring-up for a host kernel: the MSRs the
//! `x86_64` crate lacks (one zero-sized type each), the interrupt SSP table,
//! CPUID detection, and the enable sequence that ends in a continuation.
//!
//! The order a host follows on each CPU (DESIGN.md §3):
//! 1. write a free supervisor token ([`shstk::supervisor_token`]) at the top
//!    slot of every shadow stack while its page is still ordinary memory;
//! 2. map the shadow-stack pages R/W=0, Dirty=1 (and keep CR0.WP=1);
//! 3. fill a [`SspTable`] with the IST stacks' token addresses;
//! 4. call [`enable`]: CR4.CET, IA32_PL0_SSP, the SSP table, IA32_S_CET,
//!    SETSSBSY, then a jump to the continuation, which never returns.
//!
//! ```no_run
//! # fn demo(primary_top: u64, nmi_top: u64, stack_top: u64) -> ! {
//! use shadowcall::cet::{self, Bringup, SspTable};
//! use shadowcall::shstk::token_addr;
//!
//! static mut TABLE: SspTable = SspTable::new();
//! extern "C" fn kernel_main() -> ! { loop {} }
//!
//! let support = cet::Support::detect();
//! assert!(support.supervisor_shadow_stacks());
//! // SAFETY: single CPU, before the table is handed to the CPU.
//! let table = unsafe { &mut *core::ptr::addr_of_mut!(TABLE) };
//! table.set(2, token_addr(nmi_top)).unwrap();
//! let bringup = Bringup { pl0_token: token_addr(primary_top), ssp_table: table, rsp: stack_top - 8 };
//! // SAFETY: tokens written and pages mapped as shadow stacks (steps 1-2).
//! unsafe { cet::enable(&bringup, &support, kernel_main) }
//! # }
//! ```

use core::sync::atomic::{AtomicBool, Ordering};

use raw_cpuid::CpuId;
use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::registers::model_specific::{CetFlags, Msr, SCet};

use crate::shstk::{self, SSP_TABLE_ENTRIES};

/// Set by the enable sequence right after SETSSBSY (the asm stubs read it as a
/// byte to decide whether RDSSP may run). Only ever goes from false to true.
#[no_mangle]
pub static SC_SHSTK_ACTIVE: AtomicBool = AtomicBool::new(false);

/// IA32_S_CET: supervisor CET control (the `x86_64` crate's [`SCet`]).
pub const S_CET_MSR: u32 = 0x6a2;

/// The S_CET value the engine needs: shadow stacks on, WRSS allowed (the
/// emulation writes return addresses with it).
pub const S_CET_FLAGS: CetFlags = CetFlags::SS_ENABLE.union(CetFlags::SS_WRITE_ENABLE);

/// IA32_PL0_SSP: the supervisor shadow-stack token SETSSBSY claims.
pub struct Pl0Ssp;

/// IA32_INTERRUPT_SSP_TABLE_ADDR: the table of IST shadow-stack tokens.
pub struct InterruptSspTable;

/// IA32_XSS: supervisor state components managed by XSAVES.
pub struct Xss;

impl Pl0Ssp {
    /// The MSR's number.
    pub const MSR: u32 = 0x6a4;

    /// # Safety
    /// `token` is the address of a free supervisor token at the top of a
    /// mapped shadow stack that nothing else uses; the next ring-0 shadow
    /// stack switch (SETSSBSY) claims it.
    pub unsafe fn write(token: u64) {
        // SAFETY: the caller vouches for the token.
        unsafe { Msr::new(Self::MSR).write(token) }
    }

    /// The token address SETSSBSY claims next.
    pub fn read() -> u64 {
        // SAFETY: reading IA32_PL0_SSP has no side effect (CET_SS enumerated by the caller's CPU).
        unsafe { Msr::new(Self::MSR).read() }
    }
}

impl InterruptSspTable {
    /// The MSR's number.
    pub const MSR: u32 = 0x6a8;

    /// # Safety
    /// Every non-zero entry of `table` is a free supervisor token on a
    /// mapped IST shadow stack reserved for that IST index on this CPU.
    pub unsafe fn write(table: &'static SspTable) {
        // SAFETY: the caller vouches for the entries; the table is 'static.
        unsafe { Msr::new(Self::MSR).write(table.0.as_ptr() as u64) }
    }
}

impl Xss {
    /// The MSR's number.
    pub const MSR: u32 = 0xda0;
    /// XSS component bit for supervisor CET state (S_CET, PL0_SSP..PL2_SSP).
    pub const CET_S: u64 = 1 << 12;

    /// # Safety
    /// CPUID enumerates XSAVES.
    pub unsafe fn read() -> u64 {
        // SAFETY: the caller vouches that IA32_XSS exists.
        unsafe { Msr::new(Self::MSR).read() }
    }

    /// # Safety
    /// Only bits CPUID.(0xD,1):ECX enumerates are set, and the kernel's
    /// XSAVES areas are sized for them.
    pub unsafe fn write(v: u64) {
        // SAFETY: the caller vouches for the bits.
        unsafe { Msr::new(Self::MSR).write(v) }
    }
}

/// One interrupt SSP table: entry `i` is the token of IST `i` (entry 0 unused).
#[repr(C, align(64))]
pub struct SspTable(pub [u64; SSP_TABLE_ENTRIES]);

/// Why an [`SspTable`] entry was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SspTableError {
    /// IST indices are 1..=7.
    BadIndex(usize),
    /// The token and the 3-slot frame the CPU pushes below it must share one
    /// 32-byte aligned region (SDM vol. 3 §6.14.5): the token must be the
    /// top slot of a 32-byte aligned top.
    Misplaced(u64),
}

impl SspTable {
    /// A table with no IST token (an IST vector then raises #GP on delivery).
    pub const fn new() -> Self {
        SspTable([0; SSP_TABLE_ENTRIES])
    }

    /// Set the token of IST `ist`.
    pub fn set(&mut self, ist: usize, token: u64) -> Result<(), SspTableError> {
        if ist == 0 || ist >= SSP_TABLE_ENTRIES {
            return Err(SspTableError::BadIndex(ist));
        }
        if !shstk::ist_token_well_placed(token) {
            return Err(SspTableError::Misplaced(token));
        }
        self.0[ist] = token;
        Ok(())
    }

    /// The token of IST `ist` (0: none).
    pub fn get(&self, ist: usize) -> u64 {
        self.0[ist]
    }
}

impl Default for SspTable {
    fn default() -> Self {
        Self::new()
    }
}

const EAXD1_XSAVES: u32 = 1 << 3;
const ECXD1_CET_S: u32 = 1 << 12;
const LEAF_XSAVE: u32 = 0xd;

/// What CPUID says about supervisor shadow stacks on this CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Support {
    /// CPUID.(7,0):ECX\[7\] CET_SS: shadow stacks.
    pub cet_ss: bool,
    /// CPUID.(7,1):EDX\[18\] CET_SSS: supervisor shadow stacks survive VMM
    /// paging games (informational).
    pub cet_sss: bool,
    /// CPUID.(0xD,1):EAX\[3\] XSAVES.
    pub xsaves: bool,
    /// CPUID.(0xD,1):ECX\[12\]: XSS can hold supervisor CET state.
    pub xss_cet_s: bool,
}

impl Support {
    /// Read CPUID on the running CPU.
    pub fn detect() -> Self {
        let id = CpuId::new();
        let mut s = Support::default();
        if let Some(ext) = id.get_extended_feature_info() {
            s.cet_ss = ext.has_cet_ss();
            s.cet_sss = ext.has_cet_sss();
        }
        if core::arch::x86_64::__cpuid(0).eax >= LEAF_XSAVE {
            let d1 = core::arch::x86_64::__cpuid_count(LEAF_XSAVE, 1);
            s.xsaves = d1.eax & EAXD1_XSAVES != 0;
            s.xss_cet_s = d1.ecx & ECXD1_CET_S != 0;
        }
        s
    }

    /// Can [`enable`] run on this CPU?
    pub fn supervisor_shadow_stacks(&self) -> bool {
        self.cet_ss
    }
}

/// Where this CPU's shadow stacks are, for [`enable`].
pub struct Bringup {
    /// IA32_PL0_SSP: the free token of the CPU's primary shadow stack.
    pub pl0_token: u64,
    /// The CPU's interrupt SSP table (its own; IST entries only).
    pub ssp_table: &'static SspTable,
    /// RSP for the continuation (16-byte aligned minus 8, as after a call).
    pub rsp: u64,
}

extern "C" {
    fn sc_cet_enter(s_cet: u64, cont: extern "C" fn() -> !, rsp: u64) -> !;
}

core::arch::global_asm!(include_str!("../asm/cet.S"), MSR_S_CET = const S_CET_MSR, options(att_syntax));

/// Turn supervisor shadow stacks on for this CPU and continue in `cont` on
/// `b.rsp`, with SSP just below the primary token. Never returns; the
/// caller's stack frames are abandoned (their return addresses were never
/// pushed on a shadow stack). Lives in `.text.cet`, where a host keeps no
/// patch site or target.
///
/// # Safety
/// - `support.supervisor_shadow_stacks()`, CR0.WP=1, interrupts off;
/// - `b.pl0_token` and every entry of `b.ssp_table` are free supervisor
///   tokens at the tops of pages mapped R/W=0, Dirty=1 (shadow-stack pages),
///   used by this CPU only;
/// - `b.rsp` is the top of a mapped stack nothing else uses.
#[inline(never)]
#[link_section = ".text.cet"]
pub unsafe fn enable(b: &Bringup, support: &Support, cont: extern "C" fn() -> !) -> ! {
    // SAFETY: CR0.WP is set (caller); S_CET is still 0, so CR4.CET alone changes nothing.
    unsafe { Cr4::update(|f| f.insert(Cr4Flags::CONTROL_FLOW_ENFORCEMENT)) };
    // SAFETY: the caller vouches for the token and the table.
    unsafe {
        Pl0Ssp::write(b.pl0_token);
        InterruptSspTable::write(b.ssp_table);
    }
    if support.xsaves && support.xss_cet_s {
        // SAFETY: CPUID enumerates XSAVES and the CET_S component.
        unsafe { Xss::write(Xss::read() | Xss::CET_S) };
    }
    // SAFETY: tokens, CR4.CET, PL0_SSP and the SSP table are in place; the
    // asm never returns and neither does `cont`.
    unsafe { sc_cet_enter(S_CET_FLAGS.bits(), cont, b.rsp) }
}

/// Have shadow stacks been turned on by [`enable`] (on any CPU)? Cheap; for
/// decisions a forged byte must not steer, use [`enforced`].
#[inline]
pub fn active() -> bool {
    SC_SHSTK_ACTIVE.load(Ordering::Relaxed)
}

/// Are supervisor shadow stacks enforced on this CPU, read from the CPU
/// (CR4.CET and IA32_S_CET.SH_STK_EN), not from memory? An MSR read.
pub fn enforced() -> bool {
    Cr4::read().contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT) && SCet::read().0.contains(CetFlags::SS_ENABLE)
}

/// The current SSP, or 0 when shadow stacks are off (RDSSP is not executed then).
#[inline]
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
///
/// # Safety
/// `addr` is 8-byte aligned and mapped.
#[inline]
pub unsafe fn read_slot(addr: u64) -> u64 {
    // SAFETY: the caller vouches for the address.
    unsafe { (addr as *const u64).read_volatile() }
}

/// Write one shadow-stack slot with WRSS.
///
/// # Safety
/// Shadow stacks are on with WR_SHSTK_EN; `addr` is a slot of a shadow stack
/// the caller has checked (found from RDSSP), and `value` is derived from
/// the shadow stack itself or read-only data, never from ordinary memory
/// (DESIGN.md §11): it changes what a later RET/IRET on that stack accepts.
#[inline]
pub unsafe fn wrss(addr: u64, value: u64) {
    // SAFETY: the caller vouches for slot and value.
    unsafe { core::arch::asm!("wrssq {v}, ({a})", a = in(reg) addr, v = in(reg) value, options(att_syntax, nostack)) };
}

/// Pop `slots` shadow-stack slots without comparing them (INCSSPQ; the CPU
/// uses the low 8 bits, so 0..=255).
///
/// # Safety
/// Shadow stacks are on, and the popped slots belong to frames that no
/// return will use again (the caller has balanced the normal stack the same
/// way): popping live return addresses lets a later RET accept whatever the
/// slot above holds. A production kernel keeps every INCSSP in its critical
/// regions (the reference kernel's build refuses one outside them).
#[inline]
pub unsafe fn incssp(slots: u8) {
    // SAFETY: the caller vouches that the slots are dead.
    unsafe { core::arch::asm!("incsspq {n}", n = in(reg) u64::from(slots), options(att_syntax, nostack)) };
}
