//! Fault recovery under the threat model (issue 8, points 3 and 4): a forged
//! recovery context cannot choose where a recovery returns to, and a fault
//! inside an NMI handler is unwound inside the NMI.

use alloc::format;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shadowcall::patch::NewInsn;
use shadowcall::shstk;
use shadowcall_support::ktap::Outcome;

use super::emul_tests::{call_checked, SiteFn};
use super::smp_tests::SC_STRESS_COUNTS;
use crate::apic::{self, Delivery};
use crate::interrupts::IST_NMI;
use crate::percpu::this_cpu;
use crate::recover::{try_run, FaultInfo, FORGED_TRY_CTX, NMI_FAULTS, NMI_LAST_FAULT, TRY_RET_OFFSET, VEC_PF};
use crate::{cet, check, mm, patching, BootState};

core::arch::global_asm!(include_str!("../../asm/sec_recover.S"), options(att_syntax));

/// Set while sec_try_forged_ssp's fault is in flight: reaching
/// `sc_r_after_probe` then means the recovery obeyed the forgery.
#[no_mangle]
static SC_R_ARMED: AtomicBool = AtomicBool::new(false);
/// RSP and SSP at `sc_r_probe`'s entry: the slots of its return address.
#[no_mangle]
static SC_R_SEEN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

extern "C" {
    fn sc_r_dig(depth: u64);
    static sc_r_after_probe: u8;
    fn sc_r_int1() -> u64;
    fn sc_s_fn(_: u64) -> u64;
    fn sc_s_target_0();
    fn sc_s_target_1();
    static sc_s_site: u8;
}

/// Calls deep enough (one slot each on both stacks) that the test's own
/// calls and the fault path (exception frame, dispatcher, `fault`) never
/// reach the dead slots `sc_r_dig` leaves behind (checked before faulting).
const DIG_DEPTH: u64 = 512;
/// Spins to wait for a self-NMI to be taken.
const NMI_WAIT_SPINS: u64 = 50_000_000;

/// Reached only if a recovery returned to the forged return address.
#[no_mangle]
extern "C" fn sc_r_forged_landing() -> ! {
    SC_R_ARMED.store(false, Ordering::SeqCst);
    diag!(
        "FAIL: sec_try_forged_ssp: fault recovery returned to the forged return address {:#x} (SSP/RSP taken from the forged TryCtx)",
        core::ptr::addr_of!(sc_r_after_probe) as u64
    );
    diag!("PANIC: control flow hijacked through the recovery context");
    crate::exit(false)
}

/// An unmapped guard page of this CPU (below its kernel stack).
fn guard_addr() -> u64 {
    mm::kernel_stack(this_cpu().index).lo - 8
}

fn is_guard_pf(f: &FaultInfo, guard: u64) -> bool {
    f.vector == VEC_PF && f.cr2 == guard
}

/// Outcomes of the forging closure that are not the expected fault.
const NO_RECOVERY_POINT: u64 = 1;
const STALE_SLOTS_OVERWRITTEN: u64 = 2;

