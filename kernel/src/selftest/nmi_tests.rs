//! A #BP taken inside an NMI handler must leave NMIs blocked (DESIGN §8.3):
//! `nmi_bp_keeps_nmi_masked` (one CPU) and `nmi_storm` (NMIs from another
//! CPU, back to back, while the sites they run are repatched).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shadowcall::patch::NewInsn;
use shadowcall::shstk;
use shadowcall_support::ktap::Outcome;

use super::emul_tests::{call_checked, SiteFn};
use super::smp_tests::SC_STRESS_COUNTS;
use crate::interrupts::IST_NMI;
use crate::patching::{self, Step};
use crate::percpu::{self, this_cpu};
use crate::{apic, cet, mm, smp, BootState};

use super::smp_tests::{nmi_site, sc_s_fn, sc_s_nmi_fn, site as stress_site, targets};

extern "C" {
    fn sc_t_stray_probe() -> u64;
}

/// NMI handlers running on each CPU right now, and NMIs that arrived while
/// one was already running (the CPU's NMI blocking was lost).
static DEPTH: [AtomicU64; mm::MAX_CPUS] = [const { AtomicU64::new(0) }; mm::MAX_CPUS];
static NESTED: AtomicU64 = AtomicU64::new(0);
/// Event order: the outer handler's end and the second NMI's start.
static SEQ: AtomicU64 = AtomicU64::new(1);
static OUTER_DONE: AtomicU64 = AtomicU64::new(0);
static SECOND_AT: AtomicU64 = AtomicU64::new(0);
static OUTER_SAW_NMI: AtomicU64 = AtomicU64::new(0);
static OUTER_UNBALANCED: AtomicU64 = AtomicU64::new(0);
static OUTER_EMULATED: AtomicU64 = AtomicU64::new(0);
/// Arm the one-CPU test's outer handler.
static MASK_TEST: AtomicBool = AtomicBool::new(false);
static EXPECT_SECOND: AtomicBool = AtomicBool::new(false);
/// nmi_storm: the receiver's NMI handler calls the NMI site.
static STORM: AtomicBool = AtomicBool::new(false);
static STORM_CALLS: AtomicU64 = AtomicU64::new(0);
static STORM_UNBALANCED: AtomicU64 = AtomicU64::new(0);

/// Spins the outer handler waits after sending itself an NMI: far longer than
/// a self-NMI takes to be delivered when NMIs are not blocked.
const MASKED_WAIT_SPINS: u64 = 20_000;

/// The NMI handler starts (outside its recovery point).
pub fn nmi_depth_enter() {
    if DEPTH[this_cpu().index].fetch_add(1, Ordering::SeqCst) > 0 {
        NESTED.fetch_add(1, Ordering::SeqCst);
    }
}

/// The NMI handler ends (outside its recovery point).
pub fn nmi_depth_exit() {
    DEPTH[this_cpu().index].fetch_sub(1, Ordering::SeqCst);
}

