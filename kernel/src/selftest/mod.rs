//! Self-tests, run on every boot and reported as KTAP version 1.
//!
//! Every test runs under a fault-recovery point: an unexpected fault makes
//! that test `not ok` (with a readable report) and the run goes on.

/// An engine counter (`shadowcall::engine::Counters`) of a CPU: `Some` in
/// a test-hooks build; `None` in a production build, where the engine counts
/// nothing and the checks that need a count are skipped.
macro_rules! engine_count {
    ($cpu:expr, $field:ident) => {{
        #[cfg(feature = "test-hooks")]
        let n = Some($cpu.engine.counters.$field.load(core::sync::atomic::Ordering::SeqCst));
        #[cfg(not(feature = "test-hooks"))]
        let n = {
            let _ = &$cpu;
            None::<u64>
        };
        n
    }};
}
pub(crate) use engine_count;

/// `now - then` of two counts (`None` in a production build).
pub fn since(now: Option<u64>, then: Option<u64>) -> Option<u64> {
    Some(now?.wrapping_sub(then?))
}

pub mod cet_tests;
pub mod emul_tests;
pub mod nmi_tests;
pub mod sec_alias;
pub mod sec_nested;
pub mod sec_publish;
pub mod sec_recover;
pub mod sec_sync;
pub mod sec_tests;
pub mod site_tests;
pub mod smp_tests;

use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

use shadowcall_support::ktap::{Ktap, Outcome};

use crate::console::CONSOLE;
use crate::percpu::this_cpu;
use crate::{cet, interrupts, patching, BootState};

/// What the call targets in asm/selftest.S record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetLog {
    /// Calls of sc_t_target_a, _b, _c.
    pub count: [u64; 3],
    /// Return address on the normal stack at the last target entry.
    pub last_ret: u64,
    /// Return address on top of the shadow stack at the last target entry (0 without CET).
    pub last_shret: u64,
    pub last_rflags: u64,
    /// Sum of all return addresses targets saw.
    pub ret_sum: u64,
    /// Times the instruction after a SITE_FN site ran.
    pub after: u64,
    pub nest: u64,
    pub rec: u64,
    pub evil: u64,
}

#[no_mangle]
pub static mut SC_TLOG: TargetLog = TargetLog {
    count: [0; 3],
    last_ret: 0,
    last_shret: 0,
    last_rflags: 0,
    ret_sum: 0,
    after: 0,
    nest: 0,
    rec: 0,
    evil: 0,
};

/// Sites in the block of registered sites (`sc_t_large_base`): enough for
/// the 65,536-site benchmarks.
pub const SITE_BLOCK_LEN: usize = 65536;
/// Sites patch_batch_large patches in one batch (more than a page of entries).
pub const LARGE_SITES: usize = 2048;
/// Bytes per site in that block (`call rel32; ret`).
pub const LARGE_STRIDE: u64 = 6;

/// The address of site `i` of the block.
pub fn block_site(i: usize) -> u64 {
    extern "C" {
        static sc_t_large_base: u8;
    }
    core::ptr::addr_of!(sc_t_large_base) as u64 + i as u64 * LARGE_STRIDE
}

core::arch::global_asm!(
    concat!(include_str!("../../asm/selftest.S"), include_str!("../../asm/bench.S")),
    LOG_COUNT = const offset_of!(TargetLog, count),
    LOG_RET = const offset_of!(TargetLog, last_ret),
    LOG_SHRET = const offset_of!(TargetLog, last_shret),
    LOG_RFLAGS = const offset_of!(TargetLog, last_rflags),
    LOG_SUM = const offset_of!(TargetLog, ret_sum),
    LOG_AFTER = const offset_of!(TargetLog, after),
    LOG_NEST = const offset_of!(TargetLog, nest),
    LOG_REC = const offset_of!(TargetLog, rec),
    LOG_EVIL = const offset_of!(TargetLog, evil),
    SITE_BLOCK_LEN = const SITE_BLOCK_LEN,
    LARGE_STRIDE = const LARGE_STRIDE,
    IST_TEST_VECTOR = const interrupts::IST_TEST_VECTOR,
    options(att_syntax)
);