/// sec_try_forged_ssp: inside a try_run, forge the recovery context's SSP
/// and RSP to point at dead slots that still hold a return address once
/// pushed on this CPU (`sc_r_dig`'s probe), as the old unwinding would have
/// obeyed them: its RET would have returned there on both stacks. Then
/// fault. The recovery must come back to try_run's caller with both stacks
/// where they were, and the forgery must be noticed (counted), never obeyed.
pub fn sec_try_forged_ssp(_st: &BootState) -> Outcome<'static> {
    let landing = core::ptr::addr_of!(sc_r_after_probe) as u64;
    // SAFETY: an asm helper that only calls and returns.
    unsafe { sc_r_dig(DIG_DEPTH) };
    let (old_rsp, old_ssp) = (SC_R_SEEN[0].load(Ordering::SeqCst), SC_R_SEEN[1].load(Ordering::SeqCst));
    // The forged RSP makes sc_try_call's epilogue pop its RET from the old slot.
    let forged_rsp = old_rsp - TRY_RET_OFFSET;
    let stale_intact = move || {
        // SAFETY: a dead slot of this CPU's kernel stack (below the live RSP, mapped).
        let normal = unsafe { (old_rsp as *const u64).read_volatile() };
        normal == landing && (!cet::active() || cet::read_slot(old_ssp) == landing)
    };
    check!(stale_intact(), "the dead slots at rsp={old_rsp:#x}/ssp={old_ssp:#x} do not hold {landing:#x}");
    let guard = guard_addr();
    let ssp0 = cet::rdssp();
    let forged0 = FORGED_TRY_CTX.load(Ordering::SeqCst);
    let r = try_run(|| {
        let Some(ctx) = this_cpu().top_try().map(|p| p.cast::<crate::recover::TryCtx>()) else {
            return NO_RECOVERY_POINT;
        };
        // SAFETY: the attacker's ordinary stores into the recovery context
        // (a live TryCtx on the normal stack).
        unsafe {
            if cet::active() {
                (*ctx).ssp = old_ssp;
            }
            (*ctx).rsp = forged_rsp;
        }
        if !stale_intact() {
            return STALE_SLOTS_OVERWRITTEN;
        }
        SC_R_ARMED.store(true, Ordering::SeqCst);
        // SAFETY: a deliberate read of an unmapped guard page; the #PF is the test.
        unsafe { (guard as *const u64).read_volatile() }
    });
    SC_R_ARMED.store(false, Ordering::SeqCst);
    let forged = FORGED_TRY_CTX.load(Ordering::SeqCst) - forged0;
    diag!(
        "forged TryCtx: ssp={:#x} rsp={forged_rsp:#x} (old return address {landing:#x}); recovery gave {r:?}; forgeries counted: {forged}",
        if cet::active() { old_ssp } else { 0 }
    );
    if !cet::active() {
        diag!("no shadow stacks: the forged-SSP part does not apply; the forged RSP was checked");
    }
    check!(r != Ok(STALE_SLOTS_OVERWRITTEN), "test setup: the dead slots were overwritten before the fault");
    check!(
        matches!(r, Err(ref f) if is_guard_pf(f, guard)),
        "expected the guard-page #PF at {guard:#x} to come back as Err, got {r:?}"
    );
    check!(cet::rdssp() == ssp0, "SSP {:#x} not back where try_run left it ({ssp0:#x})", cet::rdssp());
    let want = if cet::active() { 2 } else { 1 };
    check!(forged == want, "expected {want} forged TryCtx fields noticed, counted {forged}");
    Outcome::Pass
}

/// Armed by sec_fault_in_nmi: the next NMI handler body faults once.
static NMI_FAULT_ARMED: AtomicBool = AtomicBool::new(false);

/// Called by the NMI handler body: when armed, fault once by reading this
/// CPU's kernel-stack guard page (an address from the static layout).
pub fn nmi_hook() {
    if NMI_FAULT_ARMED.swap(false, Ordering::Relaxed) {
        // SAFETY: a deliberate read of an unmapped guard page; the #PF is the test.
        unsafe { (guard_addr() as *const u64).read_volatile() };
    }
}

/// Send this CPU an NMI and wait until its handler has counted `expect` NMIs.
fn self_nmi(expect: u64) -> bool {
    let c = this_cpu();
    apic::send(c.apic_id.load(Ordering::Relaxed), Delivery::Nmi, 0);
    let mut spins = 0;
    while c.counters.nmis.load(Ordering::SeqCst) < expect && spins < NMI_WAIT_SPINS {
        core::hint::spin_loop();
        spins += 1;
    }
    c.counters.nmis.load(Ordering::SeqCst) >= expect
}

fn nmi_token_free() -> Result<(), alloc::string::String> {
    if !cet::active() {
        return Ok(());
    }
    let token = shstk::token_addr(mm::ist_shadow_stack(this_cpu().index, IST_NMI).hi);
    let v = cet::read_slot(token);
    if shstk::token_is_free(v, token) {
        Ok(())
    } else {
        Err(format!("the NMI IST shadow-stack token at {token:#x} is {v:#x}, not free"))
    }
}

