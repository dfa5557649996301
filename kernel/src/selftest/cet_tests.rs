//! Foundation self-tests: command line, CPUID, shadow-stack enforcement, the
//! exception-frame rules, IST shadow stacks and the page-table invariant.

use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall::frame::TrapFrame;
use shadowcall::shstk::{self, CpError, ShadowFrame};
use shadowcall_support::ktap::Outcome;
use shadowcall_support::paging::{self, Kind, Pte, PAGE_SIZE};
use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::registers::model_specific::CetFlags;

use crate::interrupts::IST_TEST;
use crate::patching::BpTestHook;
use crate::percpu::this_cpu;
#[cfg(feature = "test-hooks")]
use crate::recover::VEC_GP;
use crate::recover::{try_run, VEC_CP, VEC_PF};
use crate::{cet, check, mm, BootState};
use shadowcall::cet::Pl0Ssp;

extern "C" {
    fn sc_t_tamper_ret() -> u64;
    static sc_t_tamper_ret_insn: u8;
    fn sc_t_iret_probe() -> u64;
    fn sc_t_ist_int();
}

/// #PF error-code bits.
const PF_PRESENT: u64 = 1 << 0;
const PF_WRITE: u64 = 1 << 1;
const PF_SHADOW_STACK: u64 = 1 << 6;

/// The SKIP for CET tests when shadow stacks are off, saying why.
pub fn skip_without_shstk(st: &BootState) -> Option<Outcome<'static>> {
    if cet::active() {
        None
    } else if st.features.cet.cet_ss {
        Some(Outcome::Skip("shadow stacks off (cet=off)"))
    } else {
        Some(Outcome::Skip("no CET"))
    }
}

macro_rules! need_shstk {
    ($st:expr) => {
        if let Some(skip) = skip_without_shstk($st) {
            return skip;
        }
    };
}

pub fn cmdline(st: &BootState) -> Outcome<'static> {
    diag!("cmdline: '{}'", st.boot.cmdline());
    let too_long = st.boot.cmdline_len_check().err();
    if let Some(e) = too_long {
        diag!("FAIL: cmdline: {e} (only the first bytes were kept and parsed)");
    }
    for e in &st.cmdline_errors {
        diag!("FAIL: cmdline: {e}");
    }
    if too_long.is_some() || !st.cmdline_errors.is_empty() {
        return Outcome::Fail;
    }
    let c = &st.boot.parsed;
    diag!("cmdline: cet={:?} expect_cet={:?} emul={:?}", c.cet, c.expect_cet, c.emul);
    Outcome::Pass
}

pub fn cpuid_cet(st: &BootState) -> Outcome<'static> {
    let f = &st.features;
    diag!(
        "CPUID: vendor={} CET_SS={} CET_IBT={} CET_SSS={} XSAVES={} XSS.CET_S enumerated={} SERIALIZE={}",
        f.vendor(),
        f.cet.cet_ss as u8,
        f.cet_ibt as u8,
        f.cet.cet_sss as u8,
        f.cet.xsaves as u8,
        f.cet.xss_cet_s as u8,
        f.serialize as u8
    );
    if f.cet.cet_ss && !f.cet.xss_cet_s {
        diag!("XSS: CPUID.(0xD,1):ECX[12] does not enumerate CET_S state; IA32_XSS left alone");
    }
    match st.boot.parsed.expect_cet {
        Some(e) => check!(e == f.cet.cet_ss, "expect_cet={} but CPUID CET_SS={}", e as u8, f.cet.cet_ss as u8),
        None => diag!("no expect_cet= given: nothing to assert against"),
    }
    Outcome::Pass
}

pub fn fallback_path(st: &BootState) -> Outcome<'static> {
    if cet::active() {
        return Outcome::Skip("shadow stacks on: the CET path runs");
    }
    let why = if st.features.cet.cet_ss { "cet=off" } else { "CPU has no CET_SS" };
    diag!("fallback path: {why}; call emulation strategy {}", crate::patching::strategy().name());
    check!(!st.want_shstk, "shadow stacks were wanted but are not on");
    check!(!Cr4::read().contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT), "CR4.CET is set on the fallback path");
    Outcome::Pass
}

