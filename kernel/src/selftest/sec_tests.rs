//! Threat-model self-tests (DESIGN.md, "Threat model"): each forges, with
//! ordinary stores only, the data an attacker could reach, and shows the
//! forgery refused or without effect, with nothing written to any shadow
//! stack. Also `frame_alignment`. The hooks here are compiled in only with
//! the `test-hooks` feature; without it the tests that need one report
//! `# SKIP needs the test-hooks build`.
#![cfg_attr(not(feature = "test-hooks"), allow(dead_code))]

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shadowcall::emul::record::{RECORD_SIZE, REC_SSP};
use shadowcall::emul::PendingCall;
use shadowcall::frame::TrapFrame;
use shadowcall::patch::{NewInsn, PatchError, SealedEntry, SealedHeader, INT3, SITE_LEN};
use shadowcall::shstk::CpError;
use shadowcall_support::ktap::Outcome;
use spin::Mutex;

use super::cet_tests::skip_without_shstk;
use super::{tlog, tlog_reset};
use crate::patching::{self, InFlight, Step};
use crate::percpu::this_cpu;
use crate::recover::{try_run, FaultInfo, GUARD_REFUSAL, VEC_CP, VEC_PF, VEC_UD};
use crate::{apic, cet, interrupts, mm, BootState};

#[cfg(feature = "test-hooks")]
use crate::mm::test_set_alias_pte;
#[cfg(feature = "test-hooks")]
use crate::patching::test_poke;
#[cfg(feature = "test-hooks")]
use crate::records::{test_claim_record, test_free_record, test_set_in_exit};

/// Without the hooks these are never reached (the tests skip first).
#[cfg(not(feature = "test-hooks"))]
mod no_hooks {
    pub fn test_poke(_: u64, _: &[u8]) {
        unreachable!("test-hooks build only")
    }
    pub fn test_claim_record(_: u64, _: u64, _: u64, _: u64) -> u64 {
        unreachable!("test-hooks build only")
    }
    pub fn test_free_record(_: u64) {
        unreachable!("test-hooks build only")
    }
    pub fn test_set_in_exit(_: usize, _: u64) {
        unreachable!("test-hooks build only")
    }
    pub fn test_set_alias_pte(_: usize, _: u64) {
        unreachable!("test-hooks build only")
    }
}
#[cfg(not(feature = "test-hooks"))]
use no_hooks::{test_claim_record, test_free_record, test_poke, test_set_alias_pte, test_set_in_exit};

/// Are the self-test hooks compiled in?
const HOOKS: bool = cfg!(feature = "test-hooks");
const NO_HOOKS: Outcome<'static> = Outcome::Skip("needs the test-hooks build");

core::arch::global_asm!(
    include_str!("../../asm/sec.S"),
    IST_TEST_VECTOR = const interrupts::IST_TEST_VECTOR,
    VEC_SPURIOUS = const apic::SPURIOUS_VECTOR,
    options(att_syntax)
);

extern "C" {
    fn sc_t_align_probe(which: u64, misalign: u64) -> u64;
    fn sc_t_sec_int() -> u64;
    fn sc_t_call_tramp(entry: u64) -> u64;
    fn sc_t_fn_call(_: u64) -> u64;
    static sc_t_site_call: u8;
    static sc_t_iret_landing: u8;
    fn sc_t_target_a();
    fn sc_t_target_b();
}

fn site() -> u64 {
    core::ptr::addr_of!(sc_t_site_call) as u64
}
fn target(i: usize) -> u64 {
    [sc_t_target_a as *const () as u64, sc_t_target_b as *const () as u64][i]
}
fn landing() -> u64 {
    core::ptr::addr_of!(sc_t_iret_landing) as u64
}

/// The 4 shadow-stack slots the forgeries aim at: on the spare shadow-stack
/// page (no CPU's stack), where any write would show.
fn victim() -> u64 {
    mm::spare_shadow_page() + 2048
}
fn victim_slots() -> [u64; 4] {
    let v = victim();
    [cet::read_slot(v - 8), cet::read_slot(v), cet::read_slot(v + 8), cet::read_slot(v + 16)]
}

fn text_checksum_except(skip: u64) -> u64 {
    super::text_checksum_except(Some(skip))
}

/// Mark the refusals a test provokes as expected (printed "expected:").
fn expecting<R>(f: impl FnOnce() -> R) -> R {
    let c = this_cpu();
    c.expect_refusal.store(true, Ordering::Relaxed);
    let r = f();
    c.expect_refusal.store(false, Ordering::Relaxed);
    r
}

// ---- Hooks (called from the handlers, test-hooks builds only) --------------

static LAST_FRAME: AtomicU64 = AtomicU64::new(0);
/// Forge the #BP handler's frame after its checks, once.
static FORGE_BP: AtomicBool = AtomicBool::new(false);
/// Forge the IST test vector's frame, once.
static FORGE_IST: AtomicBool = AtomicBool::new(false);
/// Forge the ordinary copy of the batch before it is sealed, once.
static FORGE_SEAL: AtomicBool = AtomicBool::new(false);
/// The site whose next #BP opens the stale-int3 race window.
static RACE_SITE: AtomicU64 = AtomicU64::new(0);
static RACE_FLIGHT: Mutex<Option<InFlight>> = Mutex::new(None);

/// Every handler entry: the frame's address (its RSP at the stub's call).
pub fn record_frame(at: u64) {
    LAST_FRAME.store(at, Ordering::Relaxed);
}

/// What an attacker who can write the saved frame does: point the exit at
/// a shadow-stack address of its choosing, with values of its choosing.
fn forge(frame: &mut TrapFrame) {
    frame.ssp = victim();
    frame.shadow_push = landing();
    frame.rip = landing();
}

/// The #BP handler is done with its checks; the exit has not run yet.
pub fn after_bp_checks(frame: &mut TrapFrame) {
    if FORGE_BP.swap(false, Ordering::Relaxed) {
        forge(frame);
    }
}

/// The shadow-gap exit raises a (software) NMI just before its WRSS, once.
#[no_mangle]
pub static SC_T_EXIT_NMI: AtomicBool = AtomicBool::new(false);
/// That NMI's handler forges the registers saved in its trap frame.
static FORGE_NMI_REGS: AtomicBool = AtomicBool::new(false);
/// The #BP stub's fast path runs (off in self-test builds otherwise).
#[no_mangle]
pub static SC_T_FAST: AtomicBool = AtomicBool::new(false);
/// The fast path raises a (software) NMI right after its lookup, once.
#[no_mangle]
pub static SC_T_FAST_NMI: AtomicBool = AtomicBool::new(false);
/// That NMI's handler forges the fast path's registers in its trap frame.
static FORGE_NMI_FAST: AtomicBool = AtomicBool::new(false);

