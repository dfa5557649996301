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

core::arch::global_asm!(include_str!("../../../asm/sec_recover.S"), options(att_syntax));

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