pub fn shstk_enabled(st: &BootState) -> Outcome<'static> {
    need_shstk!(st);
    let s_cet = cet::s_cet();
    let ssp = cet::rdssp();
    let stack = mm::primary_shadow_stack(this_cpu().index);
    let token = shstk::token_addr(stack.hi);
    let token_val = cet::read_slot(token);
    let pl0 = Pl0Ssp::read();
    diag!(
        "S_CET={:#x} CR4.CET={} SSP={ssp:#x} shadow stack=[{:#x},{:#x}) token@{token:#x}={token_val:#x} PL0_SSP={pl0:#x}",
        s_cet.bits(),
        Cr4::read().contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT) as u8,
        stack.lo,
        stack.hi
    );
    check!(s_cet.contains(CetFlags::SS_ENABLE | CetFlags::SS_WRITE_ENABLE), "S_CET lacks SH_STK_EN|WR_SHSTK_EN");
    check!(Cr4::read().contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT), "CR4.CET clear");
    check!(ssp >= stack.lo && ssp < token, "SSP {ssp:#x} not inside this CPU's shadow stack");
    check!(shstk::token_is_busy(token_val, token), "token {token_val:#x} at {token:#x} not busy");
    check!(pl0 == token, "PL0_SSP {pl0:#x} != token address {token:#x}");
    Outcome::Pass
}

pub fn cp_near_ret(st: &BootState) -> Outcome<'static> {
    need_shstk!(st);
    super::tlog_reset();
    let ssp0 = cet::rdssp();
    // SAFETY: asm test function; its #CP is caught by try_run.
    let r = try_run(|| unsafe { sc_t_tamper_ret() });
    let ssp1 = cet::rdssp();
    // SAFETY: symbol address only.
    let ret_insn = unsafe { &sc_t_tamper_ret_insn as *const u8 as u64 };
    let Err(f) = r else {
        diag!("FAIL: the tampered return went through (returned {:#x})", r.unwrap_or(0));
        return Outcome::Fail;
    };
    diag!("caught {f}");
    check!(f.vector == VEC_CP, "expected #CP, got {f}");
    check!(
        CpError::decode(f.error_code) == CpError::NearRet,
        "expected #CP error 1 (NEAR-RET), got {:#x}",
        f.error_code
    );
    check!(f.rip == ret_insn, "#CP at {:#x}, expected the ret at {ret_insn:#x}", f.rip);
    check!(super::tlog().evil == 0, "the landing code ran");
    check!(ssp0 == ssp1, "SSP not recovered: {ssp0:#x} -> {ssp1:#x}");
    Outcome::Pass
}

pub fn cp_iret_rip_only(st: &BootState) -> Outcome<'static> {
    need_shstk!(st);
    // The probe's handling in the #BP path is a self-test hook.
    if cfg!(not(feature = "test-hooks")) {
        return Outcome::Skip("needs the test-hooks build");
    }
    let ssp0 = cet::rdssp();
    this_cpu().bp_test_hook.store(BpTestHook::RipOnly as u8, Ordering::Relaxed);
    // SAFETY: asm test function; the #CP at IRET is caught by try_run.
    let r = try_run(|| unsafe { sc_t_iret_probe() });
    this_cpu().bp_test_hook.store(BpTestHook::None as u8, Ordering::Relaxed);
    let Err(f) = r else {
        diag!("FAIL: IRET with only RIP changed did not fault (returned {:?})", r);
        return Outcome::Fail;
    };
    diag!("caught {f}");
    check!(f.vector == VEC_CP, "expected #CP, got {f}");
    check!(
        CpError::decode(f.error_code) == CpError::FarRetIret,
        "expected #CP error 2 (FAR-RET/IRET), got {:#x}",
        f.error_code
    );
    check!(cet::rdssp() == ssp0, "SSP not recovered");
    Outcome::Pass
}