/// sec_fault_in_nmi: the NMI handler faults once; the fault must be
/// recovered inside the NMI (its own recovery point), the NMI must return
/// normally (IST token free; a second NMI is taken and counted), the
/// thread's recovery point must not be used, and patching still works.
pub fn sec_fault_in_nmi(_st: &BootState) -> Outcome<'static> {
    let c = this_cpu();
    let guard = guard_addr();
    let n0 = c.counters.nmis.load(Ordering::SeqCst);
    let f0 = NMI_FAULTS.load(Ordering::SeqCst);
    let ssp0 = cet::rdssp();
    if let Err(e) = nmi_token_free() {
        diag!("FAIL: before the test: {e}");
        return Outcome::Fail;
    }
    NMI_FAULT_ARMED.store(true, Ordering::SeqCst);
    let r1 = try_run(|| self_nmi(n0 + 1) as u64);
    let armed = NMI_FAULT_ARMED.swap(false, Ordering::SeqCst);
    let faults = NMI_FAULTS.load(Ordering::SeqCst) - f0;
    let (vector, cr2) = (NMI_LAST_FAULT[0].load(Ordering::SeqCst), NMI_LAST_FAULT[1].load(Ordering::SeqCst));
    diag!("first NMI: thread's try_run gave {r1:?}; faults recovered in NMI context: {faults} (vector {vector}, cr2 {cr2:#x})");
    check!(r1 == Ok(1), "the thread's recovery point was used or no NMI was taken: {r1:?}");
    check!(!armed, "the NMI handler did not reach the faulting hook");
    check!(faults == 1 && vector == VEC_PF && cr2 == guard, "expected one #PF at {guard:#x} recovered in NMI context");
    check!(!c.in_nmi.load(Ordering::SeqCst), "in_nmi left set after the NMI returned");
    check!(cet::rdssp() == ssp0, "the thread's SSP changed");
    if let Err(e) = nmi_token_free() {
        diag!("FAIL: after the faulting NMI: {e}");
        return Outcome::Fail;
    }

    let r2 = try_run(|| self_nmi(n0 + 2) as u64);
    diag!("second NMI: {r2:?}, NMIs counted {}", c.counters.nmis.load(Ordering::SeqCst) - n0);
    check!(r2 == Ok(1), "a second NMI was not taken normally: {r2:?}");
    check!(NMI_FAULTS.load(Ordering::SeqCst) == f0 + 1, "the second NMI faulted");
    if let Err(e) = nmi_token_free() {
        diag!("FAIL: after the second NMI: {e}");
        return Outcome::Fail;
    }
    let site = core::ptr::addr_of!(sc_s_site) as u64;
    let (t0, t1) = (sc_s_target_0 as *const () as u64, sc_s_target_1 as *const () as u64);
    let before = SC_STRESS_COUNTS[1].load(Ordering::SeqCst);
    let p = patching::patch(&[(site, NewInsn::Call(t1))], |_| {});
    check!(p.is_ok(), "patching after the recovered fault failed: {p:?}");
    let call = call_checked(sc_s_fn as SiteFn, 0);
    let after = SC_STRESS_COUNTS[1].load(Ordering::SeqCst);
    let back = patching::patch(&[(site, NewInsn::Call(t0))], |_| {});
    check!(call.balanced() && after == before + 1, "the patched site did not call the new target");
    check!(back.is_ok(), "restoring the site failed: {back:?}");
    Outcome::Pass
}

// ---- sec_fault_ssp_race --------------------------------------------------------

/// Faults unwound while another CPU attacks the unwind.
const RACE_ITERATIONS: u64 = 64;
/// Bytes of the normal stack below the faulting function's locals that the
/// attacker covers: the trap frame, the dispatcher and `fault` with every
/// frame it calls (a few hundred bytes in either build), generously.
const RACE_REGION: u64 = 4096;
/// Slots of the faulting function's own frame: with a forged `TryCtx.rsp`
/// the unwind searches for the recovery point's frame from the faulting
/// RSP upward through them, which widens the window of the old code (the
/// recovery SSP was computed before that search and written after it).
const RACE_PAD_SLOTS: usize = 256;
/// Spins for the attacker to start.
const RACE_START_SPINS: u64 = 50_000_000;

