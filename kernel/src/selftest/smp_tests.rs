//! SMP, interrupt and NMI self-tests: every CPU online with its own shadow
//! stack, the cross-CPU sync, patching while other CPUs call the site, and
//! timer interrupts and NMIs landing inside the emulation window.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shadowcall::frame::TrapFrame;
use shadowcall::patch::NewInsn;
use shadowcall_support::ktap::Outcome;

use super::emul_tests::{call_checked, SiteFn};
use crate::patching::{self, Step};
use crate::percpu::{self, this_cpu, PerCpu};
use crate::{apic, cet, check, mm, smp, BootState};

/// Calls of sc_s_target_0/1/2 (locked increments in asm/selftest.S).
#[no_mangle]
pub static SC_STRESS_COUNTS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

extern "C" {
    pub(super) fn sc_s_fn(_: u64) -> u64;
    pub(super) fn sc_s_nmi_fn(_: u64) -> u64;
    fn sc_s_target_0();
    fn sc_s_target_1();
    fn sc_s_target_2();
    static sc_s_site: u8;
    static sc_s_nmi_site: u8;
}

/// sc_s_target_0/1/2.
pub(super) fn targets() -> [u64; 3] {
    [sc_s_target_0 as *const () as u64, sc_s_target_1 as *const () as u64, sc_s_target_2 as *const () as u64]
}
fn target_calls() -> u64 {
    SC_STRESS_COUNTS.iter().map(|c| c.load(Ordering::SeqCst)).sum()
}
fn sum(f: impl Fn(&PerCpu) -> &AtomicU64) -> u64 {
    percpu::online().map(|c| f(c).load(Ordering::SeqCst)).sum()
}
/// The stress site (sc_s_fn's).
pub(super) fn site() -> u64 {
    core::ptr::addr_of!(sc_s_site) as u64
}
/// The site the NMI handler calls (sc_s_nmi_fn's).
pub(super) fn nmi_site() -> u64 {
    core::ptr::addr_of!(sc_s_nmi_site) as u64
}
fn restore_site() -> bool {
    patching::patch(&[(site(), NewInsn::Call(targets()[0]))], |_| {}).is_ok()
}

// ---- smp_online -------------------------------------------------------------

static SEEN_SSP: [AtomicU64; mm::MAX_CPUS] = [const { AtomicU64::new(0) }; mm::MAX_CPUS];

fn report_ssp(_: u64) {
    SEEN_SSP[this_cpu().index].store(cet::rdssp(), Ordering::SeqCst);
}

pub fn smp_online(_st: &BootState) -> Outcome<'static> {
    let Some(topo) = crate::TOPOLOGY.get() else {
        diag!("FAIL: SMP start-up did not run");
        return Outcome::Fail;
    };
    diag!(
        "CPUs reported by {}: APIC ids {:?}; APIC mode {}",
        topo.source,
        topo.reported,
        if apic::is_x2apic() { "x2APIC" } else { "xAPIC" }
    );
    for e in &topo.errors {
        diag!("FAIL: {e}");
    }
    let mut ok = topo.errors.is_empty();
    let me = this_cpu().index;
    for c in percpu::online() {
        let ssp = if c.index == me {
            cet::rdssp()
        } else {
            let t = smp::run_on(c.index, report_ssp, 0);
            smp::wait(c.index, t);
            SEEN_SSP[c.index].load(Ordering::SeqCst)
        };
        let stack = mm::primary_shadow_stack(c.index);
        let own = ssp >= stack.lo && ssp < stack.hi;
        diag!(
            "CPU {} APIC id {} online; shadow stack [{:#x},{:#x}) SSP {:#x}{}",
            c.index,
            c.apic_id.load(Ordering::Relaxed),
            stack.lo,
            stack.hi,
            ssp,
            if cet::active() {
                if own {
                    ""
                } else {
                    " NOT ITS OWN"
                }
            } else {
                " (shadow stacks off)"
            }
        );
        ok &= !cet::active() || own;
    }
    let online = percpu::online().count();
    let expected = topo.reported.len().min(mm::MAX_CPUS);
    check!(online == expected, "{online} CPUs online, firmware reported {}", topo.reported.len());
    if ok {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}