pub fn iret_rip_and_lip(st: &BootState) -> Outcome<'static> {
    need_shstk!(st);
    // The probe's handling in the #BP path is a self-test hook.
    if cfg!(not(feature = "test-hooks")) {
        return Outcome::Skip("needs the test-hooks build");
    }
    let ssp0 = cet::rdssp();
    #[cfg(feature = "test-hooks")]
    let w0 = cet::WRSS_WRITES.load(Ordering::Relaxed);
    this_cpu().bp_test_hook.store(BpTestHook::RipAndLip as u8, Ordering::Relaxed);
    // SAFETY: asm test function.
    let r = try_run(|| unsafe { sc_t_iret_probe() });
    this_cpu().bp_test_hook.store(BpTestHook::None as u8, Ordering::Relaxed);
    check!(r == Ok(2), "expected to resume at the landing (2), got {r:?}");
    // The one WRSS (the LIP slot) is the #BP exit's, in asm: no Rust WRSS.
    #[cfg(feature = "test-hooks")]
    check!(cet::WRSS_WRITES.load(Ordering::Relaxed) == w0, "a WRSS outside the #BP exit");
    check!(cet::rdssp() == ssp0, "SSP unbalanced");
    Outcome::Pass
}

pub fn shstk_write_pf(st: &BootState) -> Outcome<'static> {
    need_shstk!(st);
    let addr = mm::spare_shadow_page() + 64;
    // SAFETY: a deliberate store to a shadow-stack page; the #PF is caught.
    let r = try_run(|| unsafe {
        (addr as *mut u64).write_volatile(0x5ca1ab1e);
        0
    });
    let Err(f) = r else {
        diag!("FAIL: an ordinary store to a shadow-stack page succeeded");
        return Outcome::Fail;
    };
    diag!("caught {f}");
    check!(f.vector == VEC_PF, "expected #PF, got {f}");
    check!(f.error_code & (PF_PRESENT | PF_WRITE) == PF_PRESENT | PF_WRITE, "error code {:#x} lacks P|W", f.error_code);
    check!(f.error_code & PF_SHADOW_STACK == 0, "error code {:#x} has SS set for an ordinary store", f.error_code);
    check!(f.cr2 == addr, "CR2 {:#x} != {addr:#x}", f.cr2);
    check!(cet::read_slot(addr) == 0, "the store landed");
    Outcome::Pass
}

#[cfg(feature = "test-hooks")]
static PLAIN_SLOT: AtomicU64 = AtomicU64::new(0x600d);

pub fn wrss_plain_pf(st: &BootState) -> Outcome<'static> {
    need_shstk!(st);
    // The probe is a WRSS in compiled Rust (its operands may pass through
    // the stack): test-hooks builds only, like every Rust WRSS.
    #[cfg(not(feature = "test-hooks"))]
    return Outcome::Skip("needs the test-hooks build");
    #[cfg(feature = "test-hooks")]
    let addr = &PLAIN_SLOT as *const AtomicU64 as u64;
    // SAFETY: a deliberate WRSS to an ordinary data page; the #PF is caught.
    #[cfg(feature = "test-hooks")]
    let r = try_run(|| unsafe {
        cet::wrss(addr, 0xbad);
        0
    });
    #[cfg(feature = "test-hooks")]
    wrss_plain_pf_check(r, addr)
}

#[cfg(feature = "test-hooks")]
fn wrss_plain_pf_check(r: Result<u64, crate::recover::FaultInfo>, addr: u64) -> Outcome<'static> {
    let Err(f) = r else {
        diag!("FAIL: WRSS to an ordinary page succeeded");
        return Outcome::Fail;
    };
    diag!("caught {f}");
    check!(f.vector == VEC_PF, "expected #PF, got {f}");
    check!(f.error_code & PF_SHADOW_STACK != 0, "error code {:#x} lacks SS (bit 6)", f.error_code);
    check!(f.error_code & PF_WRITE != 0, "error code {:#x} lacks W", f.error_code);
    check!(f.cr2 == addr, "CR2 {:#x} != {addr:#x}", f.cr2);
    check!(PLAIN_SLOT.load(Ordering::Relaxed) == 0x600d, "the WRSS landed");
    Outcome::Pass
}