/// The attacker's inputs: the real recovery SSP, the forged one, and the
/// top of the region it covers (0: not yet known).
static RACE_LEGIT: AtomicU64 = AtomicU64::new(0);
static RACE_FORGED: AtomicU64 = AtomicU64::new(0);
static RACE_TOP: AtomicU64 = AtomicU64::new(0);
static RACE_RUNNING: AtomicBool = AtomicBool::new(false);
static RACE_STOP: AtomicBool = AtomicBool::new(false);
/// Stack slots the attacker changed, and its sweeps over the region.
static RACE_HITS: AtomicU64 = AtomicU64::new(0);
static RACE_SWEEPS: AtomicU64 = AtomicU64::new(0);

#[cfg(feature = "test-hooks")]
use crate::records::{test_claim_record, test_claim_top_record, test_free_record};
/// Without the hooks these are never reached (the tests skip first).
#[cfg(not(feature = "test-hooks"))]
mod no_hooks {
    pub fn test_claim_record(_: u64, _: u64, _: u64, _: u64) -> u64 {
        unreachable!("test-hooks build only")
    }
    pub fn test_claim_top_record(_: u64, _: u64, _: u64, _: u64) -> u64 {
        unreachable!("test-hooks build only")
    }
    pub fn test_free_record(_: u64) {
        unreachable!("test-hooks build only")
    }
}
#[cfg(not(feature = "test-hooks"))]
use no_hooks::{test_claim_record, test_claim_top_record, test_free_record};

/// The attacker, on another CPU: ordinary stores only. Over and over, every
/// slot of the victim's normal stack in [RACE_TOP - RACE_REGION, RACE_TOP) that holds the
/// real recovery SSP L (or the marker slot L-8, from which L is computed) is
/// replaced by the forged X (or X-8), with a compare-and-swap so that no
/// other live value of the victim is touched. The old unwind kept L in such
/// a slot between computing it and its WRSS.
fn race_attacker(victim: u64) {
    RACE_RUNNING.store(true, Ordering::SeqCst);
    let (legit, forged) = (RACE_LEGIT.load(Ordering::SeqCst), RACE_FORGED.load(Ordering::SeqCst));
    let stack = mm::kernel_stack(victim as usize);
    while !RACE_STOP.load(Ordering::Relaxed) {
        let hi = RACE_TOP.load(Ordering::Relaxed);
        if hi < stack.lo || hi > stack.hi {
            continue;
        }
        let mut a = stack.lo.max(hi.saturating_sub(RACE_REGION)) & !(shstk::SLOT - 1);
        while a < hi {
            // SAFETY: a slot of the victim CPU's kernel stack (mapped,
            // 8-aligned); the attacker's ordinary accesses to it.
            let slot = unsafe { &*(a as *const AtomicU64) };
            let v = slot.load(Ordering::Relaxed);
            let to = if v == legit {
                forged
            } else if v == legit - shstk::SLOT {
                forged - shstk::SLOT
            } else {
                a += shstk::SLOT;
                continue;
            };
            if slot.compare_exchange(v, to, Ordering::SeqCst, Ordering::Relaxed).is_ok() {
                RACE_HITS.fetch_add(1, Ordering::Relaxed);
            }
            a += shstk::SLOT;
        }
        RACE_SWEEPS.fetch_add(1, Ordering::Relaxed);
    }
    RACE_RUNNING.store(false, Ordering::SeqCst);
}

/// Inside the recovery point: the recovery SSP (the marker slot + 8),
/// found by scanning this shadow stack up from RDSSP.
#[inline(never)]
fn race_recovery_ssp() -> u64 {
    let marker = crate::recover::try_marker();
    let top = mm::primary_shadow_stack(this_cpu().index).hi;
    let mut s = cet::rdssp();
    while s < top - shstk::SLOT {
        if cet::read_slot(s) == marker {
            return s + shstk::SLOT;
        }
        s += shstk::SLOT;
    }
    0
}