/// A handler of a vector other than #BP ran (the common exit comes next).
pub fn after_dispatch(frame: &mut TrapFrame) {
    if frame.vector == crate::recover::VEC_NMI && FORGE_NMI_REGS.swap(false, Ordering::Relaxed) {
        // The shadow-gap exit holds F in r8 and the target in rcx: aim its
        // WRSS at the victim slots, with the attacker's values.
        frame.r8 = victim() + 8;
        frame.rcx = landing();
        frame.rax = landing();
        frame.rdx = landing();
    }
    if frame.vector == crate::recover::VEC_NMI && FORGE_NMI_FAST.swap(false, Ordering::Relaxed) {
        // The fast path holds F in rsi, its record page in rdi, S in rbp,
        // T in r8 and the kind in rcx: aim its WRSS at the victim slots
        // (and the victim page as the record page), with the attacker's
        // values.
        frame.rsi = victim() + 8;
        frame.rdi = victim() & !0xfff;
        frame.rbp = landing();
        frame.r8 = landing();
        frame.rax = landing();
        frame.rdx = landing();
    }
    if frame.vector == apic::SPURIOUS_VECTOR as u64 && FORGE_IST.swap(false, Ordering::Relaxed) {
        forge(frame);
    }
}

/// The patcher wrote the batch into ordinary memory and is about to copy it
/// into the sealed area: change the first entry's target and site there.
pub fn forge_sealed_copy(buf: &mut [u8]) {
    if !FORGE_SEAL.swap(false, Ordering::Relaxed) {
        return;
    }
    let at = core::mem::offset_of!(SealedHeader, entries_off);
    let Some(off) = buf.get(at..at + 8).map(|w| u64::from_ne_bytes(w.try_into().unwrap_or([0; 8])) as usize) else {
        return;
    };
    let target_at = off + core::mem::offset_of!(SealedEntry, target);
    if let Some(w) = buf.get_mut(target_at..target_at + 8) {
        w.copy_from_slice(&landing().to_ne_bytes());
    }
}

/// The #BP handler found no live batch for `addr` and is about to read the
/// site's bytes: for the armed site, publish a batch for it right now (as a
/// patcher on another CPU could), int3 written.
pub fn race_window(addr: u64) {
    if addr != RACE_SITE.load(Ordering::Relaxed) {
        return;
    }
    RACE_SITE.store(0, Ordering::Relaxed);
    // The stale int3 the test planted goes first: text as before, then the
    // batch's own step 1 writes the int3 again.
    test_poke(addr, &[OPC_CALL]);
    if let Ok(f) = patching::begin(&[(addr, NewInsn::Call(target(1)))]) {
        *RACE_FLIGHT.lock() = Some(f);
    }
}

const OPC_CALL: u8 = 0xe8;

// ---- frame_alignment ---------------------------------------------------------

/// Misaligned handler entries counted (test-hooks builds; the test needs them).
fn misaligned_frames() -> u64 {
    #[cfg(feature = "test-hooks")]
    return patching::MISALIGNED_FRAMES.load(Ordering::Relaxed);
    #[cfg(not(feature = "test-hooks"))]
    0
}

pub fn frame_alignment(_st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    let names = ["#BP", "IST test vector", "#UD", "#PF (error code)", "APIC spurious"];
    let mut errors = Vec::new();
    let mis0 = misaligned_frames();
    for (which, name) in names.iter().enumerate() {
        for misalign in [0u64, 1] {
            LAST_FRAME.store(1, Ordering::Relaxed);
            // SAFETY: asm probe; the faults it raises are caught here.
            let r = expecting(|| try_run(|| unsafe { sc_t_align_probe(which as u64, misalign) }));
            let at = LAST_FRAME.load(Ordering::Relaxed);
            let faults = which == 2 || which == 3;
            if faults != r.is_err() {
                errors.push(format!("{name}: unexpected outcome {r:?}"));
            }
            if at == 1 {
                errors.push(format!("{name}: the handler did not run"));
            } else if !at.is_multiple_of(16) {
                errors.push(format!(
                    "{name}, interrupted RSP = {} (mod 16): handler entered with its frame at {at:#x} (RSP = {} mod 16)",
                    misalign * 8,
                    at % 16
                ));
            }
        }
    }
    let mis = misaligned_frames() - mis0;
    if mis != 0 {
        errors.push(format!("{mis} misaligned handler entries counted"));
    }
    diag!("{} vectors x 2 interrupted alignments: every handler entered with RSP = 0 (mod 16)", names.len());
    super::outcome_of(&errors)
}

// ---- sec_exit_forged_frame ---------------------------------------------------

pub fn sec_exit_forged_frame(st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    let mut errors: Vec<String> = Vec::new();
    // 1. An ordinary interrupt handler (the APIC spurious vector) whose saved frame
    //    is forged: its exit writes no shadow stack, and IRET refuses the
    //    forged RIP (#CP(2)).
    let before = victim_slots();
    let ssp0 = cet::rdssp();
    FORGE_IST.store(true, Ordering::Relaxed);
    // SAFETY: asm probe; the #CP at IRET is caught.
    let r = try_run(|| unsafe { sc_t_sec_int() });
    FORGE_IST.store(false, Ordering::Relaxed);
    match r {
        Err(f) if f.vector == VEC_CP && CpError::decode(f.error_code) == CpError::FarRetIret => {
            diag!("forged frame in an interrupt handler: {f}")
        }
        other => errors.push(format!("forged interrupt frame: expected #CP(FAR-RET/IRET), got {other:?}")),
    }
    if victim_slots() != before {
        errors.push(format!("forged interrupt frame: shadow slots written: {before:x?} -> {:x?}", victim_slots()));
    }
    if cet::rdssp() != ssp0 {
        errors.push(String::from("SSP not recovered"));
    }
    // 2. The #BP handler's frame forged after its checks, under each strategy:
    //    the exit refuses, nothing written, the target never runs.
    refused_under_each_strategy("forged #BP frame", &FORGE_BP, &mut errors);
    super::outcome_of(&errors)
}