// ---- smp_sync ---------------------------------------------------------------

pub fn smp_sync(_st: &BootState) -> Outcome<'static> {
    let me = this_cpu().index;
    let before: Vec<(usize, u64)> = percpu::online().map(|c| (c.index, c.syncs.load(Ordering::SeqCst))).collect();
    let rounds0 = patching::sync_rounds();
    patching::sync();
    check!(patching::sync_rounds() == rounds0 + 1, "sync did not count a round");
    let mut ok = true;
    for (index, b) in before {
        let now = percpu::cpu(index).syncs.load(Ordering::SeqCst);
        if index == me {
            diag!("CPU {index}: serialized itself (sync round {})", rounds0 + 1);
        } else {
            diag!("CPU {index}: {} serializations by sync IPI (+{})", now, now - b);
            ok &= now == b + 1;
        }
    }
    diag!("sync IPIs sent so far: {}", smp::SYNC_IPIS.load(Ordering::SeqCst));
    check!(ok, "a CPU did not serialize exactly once for one sync round");
    Outcome::Pass
}

/// Count timer interrupts pending when a window ends (the #BP path's
/// injection point: test-hooks builds only; a no-op otherwise).
#[cfg_attr(not(feature = "test-hooks"), allow(unused_variables))]
fn watch_irq(on: bool) {
    #[cfg(feature = "test-hooks")]
    patching::WATCH_IRQ.store(on, Ordering::SeqCst);
}

/// Send NMIs at the window's points (test-hooks builds only; a no-op otherwise).
#[cfg_attr(not(feature = "test-hooks"), allow(unused_variables))]
fn inject_nmi(on: bool) {
    #[cfg(feature = "test-hooks")]
    patching::INJECT_NMI.store(on, Ordering::SeqCst);
}

// ---- smp_patch_stress -------------------------------------------------------

static STOP: AtomicBool = AtomicBool::new(false);
static CALLS: [AtomicU64; mm::MAX_CPUS] = [const { AtomicU64::new(0) }; mm::MAX_CPUS];
static UNBALANCED: [AtomicU64; mm::MAX_CPUS] = [const { AtomicU64::new(0) }; mm::MAX_CPUS];
static WORKER_FAULTS: AtomicU64 = AtomicU64::new(0);

fn stress_worker(_: u64) {
    let me = this_cpu().index;
    // Each calling CPU runs its local APIC timer meanwhile: interrupts land
    // around (and become pending inside) the emulation windows.
    apic::timer(crate::apic::VEC_TIMER, STRESS_TIMER_COUNT);
    let r = crate::recover::try_run(|| {
        let (mut calls, mut bad) = (0u64, 0u64);
        while !STOP.load(Ordering::Relaxed) {
            let c = call_checked(sc_s_fn as SiteFn, 0);
            calls += 1;
            bad += !c.balanced() as u64;
            if calls % 64 == 0 {
                CALLS[me].store(calls, Ordering::Relaxed);
            }
        }
        CALLS[me].store(calls, Ordering::SeqCst);
        UNBALANCED[me].store(bad, Ordering::SeqCst);
        0
    });
    apic::timer(crate::apic::VEC_TIMER, 0);
    if let Err(f) = r {
        WORKER_FAULTS.fetch_add(1, Ordering::SeqCst);
        diag!("FAIL: CPU {me}: fault in the stress loop: {f}");
    }
}