/// What the IST test vector's handler saw.
static IST_SEEN_SSP: AtomicU64 = AtomicU64::new(0);
static IST_SEEN_TOKEN: AtomicU64 = AtomicU64::new(0);
static IST_SEEN_RSP: AtomicU64 = AtomicU64::new(0);
static IST_CALLS: AtomicU64 = AtomicU64::new(0);

/// Handler of `IST_TEST_VECTOR` (delivered through IST 5).
pub fn ist_probe(frame: &mut TrapFrame) {
    IST_SEEN_SSP.store(frame.ssp, Ordering::Relaxed);
    IST_SEEN_RSP.store(frame as *const TrapFrame as u64, Ordering::Relaxed);
    if cet::active() {
        let token = cet::ssp_table_entry(IST_TEST);
        IST_SEEN_TOKEN.store(cet::read_slot(token), Ordering::Relaxed);
    }
    IST_CALLS.fetch_add(1, Ordering::Relaxed);
}

pub fn ist_shstk(st: &BootState) -> Outcome<'static> {
    need_shstk!(st);
    let stack = mm::ist_shadow_stack(this_cpu().index, IST_TEST);
    let token = cet::ssp_table_entry(IST_TEST);
    check!(token == shstk::token_addr(stack.hi), "SSP table entry {token:#x} is not the IST stack's token");
    check!(shstk::ist_token_well_placed(token), "token {token:#x} and frame not in one aligned 32-byte region");
    check!(shstk::token_is_free(cet::read_slot(token), token), "token busy before delivery");
    let ssp0 = cet::rdssp();
    let calls0 = IST_CALLS.load(Ordering::Relaxed);
    // SAFETY: raises the IST test vector; its handler only records.
    unsafe { sc_t_ist_int() };
    check!(IST_CALLS.load(Ordering::Relaxed) == calls0 + 1, "handler did not run");
    let seen_ssp = IST_SEEN_SSP.load(Ordering::Relaxed);
    let seen_token = IST_SEEN_TOKEN.load(Ordering::Relaxed);
    let seen_rsp = IST_SEEN_RSP.load(Ordering::Relaxed);
    diag!("inside: SSP={seen_ssp:#x} (token {token:#x}) token={seen_token:#x} RSP={seen_rsp:#x}");
    let frame = ShadowFrame::at(seen_ssp);
    check!(frame.above() == token, "frame not right below the IST token");
    check!(shstk::token_is_busy(seen_token, token), "token not busy inside the handler");
    let ist = mm::ist_stack(this_cpu().index, IST_TEST);
    check!(seen_rsp >= ist.lo && seen_rsp < ist.hi, "handler not on the IST normal stack");
    check!(shstk::token_is_free(cet::read_slot(token), token), "token still busy after IRET");
    check!(cet::rdssp() == ssp0, "SSP changed across the interrupt");

    // A busy token makes delivery fail with #GP(0) before the handler runs
    // (its WRSS are compiled Rust: test-hooks builds only).
    #[cfg(not(feature = "test-hooks"))]
    return Outcome::Pass;
    #[cfg(feature = "test-hooks")]
    ist_busy_token(token, calls0, ssp0)
}

