//! Benchmarks (`bench=1` on the command line): tight loops timed with
//! RDTSC, printed as one JSON object per `# bench ` line for `cargo xtask
//! bench`. On Bochs with `clock: sync=none` the unit is retired
//! instructions (deterministic); on QEMU/KVM it is TSC cycles, so every
//! figure is measured `REPS` times, after `WARMUP_REPS` discarded
//! repetitions (cold caches and TCG translation), and the runner reports
//! median and spread.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall::patch::NewInsn;
use shadowcall_cmdline::EmulStrategy;

use crate::patching::{self, Step};
use crate::selftest::block_site;
use crate::{cet, BootState};

/// Repetitions of every measurement (the figures printed).
const REPS: usize = 5;
/// Repetitions run first and discarded: the first pass pays for cold
/// caches and, on QEMU TCG, for translating the code.
const WARMUP_REPS: usize = 1;
/// Iterations per emulation measurement.
const ITERS: u64 = 200;
/// Batch sizes of the lookup and whole-batch benchmarks.
const SIZES: [usize; 5] = [1, 16, 256, 4096, 65536];

/// TSC at kmain entry.
pub static TSC_KMAIN: AtomicU64 = AtomicU64::new(0);

extern "C" {
    fn sc_b_loop(f: unsafe extern "C" fn(), n: u64) -> u64;
    fn sc_b_ret();
    fn sc_b_int3_fn();
    fn sc_b_target();
    fn sc_b_fn_call();
    fn sc_b_fn_call1();
    fn sc_b_fn_jmp();
    fn sc_b_fn_nop();
    fn sc_b_fn_ret();
    static sc_b_site_call: u8;
    static sc_b_site_call1: u8;
    static sc_b_site_jmp: u8;
    static sc_b_site_nop: u8;
    static sc_b_site_ret: u8;
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and side-effect free.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Per-op figures of `REPS` runs of `n` calls of `f`, after `WARMUP_REPS`
/// runs whose figures are dropped.
fn measure(f: unsafe extern "C" fn(), n: u64) -> Vec<u64> {
    (0..WARMUP_REPS + REPS)
        .map(|_| {
            // SAFETY: `f` is one of the asm bench functions, balanced on both stacks.
            unsafe { sc_b_loop(f, n) / n }
        })
        .skip(WARMUP_REPS)
        .collect()
}

static NMI_FN: AtomicU64 = AtomicU64::new(0);
static NMI_N: AtomicU64 = AtomicU64::new(0);
static NMI_DONE: AtomicU64 = AtomicU64::new(0);
static NMI_PER_OP: [AtomicU64; REPS] = [const { AtomicU64::new(0) }; REPS];

/// `measure(f, n)` run inside an NMI handler on this CPU (sent to itself).
fn measure_in_nmi(f: unsafe extern "C" fn(), n: u64) -> Vec<u64> {
    let cpu = crate::percpu::this_cpu();
    let done0 = NMI_DONE.load(Ordering::SeqCst);
    NMI_N.store(n, Ordering::SeqCst);
    NMI_FN.store(f as usize as u64, Ordering::SeqCst);
    crate::apic::send(cpu.apic_id.load(Ordering::Relaxed), crate::apic::Delivery::Nmi, 0);
    while NMI_DONE.load(Ordering::SeqCst) == done0 {
        core::hint::spin_loop();
    }
    NMI_PER_OP.iter().map(|v| v.load(Ordering::SeqCst)).collect()
}

/// Called by the NMI handler: run a pending `measure_in_nmi`.
pub fn nmi_hook() {
    let f = NMI_FN.swap(0, Ordering::SeqCst);
    if f == 0 {
        return;
    }
    // SAFETY: the value was stored from an `unsafe extern "C" fn()` by measure_in_nmi.
    let f: unsafe extern "C" fn() = unsafe { core::mem::transmute(f as usize) };
    for (slot, v) in NMI_PER_OP.iter().zip(measure(f, NMI_N.load(Ordering::SeqCst))) {
        slot.store(v, Ordering::SeqCst);
    }
    NMI_DONE.fetch_add(1, Ordering::SeqCst);
}

/// The outcome of a benchmark's patch: a failure is printed as
/// `# bench: error: ...`, which makes `cargo xtask bench` fail the run
/// (a figure measured without its patch would be meaningless).
fn reported<T, E: core::fmt::Debug>(what: &str, r: Result<T, E>) -> Option<T> {
    r.map_err(|e| crate::diag!("bench: error: {what}: {e:?}")).ok()
}

/// One `# bench {json}` line.
fn emit(name: &str, strategy: Option<EmulStrategy>, extra: &[(&str, u64)], per_op: &[u64]) {
    let mut s = String::new();
    let _ = write!(s, "{{\"name\":\"{name}\",\"shstk\":{}", cet::active());
    if let Some(st) = strategy {
        let _ = write!(s, ",\"strategy\":\"{}\"", st.name());
    }
    for (k, v) in extra {
        let _ = write!(s, ",\"{k}\":{v}");
    }
    let _ = write!(s, ",\"per_op\":[");
    for (i, v) in per_op.iter().enumerate() {
        let _ = write!(s, "{}{v}", if i > 0 { "," } else { "" });
    }
    s.push_str("]}");
    crate::diag!("bench {s}");
}

pub fn run_all(st: &BootState, tsc_tests_end: u64) {
    crate::diag!("bench: start (unit: TSC ticks; instructions on Bochs with clock sync=none)");
    emit(
        "boot",
        None,
        &[
            ("tsc_kmain", TSC_KMAIN.load(Ordering::Relaxed)),
            ("tsc_tests_end", tsc_tests_end),
            ("test_hooks", cfg!(feature = "test-hooks") as u64),
        ],
        &[],
    );
    emit("direct_call", None, &[("n", ITERS)], &measure(sc_b_ret, ITERS));
    emit("int3_iret", None, &[("n", ITERS)], &measure(sc_b_int3_fn, ITERS));
    // The same trap taken inside an NMI handler: its exit returns with
    // POPF + INCSSP + RET instead of IRET (DESIGN §8.3).
    emit("int3_nmi_ret", None, &[("n", ITERS)], &measure_in_nmi(sc_b_int3_fn, ITERS));

    // Emulation of each kind, under each strategy, inside one window.
    let target = sc_b_target as *const () as u64;
    let kinds: [(&str, u64, unsafe extern "C" fn(), NewInsn); 4] = [
        ("emul_call", core::ptr::addr_of!(sc_b_site_call) as u64, sc_b_fn_call, NewInsn::Call(target)),
        ("emul_jmp", core::ptr::addr_of!(sc_b_site_jmp) as u64, sc_b_fn_jmp, NewInsn::Jmp(target)),
        ("emul_nop", core::ptr::addr_of!(sc_b_site_nop) as u64, sc_b_fn_nop, NewInsn::Nop),
        ("emul_ret", core::ptr::addr_of!(sc_b_site_ret) as u64, sc_b_fn_ret, NewInsn::Ret),
    ];
    let batch: Vec<(u64, NewInsn)> = kinds.iter().map(|k| (k.1, k.3)).collect();
    let mut results: Vec<(&str, EmulStrategy, Vec<u64>)> = Vec::new();
    let window = patching::patch(&batch, |step| {
        if step != Step::Int3Written {
            return;
        }
        for s in patching::strategies_here() {
            patching::set_strategy(s);
            for k in &kinds {
                results.push((k.0, s, measure(k.2, ITERS)));
            }
            results.push(("emul_call_nmi", s, measure_in_nmi(sc_b_fn_call, ITERS)));
        }
        patching::set_strategy(st.strategy);
    });
    reported("the emulation batch", window);
    for (name, s, v) in &results {
        emit(name, Some(*s), &[("n", ITERS)], v);
    }
    // The same sites after the patch: no trap at all.
    emit("patched_call", None, &[("n", ITERS)], &measure(sc_b_fn_call, ITERS));
    let restore: Vec<(u64, NewInsn)> =
        kinds.iter().map(|k| (k.1, NewInsn::Call(sc_b_ret as *const () as u64))).collect();
    reported("restoring the emulation batch", patching::patch(&restore, |_| {}));

    // The static-call case: an emulated call through a batch of one site
    // (its own site, the same target as emul_call).
    let site1 = core::ptr::addr_of!(sc_b_site_call1) as u64;
    let mut one_site: Vec<(EmulStrategy, Vec<u64>)> = Vec::new();
    let window = patching::patch(&[(site1, NewInsn::Call(target))], |step| {
        if step != Step::Int3Written {
            return;
        }
        for s in patching::strategies_here() {
            patching::set_strategy(s);
            one_site.push((s, measure(sc_b_fn_call1, ITERS)));
        }
        patching::set_strategy(st.strategy);
    });
    reported("the 1-site batch", window);
    for (s, v) in &one_site {
        emit("emul_call_1site", Some(*s), &[("n", ITERS)], v);
    }
    let restore1 = patching::patch(&[(site1, NewInsn::Call(sc_b_ret as *const () as u64))], |_| {});
    reported("restoring the 1-site batch", restore1);

    // Whole-batch patching and lookup cost as the batch grows. The block's
    // sites start as `call a`; the lookup window patches them to the
    // emul_call target (so lookup[N] and emul_call differ only in the
    // batch), the timed patch puts `call a` back.
    let a = crate::selftest::target_addr(0);
    for &n in &SIZES {
        let to_target: Vec<(u64, NewInsn)> = (0..n).map(|i| (block_site(i), NewInsn::Call(target))).collect();
        let back: Vec<(u64, NewInsn)> = (0..n).map(|i| (block_site(i), NewInsn::Call(a))).collect();
        // Lookup: emulate the middle site while the batch of n entries is active.
        let mid = block_site(n / 2);
        // SAFETY: each block entry is `call rel32; ret`, a function.
        let f: unsafe extern "C" fn() = unsafe { core::mem::transmute(mid as usize) };
        let mut per_op = Vec::new();
        let window = patching::patch(&to_target, |step| {
            if step == Step::Int3Written {
                per_op = measure(f, ITERS / 4);
            }
        });
        reported("the lookup batch", window);
        emit("lookup", Some(patching::strategy()), &[("sites", n as u64), ("n", ITERS / 4)], &per_op);
        let t0 = rdtsc();
        let stats = patching::patch(&back, |_| {});
        let total = rdtsc() - t0;
        let rounds = reported("the timed batch", stats).map_or(0, |s| s.sync_rounds);
        emit(
            "patch_batch",
            None,
            &[("sites", n as u64), ("sync_rounds", rounds), ("total", total)],
            &[total / n as u64],
        );
    }
    crate::diag!("bench: done");
}