/// Inside the recovery point: forge its `TryCtx.rsp` (the unwind searches
/// for the frame instead), publish the attacked region, and fault.
#[inline(never)]
fn race_fault(guard: u64) -> u64 {
    let pad = core::hint::black_box([0u64; RACE_PAD_SLOTS]);
    let here = pad.as_ptr() as u64;
    if let Some(ctx) = this_cpu().top_try().map(|p| p.cast::<crate::recover::TryCtx>()) {
        // SAFETY: the attacker's ordinary store into the live recovery context.
        unsafe { (*ctx).rsp = 0 };
    }
    RACE_TOP.store(here, Ordering::SeqCst);
    // SAFETY: a deliberate read of an unmapped guard page; the #PF is the test.
    unsafe { (guard as *const u64).read_volatile() }
}

/// One recovery point: the same call site (so the same recovery SSP) for
/// the probe and for every faulting run. Checks SSP right after it, before
/// any return could pop a slot of a forged shadow stack.
#[inline(never)]
fn race_try(probe: bool, guard: u64) -> Result<u64, FaultInfo> {
    let before = cet::rdssp();
    let r = try_run(|| if probe { race_recovery_ssp() } else { race_fault(guard) });
    let after = cet::rdssp();
    if after != before {
        race_hijacked(before, after);
    }
    r
}

/// The unwind did not land at the recovery point: the shadow stack is no
/// longer this thread's, so no return is safe. Report and stop.
#[inline(never)]
fn race_hijacked(want: u64, got: u64) -> ! {
    RACE_STOP.store(true, Ordering::SeqCst);
    diag!("FAIL: sec_fault_ssp_race: after the unwind SSP is {got:#x}, not {want:#x} where try_run left it");
    diag!("PANIC: fault recovery obeyed an SSP from ordinary memory");
    crate::exit(false)
}

/// sec_fault_ssp_race (review 5, F1): another CPU keeps replacing, on this
/// CPU's normal stack below the faulting frame, every copy of the recovery
/// SSP (and of the marker slot) by a forged SSP: a shadow-stack slot (on a
/// record page) holding the same return address, so a RET there would pass.
/// Meanwhile this CPU faults under a recovery point, over and over. Every
/// unwind must land at the real recovery point: the fault comes back as
/// `Err`, SSP is back where try_run left it. (The old unwind computed the
/// recovery SSP in Rust and the compiler kept it on the stack until its WRSS:
/// the frame got the forged SSP.)
pub fn sec_fault_ssp_race(_st: &BootState) -> Outcome<'static> {
    if !cfg!(feature = "test-hooks") {
        return Outcome::Skip("needs the test-hooks build");
    }
    if !cet::enforced() {
        return Outcome::Skip("needs shadow stacks");
    }
    let me = this_cpu().index;
    let Some(other) = crate::percpu::online().map(|c| c.index).find(|&i| i != me) else {
        return Outcome::Skip("needs 2 CPUs");
    };
    let guard = guard_addr();
    let ssp0 = cet::rdssp();
    let legit = match race_try(true, guard) {
        Ok(l) if l != 0 => l,
        r => {
            diag!("FAIL: no recovery SSP found inside the recovery point: {r:?}");
            return Outcome::Fail;
        }
    };
    // The return address right above the marker, copied into a record.
    let ret = cet::read_slot(legit);
    let rec = test_claim_top_record(1, 0, ret, ret);
    let forged = rec + shadowcall::emul::record::REC_SITE;
    diag!("recovery SSP {legit:#x}, forged SSP {forged:#x} (record page, holds {ret:#x})");
    RACE_LEGIT.store(legit, Ordering::SeqCst);
    RACE_FORGED.store(forged, Ordering::SeqCst);
    RACE_TOP.store(0, Ordering::SeqCst);
    RACE_STOP.store(false, Ordering::SeqCst);
    RACE_HITS.store(0, Ordering::SeqCst);
    RACE_SWEEPS.store(0, Ordering::SeqCst);
    let ticket = crate::smp::run_on(other, race_attacker, me as u64);
    let mut spins = 0;
    while !RACE_RUNNING.load(Ordering::SeqCst) && spins < RACE_START_SPINS {
        core::hint::spin_loop();
        spins += 1;
    }
    let mut landed = 0;
    let mut bad = None;
    for i in 0..RACE_ITERATIONS {
        let r = race_try(false, guard);
        if cet::rdssp() != ssp0 {
            race_hijacked(ssp0, cet::rdssp());
        }
        if !matches!(r, Err(ref f) if is_guard_pf(f, guard)) {
            bad = Some((i, r));
            break;
        }
        landed += 1;
    }
    RACE_STOP.store(true, Ordering::SeqCst);
    crate::smp::wait(other, ticket);
    test_free_record(rec);
    diag!(
        "{landed} of {RACE_ITERATIONS} unwinds landed at the recovery point; attacker on CPU {other}: {} sweeps, {} slots changed",
        RACE_SWEEPS.load(Ordering::SeqCst),
        RACE_HITS.load(Ordering::SeqCst)
    );
    check!(bad.is_none(), "expected each guard-page #PF at {guard:#x} to come back as Err, got {bad:?}");
    check!(RACE_SWEEPS.load(Ordering::SeqCst) > 0, "the attacker never swept the region");
    Outcome::Pass
}