/// Address of call target 0 (sc_t_target_a), 1 (_b) or 2 (_c).
pub fn target_addr(i: usize) -> u64 {
    extern "C" {
        fn sc_t_target_a();
        fn sc_t_target_b();
        fn sc_t_target_c();
    }
    [sc_t_target_a as *const () as u64, sc_t_target_b as *const () as u64, sc_t_target_c as *const () as u64][i]
}

/// Snapshot of the target log.
pub fn tlog() -> TargetLog {
    // SAFETY: plain read; the asm targets only write it on this CPU.
    unsafe { core::ptr::addr_of!(SC_TLOG).read_volatile() }
}

/// Zero the target log.
pub fn tlog_reset() {
    // SAFETY: as above.
    unsafe { core::ptr::addr_of_mut!(SC_TLOG).write_volatile(TargetLog::default()) }
}

/// Spins the helper CPU of [`lowered_during`] waits before it lowers its word.
const HOLD_SPINS: u64 = 200_000;
/// [`lowered_during`]'s operation has started.
static HOLD_GO: AtomicBool = AtomicBool::new(false);
/// The helper CPU has lowered its word.
static HOLD_LOWERED: AtomicBool = AtomicBool::new(false);
/// How the helper CPU lowers its word (given its index).
static HOLD_LOWER: Mutex<Option<fn(usize)>> = Mutex::new(None);

/// On the helper CPU: a while after the operation started, lower its word.
fn hold_then_lower(_: u64) {
    while !HOLD_GO.load(Ordering::SeqCst) {
        core::hint::spin_loop();
    }
    for _ in 0..HOLD_SPINS {
        core::hint::spin_loop();
    }
    if let Some(lower) = *HOLD_LOWER.lock() {
        lower(this_cpu().index);
    }
    HOLD_LOWERED.store(true, Ordering::SeqCst);
}

/// Run `op` on this CPU while CPU `w` keeps a word of its own raised (the
/// caller raised it: an in-exit count, a writer word) and lowers it with
/// `lower`, on its own CPU, a while after `op` started. Returns `op`'s
/// result and whether the word was lowered before `op` returned (an `op`
/// that waits for the word must see that).
pub fn lowered_during<R>(w: usize, lower: fn(usize), op: impl FnOnce() -> R) -> (R, bool) {
    *HOLD_LOWER.lock() = Some(lower);
    HOLD_LOWERED.store(false, Ordering::SeqCst);
    HOLD_GO.store(false, Ordering::SeqCst);
    let t = crate::smp::run_on(w, hold_then_lower, 0);
    HOLD_GO.store(true, Ordering::SeqCst);
    let r = op();
    // Read right after `op` returned: the lowering must have come first.
    let lowered = HOLD_LOWERED.load(Ordering::SeqCst);
    crate::smp::wait(w, t);
    HOLD_GO.store(false, Ordering::SeqCst);
    (r, lowered)
}

/// FNV-1a over kernel text, leaving out `[skip, skip + SITE_LEN)` (pass
/// `None` to cover all of it).
pub fn text_checksum_except(skip: Option<u64>) -> u64 {
    use shadowcall::patch::SITE_LEN;
    let t = crate::mm::text();
    let skipped = |a: u64| skip.is_some_and(|s| (s..s + SITE_LEN as u64).contains(&a));
    t.bytes
        .iter()
        .enumerate()
        .filter(|&(i, _)| !skipped(t.base + i as u64))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, (_, &b)| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The five bytes at a site now.
pub fn site_bytes_of(site: u64) -> [u8; shadowcall::patch::SITE_LEN] {
    // SAFETY: sites lie in mapped, readable kernel text.
    unsafe { (site as *const [u8; shadowcall::patch::SITE_LEN]).read_volatile() }
}

/// A test's outcome from the failures it collected (each printed as a diagnostic).
pub fn outcome_of(errors: &[alloc::string::String]) -> Outcome<'static> {
    for e in errors {
        crate::diag!("FAIL: {e}");
    }
    if errors.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}

