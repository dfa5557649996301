//! Helpers for the emulator matrix in `tests/matrix.rs`.
//!
//! The kernel is built once per test binary; every boot copies the ELF into
//! its own temporary run directory, so tests can run in parallel.
//!
//! `SHADOWCALL_TEST_KERNEL=/path/to/elf` boots that ELF instead of building
//! kernel/ (for testing the runner itself against a stand-in kernel).

use std::path::PathBuf;
use std::sync::OnceLock;

use xtask::{Machine, RunOptions, RunOutcome};

/// Builds the kernel on first use; later calls get the same result.
pub fn kernel() -> PathBuf {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let build = || match std::env::var_os("SHADOWCALL_TEST_KERNEL") {
        Some(path) => Ok(PathBuf::from(path)),
        None => xtask::build_kernel().map_err(|e| e.to_string()),
    };
    match KERNEL.get_or_init(build) {
        Ok(path) => path.clone(),
        Err(e) => panic!("kernel build failed: {e}"),
    }
}

/// Options for booting the prebuilt kernel on `machine`.
pub fn options(machine: Machine) -> RunOptions {
    let mut opts = RunOptions::new(machine);
    opts.kernel = Some(kernel());
    opts
}

/// Boots once; a run that could not even start (missing tool...) panics.
pub fn boot(opts: &RunOptions) -> RunOutcome {
    match xtask::run(opts) {
        Ok(outcome) => outcome,
        Err(e) => panic!("could not run {}: {e}", opts.machine.name()),
    }
}

/// Asserts the run passed and printed a diagnostic containing `path`.
pub fn assert_passes_with_path(outcome: &RunOutcome, path: &str) {
    assert!(
        outcome.passed,
        "the run should pass but failed:\n{}",
        outcome.describe()
    );
    assert!(
        outcome.report.has_diagnostic_containing(path),
        "the report passed but has no diagnostic containing `{path}`:\n{}",
        outcome.describe()
    );
}

/// Asserts the run failed because test `cmdline` is `not ok` and a
/// diagnostic mentions `needle`.
pub fn assert_cmdline_rejected(outcome: &RunOutcome, needle: &str) {
    assert!(
        !outcome.passed,
        "the run should fail but passed:\n{}",
        outcome.describe()
    );
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
        outcome
            .failures
            .iter()
            .any(|f| f.contains("not ok: ") && f.contains("cmdline")),
        "the failure reasons should name cmdline: {:?}",
        outcome.failures
    );
}