// ---- sec_fault_ist_records -----------------------------------------------------

/// The vector of #DB, delivered on its own IST stack (interrupts::IST_DB).
const VEC_DB: u64 = 1;
/// The record (slot address) the next test claimed inside its recovery point.
static IST_REC_INSIDE: AtomicU64 = AtomicU64::new(0);

/// sec_fault_ist_records (review 5, E): a fault delivered on an IST stack
/// (#DB by `int $1`) under a recovery point, with a trampoline record bound
/// to an SSP between the fault and the recovery point (an emulation the
/// unwind abandons) and one bound above the recovery point (not abandoned).
/// The unwind must free the first and keep the second: the abandoned range
/// is bounded by the interrupted SSP (the frame's previous SSP), not by the
/// faulting frame, which lies on the IST stack. The IST token must be free
/// afterwards.
pub fn sec_fault_ist_records(_st: &BootState) -> Outcome<'static> {
    if !cfg!(feature = "test-hooks") {
        return Outcome::Skip("needs the test-hooks build");
    }
    if !cet::enforced() {
        return Outcome::Skip("needs shadow stacks");
    }
    let ssp0 = cet::rdssp();
    let outside = test_claim_record(ssp0, 0, 0, 0);
    let r = try_run(|| {
        IST_REC_INSIDE.store(test_claim_record(cet::rdssp(), 0, 0, 0), Ordering::SeqCst);
        // SAFETY: asm/sec_recover.S: `int $1` (a #DB through its IST
        // gate), unwound to this recovery point.
        unsafe { sc_r_int1() }
    });
    let inside = IST_REC_INSIDE.swap(0, Ordering::SeqCst);
    let inside_bound = if inside != 0 { cet::read_slot(inside) } else { 0 };
    let outside_bound = cet::read_slot(outside);
    if inside_bound != 0 {
        test_free_record(inside);
    }
    test_free_record(outside);
    diag!(
        "#DB on IST {}: {r:?}; record bound inside the unwound range now {inside_bound:#x}, above it {outside_bound:#x}",
        crate::interrupts::IST_DB
    );
    check!(matches!(r, Err(ref f) if f.vector == VEC_DB), "expected the #DB to come back as Err, got {r:?}");
    check!(cet::rdssp() == ssp0, "SSP {:#x} not back where try_run left it ({ssp0:#x})", cet::rdssp());
    check!(inside != 0, "no record was claimed inside the recovery point");
    check!(inside_bound == 0, "the record of the abandoned emulation leaked (bound {inside_bound:#x})");
    check!(outside_bound == ssp0, "the record bound above the recovery point was freed");
    let token = shstk::token_addr(mm::ist_shadow_stack(this_cpu().index, crate::interrupts::IST_DB).hi);
    let v = cet::read_slot(token);
    check!(shstk::token_is_free(v, token), "the #DB IST token at {token:#x} is {v:#x}, not free");
    Outcome::Pass
}