/// Fail the current test with a diagnostic unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::diag!("FAIL: {}", format_args!($($arg)*));
            return shadowcall_support::ktap::Outcome::Fail;
        }
    };
}

pub type TestFn = fn(&BootState) -> Outcome<'static>;

/// The tests, in report order. Names are a contract (other tools compare runs by them).
const TESTS: &[(&str, TestFn)] = &[
    ("cmdline", cet_tests::cmdline),
    ("cpuid_cet", cet_tests::cpuid_cet),
    ("fallback_path", cet_tests::fallback_path),
    ("shstk_enabled", cet_tests::shstk_enabled),
    ("cp_near_ret", cet_tests::cp_near_ret),
    ("cp_iret_rip_only", cet_tests::cp_iret_rip_only),
    ("iret_rip_and_lip", cet_tests::iret_rip_and_lip),
    ("shstk_write_pf", cet_tests::shstk_write_pf),
    ("wrss_plain_pf", cet_tests::wrss_plain_pf),
    ("ist_shstk", cet_tests::ist_shstk),
    ("no_ro_dirty_leaf", cet_tests::no_ro_dirty_leaf),
    ("guard_pages", cet_tests::guard_pages),
    ("trampoline_disp_nonzero", emul_tests::trampoline_disp_nonzero),
    ("zero_disp_call_shadow", emul_tests::zero_disp_call_shadow),
    ("emul_call", emul_tests::emul_call),
    ("emul_jmp", emul_tests::emul_jmp),
    ("emul_nop", emul_tests::emul_nop),
    ("emul_ret", emul_tests::emul_ret),
    ("emul_call_nested", emul_tests::emul_call_nested),
    ("emul_call_recursive", emul_tests::emul_call_recursive),
    ("emul_call_irq_on", emul_tests::emul_call_irq_on),
    ("patch_roundtrip", emul_tests::patch_roundtrip),
    ("patch_batch_large", emul_tests::patch_batch_large),
    ("naive_emul_cp", emul_tests::naive_emul_cp),
    ("wrss_guard", emul_tests::wrss_guard),
    ("breakpoint_not_emulated", emul_tests::breakpoint_not_emulated),
    ("patch_bad_input", emul_tests::patch_bad_input),
    ("patch_site_macro", site_tests::patch_site_macro),
    ("patch_one_site", site_tests::patch_one_site),
    ("smp_online", smp_tests::smp_online),
    ("smp_sync", smp_tests::smp_sync),
    ("smp_patch_stress", smp_tests::smp_patch_stress),
    ("irq_in_window", smp_tests::irq_in_window),
    ("nmi_in_window", smp_tests::nmi_in_window),
    ("frame_alignment", sec_tests::frame_alignment),
    ("sec_exit_forged_frame", sec_tests::sec_exit_forged_frame),
    ("sec_plain_live_site", sec_tests::sec_plain_live_site),
    ("sec_batch_forged", sec_tests::sec_batch_forged),
    ("sec_poke_alias_private", sec_alias::sec_poke_alias_private),
    ("sec_try_forged_ssp", sec_recover::sec_try_forged_ssp),
    ("sec_fault_in_nmi", sec_recover::sec_fault_in_nmi),
    ("sec_unwind_nmi_regs", sec_recover::sec_unwind_nmi_regs),
    ("sec_fault_ssp_race", sec_recover::sec_fault_ssp_race),
    ("sec_fault_ist_records", sec_recover::sec_fault_ist_records),
    ("sec_tramp_record_bound", sec_tests::sec_tramp_record_bound),
    ("sec_stale_int3_race", sec_tests::sec_stale_int3_race),
    ("sec_poke_forged_entry", sec_tests::sec_poke_forged_entry),
    ("sec_exit_nmi_regs", sec_tests::sec_exit_nmi_regs),
    ("sec_fast_path", sec_tests::sec_fast_path),
    ("sec_seal_unverified", sec_tests::sec_seal_unverified),
    ("sec_unseal_in_exit", sec_tests::sec_unseal_in_exit),
    ("sec_publish_unverified", sec_publish::sec_publish_unverified),
    ("sec_publish_exclusive", sec_publish::sec_publish_exclusive),
    ("sec_poke_step_order", sec_tests::sec_poke_step_order),
    ("sec_tramp_bytes", sec_tests::sec_tramp_bytes),
    ("nmi_bp_keeps_nmi_masked", nmi_tests::nmi_bp_keeps_nmi_masked),
    ("nmi_storm", nmi_tests::nmi_storm),
    ("sec_sync_forged_ack", sec_sync::sec_sync_forged_ack),
    ("sec_poke_nmi_abort", nmi_tests::sec_poke_nmi_abort),
    ("sec_nested_save", sec_nested::sec_nested_save),
    ("sec_region_flags", sec_nested::sec_region_flags),
    ("sec_region_df", sec_nested::sec_region_df),
    ("sec_nested_iret_rsp", sec_nested::sec_nested_iret_rsp),
];

