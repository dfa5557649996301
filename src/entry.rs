//! The #BP entry stub and its exits (asm/bp.S), assembled into the crate
//! with the feature `entry`.
//!
//! `sc_isr_3` is the host's IDT entry for vector 3 (an interrupt gate, no
//! IST). It copies the hardware frame 8 bytes lower (the gap an emulated
//! push needs), saves the registers as a [`TrapFrame`](crate::frame::TrapFrame),
//! reads SSP, and calls the host's `sc_bp_handler(&mut TrapFrame, ssp) ->
//! Exit`, which calls [`Patcher::handle_int3`](crate::engine::Patcher::handle_int3).
//! The exit named by the [`Exit`](crate::engine::Exit) then writes the shadow
//! stack, from the shadow stack and read-only data only (DESIGN §11), or
//! calls the host's `sc_bp_exit_refused(&mut TrapFrame, ssp)` if a check
//! fails. Everything from `sc_bpx_region_start` to `sc_bpx_region_end` is a
//! critical region: the host's NMI and #MC entries must give an interrupted
//! exit its registers back from a page only WRSS writes (DESIGN §8.3).
//!
//! The host defines its layout as link-time symbols (README "Use it in your
//! kernel"): `sc_stacks`, `SC_CPU_STACKS_SIZE`, `SC_MAX_CPUS`,
//! `SC_NMI_STACK_OFF`, `SC_IST_STACK_SIZE`, `SC_NMI_SHSTK_OFF`,
//! `SC_NMI_SHSTK_SIZE`, the optional `sc_bp_probe`, `sc_tramp_records`,
//! `sc_tramp_page`, `__sealed_start`/`__sealed_end`, `__sites_start`/
//! `__sites_end`, `__targets_start`/`__targets_end`. With `test-hooks`
//! also the self-test probe symbols `sc_t_iret_int3`, `sc_t_iret_landing`
//! and the bytes `SC_T_EXIT_NMI`, `SC_T_FAST` (the fast path on) and
//! `SC_T_FAST_NMI`.

use core::mem::{offset_of, size_of};

use crate::emul::record;
use crate::frame::TrapFrame;
use crate::patch::{SealedEntry, SealedHeader};

// The exits index sealed entries with a shift, and find a CPU's record page
// by shifting its index.
const _: () = assert!(size_of::<SealedEntry>().is_power_of_two());
const _: () = assert!(record::RECORD_PAGE_SIZE.is_power_of_two());
const _: () = assert!(record::IN_EXIT_WORD + 8 <= record::RECORD_PAGE_SIZE);

