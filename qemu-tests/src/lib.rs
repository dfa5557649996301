//! Helpers for the emulator matrix in `tests/matrix.rs`, and its harness
//! ([`harness`]).
//!
//! The kernel is built once per test binary; every boot copies the ELF into
//! its own temporary run directory, so tests can run in parallel.
//!
//! Nothing here installs anything: a missing host tool fails the boot with
//! what is missing and the command that installs it (`cargo xtask test`
//! installs first, then runs this).
//!
//! `SHADOWCALL_TEST_KERNEL=/path/to/elf` boots that ELF instead of building
//! kernel/ (for testing the runner itself against a stand-in kernel).

use std::path::PathBuf;
use std::sync::{OnceLock, RwLock};

pub mod harness;

use xtask::example::Example;
use xtask::kernel::Build;
use xtask::ktap::Status;
use xtask::{CetMode, Echo, EmulStrategy, Machine, Policy, RunOptions, RunOutcome};

/// Builds the kernel on first use; later calls get the same result.
pub fn kernel() -> PathBuf {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let build = || match std::env::var_os("SHADOWCALL_TEST_KERNEL") {
        Some(path) => Ok(PathBuf::from(path)),
        None => xtask::build_kernel(Policy::ReportOnly).map_err(|e| e.to_string()),
    };
    match KERNEL.get_or_init(build) {
        Ok(path) => path.clone(),
        Err(e) => panic!("kernel build failed: {e}"),
    }
}

/// The production kernel (`--no-default-features`: no test hook compiled
/// in), built on first use.
pub fn production_kernel() -> PathBuf {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let build = || xtask::kernel::build_kernel_of(Policy::ReportOnly, Build::Production).map_err(|e| e.to_string());
    match KERNEL.get_or_init(build) {
        Ok(path) => path.clone(),
        Err(e) => panic!("production kernel build failed: {e}"),
    }
}

/// The skip reason of a self-test that needs the test-hooks build.
pub const NEEDS_HOOKS: &str = "needs the test-hooks build";

/// The production build passed: it says it is one, every test that needs no
/// hook ran (ok, or skipped for a reason other than the hooks: the CPU or
/// the CPU count), and the hook tests skipped, at least `min_hook_skips`.
pub fn assert_production_passes(outcome: &RunOutcome, path: &str, min_hook_skips: usize) -> String {
    let ctx = || outcome.describe();
    assert_passes_with_path(outcome, path);
    assert!(
        outcome.report.has_diagnostic_containing("build: production (test hooks compiled out)"),
        "the kernel booted is not the production build:\n{}",
        ctx()
    );
    let hook_skips: Vec<&str> = outcome
        .report
        .results
        .iter()
        .filter(|r| matches!(&r.status, Status::Skip(why) if why.contains(NEEDS_HOOKS)))
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        hook_skips.len() >= min_hook_skips,
        "expected at least {min_hook_skips} tests skipped for the hooks, got {hook_skips:?}:\n{}",
        ctx()
    );
    let ok = outcome.report.results.iter().filter(|r| r.status == Status::Ok).count();
    format!("{ok} ok; without hooks: {}", hook_skips.join(", "))
}

/// Options for booting the prebuilt kernel on `machine`.
pub fn options(machine: Machine) -> RunOptions {
    let mut opts = RunOptions::new(machine);
    opts.kernel = Some(kernel());
    opts.echo = Echo::Silent;
    opts.announce = false;
    opts.install = Policy::ReportOnly;
    opts
}

/// Builds example `e` on first use (one example per test binary is built
/// once); later calls get the same result.
pub fn example_elf(e: Example) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(|| e.build(Policy::ReportOnly).map_err(|err| err.to_string())) {
        Ok(path) if path == &e.elf() => path.clone(),
        Ok(other) => panic!("only one example is built per test binary: {} already, not {}", other.display(), e.name),
        Err(err) => panic!("example `{}` build failed: {err}", e.name),
    }
}