/// The NMI handler's test work (inside its recovery point).
pub fn nmi_body() {
    if POKE_NMI.swap(false, Ordering::SeqCst) {
        let shared = mm::current_pml4() == mm::shared_pml4();
        POKE_NMI_SAW.store(if shared { 1 } else { 2 }, Ordering::SeqCst);
    }
    let me = this_cpu().index;
    if EXPECT_SECOND.swap(false, Ordering::SeqCst) {
        SECOND_AT.store(SEQ.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
    }
    if MASK_TEST.swap(false, Ordering::SeqCst) {
        outer_handler();
    }
    if STORM.load(Ordering::Relaxed) && me == STORM_RECEIVER.load(Ordering::Relaxed) as usize {
        let c = call_checked(sc_s_nmi_fn as SiteFn, 0);
        STORM_CALLS.fetch_add(1, Ordering::Relaxed);
        if !c.balanced() {
            STORM_UNBALANCED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The outer NMI of `nmi_bp_keeps_nmi_masked`: a mid-patch site (emulated),
/// a stray int3 (a real breakpoint), then an NMI to itself, and a wait in
/// which an unmasked NMI would be taken at once.
fn outer_handler() {
    let c = this_cpu();
    let em0 = super::engine_count!(c, emulations);
    let call = call_checked(sc_s_nmi_fn as SiteFn, 0);
    if !call.balanced() {
        OUTER_UNBALANCED.fetch_add(1, Ordering::SeqCst);
    }
    // Counted in test-hooks builds; in production the call's balance is the check.
    OUTER_EMULATED.store(super::since(super::engine_count!(c, emulations), em0).unwrap_or(1), Ordering::SeqCst);
    c.expect_refusal.store(true, Ordering::Relaxed);
    // SAFETY: asm probe with a stray int3 (reported, execution continues).
    unsafe { sc_t_stray_probe() };
    c.expect_refusal.store(false, Ordering::Relaxed);
    let n0 = c.counters.nmis.load(Ordering::SeqCst);
    EXPECT_SECOND.store(true, Ordering::SeqCst);
    apic::send(c.apic_id.load(Ordering::Relaxed), apic::Delivery::Nmi, 0);
    for _ in 0..MASKED_WAIT_SPINS {
        core::hint::spin_loop();
    }
    OUTER_SAW_NMI.store(c.counters.nmis.load(Ordering::SeqCst) - n0, Ordering::SeqCst);
    OUTER_DONE.store(SEQ.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
}

fn nmi_token_free(cpu: usize) -> bool {
    if !cet::active() {
        return true;
    }
    let token = shstk::token_addr(mm::ist_shadow_stack(cpu, IST_NMI).hi);
    shstk::token_is_free(cet::read_slot(token), token)
}

pub fn nmi_bp_keeps_nmi_masked(_st: &BootState) -> Outcome<'static> {
    let c = this_cpu();
    let mut errors: Vec<String> = Vec::new();
    let t = targets();
    // Every kind the handler emulates, under each strategy: the #BP exits of
    // each (shadow gap, classic, both trampoline traps, jmp, nop, ret) then
    // return to NMI context without IRET.
    let kinds = [
        ("call", NewInsn::Call(t[2]), 1),
        ("jmp", NewInsn::Jmp(t[2]), 1),
        ("nop", NewInsn::Nop, 0),
        ("ret", NewInsn::Ret, 0),
    ];
    for (s, (kind, insn, target_runs)) in
        patching::strategies_here().into_iter().flat_map(|s| kinds.iter().map(move |k| (s, *k)))
    {
        patching::set_strategy(s);
        let nested0 = NESTED.load(Ordering::SeqCst);
        let (bps0, n0) = (c.counters.breakpoints.load(Ordering::SeqCst), c.counters.nmis.load(Ordering::SeqCst));
        OUTER_DONE.store(0, Ordering::SeqCst);
        SECOND_AT.store(0, Ordering::SeqCst);
        SC_STRESS_COUNTS.iter().for_each(|x| x.store(0, Ordering::SeqCst));
        let r = patching::patch(&[(nmi_site(), insn)], |step| {
            if step != Step::Int3Written {
                return;
            }
            MASK_TEST.store(true, Ordering::SeqCst);
            apic::send(c.apic_id.load(Ordering::Relaxed), apic::Delivery::Nmi, 0);
            for _ in 0..10 * MASKED_WAIT_SPINS {
                if SECOND_AT.load(Ordering::SeqCst) != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
        });
        let name = format!("{}/{kind}", s.name());
        if let Err(e) = r {
            errors.push(format!("{name}: patch: {e}"));
        }
        let (done, second) = (OUTER_DONE.load(Ordering::SeqCst), SECOND_AT.load(Ordering::SeqCst));
        if done == 0 {
            errors.push(format!("{name}: the outer NMI handler did not run"));
        }
        if second == 0 {
            errors.push(format!("{name}: the second NMI never arrived"));
        } else if second < done {
            errors.push(format!("{name}: the second NMI arrived inside the outer handler (NMIs unmasked)"));
        }
        if OUTER_SAW_NMI.load(Ordering::SeqCst) != 0 || NESTED.load(Ordering::SeqCst) != nested0 {
            errors.push(format!("{name}: an NMI was taken while the outer NMI handler ran"));
        }
        if OUTER_EMULATED.load(Ordering::SeqCst) != 1 || SC_STRESS_COUNTS[2].load(Ordering::SeqCst) != target_runs {
            errors.push(format!("{name}: the mid-patch site was not emulated once in the NMI handler"));
        }
        if OUTER_UNBALANCED.swap(0, Ordering::SeqCst) != 0 {
            errors.push(format!("{name}: unbalanced stacks in the NMI handler"));
        }
        if c.counters.breakpoints.load(Ordering::SeqCst) != bps0 + 1 {
            errors.push(format!("{name}: the stray int3 in the NMI handler was not reported once"));
        }
        if c.counters.nmis.load(Ordering::SeqCst) != n0 + 2 {
            errors.push(format!("{name}: {} NMIs counted, expected 2", c.counters.nmis.load(Ordering::SeqCst) - n0));
        }
        if !nmi_token_free(c.index) {
            errors.push(format!("{name}: the NMI stack's token is busy after the NMIs"));
        }
        if patching::patch(&[(nmi_site(), NewInsn::Call(t[0]))], |_| {}).is_err() {
            errors.push(String::from("restore failed"));
        }
    }
    patching::set_strategy(crate::state().strategy);
    crate::diag!(
        "strategies {:?} x call/jmp/nop/ret: NMI handler ran an emulated site and a stray int3, sent itself an NMI: taken after its IRET",
        patching::strategies_here().iter().map(|s| s.name()).collect::<Vec<_>>()
    );
    super::outcome_of(&errors)
}

// ---- nmi_storm ---------------------------------------------------------------

static STORM_RECEIVER: AtomicU64 = AtomicU64::new(0);
static STORM_STOP: AtomicBool = AtomicBool::new(false);
static STORM_THREAD_CALLS: AtomicU64 = AtomicU64::new(0);
static STORM_THREAD_BAD: AtomicU64 = AtomicU64::new(0);
static STORM_FAULTS: AtomicU64 = AtomicU64::new(0);

fn storm_receiver(_: u64) {
    let r = crate::recover::try_run(|| {
        let (mut calls, mut bad) = (0u64, 0u64);
        while !STORM_STOP.load(Ordering::Relaxed) {
            let c = call_checked(sc_s_fn as SiteFn, 0);
            calls += 1;
            bad += !c.balanced() as u64;
        }
        STORM_THREAD_CALLS.store(calls, Ordering::SeqCst);
        STORM_THREAD_BAD.store(bad, Ordering::SeqCst);
        0
    });
    if r.is_err() {
        STORM_FAULTS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Send one NMI to `cpu` and wait (bounded) until its handler counted it.
fn send_nmi_acked(cpu: usize, apic_id: u32) -> bool {
    let n = &percpu::cpu(cpu).counters.nmis;
    let n0 = n.load(Ordering::SeqCst);
    apic::send(apic_id, apic::Delivery::Nmi, 0);
    for _ in 0..STORM_ACK_SPINS {
        if n.load(Ordering::SeqCst) != n0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

const STORM_ACK_SPINS: u64 = 5_000_000;

pub fn nmi_storm(st: &BootState) -> Outcome<'static> {
    let Some(rx) = percpu::online().map(|c| c.index).find(|&i| i != this_cpu().index) else {
        crate::diag!("SKIP: one CPU");
        return Outcome::Skip("one CPU");
    };
    let goal: u64 = if st.features.is_tcg() { 10_000 } else { 1_000 };
    let rx_cpu = percpu::cpu(rx);
    let apic_id = rx_cpu.apic_id.load(Ordering::Relaxed);
    let t = targets();
    let mut errors: Vec<String> = Vec::new();
    let (n0, nested0) = (rx_cpu.counters.nmis.load(Ordering::SeqCst), NESTED.load(Ordering::SeqCst));
    let em0 = super::engine_count!(rx_cpu, emulations);
    SC_STRESS_COUNTS.iter().for_each(|x| x.store(0, Ordering::SeqCst));
    STORM_CALLS.store(0, Ordering::SeqCst);
    STORM_UNBALANCED.store(0, Ordering::SeqCst);
    STORM_STOP.store(false, Ordering::SeqCst);
    STORM_RECEIVER.store(rx as u64, Ordering::SeqCst);
    STORM.store(true, Ordering::SeqCst);
    let ticket = smp::run_on(rx, storm_receiver, 0);
    let (mut sent, mut lost, mut round) = (0u64, 0u64, 0usize);
    let per_window = goal / 40 + 1;
    while sent < goal && lost == 0 {
        let batch = [(nmi_site(), NewInsn::Call(t[round % 3])), (stress_site(), NewInsn::Call(t[(round + 1) % 3]))];
        let mut storm = |n: u64| {
            for _ in 0..n {
                if send_nmi_acked(rx, apic_id) {
                    sent += 1;
                } else {
                    lost += 1;
                    break;
                }
            }
        };
        let r = patching::patch(&batch, |step| {
            if step == Step::Int3Written || step == Step::TailsWritten {
                storm(per_window);
            }
        });
        if let Err(e) = r {
            errors.push(format!("round {round}: patch: {e}"));
            break;
        }
        storm(per_window / 4 + 1);
        round += 1;
    }
    STORM_STOP.store(true, Ordering::SeqCst);
    smp::wait(rx, ticket);
    STORM.store(false, Ordering::SeqCst);
    let received = rx_cpu.counters.nmis.load(Ordering::SeqCst) - n0;
    let nmi_calls = STORM_CALLS.load(Ordering::SeqCst);
    let calls = STORM_THREAD_CALLS.load(Ordering::SeqCst) + nmi_calls;
    let counted: u64 = SC_STRESS_COUNTS.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    let emulated = super::since(super::engine_count!(rx_cpu, emulations), em0);
    crate::diag!(
        "CPU {rx}: {received} NMIs received of {sent} sent over {round} patch rounds; NMI handler calls {nmi_calls}, thread calls {}, target calls {counted}, emulations {emulated:?}",
        calls - nmi_calls
    );
    if lost != 0 {
        errors.push(format!("an NMI to CPU {rx} was not taken (lost or CPU stuck)"));
    }
    if sent < goal {
        errors.push(format!("only {sent} NMIs sent, goal {goal}"));
    }
    if received != sent {
        errors.push(format!("{received} NMIs received, {sent} sent"));
    }
    if nmi_calls != received {
        errors.push(format!("{nmi_calls} NMI-handler calls for {received} NMIs"));
    }
    if counted != calls {
        errors.push(format!("targets counted {counted} calls, {calls} were made"));
    }
    if STORM_UNBALANCED.load(Ordering::SeqCst) != 0 || STORM_THREAD_BAD.load(Ordering::SeqCst) != 0 {
        errors.push(String::from("unbalanced stacks"));
    }
    if NESTED.load(Ordering::SeqCst) != nested0 {
        errors.push(String::from("an NMI nested inside an NMI handler"));
    }
    if STORM_FAULTS.load(Ordering::SeqCst) != 0 {
        errors.push(String::from("a fault on the receiving CPU"));
    }
    if emulated == Some(0) {
        errors.push(String::from("no emulation on the receiving CPU: the test tested nothing"));
    }
    if !nmi_token_free(rx) {
        errors.push(format!("CPU {rx}'s NMI stack token is busy at the end"));
    }
    if patching::patch(&[(nmi_site(), NewInsn::Call(t[0])), (stress_site(), NewInsn::Call(t[0]))], |_| {}).is_err() {
        errors.push(String::from("restore failed"));
    }
    super::outcome_of(&errors)
}

// ---- sec_poke_nmi_abort -------------------------------------------------------

/// An NMI sent from inside an alias write (mm::NMI_IN_NEXT_POKE).
static POKE_NMI: AtomicBool = AtomicBool::new(false);
/// What that NMI's handler ran on: 1 = the shared tables, 2 = the private ones.
static POKE_NMI_SAW: AtomicU64 = AtomicU64::new(0);

/// Send this CPU an NMI now and let it land (called inside a poking window).
#[cfg(feature = "test-hooks")]
pub fn nmi_now() {
    let c = this_cpu();
    let n0 = c.counters.nmis.load(Ordering::SeqCst);
    POKE_NMI.store(true, Ordering::SeqCst);
    apic::send(c.apic_id.load(Ordering::Relaxed), apic::Delivery::Nmi, 0);
    for _ in 0..MASKED_WAIT_SPINS {
        if c.counters.nmis.load(Ordering::SeqCst) != n0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// An NMI taken while the patching CPU holds its text alias: the handler runs
/// on the shared tables (the alias out of its reach), the interrupted write
/// is redone from read-only data, and the patch completes with text exactly
/// as validated.
pub fn sec_poke_nmi_abort(_st: &BootState) -> Outcome<'static> {
    if !cfg!(feature = "test-hooks") {
        return Outcome::Skip("needs the test-hooks build");
    }
    let mut errors: Vec<String> = Vec::new();
    let t = targets();
    let site = nmi_site();
    let redone0 = patching::POKES_REDONE.load(Ordering::SeqCst);
    let sum0 = super::text_checksum_except(Some(site));
    POKE_NMI_SAW.store(0, Ordering::SeqCst);
    // The window is held open by the test writer (TextAlias, test builds),
    // which sends the NMI from inside it; the patcher's own writers
    // (asm/poke.S) are left by the same entry switch.
    let new = NewInsn::Call(t[1]).encode(site).unwrap_or_default();
    #[cfg(feature = "test-hooks")]
    {
        *mm::IN_NEXT_POKE.lock() = Some(nmi_now);
        patching::test_poke(site, &new);
    }
    match POKE_NMI_SAW.load(Ordering::SeqCst) {
        1 => {}
        2 => errors.push(String::from("the NMI handler ran on the private poking tables (the alias in its reach)")),
        _ => errors.push(String::from("no NMI arrived inside the poking window")),
    }
    let redone = patching::POKES_REDONE.load(Ordering::SeqCst) - redone0;
    if redone == 0 {
        errors.push(String::from("the interrupted alias write was not redone"));
    }
    if new != super::site_bytes_of(site) {
        errors.push(String::from("the site does not hold the bytes written"));
    }
    if super::text_checksum_except(Some(site)) != sum0 {
        errors.push(String::from("text outside the site changed"));
    }
    if !mm::text_alias_unmapped() {
        errors.push(String::from("a writable view of text remains (alias mapped or lock held)"));
    }
    if patching::patch(&[(site, NewInsn::Call(t[0]))], |_| {}).is_err() {
        errors.push(String::from("restore failed"));
    }
    crate::diag!("an NMI inside the poking window: handler on the shared tables, {redone} alias write(s) redone");
    super::outcome_of(&errors)
}