/// Run every test and print the report. True when none failed.
pub fn run_all(st: &BootState) -> bool {
    let mut k = Ktap::default();
    {
        let mut c = CONSOLE.lock();
        let _ = k.header(&mut *c, TESTS.len() as u32);
    }
    let init = patching::init(st.strategy, st.features.serialize, st.features.is_tcg());
    if st.features.is_tcg() {
        crate::diag!(
            "QEMU TCG detected: each patching step is written twice (TCG cross-modifying-code workaround, DESIGN.md)"
        );
    }
    if let Err(e) = &init {
        crate::diag!("FAIL: trampoline emission: {e}");
    }
    crate::diag!(
        "build: {}",
        if cfg!(feature = "test-hooks") {
            "self-test (test hooks compiled in)"
        } else {
            "production (test hooks compiled out)"
        }
    );
    let path = if cet::active() { "cet" } else { "fallback" };
    crate::diag!(
        "shadowcall: path={path}-{} cpu={} cet_ss={} cmdline='{}'",
        patching::strategy().name(),
        st.features.vendor(),
        st.features.cet.cet_ss as u8,
        st.boot.cmdline()
    );
    for &(name, test) in TESTS {
        let mut outcome = Outcome::Fail;
        if let Err(f) = crate::recover::try_run(|| {
            outcome = test(st);
            0
        }) {
            crate::diag!("FAIL: {name}: unexpected fault: {f}");
            outcome = Outcome::Fail;
        }
        let mut c = CONSOLE.lock();
        let _ = k.result(&mut *c, name, outcome);
    }
    #[cfg(feature = "test-hooks")]
    {
        let c = &this_cpu().engine.counters;
        crate::diag!(
            "emulations: {} (trampoline calls {}, second traps {}, shadow-gap calls {}, classic calls {}), guard refusals {}",
            c.emulations.load(core::sync::atomic::Ordering::Relaxed),
            c.tramp_calls.load(core::sync::atomic::Ordering::Relaxed),
            c.second_traps.load(core::sync::atomic::Ordering::Relaxed),
            c.shadow_gap_calls.load(core::sync::atomic::Ordering::Relaxed),
            c.classic_calls.load(core::sync::atomic::Ordering::Relaxed),
            c.refusals.load(core::sync::atomic::Ordering::Relaxed),
        );
    }
    crate::diag!(
        "breakpoints reported {}, sync rounds {}",
        this_cpu().counters.breakpoints.load(core::sync::atomic::Ordering::Relaxed),
        patching::sync_rounds()
    );
    crate::diag!("totals: {} passed, {} failed, {} skipped", k.passed, k.failed, k.skipped);
    k.failed == 0
}