/// Options for booting example `e` (built once) on `machine`.
pub fn example_options(e: Example, machine: Machine) -> RunOptions {
    let mut opts = RunOptions::new(machine);
    opts.example = Some(e);
    opts.kernel = Some(example_elf(e));
    opts.echo = Echo::Silent;
    opts.announce = false;
    opts.install = Policy::ReportOnly;
    opts
}

/// The tests every boot of the minimal example reports.
pub const EXAMPLE_TESTS: [&str; 4] =
    ["example_boot", "example_shadow_stack", "example_call_site", "example_patch_site"];

/// The strategies `example_patch_site` must have patched under, with and
/// without shadow stacks (in the order its note names them).
fn example_strategies(shadow_stacks: bool) -> [&'static str; 2] {
    if shadow_stacks {
        ["Trampoline", "ShadowGap"]
    } else {
        ["Classic", "Trampoline"]
    }
}

/// The example's run passed with every test of [`EXAMPLE_TESTS`] ok;
/// `example_shadow_stack` may be skipped only without `shadow_stacks`, and
/// `example_patch_site` patched live under the strategies of this setting.
pub fn assert_example_passes(outcome: &RunOutcome, shadow_stacks: bool) {
    assert!(outcome.passed, "the example run should pass but failed:\n{}", outcome.describe());
    for name in EXAMPLE_TESTS {
        let status = outcome.report.result(name).map(|r| &r.status);
        let skip_allowed = name == "example_shadow_stack" && !shadow_stacks;
        let fine = match status {
            Some(Status::Ok) => true,
            Some(Status::Skip(_)) => skip_allowed,
            _ => false,
        };
        assert!(
            fine,
            "`{name}` must be ok{} but is {status:?}:\n{}",
            if skip_allowed { " or skip" } else { "" },
            outcome.describe()
        );
    }
    let [first, second] = example_strategies(shadow_stacks);
    let note = format!("# example_patch_site: {first}: 8 calls emulated, {second}: 8 calls emulated;");
    assert!(
        outcome.report.diagnostics_before("example_patch_site").is_some_and(|d| d.iter().any(|l| l.starts_with(&note))),
        "`example_patch_site` must report `{note}`:\n{}",
        outcome.describe()
    );
}

/// Options with `--cet` and `--emul` set.
pub fn options_with(machine: Machine, cet: Option<CetMode>, emul: Option<EmulStrategy>) -> RunOptions {
    let mut opts = options(machine);
    opts.cet = cet;
    opts.emul = emul;
    opts
}

/// The tests that emulate a CALL: with classic emulation and shadow stacks
/// on, each must fail with #CP (near-return mismatch).
pub const EMULATED_CALL_TESTS: [&str; 10] = [
    "emul_call",
    "emul_call_nested",
    "emul_call_recursive",
    "emul_call_irq_on",
    "patch_roundtrip",
    "patch_batch_large",
    "sec_batch_forged",
    "sec_stale_int3_race",
    "patch_site_macro",
    "patch_one_site",
];

/// The negative control: exactly [`EMULATED_CALL_TESTS`] are `not ok`, each
/// preceded by a `NEAR-RET` diagnostic; all others ok or skip; the plan complete.
pub fn assert_classic_fails_with_cp(outcome: &RunOutcome) {
    let report = &outcome.report;
    let ctx = || outcome.describe();
    assert!(
        report.header_seen && report.errors.is_empty() && report.panic.is_none(),
        "bad or missing KTAP report:\n{}",
        ctx()
    );
    let plan = report.plan.expect("no plan line") as usize;
    assert_eq!(report.results.len(), plan, "incomplete plan:\n{}", ctx());
    assert!(!outcome.timed_out && outcome.kvm_internal_error.is_none(), "the run did not end normally:\n{}", ctx());
    for name in EMULATED_CALL_TESTS {
        assert!(report.result(name).is_some(), "test `{name}` is missing from the report:\n{}", ctx());
    }
    for r in &report.results {
        let should_fail = EMULATED_CALL_TESTS.contains(&r.name.as_str());
        if should_fail {
            assert_eq!(
                r.status,
                Status::NotOk,
                "`{}` must be not ok under classic emulation with shadow stacks:\n{}",
                r.name,
                ctx()
            );
            let diags = report.diagnostics_before(&r.name).unwrap_or_default();
            assert!(
                diags.iter().any(|d| d.contains("NEAR-RET")),
                "`{}` failed without a NEAR-RET #CP diagnostic before it: {diags:?}\n{}",
                r.name,
                ctx()
            );
        } else {
            assert_ne!(r.status, Status::NotOk, "only the emulated-CALL tests may fail, not `{}`:\n{}", r.name, ctx());
        }
    }
}