/// Under each strategy, inside a patch's window: `forge` armed, the site
/// called. The #BP exit must refuse (the call unwinds to its recovery
/// point): no shadow slot written, no target run, SSP recovered, no
/// trampoline record left claimed. The site and the boot's strategy are
/// restored after.
fn refused_under_each_strategy(what: &str, forge: &AtomicBool, errors: &mut Vec<String>) {
    for s in patching::strategies_here() {
        patching::set_strategy(s);
        let mut inside = Vec::new();
        let r = patching::patch(&[(site(), NewInsn::Call(target(1)))], |step| {
            if step != Step::Int3Written {
                return;
            }
            let before = victim_slots();
            let ssp0 = cet::rdssp();
            tlog_reset();
            forge.store(true, Ordering::Relaxed);
            // SAFETY: a site function; the refusal is caught.
            let r = expecting(|| try_run(|| unsafe { sc_t_fn_call(0) }));
            forge.store(false, Ordering::Relaxed);
            match r {
                Err(FaultInfo { vector: GUARD_REFUSAL, .. }) => {}
                other => inside.push(format!("{}: {what}: expected a refusal, got {other:?}", s.name())),
            }
            if victim_slots() != before {
                inside.push(format!("{}: {what}: shadow slots written", s.name()));
            }
            if tlog().count[1] != 0 || tlog().count[0] != 0 {
                inside.push(format!("{}: a target ran after the forgery", s.name()));
            }
            if cet::rdssp() != ssp0 {
                inside.push(format!("{}: SSP not recovered", s.name()));
            }
        });
        errors.extend(inside);
        if let Err(e) = r {
            errors.push(format!("{}: patch: {e}", s.name()));
        }
        if crate::records::pending_tramp_records() != 0 {
            errors.push(format!("{}: a trampoline record was left claimed", s.name()));
        }
        if patching::patch(&[(site(), NewInsn::Call(target(0)))], |_| {}).is_err() {
            errors.push(String::from("restore failed"));
        }
    }
    patching::set_strategy(crate::state().strategy);
}

// ---- sec_batch_forged --------------------------------------------------------

pub fn sec_batch_forged(_st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    let mut errors: Vec<String> = Vec::new();
    let site = site();
    // 1. The batch changed in ordinary memory between validation and
    //    sealing: the sealed copy is validated again and refused; text and
    //    the sealed area unchanged, no batch live.
    let sum0 = super::text_checksum_except(None);
    FORGE_SEAL.store(true, Ordering::Relaxed);
    let r = patching::patch(&[(site, NewInsn::Call(target(1)))], |_| {});
    FORGE_SEAL.store(false, Ordering::Relaxed);
    match r {
        Err(PatchError::BadSealedBatch { .. }) => diag!("batch forged before sealing: {}", r.unwrap_err()),
        other => errors.push(format!("batch forged before sealing: expected a refusal, got {other:?}")),
    }
    if super::text_checksum_except(None) != sum0 {
        errors.push(String::from("text changed by a refused batch"));
    }
    if patching::batch_live() {
        errors.push(String::from("a refused batch stayed live"));
    }
    // 2. The sealed batch during the window: an ordinary store faults, the
    //    entry is unchanged, and a call still runs the validated instruction.
    let sum0 = text_checksum_except(site);
    let r = patching::patch(&[(site, NewInsn::Call(target(1)))], |step| {
        if step != Step::Int3Written {
            return;
        }
        let Some(entry) = patching::live_entry(site) else {
            errors.push(String::from("no live sealed entry for the site"));
            return;
        };
        let at = core::ptr::addr_of!(entry.target) as u64;
        // SAFETY: a deliberate ordinary store into the sealed area; the #PF is caught.
        let w = try_run(|| unsafe {
            (at as *mut u64).write_volatile(landing());
            0
        });
        match w {
            Err(f) if f.vector == VEC_PF && f.cr2 == at => {}
            other => errors.push(format!("store into the sealed batch: expected #PF at {at:#x}, got {other:?}")),
        }
        if entry.target != target(1) {
            errors.push(String::from("the sealed entry changed"));
        }
        tlog_reset();
        // SAFETY: a site function of the batch.
        let v = try_run(|| unsafe { sc_t_fn_call(0) });
        let log = tlog();
        match v {
            Err(f) => errors.push(format!("call in the window faulted: {f}")),
            Ok(_) if log.count[1] != 1 || log.last_ret != site + SITE_LEN as u64 => {
                errors.push(format!("call in the window: target b ran {} times, ret {:#x}", log.count[1], log.last_ret))
            }
            Ok(_) => {}
        }
    });
    if let Err(e) = r {
        errors.push(format!("patch: {e}"));
    }
    if text_checksum_except(site) != sum0 {
        errors.push(String::from("text outside the batch's site changed"));
    }
    let want = NewInsn::Call(target(1)).encode(site).ok();
    // SAFETY: a registered site: readable text.
    let now = unsafe { (site as *const [u8; SITE_LEN]).read_volatile() };
    if want != Some(now) {
        errors.push(String::from("the site does not hold the validated instruction"));
    }
    if patching::patch(&[(site, NewInsn::Call(target(0)))], |_| {}).is_err() {
        errors.push(String::from("restore failed"));
    }
    super::outcome_of(&errors)
}

// ---- sec_tramp_record_bound --------------------------------------------------