/// What `forge_nmi_frame` writes into the next NMI's trap frame: the slot
/// (RDI), the range's low bound (RSI, 0) and the value (R8) of the unwind's
/// record-free WRSS; 0: nothing armed.
#[cfg(feature = "test-hooks")]
static FORGE_SLOT: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "test-hooks")]
static FORGE_VALUE: AtomicU64 = AtomicU64::new(0);

/// The dispatcher's first step (test-hooks builds): an armed forgery of the
/// next NMI's saved registers, as another CPU's ordinary stores would do.
#[cfg(feature = "test-hooks")]
pub fn forge_nmi_frame(frame: &mut shadowcall::frame::TrapFrame) {
    if frame.vector == crate::recover::VEC_NMI {
        let slot = FORGE_SLOT.swap(0, Ordering::SeqCst);
        if slot != 0 {
            frame.rdi = slot;
            frame.rsi = 0;
            frame.r8 = FORGE_VALUE.load(Ordering::SeqCst);
        }
    }
}

#[cfg(feature = "test-hooks")]
extern "C" {
    static mut sc_t_unwind_nmi: u8;
}

/// §4/§11 (sixth review): an NMI taken inside the fault unwind's record-free
/// loop (a software NMI at a test-hooks probe in `sc_unwind_shadow`), whose
/// trap frame's saved RDI/RSI/R8 are forged to a victim shadow slot and a
/// value: the unwind lies in a critical region, so the NMI hands its
/// registers back from the WRSS-only save page and the victim slot is
/// untouched; the unwind still lands at the recovery point.
pub fn sec_unwind_nmi_regs(_st: &BootState) -> Outcome<'static> {
    if !cet::enforced() {
        return Outcome::Skip("needs shadow stacks");
    }
    if !cfg!(feature = "test-hooks") {
        return Outcome::Skip("needs the test-hooks build");
    }
    #[cfg(feature = "test-hooks")]
    {
        let guard = guard_addr();
        let rec = test_claim_top_record(1, 0, 0x1111, 0x2222);
        let victim = rec + shadowcall::emul::record::REC_TARGET;
        let value = 0x4141_4141_4141_4141u64;
        let before = cet::read_slot(victim);
        FORGE_VALUE.store(value, Ordering::SeqCst);
        FORGE_SLOT.store(victim, Ordering::SeqCst);
        let nmis0 = this_cpu().counters.nmis.load(Ordering::SeqCst);
        // SAFETY: the probe's flag byte (test-hooks builds only).
        unsafe { core::ptr::addr_of_mut!(sc_t_unwind_nmi).write_volatile(1) };
        let ssp0 = cet::rdssp();
        let r = try_run(|| race_fault(guard));
        let ssp1 = cet::rdssp();
        let got = cet::read_slot(victim);
        let armed = FORGE_SLOT.swap(0, Ordering::SeqCst);
        test_free_record(rec);
        diag!("NMI inside the unwind, its frame's RDI/RSI/R8 forged to slot {victim:#x} := {value:#x}: slot {before:#x} -> {got:#x}; unwind {r:?}");
        check!(armed == 0, "the NMI inside the unwind was not taken");
        check!(this_cpu().counters.nmis.load(Ordering::SeqCst) > nmis0, "no NMI counted");
        check!(got == before, "ARBITRARY WRSS: shadow slot {victim:#x} := {got:#x} from an NMI trap frame");
        check!(
            r.is_err() && ssp1 == ssp0,
            "the unwind did not land at the recovery point (SSP {ssp1:#x}, was {ssp0:#x})"
        );
    }
    Outcome::Pass
}