/// Held shared by every boot, exclusively by a boot that must have the
/// host to itself (see [`boot_needing_host_cpus`]).
static HOST: RwLock<()> = RwLock::new(());

fn run_or_panic(opts: &RunOptions) -> RunOutcome {
    let outcome = match xtask::run(opts) {
        Ok(outcome) => outcome,
        Err(e) => panic!("could not run {}: {e}", opts.label()),
    };
    // `# SECURITY` lines stay loud even in a passing run; `# expected:` ones are not alarms.
    if !outcome.report.security.is_empty() {
        for note in xtask::runner::security_notes(&outcome.report) {
            if note.contains("SECURITY") {
                show(&format!("{}:\n{note}", opts.label()));
            }
        }
    }
    outcome
}

/// Boots once; a run that could not even start (missing tool...) panics.
pub fn boot(opts: &RunOptions) -> RunOutcome {
    let _shared = HOST.read().unwrap_or_else(|e| e.into_inner());
    run_or_panic(opts)
}

/// Boots once, alone on the host when it has fewer than `cpus` CPUs: the
/// other boots wait. QEMU TCG gives each guest CPU a host thread, and
/// `smp_patch_stress` with 4 guest CPUs sharing 2 host CPUs with another
/// emulator ran past 300 s (82 s alone).
pub fn boot_needing_host_cpus(opts: &RunOptions, cpus: usize) -> RunOutcome {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    if host >= cpus {
        return boot(opts);
    }
    let _alone = HOST.write().unwrap_or_else(|e| e.into_inner());
    show(&format!(
        "note: {} --smp {} runs alone: this host has {host} CPUs, it needs {cpus}",
        opts.machine.name(),
        opts.smp
    ));
    run_or_panic(opts)
}

/// Asserts the run passed and printed a diagnostic containing `path`.
pub fn assert_passes_with_path(outcome: &RunOutcome, path: &str) {
    assert!(outcome.passed, "the run should pass but failed:\n{}", outcome.describe());
    assert!(
        outcome.report.has_diagnostic_containing(path),
        "the report passed but has no diagnostic containing `{path}`:\n{}",
        outcome.describe()
    );
}

/// Asserts the run failed because test `cmdline` is `not ok` and a
/// diagnostic mentions `needle`.
pub fn assert_cmdline_rejected(outcome: &RunOutcome, needle: &str) {
    assert!(!outcome.passed, "the run should fail but passed:\n{}", outcome.describe());
    let cmdline = outcome.report.result("cmdline");
    assert!(
        cmdline.is_some_and(|r| r.status == xtask::ktap::Status::NotOk),
        "expected `not ok N cmdline`, got {cmdline:?}:\n{}",
        outcome.describe()
    );
    assert!(
        outcome.report.has_diagnostic_containing(needle),
        "expected a diagnostic mentioning `{needle}`:\n{}",
        outcome.describe()
    );
    assert!(
        outcome.failures.iter().any(|f| f.contains("not ok: ") && f.contains("cmdline")),
        "the failure reasons should name cmdline: {:?}",
        outcome.failures
    );
}

/// The kernel's SMP tests: each must be `ok` (not skipped) on a run with
/// two CPUs or more.
pub const SMP_TESTS: [&str; 7] = [
    "smp_online",
    "smp_sync",
    "smp_patch_stress",
    "irq_in_window",
    "nmi_in_window",
    "sec_poke_alias_private",
    "nmi_storm",
];