core::arch::global_asm!(
    concat!(
        include_str!("../asm/regs.S"),
        include_str!("../asm/stack_cpu.S"),
        include_str!("../asm/sealed.S"),
        include_str!("../asm/publish.S"),
        include_str!("../asm/bp.S")
    ),
    BP_GAP = const crate::frame::BP_STACK_GAP,
    FRAME_RIP = const offset_of!(TrapFrame, rip),
    FRAME_RSP = const offset_of!(TrapFrame, rsp),
    FRAME_RCX = const offset_of!(TrapFrame, rcx),
    FRAME_R9 = const offset_of!(TrapFrame, r9),
    FRAME_RFLAGS = const offset_of!(TrapFrame, rflags),
    BP_RSP_MIN = const crate::frame::BP_RETURN_RSP_MIN,
    BP_RSP_MAX = const crate::frame::BP_RETURN_RSP_MAX,
    RFLAGS_IF_BIT = const crate::frame::RFLAGS_IF.trailing_zeros(),
    BPX_COUNT = const crate::engine::ACTION_COUNT,
    SEALED_LIVE = const crate::patch::SEALED_MAGIC,
    SEALED_STATE = const offset_of!(SealedHeader, magic),
    SEALED_ENTRIES_OFF = const offset_of!(SealedHeader, entries_off),
    SEALED_LEN = const offset_of!(SealedHeader, len),
    SEALED_HEADER_SIZE = const size_of::<SealedHeader>(),
    SEALED_DEPTH = const offset_of!(SealedHeader, depth),
    SEALED_KEYS_OFF = const offset_of!(SealedHeader, keys_off),
    SEALED_SLOTS_OFF = const offset_of!(SealedHeader, slots_off),
    CODE_SHADOW_GAP = const crate::engine::CODE_SHADOW_GAP,
    CODE_CLASSIC = const crate::engine::CODE_CLASSIC,
    CODE_TRAMPOLINE = const crate::engine::CODE_TRAMPOLINE,
    INT3 = const crate::patch::INT3,
    ENTRY_SIZE = const size_of::<SealedEntry>(),
    ENTRY_SHIFT = const size_of::<SealedEntry>().trailing_zeros(),
    ENTRY_SITE = const offset_of!(SealedEntry, site),
    ENTRY_TARGET = const offset_of!(SealedEntry, target),
    ENTRY_KIND = const offset_of!(SealedEntry, kind),
    ENTRY_BYTES = const offset_of!(SealedEntry, bytes),
    SITE_LEN = const crate::patch::SITE_LEN,
    OPC_CALL_REL32 = const crate::patch::OPC_CALL_REL32,
    OPC_JMP_REL32 = const crate::patch::OPC_JMP_REL32,
    NOP5_WORD = const crate::patch::NOP5_WORD,
    RET_WORD = const crate::patch::RET_WORD,
    KIND_CALL = const crate::patch::KIND_CALL,
    KIND_JMP = const crate::patch::KIND_JMP,
    KIND_NOP = const crate::patch::KIND_NOP,
    KIND_RET = const crate::patch::KIND_RET,
    KIND_MASK = const crate::patch::KIND_MASK,
    SITE_INDEX_SHIFT = const crate::patch::SITE_INDEX_SHIFT,
    TARGET_INDEX_SHIFT = const crate::patch::TARGET_INDEX_SHIFT,
    INDEX_MASK = const crate::patch::INDEX_MASK,
    IN_EXIT = const record::IN_EXIT_WORD,
    SYNC_WORD = const record::SYNC_WORD,
    SYNC_GEN = const record::SYNC_GEN_WORD,
    MY_GEN = const record::MY_GEN_WORD,
    GEN_CPU_BITS = const record::GEN_CPU_BITS,
    RECORD_PAGE_BYTES = const record::RECORD_PAGE_SIZE,
    RECORD_PAGE_SHIFT = const record::RECORD_PAGE_SIZE.trailing_zeros(),
    RECORD_SIZE = const record::RECORD_SIZE,
    RECORDS_PER_PAGE = const record::RECORDS_PER_PAGE,
    REC_SSP = const record::REC_SSP,
    REC_RSP_IF = const record::REC_RSP_IF,
    REC_SITE = const record::REC_SITE,
    REC_TARGET = const record::REC_TARGET,
    TRAMP_RET1 = const crate::tramp::TRAMP_RET1_OFF,
    TRAMP_RET2 = const crate::tramp::TRAMP_RET2_OFF,
    TRAMP_TRAP = const crate::tramp::TRAMP_TRAP_OFF,
    TEST_HOOKS = const cfg!(feature = "test-hooks") as u8,
    CR4_CET_BIT = const x86_64::registers::control::Cr4Flags::CONTROL_FLOW_ENFORCEMENT.bits().trailing_zeros(),
    options(att_syntax)
);

// The host's layout symbols, as the asm reads them. The absolute ones
// (SC_*) are numbers: their "address" is their value.
extern "C" {
    static sc_stacks: u8;
    static sc_tramp_records: u8;
    static sc_tramp_page: u8;
    static __sealed_start: u8;
    static __sealed_end: u8;
    static __sites_start: u64;
    static __sites_end: u64;
    static __targets_start: u64;
    static __targets_end: u64;
    static SC_CPU_STACKS_SIZE: u8;
    static SC_MAX_CPUS: u8;
    static SC_NMI_STACK_OFF: u8;
    static SC_IST_STACK_SIZE: u8;
    static SC_NMI_SHSTK_OFF: u8;
    static SC_NMI_SHSTK_SIZE: u8;
    // The crate's own word (bp.S): the host's optional `sc_bp_probe`, or 0.
    static sc_bp_probe_ref: u64;
}

/// The host's layout as the asm sees it (link-time symbols).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `sc_stacks`.
    pub stacks: u64,
    /// `SC_CPU_STACKS_SIZE`.
    pub cpu_stacks_size: u64,
    /// `SC_MAX_CPUS`.
    pub max_cpus: u64,
    /// `SC_NMI_STACK_OFF`, `SC_IST_STACK_SIZE`.
    pub nmi_stack: (u64, u64),
    /// `SC_NMI_SHSTK_OFF`, `SC_NMI_SHSTK_SIZE`: the NMI's shadow stack in a
    /// CPU's stack area (the #BP fast path tells NMI context from RDSSP).
    pub nmi_shadow_stack: (u64, u64),
    /// `sc_tramp_records`.
    pub records: u64,
    /// `sc_tramp_page`.
    pub tramp_page: u64,
    /// `__sealed_start`, `__sealed_end`.
    pub sealed: (u64, u64),
    /// `__sites_start`, `__sites_end`.
    pub sites: (u64, u64),
    /// `__targets_start`, `__targets_end`.
    pub targets: (u64, u64),
    /// `sc_bp_probe` (optional, 0 without one): an int3 that is no site,
    /// which the #BP stub returns from at once while no batch is live (a
    /// benchmark's bare trap).
    pub probe: u64,
}