/// How long the patcher keeps each half of the window open waiting for a
/// calling CPU to trap. (Under QEMU TCG with 4 vCPUs a caller sometimes runs
/// its stale translation of the old bytes for seconds; see DESIGN.md §8.4.)
/// An engine counter summed over the online CPUs (`None` in a production
/// build: the engine counts nothing there).
macro_rules! engine_total {
    ($f:ident) => {
        percpu::online().map(|c| super::engine_count!(c, $f)).sum::<Option<u64>>()
    };
}

const WINDOW_WAIT_SPINS: u64 = 3_000_000;

/// Timer period on the calling CPUs during the stress test.
const STRESS_TIMER_COUNT: u32 = 20_000;

pub fn smp_patch_stress(st: &BootState) -> Outcome<'static> {
    let me = this_cpu().index;
    let workers: Vec<usize> = percpu::online().map(|c| c.index).filter(|&i| i != me).collect();
    if workers.is_empty() {
        return Outcome::Skip("one CPU: needs at least two");
    }
    let soak = st.boot.parsed.stress;
    let (min_rounds, min_calls) = if soak { (100, 10_000_000u64) } else { (24, 0) };
    STOP.store(false, Ordering::SeqCst);
    for c in SC_STRESS_COUNTS.iter() {
        c.store(0, Ordering::SeqCst);
    }
    for &w in &workers {
        CALLS[w].store(0, Ordering::SeqCst);
        UNBALANCED[w].store(0, Ordering::SeqCst);
    }
    let faults0 = WORKER_FAULTS.load(Ordering::SeqCst);
    let (ticks0, pend0, deliv0) = (
        sum(|c| &c.counters.timer_ticks),
        sum(|c| &c.counters.irq_pending_at_exit),
        sum(|c| &c.counters.irq_delivered_after),
    );
    watch_irq(true);
    let refusals0 = engine_total!(refusals);
    let bps0 = sum(|c| &c.counters.breakpoints);
    let em_total0 = engine_total!(emulations);
    let stale0 = engine_total!(stale_int3);
    let tickets: Vec<(usize, u64)> = workers.iter().map(|&w| (w, smp::run_on(w, stress_worker, 0))).collect();
    let t = targets();
    let mut errors: Vec<String> = Vec::new();
    let (mut rounds, mut min_em, mut max_em) = (0u64, u64::MAX, 0u64);
    let total_calls = || workers.iter().map(|&w| CALLS[w].load(Ordering::Relaxed)).sum::<u64>();
    while rounds < min_rounds || total_calls() < min_calls {
        let target = t[(rounds % 3) as usize];
        let em0 = engine_total!(emulations);
        let r = patching::patch(&[(site(), NewInsn::Call(target))], |_step| {
            // Hold the window open (after step 1, and after step 2 if still
            // needed) until some CPU has gone through it (the engine's count;
            // in a production build, a worker's next call), for a bounded time.
            let calls0 = total_calls();
            let mut spins = 0u64;
            let waiting = || match em0 {
                Some(_) => engine_total!(emulations) == em0,
                None => total_calls() == calls0,
            };
            while waiting() && spins < WINDOW_WAIT_SPINS {
                core::hint::spin_loop();
                spins += 1;
            }
        });
        let em = super::since(engine_total!(emulations), em0);
        if let Err(e) = r {
            errors.push(format!("round {rounds}: patch failed: {e}"));
            break;
        }
        if em == Some(0) {
            errors.push(format!("round {rounds}: no call went through the int3 emulation"));
        }
        let em = em.unwrap_or(0);
        min_em = min_em.min(em);
        max_em = max_em.max(em);
        rounds += 1;
        if soak && rounds % 10 == 0 {
            diag!(
                "soak {{\"rounds\":{rounds},\"calls\":{},\"goal_rounds\":{min_rounds},\"goal_calls\":{min_calls}}}",
                total_calls()
            );
        }
    }
    STOP.store(true, Ordering::SeqCst);
    for &(w, tk) in &tickets {
        smp::wait(w, tk);
    }
    watch_irq(false);
    let (ticks, pend, deliv) = (
        sum(|c| &c.counters.timer_ticks) - ticks0,
        sum(|c| &c.counters.irq_pending_at_exit) - pend0,
        sum(|c| &c.counters.irq_delivered_after) - deliv0,
    );
    diag!("timer on the calling CPUs: {ticks} interrupts, {pend} pending at a window's end, {deliv} of those delivered right after it");
    // A CPU may stop with one flagged tick still to come; anything more is a loss.
    if pend.saturating_sub(deliv) > workers.len() as u64 {
        errors.push(format!("{} timer interrupts pending at a window's end were not delivered after it", pend - deliv));
    }
    let calls: u64 = workers.iter().map(|&w| CALLS[w].load(Ordering::SeqCst)).sum();
    let unbalanced: u64 = workers.iter().map(|&w| UNBALANCED[w].load(Ordering::SeqCst)).sum();
    let landed = target_calls();
    // 0 in a production build (not counted).
    let emulations = super::since(engine_total!(emulations), em_total0).unwrap_or(0);
    let stale = super::since(engine_total!(stale_int3), stale0).unwrap_or(0);
    diag!(
        "stress {{\"callers\":{},\"patches\":{rounds},\"calls\":{calls},\"emulated\":{},\"per_round_min\":{min_em},\"per_round_max\":{max_em},\"stale_int3s\":{stale},\"counted\":{landed},\"per_target\":[{},{},{}]}}",
        workers.len(),
        emulations,
        SC_STRESS_COUNTS[0].load(Ordering::SeqCst),
        SC_STRESS_COUNTS[1].load(Ordering::SeqCst),
        SC_STRESS_COUNTS[2].load(Ordering::SeqCst)
    );
    if landed != calls {
        errors.push(format!(
            "{calls} calls made but the targets counted {landed}: {} lost or misrouted",
            calls.abs_diff(landed)
        ));
    }
    if unbalanced != 0 {
        errors.push(format!("{unbalanced} calls returned with RSP or SSP unbalanced"));
    }
    if WORKER_FAULTS.load(Ordering::SeqCst) != faults0 {
        errors.push(String::from("a calling CPU took a fault (#CP or other)"));
    }
    if engine_total!(refusals) != refusals0 || sum(|c| &c.counters.breakpoints) != bps0 {
        errors.push(String::from("unexpected #BP: a breakpoint report or a guard refusal"));
    }
    if !restore_site() {
        errors.push(String::from("could not restore the site"));
    }
    super::outcome_of(&errors)
}