pub fn sec_tramp_record_bound(_st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    let mut errors: Vec<String> = Vec::new();
    let entry = patching::tramp_page();
    // The trampoline's addresses are no patch targets.
    for t in [entry, entry + shadowcall::tramp::TRAMP_TRAP_OFF] {
        if patching::patch(&[(site(), NewInsn::Call(t))], |_| {}).is_ok() {
            errors.push(format!("a call into the trampoline ({t:#x}) was accepted as a patch"));
            let _ = patching::patch(&[(site(), NewInsn::Call(target(0)))], |_| {});
        }
    }
    let other_stack_ssp = mm::ist_shadow_stack(this_cpu().index, interrupts::IST_TEST).hi - 64;
    let evil = landing();
    // This CPU's refusals (test-hooks builds; in production the fault's
    // vector, GUARD_REFUSAL, is the evidence).
    let refusals = || super::engine_count!(this_cpu(), refusals);
    if cet::active() {
        // A record can only be written with WRSS: an ordinary store faults.
        // Nor can one fake a sync acknowledgement (the sync word).
        let page = mm::tramp_record_page(cet::rdssp()).expect("SSP in the stack area");
        for slot in [page + 63 * RECORD_SIZE, crate::records::sync_word_addr(cet::rdssp())] {
            let before = cet::read_slot(slot);
            // SAFETY: a deliberate store to the record page; the #PF is caught.
            let w = try_run(|| unsafe {
                (slot as *mut u64).write_volatile(evil);
                0
            });
            match w {
                Err(f) if f.vector == VEC_PF && cet::read_slot(slot) == before => {}
                other => {
                    errors.push(format!("ordinary store to the record page at {slot:#x}: expected #PF, got {other:?}"))
                }
            }
        }
        // A pending record bound to another stack (as an interrupted
        // context's would be); this stack reaches the trampoline's trap with
        // the trampoline's own return addresses on both stacks: refused.
        let rec = test_claim_record(other_stack_ssp, 0, site(), evil);
        let (r0, ssp0) = (refusals(), cet::rdssp());
        // SAFETY: calls the trampoline entry directly; the refusal is caught.
        let r = expecting(|| try_run(|| unsafe { sc_t_call_tramp(entry) }));
        if !matches!(r, Err(FaultInfo { vector: GUARD_REFUSAL, .. })) || refusals() != r0.map(|r| r + 1) {
            errors.push(format!("second trap on another stack: expected a refusal, got {r:?}"));
        }
        if cet::read_slot(rec + REC_SSP) != other_stack_ssp {
            errors.push(String::from("the other stack's record was consumed"));
        }
        if cet::rdssp() != ssp0 {
            errors.push(String::from("SSP not recovered"));
        }
        test_free_record(rec);
    } else {
        // Without shadow stacks the record is the per-CPU LIFO: bound to the
        // interrupted RSP.
        patching::test_push_pending(PendingCall { site: site(), ret: evil, target: evil, interrupts: true, rsp: 8 });
        let r0 = refusals();
        // SAFETY: as above.
        let r = expecting(|| try_run(|| unsafe { sc_t_call_tramp(entry) }));
        if !matches!(r, Err(FaultInfo { vector: GUARD_REFUSAL, .. })) || refusals() != r0.map(|r| r + 1) {
            errors.push(format!("second trap on another stack: expected a refusal, got {r:?}"));
        }
        this_cpu().lifo().truncate(0);
    }
    // A trampoline emulation on this stack still works.
    patching::set_strategy(shadowcall_cmdline::EmulStrategy::Trampoline);
    let r = patching::patch(&[(site(), NewInsn::Call(target(1)))], |step| {
        if step != Step::Int3Written {
            return;
        }
        tlog_reset();
        // SAFETY: a site function of the batch.
        let v = try_run(|| unsafe { sc_t_fn_call(0) });
        let log = tlog();
        if v.is_err() || log.count[1] != 1 || log.last_ret != site() + SITE_LEN as u64 {
            errors.push(format!("trampoline call after the refusal: {v:?}, ran {} times", log.count[1]));
        }
    });
    patching::set_strategy(crate::state().strategy);
    if let Err(e) = r {
        errors.push(format!("patch: {e}"));
    }
    if crate::records::pending_tramp_records() != 0 {
        errors.push(String::from("records left claimed"));
    }
    if patching::patch(&[(site(), NewInsn::Call(target(0)))], |_| {}).is_err() {
        errors.push(String::from("restore failed"));
    }
    super::outcome_of(&errors)
}

// ---- sec_stale_int3_race -----------------------------------------------------

pub fn sec_stale_int3_race(_st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    let mut errors: Vec<String> = Vec::new();
    let site = site();
    let c = &this_cpu().counters;
    let (races0, bps0) = (super::engine_count!(this_cpu(), int3_races), c.breakpoints.load(Ordering::Relaxed));
    // A stale int3 at a registered site with no batch live; the handler's
    // window between "no batch" and reading the site is opened by the hook,
    // which publishes a batch for the site (int3 written) right there.
    test_poke(site, &[INT3]);
    RACE_SITE.store(site, Ordering::Relaxed);
    tlog_reset();
    // SAFETY: a site function; a fault (e.g. #UD from resuming mid-instruction) is caught.
    let r = try_run(|| unsafe { sc_t_fn_call(0) });
    RACE_SITE.store(0, Ordering::Relaxed);
    let log = tlog();
    match RACE_FLIGHT.lock().take() {
        Some(f) => {
            patching::write_tails();
            let _ = patching::finish(f);
        }
        None => errors.push(String::from("the race window was not reached (no batch published)")),
    }
    if let Err(f) = r {
        errors.push(format!("call through the raced int3 faulted: {f}"));
    }
    if log.count[1] != 1 || log.last_ret != site + SITE_LEN as u64 || log.after != 1 {
        errors.push(format!(
            "the raced site did not run the batch's call once: target b {} times, ret {:#x}, after {}",
            log.count[1], log.last_ret, log.after
        ));
    }
    if c.breakpoints.load(Ordering::Relaxed) != bps0 {
        errors.push(String::from("the int3 of a registered site was treated as a real breakpoint"));
    }
    if races0.is_some() && super::engine_count!(this_cpu(), int3_races) == races0 {
        errors.push(String::from("the race was not seen by the handler"));
    }
    if patching::patch(&[(site, NewInsn::Call(target(0)))], |_| {}).is_err() {
        errors.push(String::from("restore failed"));
    }
    // The site must hold its original call again.
    let want = NewInsn::Call(target(0)).encode(site).ok();
    // SAFETY: readable text.
    if want != Some(unsafe { (site as *const [u8; SITE_LEN]).read_volatile() }) {
        errors.push(String::from("site not restored"));
    }
    super::outcome_of(&errors)
}

// ---- sec_poke_forged_entry ---------------------------------------------------