impl Layout {
    /// The symbols' values.
    pub fn linked() -> Self {
        let a = |p: *const u8| p as u64;
        let w = |p: *const u64| p as u64;
        // Only the symbols' addresses (values) are taken, never their contents.
        use core::ptr::addr_of;
        {
            Layout {
                stacks: a(addr_of!(sc_stacks)),
                cpu_stacks_size: a(addr_of!(SC_CPU_STACKS_SIZE)),
                max_cpus: a(addr_of!(SC_MAX_CPUS)),
                nmi_stack: (a(addr_of!(SC_NMI_STACK_OFF)), a(addr_of!(SC_IST_STACK_SIZE))),
                nmi_shadow_stack: (a(addr_of!(SC_NMI_SHSTK_OFF)), a(addr_of!(SC_NMI_SHSTK_SIZE))),
                records: a(addr_of!(sc_tramp_records)),
                tramp_page: a(addr_of!(sc_tramp_page)),
                sealed: (a(addr_of!(__sealed_start)), a(addr_of!(__sealed_end))),
                sites: (w(addr_of!(__sites_start)), w(addr_of!(__sites_end))),
                targets: (w(addr_of!(__targets_start)), w(addr_of!(__targets_end))),
                // SAFETY: a word of the crate's read-only data, written by no one.
                probe: unsafe { core::ptr::read_volatile(addr_of!(sc_bp_probe_ref)) },
            }
        }
    }

    /// Are the symbols what the asm needs, and the same layout the host's
    /// `Platform` answers give (its tables, trampoline page, sealed area)?
    /// `ssp` is the calling CPU's SSP (0 without shadow stacks): it must lie
    /// in one CPU's stack area, as every #BP exit will require of its own.
    pub fn check<P: crate::engine::Platform>(&self, p: &P, ssp: u64) -> Result<(), &'static str> {
        let page = record::RECORD_PAGE_SIZE;
        let table = |t: &[u64]| (t.as_ptr() as u64, t.as_ptr() as u64 + 8 * t.len() as u64);
        if self.max_cpus == 0 || self.max_cpus > 1 << record::GEN_CPU_BITS {
            return Err("SC_MAX_CPUS is 0 or above what a sync generation can name (1 << GEN_CPU_BITS)");
        }
        if self.cpu_stacks_size == 0 || !self.cpu_stacks_size.is_multiple_of(16) {
            return Err("SC_CPU_STACKS_SIZE is 0 or not a multiple of 16");
        }
        if self.nmi_stack.0.checked_add(self.nmi_stack.1).is_none_or(|end| end > self.cpu_stacks_size) {
            return Err("the NMI stack (SC_NMI_STACK_OFF + SC_IST_STACK_SIZE) is not inside a CPU's stack area");
        }
        let (o, n) = self.nmi_shadow_stack;
        if o.checked_add(n).is_none_or(|end| end > self.cpu_stacks_size) || o > i32::MAX as u64 || n > i32::MAX as u64 {
            return Err("the NMI shadow stack (SC_NMI_SHSTK_OFF + SC_NMI_SHSTK_SIZE) is not inside a CPU's stack area");
        }
        if !self.stacks.is_multiple_of(16) || !self.records.is_multiple_of(page) {
            return Err("sc_stacks is not 16-byte aligned or sc_tramp_records not page-aligned");
        }
        if !self.tramp_page.is_multiple_of(page) || self.tramp_page != p.tramp_page() {
            return Err("sc_tramp_page is not page-aligned or not the Platform's trampoline page");
        }
        let (s, e) = self.sealed;
        if !s.is_multiple_of(page) || e <= s || (s, e) != p.sealed_area() {
            return Err("__sealed_start/__sealed_end are not a page-aligned area or not the Platform's sealed area");
        }
        if self.sites != table(p.sites()) || self.targets != table(p.targets()) {
            return Err("__sites_*/__targets_* are not the Platform's site and target tables");
        }
        let tramp = p.tramp_page()..p.tramp_page() + page;
        if self.probe != 0 && (p.sites().binary_search(&self.probe).is_ok() || tramp.contains(&self.probe)) {
            return Err("sc_bp_probe is a registered site or in the trampoline page");
        }
        let area = self.cpu_stacks_size.checked_mul(self.max_cpus).and_then(|n| self.stacks.checked_add(n));
        if ssp != 0 && !(ssp >= self.stacks && area.is_some_and(|end| ssp < end)) {
            return Err("this CPU's SSP is in no CPU's stack area (sc_stacks + i * SC_CPU_STACKS_SIZE)");
        }
        Ok(())
    }
}