// ---- irq_in_window ----------------------------------------------------------

/// Local APIC timer handler.
pub fn timer_tick() {
    let c = this_cpu();
    PerCpu::count(&c.counters.timer_ticks);
    if super::engine_count!(c, window_depth).is_some_and(|d| d > 0) {
        PerCpu::count(&c.counters.irq_taken_in_window);
    }
    if c.irq_expect_after.swap(false, Ordering::Relaxed) {
        PerCpu::count(&c.counters.irq_delivered_after);
    }
}

/// Timer period (APIC timer ticks, divide by 1): short enough to fire inside windows often.
const TIMER_COUNT: u32 = 3000;
/// Per strategy: emulate calls until this many timer interrupts became
/// pending inside a window, or WINDOW_CALLS_MAX calls were made.
const WINDOW_PENDING_GOAL: u64 = 25;
const WINDOW_CALLS_MAX: u64 = 200_000;

pub fn irq_in_window(_st: &BootState) -> Outcome<'static> {
    if !cfg!(feature = "test-hooks") {
        return Outcome::Skip("needs the test-hooks build");
    }
    let c = this_cpu();
    let counters = &c.counters;
    let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
    let (pend0, del0, taken0, ticks0) = (
        get(&counters.irq_pending_at_exit),
        get(&counters.irq_delivered_after),
        get(&counters.irq_taken_in_window),
        get(&counters.timer_ticks),
    );
    let mut errors: Vec<String> = Vec::new();
    let (mut emulated, mut calls) = (0, 0);
    let strategies = patching::strategies_here();
    for s in strategies.iter().copied() {
        patching::set_strategy(s);
        let r = patching::patch(&[(site(), NewInsn::Call(targets()[1]))], |step| {
            if step != Step::Int3Written {
                return;
            }
            let em0 = super::engine_count!(this_cpu(), emulations);
            watch_irq(true);
            apic::timer(crate::apic::VEC_TIMER, TIMER_COUNT);
            let p0 = get(&counters.irq_pending_at_exit);
            x86_64::instructions::interrupts::enable();
            for _ in 0..WINDOW_CALLS_MAX {
                let call = call_checked(sc_s_fn as SiteFn, 0);
                calls += 1;
                if !call.balanced() {
                    errors.push(format!("{}: unbalanced call", s.name()));
                    break;
                }
                if get(&counters.irq_pending_at_exit) - p0 >= WINDOW_PENDING_GOAL {
                    break;
                }
            }
            x86_64::instructions::interrupts::disable();
            apic::timer(crate::apic::VEC_TIMER, 0);
            watch_irq(false);
            emulated += super::since(super::engine_count!(this_cpu(), emulations), em0).unwrap_or(0);
        });
        if r.is_err() {
            errors.push(format!("{}: patch failed: {r:?}", s.name()));
        }
    }
    patching::set_strategy(crate::state().strategy);
    // A tick still flagged "expected" would be one that never came.
    let stray = c.irq_expect_after.swap(false, Ordering::SeqCst);
    let pending = get(&counters.irq_pending_at_exit) - pend0;
    let delivered = get(&counters.irq_delivered_after) - del0;
    let taken = get(&counters.irq_taken_in_window) - taken0;
    let ticks = get(&counters.timer_ticks) - ticks0;
    diag!(
        "strategies {:?}: {emulated} emulated calls with IF=1 and the timer running; {ticks} timer interrupts; {pending} became pending inside a window, {delivered} delivered right after it, {taken} taken inside (the window runs with IF=0 by design)",
        strategies.iter().map(|s| s.name()).collect::<Vec<_>>()
    );
    if emulated != calls {
        errors.push(format!("{emulated} emulations for {calls} calls"));
    }
    if pending == 0 {
        errors.push(String::from("no timer interrupt became pending inside a window (the test tested nothing)"));
    }
    if delivered != pending || stray {
        errors.push(format!("{pending} pending at window exit but {delivered} delivered right after: lost"));
    }
    if taken != 0 {
        errors.push(format!("{taken} timer interrupts were taken inside a window, which runs with interrupts off"));
    }
    if !restore_site() {
        errors.push(String::from("could not restore the site"));
    }
    super::outcome_of(&errors)
}