/// SMP tests that need shadow stacks too: `ok` on a CET run with 2+ CPUs.
pub const CET_SMP_TESTS: [&str; 1] = ["sec_sync_forged_ack"];

/// The SMP checks of a run with `cpus` CPUs: the run passed with a
/// diagnostic containing `path`; every test in [`SMP_TESTS`] is `ok`;
/// exactly `cpus` `# CPU <i> APIC id <n> online` lines, for CPUs 0..cpus
/// with distinct APIC ids; with `own_shadow_stacks`, every test in
/// [`CET_SMP_TESTS`] is `ok` and none says "NOT ITS OWN" or "shadow stacks off"; the stress figures parse, with
/// `cpus - 1` callers, calls == targets counted and emulated > 0.
/// Returns a one-line summary for the test output.
pub fn assert_smp(outcome: &RunOutcome, cpus: u32, path: &str, own_shadow_stacks: bool) -> String {
    let ctx = || outcome.describe();
    assert_passes_with_path(outcome, path);
    for name in SMP_TESTS {
        let status = outcome.report.result(name).map(|r| &r.status);
        assert_eq!(
            status,
            Some(&Status::Ok),
            "`{name}` must be ok (not skipped, not missing) with {cpus} CPUs:\n{}",
            ctx()
        );
    }
    let online = xtask::smp::cpus_online(&outcome.report);
    let lines: Vec<&str> = online.iter().map(|c| c.line.as_str()).collect();
    assert_eq!(
        online.len(),
        cpus as usize,
        "expected exactly {cpus} `# CPU ... online` lines, got {lines:#?}\n{}",
        ctx()
    );
    let mut indexes: Vec<u32> = online.iter().map(|c| c.index).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (0..cpus).collect::<Vec<_>>(), "the CPU lines should number the CPUs 0..{cpus}: {lines:#?}");
    let mut apic_ids: Vec<u32> = online.iter().map(|c| c.apic_id).collect();
    apic_ids.sort_unstable();
    apic_ids.dedup();
    assert_eq!(apic_ids.len(), online.len(), "APIC ids repeat: {lines:#?}");
    if own_shadow_stacks {
        for name in CET_SMP_TESTS {
            let status = outcome.report.result(name).map(|r| &r.status);
            assert_eq!(status, Some(&Status::Ok), "`{name}` must be ok with {cpus} CPUs and shadow stacks:\n{}", ctx());
        }
        for c in &online {
            assert!(
                !c.not_its_own && !c.shadow_stacks_off,
                "CPU {} is not on its own shadow stack: `{}`\n{}",
                c.index,
                c.line,
                ctx()
            );
        }
    }
    let figures = match outcome.stress_figures() {
        Some(Ok(f)) => f,
        Some(Err(e)) => panic!("smp_patch_stress figures: {e}\n{}", ctx()),
        None => panic!("no smp_patch_stress figures line:\n{}", ctx()),
    };
    assert_eq!(figures.callers, u64::from(cpus - 1), "all CPUs but one should call: {figures}");
    assert_eq!(figures.calls, figures.counted, "calls made != targets counted: {figures}\n{}", ctx());
    assert!(figures.targets_add_up(), "per-target counts: {figures}");
    assert!(figures.emulated > 0, "no call went through the emulation: {figures}");
    let ids: Vec<String> = online.iter().map(|c| c.apic_id.to_string()).collect();
    format!(
        "{cpus} CPUs online (APIC ids {}){}; {} ok; stress: {figures}",
        ids.join(", "),
        if own_shadow_stacks { ", each on its own shadow stack" } else { "" },
        SMP_TESTS.join(", ")
    )
}

/// Prints `line` on the real stderr, so `cargo test` shows it even for a
/// passing test (its `println!`/`eprintln!` capture would hide it).
pub fn show(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}