/// The patcher's alias writers (asm/poke.S) take their destination and bytes
/// only from the live sealed batch (or the sealed area's bounds): a sealed
/// entry forged in ordinary memory, a copy of a live entry with another site,
/// sealed-area writes over the magic word, past the end or while a batch is
/// live, and a second write of the trampoline are each refused in asm (#UD)
/// with nothing written.
pub fn sec_poke_forged_entry(_st: &BootState) -> Outcome<'static> {
    let mut errors: Vec<String> = Vec::new();
    let site = site();
    let bytes = NewInsn::Call(target(1)).encode(site).unwrap_or_default();
    let mut word = [0u8; 8];
    word[..SITE_LEN].copy_from_slice(&bytes);
    let forged =
        SealedEntry { site, target: target(1), kind: shadowcall::patch::KIND_CALL, bytes: u64::from_le_bytes(word) };
    let (start, end) = mm::sealed_area();
    let size = end - start;
    let sum0 = super::text_checksum_except(Some(site));
    let refused = |what: &str, p: mm::Poke<'_>, errors: &mut Vec<String>| {
        let r = try_run(|| {
            mm::poke_all(core::iter::once(p));
            0
        });
        mm::poke_reset_after_abort();
        match r {
            Err(f) if f.vector == VEC_UD => {}
            other => errors.push(format!("{what}: expected a refusal (#UD), got {other:?}")),
        }
    };
    // No batch live: nothing is an entry.
    refused("forged entry, no batch live", mm::Poke::Int3(&forged), &mut errors);
    refused("sealed write over the magic word", mm::Poke::Sealed { offset: 0, bytes: &[0xff; 8] }, &mut errors);
    refused("sealed write past the end", mm::Poke::Sealed { offset: size - 4, bytes: &[0xff; 8] }, &mut errors);
    // A batch live: a copy of its entry (ordinary memory) with another site.
    let other = super::block_site(0);
    let r = patching::patch(&[(site, NewInsn::Call(target(1)))], |step| {
        if step != Step::Int3Written {
            return;
        }
        let Some(live) = patching::live_entry(site) else {
            errors.push(String::from("no live entry"));
            return;
        };
        let copy = SealedEntry { site: other, ..*live };
        refused("copy of a live entry with another site", mm::Poke::Head(&copy), &mut errors);
        refused("copy of a live entry, same site", mm::Poke::Head(&SealedEntry { ..*live }), &mut errors);
        // The live batch itself cannot be rewritten (its header or entries).
        refused("sealed write while a batch is live", mm::Poke::Sealed { offset: 8, bytes: &[0x41; 8] }, &mut errors);
        refused("trampoline rewritten", mm::Poke::Tramp, &mut errors);
    });
    if let Err(e) = r {
        errors.push(format!("patch: {e}"));
    }
    if super::text_checksum_except(Some(site)) != sum0 {
        errors.push(String::from("text outside the patched site changed"));
    }
    if patching::batch_live() {
        errors.push(String::from("a batch is live after the refusals"));
    }
    if patching::patch(&[(site, NewInsn::Call(target(0)))], |_| {}).is_err() {
        errors.push(String::from("restore failed"));
    }
    if !mm::text_alias_unmapped() {
        errors.push(String::from("a writable view of text remains"));
    }
    super::outcome_of(&errors)
}

// ---- sec_exit_nmi_regs --------------------------------------------------------

/// After calls in which an NMI's forged registers aimed at the victim slots
/// (`before`: their values before): the slots untouched, this CPU's register
/// save (`cpu`) unbound, and the test site restored.
fn after_forged_nmi(before: &[u64; 4], cpu: usize, errors: &mut Vec<String>) {
    if victim_slots() != *before {
        errors.push(format!("the forged registers steered a WRSS: {before:x?} -> {:x?}", victim_slots()));
    }
    if cet::read_slot(mm::irq_save_page(cpu) + shadowcall::emul::save::BOUND) != 0 {
        errors.push(String::from("the register save was left bound"));
    }
    if patching::patch(&[(site(), NewInsn::Call(target(0)))], |_| {}).is_err() {
        errors.push(String::from("restore failed"));
    }
}

/// Call the test site's function while the batch makes the site `call
/// target b`, with the hook flags `armed` set around the call: it must not
/// fault, and target b must run once and return to the site + 5.
fn call_target_b(armed: &[&AtomicBool], what: &str, errors: &mut Vec<String>) {
    tlog_reset();
    for a in armed {
        a.store(true, Ordering::SeqCst);
    }
    // SAFETY: a site function of the batch.
    let v = try_run(|| unsafe { sc_t_fn_call(0) });
    for a in armed {
        a.store(false, Ordering::SeqCst);
    }
    let log = tlog();
    match v {
        Err(f) => errors.push(format!("{what}the call faulted: {f}")),
        Ok(_) if log.count[1] != 1 || log.last_ret != site() + SITE_LEN as u64 => errors.push(format!(
            "{what}the emulated call went wrong: target b ran {} times, ret {:#x} (shadow {:#x})",
            log.count[1], log.last_ret, log.last_shret
        )),
        Ok(_) => {}
    }
}

/// An NMI taken inside a #BP exit, between its checks and its WRSS, whose
/// trap frame's saved registers are forged: the exit gets its own registers
/// back (from the WRSS-only save page), writes the right slots with the right
/// values, and the victim slots stay untouched.
pub fn sec_exit_nmi_regs(st: &BootState) -> Outcome<'static> {
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    if !HOOKS {
        return NO_HOOKS;
    }
    let mut errors: Vec<String> = Vec::new();
    let c = this_cpu();
    patching::set_strategy(shadowcall_cmdline::EmulStrategy::ShadowGap);
    let before = victim_slots();
    let nmis0 = c.counters.nmis.load(Ordering::SeqCst);
    let r = patching::patch(&[(site(), NewInsn::Call(target(1)))], |step| {
        if step != Step::Int3Written {
            return;
        }
        call_target_b(&[&FORGE_NMI_REGS, &SC_T_EXIT_NMI], "", &mut errors);
    });
    patching::set_strategy(crate::state().strategy);
    if let Err(e) = r {
        errors.push(format!("patch: {e}"));
    }
    if c.counters.nmis.load(Ordering::SeqCst) == nmis0 {
        errors.push(String::from("no NMI was taken inside the exit: the test tested nothing"));
    }
    after_forged_nmi(&before, c.index, &mut errors);
    super::outcome_of(&errors)
}

// ---- sec_fast_path -------------------------------------------------------------

/// The engine's counts of the calls its handler emulated (shadow gap,
/// trampoline first and second traps).
#[cfg(feature = "test-hooks")]
fn handler_emulations() -> [u64; 3] {
    let n = &this_cpu().engine.counters;
    [&n.shadow_gap_calls, &n.tramp_calls, &n.second_traps].map(|a| a.load(Ordering::SeqCst))
}
#[cfg(not(feature = "test-hooks"))]
fn handler_emulations() -> [u64; 3] {
    [0; 3]
}