// ---- nmi_in_window ----------------------------------------------------------

/// The NMI handler calls the nested-emulation site when this is set.
static NMI_CALLS_SITE: AtomicBool = AtomicBool::new(false);
static NMI_UNBALANCED: AtomicU64 = AtomicU64::new(0);

/// NMI handler body (IST 2), run by interrupts::nmi under the NMI's own
/// recovery point (which also maintains `in_nmi`).
pub fn nmi(_frame: &mut TrapFrame) {
    let c = this_cpu();
    PerCpu::count(&c.counters.nmis);
    super::nmi_tests::nmi_body();
    super::sec_recover::nmi_hook();
    if super::engine_count!(c, window_depth).is_some_and(|d| d > 0) {
        PerCpu::count(&c.counters.nmi_in_window);
    }
    if crate::records::pending_tramp_records() > 0 {
        PerCpu::count(&c.counters.nmi_between_traps);
    }
    if NMI_CALLS_SITE.load(Ordering::Relaxed) {
        let em0 = super::engine_count!(c, emulations);
        let call = call_checked(sc_s_nmi_fn as SiteFn, 0);
        if !call.balanced() {
            NMI_UNBALANCED.fetch_add(1, Ordering::Relaxed);
        }
        if super::since(super::engine_count!(c, emulations), em0).is_some_and(|n| n > 0) {
            PerCpu::count(&c.counters.nmi_nested);
        }
    }
}