/// Inlined: it checks SSP against the caller's.
#[cfg(feature = "test-hooks")]
#[inline(always)]
fn ist_busy_token(token: u64, calls0: u64, ssp0: u64) -> Outcome<'static> {
    // SAFETY: marks the test IST token busy (a value we derive), restored below.
    unsafe { cet::wrss(token, token | shstk::TOKEN_BUSY) };
    // SAFETY: as above; the #GP is caught.
    let r = try_run(|| unsafe {
        sc_t_ist_int();
        0
    });
    // SAFETY: restore the free token.
    unsafe { cet::wrss(token, shstk::supervisor_token(token)) };
    let Err(f) = r else {
        diag!("FAIL: delivery through a busy IST token succeeded");
        return Outcome::Fail;
    };
    diag!("busy token: caught {f}");
    check!(f.vector == VEC_GP && f.error_code == 0, "expected #GP(0), got {f}");
    check!(IST_CALLS.load(Ordering::Relaxed) == calls0 + 1, "handler ran despite the busy token");
    check!(cet::rdssp() == ssp0, "SSP not recovered");
    Outcome::Pass
}

/// The page below each of this CPU's stacks is unmapped: running off a stack
/// faults instead of corrupting its neighbour.
pub fn guard_pages(_st: &BootState) -> Outcome<'static> {
    let cpu = this_cpu().index;
    let probes = [
        ("kernel stack", mm::kernel_stack(cpu).lo - 8),
        ("shadow stack", mm::primary_shadow_stack(cpu).lo - 8),
        ("NMI IST stack", mm::ist_stack(cpu, crate::interrupts::IST_NMI).lo - 8),
        ("NMI IST shadow stack", mm::ist_shadow_stack(cpu, crate::interrupts::IST_NMI).lo - 8),
    ];
    for (name, addr) in probes {
        // SAFETY: a deliberate read of an unmapped guard page; the #PF is caught.
        let r = try_run(|| unsafe { (addr as *const u64).read_volatile() });
        let Err(f) = r else {
            diag!("FAIL: the guard page below the {name} is readable ({addr:#x})");
            return Outcome::Fail;
        };
        check!(
            f.vector == VEC_PF && f.error_code & PF_PRESENT == 0 && f.cr2 == addr,
            "{name} guard: expected a not-present #PF at {addr:#x}, got {f}"
        );
        diag!("guard page below the {name}: {f}");
    }
    Outcome::Pass
}

pub fn no_ro_dirty_leaf(_st: &BootState) -> Outcome<'static> {
    let (mut leaves, mut shadow_pages, mut bad, mut wx, mut text_bad) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (ts, te) = mm::text_range();
    mm::for_each_leaf(|addr, e, size| {
        leaves += 1;
        let f = Pte::from_bits_retain(e);
        if paging::is_shadow_stack_leaf(e) {
            let mut a = addr;
            while a < addr + size {
                if mm::classify(a) != Some(Kind::ShadowStack) {
                    bad += 1;
                    diag!("FAIL: read-only Dirty leaf at {a:#x} is not a registered shadow-stack page");
                } else {
                    shadow_pages += 1;
                }
                a += PAGE_SIZE;
            }
        }
        if f.contains(Pte::WRITABLE) && !f.contains(Pte::NO_EXECUTE) {
            wx += 1;
            diag!("FAIL: writable and executable leaf at {addr:#x}");
        }
        if addr < te && addr + size > ts && (f.contains(Pte::WRITABLE) || f.contains(Pte::DIRTY)) {
            text_bad += 1;
            diag!("FAIL: text leaf at {addr:#x} is writable or Dirty ({e:#x})");
        }
    });
    // Every CPU's primary and IST shadow stacks, trampoline-record page and
    // register-save page, and the one spare page.
    let expected = ((mm::PRIMARY_SHSTK_PAGES + mm::IST_COUNT + 2) * mm::MAX_CPUS + 1) as u64;
    diag!("leaves={leaves} shadow-stack pages={shadow_pages} (expected {expected}) W+X={wx}");
    check!(bad == 0 && wx == 0 && text_bad == 0, "page-table invariant broken");
    check!(shadow_pages == expected, "found {shadow_pages} shadow-stack pages, expected {expected}");
    check!(mm::text_alias_unmapped(), "the text poke alias is still mapped");
    Outcome::Pass
}