/// The #BP stub's fast path (DESIGN §6; the production build's, turned on
/// here with SC_T_FAST) emulates the call under the shadow gap and the
/// trampoline without the handler (its counters stay still), right; and with
/// an NMI taken inside it, right after its lookup, whose trap frame's saved
/// registers are forged (F, the record page, S, T): it gets its own
/// registers back from the WRSS-only save page, writes the right slots with
/// the right values, and the victim slots stay untouched.
pub fn sec_fast_path(st: &BootState) -> Outcome<'static> {
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    if !HOOKS {
        return NO_HOOKS;
    }
    let mut errors: Vec<String> = Vec::new();
    let c = this_cpu();
    let before = victim_slots();
    for strategy in [shadowcall_cmdline::EmulStrategy::ShadowGap, shadowcall_cmdline::EmulStrategy::Trampoline] {
        patching::set_strategy(strategy);
        let handled0 = handler_emulations();
        let nmis0 = c.counters.nmis.load(Ordering::SeqCst);
        let r = patching::patch(&[(site(), NewInsn::Call(target(1)))], |step| {
            if step != Step::Int3Written {
                return;
            }
            call_target_b(&[&SC_T_FAST], &format!("{strategy:?}: "), &mut errors);
            let forged: [&AtomicBool; 3] = [&SC_T_FAST, &FORGE_NMI_FAST, &SC_T_FAST_NMI];
            call_target_b(&forged, &format!("{strategy:?}, forged NMI: "), &mut errors);
        });
        patching::set_strategy(crate::state().strategy);
        if let Err(e) = r {
            errors.push(format!("{strategy:?}: patch: {e}"));
        }
        if handler_emulations() != handled0 {
            errors.push(format!(
                "{strategy:?}: the handler emulated ({handled0:?} -> {:?}): the fast path did not run",
                handler_emulations()
            ));
        }
        if c.counters.nmis.load(Ordering::SeqCst) != nmis0 + 1 {
            errors.push(format!("{strategy:?}: no NMI was taken inside the fast path: the test tested nothing"));
        }
    }
    after_forged_nmi(&before, c.index, &mut errors);
    super::outcome_of(&errors)
}

// ---- sec_seal_unverified -----------------------------------------------------

extern "C" {
    /// `call sc_t_target_a; ret`: neither a registered site nor a registered target.
    fn sc_t_unregistered();
}

/// `insn` at `site`, as `SealedEntry::bytes` holds it (0 if it has no encoding).
fn packed(insn: NewInsn, site: u64) -> u64 {
    let mut w = [0u8; 8];
    w[..SITE_LEN].copy_from_slice(&insn.encode(site).unwrap_or_default());
    u64::from_le_bytes(w)
}