pub fn nmi_in_window(_st: &BootState) -> Outcome<'static> {
    if !cfg!(feature = "test-hooks") {
        return Outcome::Skip("needs the test-hooks build");
    }
    let c = this_cpu();
    let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
    let counters = &c.counters;
    let (n0, w0, b0, nest0) = (
        get(&counters.nmis),
        get(&counters.nmi_in_window),
        get(&counters.nmi_between_traps),
        get(&counters.nmi_nested),
    );
    let unb0 = NMI_UNBALANCED.load(Ordering::SeqCst);
    let t = targets();
    SC_STRESS_COUNTS.iter().for_each(|x| x.store(0, Ordering::SeqCst));
    let mut errors: Vec<String> = Vec::new();
    let mut calls = 0u64;
    let nmi_site = core::ptr::addr_of!(sc_s_nmi_site) as u64;
    let strategies = patching::strategies_here();
    for s in strategies.iter().copied() {
        patching::set_strategy(s);
        let batch = [(site(), NewInsn::Call(t[1])), (nmi_site, NewInsn::Call(t[2]))];
        let r = patching::patch(&batch, |step| {
            if step != Step::Int3Written {
                return;
            }
            NMI_CALLS_SITE.store(true, Ordering::SeqCst);
            inject_nmi(true);
            for _ in 0..60 {
                let call = call_checked(sc_s_fn as SiteFn, 0);
                calls += 1;
                if !call.balanced() {
                    errors.push(format!("{}: unbalanced call", s.name()));
                    break;
                }
            }
            inject_nmi(false);
            NMI_CALLS_SITE.store(false, Ordering::SeqCst);
        });
        if r.is_err() {
            errors.push(format!("{}: patch failed: {r:?}", s.name()));
        }
        let restore = [(site(), NewInsn::Call(t[0])), (nmi_site, NewInsn::Call(t[0]))];
        if patching::patch(&restore, |_| {}).is_err() {
            errors.push(String::from("could not restore the sites"));
        }
    }
    patching::set_strategy(crate::state().strategy);
    let (nmis, in_window, between, nested) = (
        get(&counters.nmis) - n0,
        get(&counters.nmi_in_window) - w0,
        get(&counters.nmi_between_traps) - b0,
        get(&counters.nmi_nested) - nest0,
    );
    let (to_b, to_c) = (SC_STRESS_COUNTS[1].load(Ordering::SeqCst), SC_STRESS_COUNTS[2].load(Ordering::SeqCst));
    diag!(
        "strategies {:?}: {calls} emulated calls, {nmis} NMIs injected at first-trap entry, first-trap exit and second trap: {in_window} inside a window, {between} between the two traps of the trampoline, {nested} nested emulations from the NMI handler",
        strategies.iter().map(|s| s.name()).collect::<Vec<_>>()
    );
    if in_window == 0 || nested == 0 {
        errors.push(String::from("no NMI inside a window or no nested emulation: the test tested nothing"));
    }
    if between == 0 {
        errors.push(String::from("no NMI landed between the two traps of the trampoline"));
    }
    if to_b != calls || to_c != nested {
        errors.push(format!(
            "targets counted {to_b} calls (expected {calls}) and {to_c} nested calls (expected {nested})"
        ));
    }
    if NMI_UNBALANCED.load(Ordering::SeqCst) != unb0 {
        errors.push(String::from("a nested call from the NMI handler returned unbalanced"));
    }
    super::outcome_of(&errors)
}