/// The bytes of a sealed entry, as the sealed area holds them.
fn entry_image(e: &SealedEntry) -> [u8; core::mem::size_of::<SealedEntry>()] {
    let mut b = [0u8; core::mem::size_of::<SealedEntry>()];
    for (off, v) in [
        (core::mem::offset_of!(SealedEntry, site), e.site),
        (core::mem::offset_of!(SealedEntry, target), e.target),
        (core::mem::offset_of!(SealedEntry, kind), e.kind),
        (core::mem::offset_of!(SealedEntry, bytes), e.bytes),
    ] {
        b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

/// A live sealed entry that `seal` never verified (written into the sealed
/// area through the test alias, as a racing store could have got published):
/// a target outside `.shadowcall_targets`, bytes that are not its call, a nop
/// with a target, a site outside `.shadowcall_sites`. It passes the exits'
/// and writers' `LIVE_ENTRY`; their check against the read-only tables
/// (sealed.S `CHECKED_ENTRY`) must refuse it: the step writer with #UD and
/// text unchanged; the #BP exit (shadow stacks on, every strategy) with a
/// refusal before any WRSS, no target run, SSP and the in-exit count as
/// before.
pub fn sec_seal_unverified(st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    let shstk = skip_without_shstk(st).is_none();
    let mut errors: Vec<String> = Vec::new();
    let site = site();
    let me = this_cpu().index;
    let unreg = sc_t_unregistered as *const () as u64;
    let b = target(1);
    let strategies = if shstk { patching::strategies_here() } else { Vec::new() };
    let mut refusals = (0u64, 0u64);
    // At least one round, for the writers (without shadow stacks: writers only).
    for round in 0..strategies.len().max(1) {
        if let Some(&s) = strategies.get(round) {
            patching::set_strategy(s);
        }
        let name = strategies.get(round).map_or("no shadow stacks", |s| s.name());
        let r = patching::patch(&[(site, NewInsn::Call(b))], |step| {
            if step != Step::Int3Written {
                return;
            }
            let Some(live) = patching::live_entry(site) else {
                errors.push(format!("{name}: no live entry"));
                return;
            };
            let at = live as *const SealedEntry as u64;
            // Read through the pointer each time: the test changes what `live` refers to.
            // SAFETY: a readable entry of the sealed area.
            let now = || unsafe { (at as *const SealedEntry).read_volatile() };
            let orig = now();
            let forgeries: [(&str, SealedEntry, bool); 4] = [
                (
                    "target not registered",
                    SealedEntry { target: unreg, bytes: packed(NewInsn::Call(unreg), site), ..orig },
                    true,
                ),
                ("bytes not its call", SealedEntry { bytes: packed(NewInsn::Call(b + 1), site), ..orig }, true),
                (
                    "nop with a target",
                    SealedEntry { kind: shadowcall::patch::KIND_NOP, bytes: shadowcall::patch::NOP5_WORD, ..orig },
                    true,
                ),
                (
                    "site not registered",
                    SealedEntry { site: unreg, bytes: packed(NewInsn::Call(b), unreg), ..orig },
                    false,
                ),
            ];
            for (what, forged, exit_too) in forgeries {
                test_poke(at, &entry_image(&forged));
                if now() != forged {
                    errors.push(format!("{name}, {what}: the forgery did not reach the sealed area"));
                }
                // The step writer (step 2: the forged bytes would go to text).
                if round == 0 {
                    let sum0 = super::text_checksum_except(None);
                    let r = try_run(|| {
                        mm::poke_all(core::iter::once(mm::Poke::Tails(live)));
                        0
                    });
                    mm::poke_reset_after_abort();
                    match r {
                        Err(f) if f.vector == VEC_UD => refusals.0 += 1,
                        other => errors.push(format!("{what}: step writer: expected a refusal (#UD), got {other:?}")),
                    }
                    if super::text_checksum_except(None) != sum0 {
                        errors.push(format!("{what}: step writer: text changed"));
                    }
                }
                // The #BP exit.
                if shstk && exit_too {
                    let ssp0 = cet::rdssp();
                    let before = victim_slots();
                    tlog_reset();
                    // SAFETY: a site function of the batch; the refusal is caught.
                    let r = expecting(|| try_run(|| unsafe { sc_t_fn_call(0) }));
                    match r {
                        Err(FaultInfo { vector: GUARD_REFUSAL, .. }) => refusals.1 += 1,
                        other => errors.push(format!("{name}, {what}: exit: expected a refusal, got {other:?}")),
                    }
                    let log = tlog();
                    if log.count != [0; 3] || log.after != 0 {
                        errors.push(format!("{name}, {what}: exit: code ran after the refusal: {:?}", log.count));
                    }
                    if cet::rdssp() != ssp0 || victim_slots() != before {
                        errors.push(format!("{name}, {what}: exit: SSP or shadow slots changed"));
                    }
                    if crate::records::pending_tramp_records() != 0 {
                        errors.push(format!("{name}, {what}: exit: a trampoline record was claimed"));
                    }
                    if crate::records::in_exit_count(me) != 0 {
                        errors.push(format!(
                            "{name}, {what}: exit: in-exit count left {}",
                            crate::records::in_exit_count(me)
                        ));
                    }
                }
                test_poke(at, &entry_image(&orig));
            }
        });
        if let Err(e) = r {
            errors.push(format!("{name}: patch: {e}"));
        }
        if patching::patch(&[(site, NewInsn::Call(target(0)))], |_| {}).is_err() {
            errors.push(format!("{name}: restore failed"));
        }
    }
    patching::set_strategy(crate::state().strategy);
    diag!("refused: {} step writes, {} exits", refusals.0, refusals.1);
    super::outcome_of(&errors)
}

// ---- sec_unseal_in_exit --------------------------------------------------------

/// The sealed area is not rewritten while a #BP exit may still read the
/// previous batch's entries: with an in-exit count set (the WRSS-only word
/// on a CPU's record page an exit raises before its `LIVE_ENTRY`), the
/// sealed-area writer (asm/poke.S `sc_poke_sealed`) waits, then refuses
/// (#UD) with nothing written; with another CPU's exit ending while it
/// waits, it writes only after that.
pub fn sec_unseal_in_exit(st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    let mut errors: Vec<String> = Vec::new();
    let me = this_cpu().index;
    if patching::batch_live() {
        return super::outcome_of(&[String::from("a batch is live before the test")]);
    }
    // A word of the sealed area past its magic word (the retired batch's header).
    let offset = core::mem::size_of::<u64>() as u64;
    let at = mm::sealed_area().0 + offset;
    // SAFETY: a readable word of the sealed area.
    let read = || unsafe { (at as *const u64).read_volatile() };
    let orig = read();
    let changed = (orig ^ u64::MAX).to_ne_bytes();
    let write = |bytes: &[u8]| {
        try_run(|| {
            mm::poke_all(core::iter::once(mm::Poke::Sealed { offset, bytes }));
            0
        })
    };
    // 1. This CPU's exit in flight (an NMI handler patching, say): refused.
    test_set_in_exit(me, 1);
    let r = write(&changed);
    mm::poke_reset_after_abort();
    test_set_in_exit(me, 0);
    match r {
        Err(f) if f.vector == VEC_UD => {}
        other => errors.push(format!("own exit in flight: expected a refusal (#UD), got {other:?}")),
    }
    if read() != orig {
        errors.push(String::from("own exit in flight: the sealed area was written"));
    }
    // 2. Another CPU's exit in flight, ending while the writer waits.
    let other = crate::percpu::online().map(|c| c.index).find(|&i| i != me);
    if let Some(w) = other {
        test_set_in_exit(w, 1);
        // Its exit ends (count 0, with WRSS, on its own CPU) while the writer waits.
        let (r, ended) = super::lowered_during(w, |cpu| test_set_in_exit(cpu, 0), || write(&changed));
        match r {
            Ok(_) if ended && read() == u64::from_ne_bytes(changed) => {}
            Ok(_) if !ended => errors.push(format!("CPU {w}'s exit in flight: the writer did not wait for it")),
            other => errors.push(format!("CPU {w}'s exit ended: expected the write, got {other:?}")),
        }
        if crate::records::in_exit_count(w) != 0 {
            test_set_in_exit(w, 0);
        }
        if write(&orig.to_ne_bytes()).is_err() || read() != orig {
            errors.push(String::from("the sealed word was not restored"));
        }
    } else {
        diag!("one CPU: only this CPU's exit is simulated");
    }
    // A patch still works (the counts are back to 0).
    if patching::patch(&[(site(), NewInsn::Call(target(1)))], |_| {}).is_err()
        || patching::patch(&[(site(), NewInsn::Call(target(0)))], |_| {}).is_err()
    {
        errors.push(String::from("patching after the test failed"));
    }
    super::outcome_of(&errors)
}

// ---- sec_poke_step_order ----------------------------------------------------

/// An alias PTE value that is not 0 (so "that CPU is in its poking window"
/// to the step writers) and not present (it maps nothing).
const FOREIGN_ALIAS_PTE: u64 = 1 << 12;

/// The step writers (asm/poke.S) take the step from text, not from the
/// patcher's choice (ordinary memory; the fifth review forged it from tails
/// to heads and left a call into the middle of an instruction in text).
/// With a batch live: the head writer over the old tails (step 2 skipped or
/// forged), the tails or head writer onto a site not holding int3, and any
/// step writer while another CPU is in its poking window (its alias PTE set)
/// are each refused (#UD) with nothing written; step 1 over anything, the
/// tails again and the head again onto the whole new instruction (the
/// rewrites of REWRITE_STEPS and of a redone step) are allowed; no other
/// text changes and a normal patch still works afterwards.
pub fn sec_poke_step_order(_st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    let mut errors: Vec<String> = Vec::new();
    let site = site();
    let read = || -> [u8; SITE_LEN] {
        // SAFETY: a registered site in mapped, readable kernel text.
        unsafe { core::ptr::read_volatile(site as *const [u8; SITE_LEN]) }
    };
    let orig = read();
    let new = match NewInsn::Call(target(1)).encode(site) {
        Ok(b) => b,
        Err(e) => return super::outcome_of(&[format!("encode: {e}")]),
    };
    let sum0 = text_checksum_except(site);
    // One step writer on the live entry; `ok`: expected to write, else to be
    // refused (#UD) with the site unchanged.
    let step = |what: &str, p: mm::Poke<'_>, ok: bool, errors: &mut Vec<String>| {
        let before = read();
        let r = try_run(|| {
            mm::poke_all(core::iter::once(p));
            0
        });
        match r {
            Ok(_) if ok => {}
            Err(f) if !ok && f.vector == VEC_UD => {
                mm::poke_reset_after_abort();
                if read() != before {
                    errors.push(format!("{what}: refused but the site changed: {before:02x?} -> {:02x?}", read()));
                }
            }
            other => {
                mm::poke_reset_after_abort();
                let want = if ok { "a write" } else { "a refusal (#UD)" };
                errors.push(format!("{what}: expected {want}, got {other:?}; site {before:02x?} -> {:02x?}", read()));
            }
        }
    };
    let flight = match patching::begin(&[(site, NewInsn::Call(target(1)))]) {
        Ok(f) => f,
        Err(e) => return super::outcome_of(&[format!("begin: {e}")]),
    };
    if let Some(e) = patching::live_entry(site) {
        // int3 + the old tails: step 2 skipped, the first byte must not follow.
        step("head over the old tails (step 2 skipped)", mm::Poke::Head(e), false, &mut errors);
        // The old instruction back (a test write): no step 2 or 3 onto it.
        test_poke(site, &orig[..1]);
        step("tails onto the old instruction", mm::Poke::Tails(e), false, &mut errors);
        step("head onto the old instruction", mm::Poke::Head(e), false, &mut errors);
        step("int3 onto the old instruction", mm::Poke::Int3(e), true, &mut errors);
        // Another CPU in its poking window: no step writer here.
        let other = (this_cpu().index + 1) % mm::MAX_CPUS;
        test_set_alias_pte(other, FOREIGN_ALIAS_PTE);
        step("int3 while another CPU pokes", mm::Poke::Int3(e), false, &mut errors);
        step("tails while another CPU pokes", mm::Poke::Tails(e), false, &mut errors);
        test_set_alias_pte(other, 0);
        // Steps 2 and 3, each twice (REWRITE_STEPS).
        step("tails", mm::Poke::Tails(e), true, &mut errors);
        step("tails again", mm::Poke::Tails(e), true, &mut errors);
        step("head", mm::Poke::Head(e), true, &mut errors);
        step("head again onto the new instruction", mm::Poke::Head(e), true, &mut errors);
        if read() != new {
            errors.push(format!("after steps 2 and 3: site {:02x?}, expected {new:02x?}", read()));
        }
        step("tails onto the new instruction", mm::Poke::Tails(e), false, &mut errors);
        // Back to int3 + new tails for the patcher's own step 3.
        step("int3 over the new instruction", mm::Poke::Int3(e), true, &mut errors);
    } else {
        errors.push(String::from("no live entry for the site"));
    }
    patching::finish(flight);
    if read() != new {
        errors.push(format!("after finish: site {:02x?}, expected {new:02x?}", read()));
    }
    if text_checksum_except(site) != sum0 {
        errors.push(String::from("text outside the site changed"));
    }
    // A normal patch still works: back to the original call.
    if let Err(e) = patching::patch(&[(site, NewInsn::Call(target(0)))], |_| {}) {
        errors.push(format!("restore: {e}"));
    }
    if read() != orig {
        errors.push(format!("restore: site {:02x?}, expected {orig:02x?}", read()));
    }
    if !mm::text_alias_unmapped() {
        errors.push(String::from("a writable view of text remains"));
    }
    super::outcome_of(&errors)
}

// ---- sec_tramp_bytes ----------------------------------------------------------

/// The trampoline page holds exactly `TRAMP_BYTES` and then its build-time
/// int3 fill to the end of the page (the fifth review's forged heap copy
/// put callable code at +0x800); the writer's only source,
/// `mm::SC_TRAMP_BYTES`, is `TRAMP_BYTES` in .rodata, mapped read-only; and
/// a second write of the page is refused (#UD) with nothing written.
pub fn sec_tramp_bytes(_st: &BootState) -> Outcome<'static> {
    let mut errors: Vec<String> = Vec::new();
    if let Err(e) = patching::tramp_page_intact() {
        errors.push(format!("the trampoline page after boot: {e}"));
    }
    let src = core::ptr::addr_of!(mm::SC_TRAMP_BYTES) as u64;
    let len = mm::SC_TRAMP_BYTES.len() as u64;
    let (ro_start, ro_end) = mm::rodata_range();
    if src < ro_start || src + len > ro_end {
        errors.push(format!("SC_TRAMP_BYTES at {src:#x} is not in .rodata [{ro_start:#x}, {ro_end:#x})"));
    }
    let writable = shadowcall_support::paging::Pte::WRITABLE.bits();
    match mm::shared_leaf(src) {
        Some(e) if e & writable == 0 => {}
        other => errors.push(format!("SC_TRAMP_BYTES at {src:#x} is not mapped read-only: {other:#x?}")),
    }
    if mm::SC_TRAMP_BYTES != shadowcall::tramp::TRAMP_BYTES {
        errors.push(String::from("SC_TRAMP_BYTES differs from TRAMP_BYTES"));
    }
    let r = try_run(|| {
        mm::poke_all(core::iter::once(mm::Poke::Tramp));
        0
    });
    mm::poke_reset_after_abort();
    match r {
        Err(f) if f.vector == VEC_UD => {}
        other => errors.push(format!("second trampoline write: expected a refusal (#UD), got {other:?}")),
    }
    if let Err(e) = patching::tramp_page_intact() {
        errors.push(format!("the trampoline page after the refused write: {e}"));
    }
    super::outcome_of(&errors)
}

// ---- sec_plain_live_site -----------------------------------------------------

/// Review 8 F1: a PLAIN answer for a live site (forged data in the handler)
/// would resume at the site's second byte, the middle of an instruction.
/// The PLAIN exit refuses when LIP-1 holds an int3 at a registered site
/// (the handler's site-table hint checked in asm), under each strategy.
pub fn sec_plain_live_site(st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    #[cfg_attr(not(feature = "test-hooks"), allow(unused_mut))]
    let mut errors: Vec<String> = Vec::new();
    #[cfg(feature = "test-hooks")]
    refused_under_each_strategy("PLAIN at a live site", &patching::FORGE_PLAIN, &mut errors);
    if errors.is_empty() {
        diag!("a PLAIN answer at a live site is refused by the exit under every strategy; nothing resumed mid-instruction");
    }
    super::outcome_of(&errors)
}
