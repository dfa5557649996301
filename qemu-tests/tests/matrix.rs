//! The emulator matrix: one entry per configuration. Each boots the kernel
//! (built once) in its own run directory and checks the KTAP verdict. The
//! harness (qemu_tests::harness) runs them two at a time on a 2-CPU host,
//! in the order below (the longest boot first), and reports a configuration
//! that covered nothing as NOT COVERED, never as ok.

use std::process::ExitCode;
use std::time::Duration;

use qemu_tests::harness::{self, Coverage, Entry};
use qemu_tests::{
    assert_classic_fails_with_cp, assert_cmdline_rejected, assert_example_passes, assert_passes_with_path,
    assert_production_passes, assert_smp, boot, boot_needing_host_cpus, example_options, options, options_with,
    production_kernel, show,
};
use xtask::example::MINIMAL;
use xtask::{CetMode, EmulStrategy, Machine};

const OFF: Option<CetMode> = Some(CetMode::Off);
const ON: Option<CetMode> = Some(CetMode::On);
const TRAMPOLINE: Option<EmulStrategy> = Some(EmulStrategy::Trampoline);
const SHADOWGAP: Option<EmulStrategy> = Some(EmulStrategy::ShadowGap);
const CLASSIC: Option<EmulStrategy> = Some(EmulStrategy::Classic);

/// A word long enough to push the command line past what the kernel keeps.
const LONG_WORD_LEN: usize = xtask::cmdline::MAX_LEN + 64;

const fn entry(
    name: &'static str,
    machine: Machine,
    cet: Option<CetMode>,
    emul: Option<EmulStrategy>,
    check: fn() -> Coverage,
) -> Entry {
    Entry { name, machine, cet, emul, check }
}

const MATRIX: &[Entry] = &[
    // The longest boot first. Every CPU online, the cross-CPU sync, patching
    // while 3 CPUs call the site, interrupts and NMIs in the emulation
    // window. On a host with fewer than 4 CPUs it runs alone.
    entry("qemu_smp4", Machine::Qemu, None, None, || {
        let mut opts = options(Machine::Qemu);
        opts.smp = 4;
        opts.timeout = Some(Duration::from_secs(300));
        let outcome = boot_needing_host_cpus(&opts, 4);
        let summary = assert_smp(&outcome, 4, "path=fallback", false);
        show(&format!("SMP qemu --smp 4: {summary}"));
        Coverage::Covered
    }),
    // Two CPUs with CET: each on its own shadow stack.
    entry("bochs_smp2", Machine::Bochs, None, None, || {
        let mut opts = options(Machine::Bochs);
        opts.smp = 2;
        let outcome = boot(&opts);
        let summary = assert_smp(&outcome, 2, "path=cet-", true);
        show(&format!("SMP bochs --smp 2: {summary}"));
        Coverage::Covered
    }),
    // The production build (test hooks compiled out) on two CPUs with CET:
    // every self-test that needs no hook runs and passes.
    entry("bochs_smp2_production", Machine::Bochs, None, None, || {
        let mut opts = options(Machine::Bochs);
        opts.kernel = Some(production_kernel());
        opts.smp = 2;
        let summary = assert_production_passes(&boot(&opts), "path=cet-shadowgap", 5);
        show(&format!("production bochs --smp 2: {summary}"));
        Coverage::Covered
    }),
    // The production build's other fast paths (asm/bp.S sc_bp_fast*): the
    // trampoline's two traps with CET on, and the classic call with CET off.
    entry("bochs_trampoline_production", Machine::Bochs, None, TRAMPOLINE, || {
        let mut opts = options_with(Machine::Bochs, None, TRAMPOLINE);
        opts.kernel = Some(production_kernel());
        let summary = assert_production_passes(&boot(&opts), "path=cet-trampoline", 5);
        show(&format!("production bochs emul=trampoline: {summary}"));
        Coverage::Covered
    }),
    entry("bochs_cet_off_production", Machine::Bochs, OFF, None, || {
        let mut opts = options_with(Machine::Bochs, OFF, None);
        opts.kernel = Some(production_kernel());
        let summary = assert_production_passes(&boot(&opts), "path=fallback", 5);
        show(&format!("production bochs cet=off: {summary}"));
        Coverage::Covered
    }),
    // CET on, default strategy: the one-trap shadow gap.
    entry("bochs", Machine::Bochs, None, None, || {
        assert_passes_with_path(&boot(&options(Machine::Bochs)), "path=cet-shadowgap");
        Coverage::Covered
    }),
    entry("bochs_trampoline", Machine::Bochs, None, TRAMPOLINE, || {
        assert_passes_with_path(&boot(&options_with(Machine::Bochs, None, TRAMPOLINE)), "path=cet-trampoline");
        Coverage::Covered
    }),
    // Negative control: classic emulation with shadow stacks on must make
    // every emulated CALL fail with a #CP near-return mismatch, and nothing else.
    entry("bochs_classic_is_caught_by_cet", Machine::Bochs, None, CLASSIC, || {
        assert_classic_fails_with_cp(&boot(&options_with(Machine::Bochs, None, CLASSIC)));
        Coverage::Covered
    }),
    entry("bochs_cet_off", Machine::Bochs, OFF, None, || {
        assert_passes_with_path(&boot(&options_with(Machine::Bochs, OFF, None)), "path=fallback");
        Coverage::Covered
    }),
    entry("bochs_cet_off_trampoline", Machine::Bochs, OFF, TRAMPOLINE, || {
        assert_passes_with_path(&boot(&options_with(Machine::Bochs, OFF, TRAMPOLINE)), "path=fallback-trampoline");
        Coverage::Covered
    }),
    entry("bochs_cet_off_shadowgap", Machine::Bochs, OFF, SHADOWGAP, || {
        assert_passes_with_path(&boot(&options_with(Machine::Bochs, OFF, SHADOWGAP)), "path=fallback-shadowgap");
        Coverage::Covered
    }),
    entry("bochs_nocet", Machine::BochsNocet, None, None, || {
        assert_passes_with_path(&boot(&options(Machine::BochsNocet)), "path=fallback");
        Coverage::Covered
    }),
    entry("qemu", Machine::Qemu, None, None, || {
        assert_passes_with_path(&boot(&options(Machine::Qemu)), "path=fallback");
        Coverage::Covered
    }),
    entry("qemu_trampoline", Machine::Qemu, None, TRAMPOLINE, || {
        assert_passes_with_path(&boot(&options_with(Machine::Qemu, None, TRAMPOLINE)), "path=fallback-trampoline");
        Coverage::Covered
    }),
    entry("qemu_shadowgap", Machine::Qemu, None, SHADOWGAP, || {
        assert_passes_with_path(&boot(&options_with(Machine::Qemu, None, SHADOWGAP)), "path=fallback-shadowgap");
        Coverage::Covered
    }),
    entry("qemu_kvm", Machine::QemuKvm, None, None, qemu_kvm),
    entry("qemu_cet_on_is_rejected", Machine::Qemu, ON, None, || {
        assert_cmdline_rejected(&boot(&options_with(Machine::Qemu, ON, None)), "cet=on");
        Coverage::Covered
    }),
    entry("qemu_bogus_word_is_rejected", Machine::Qemu, None, None, || {
        let mut opts = options(Machine::Qemu);
        opts.append.push("bogus_word".to_string());
        assert_cmdline_rejected(&boot(&opts), "bogus_word");
        Coverage::Covered
    }),
    // A line longer than the kernel keeps is not cut silently: `cmdline`
    // fails naming its length.
    entry("qemu_long_cmdline_is_rejected", Machine::Qemu, None, None, || {
        let mut opts = options(Machine::Qemu);
        opts.append.push(format!("x={}", "a".repeat(LONG_WORD_LEN)));
        let len = opts.words().expect("words").join(" ").len();
        let outcome = boot(&opts);
        // QEMU puts the image name in front, so the kernel sees a few more bytes.
        assert_cmdline_rejected(&outcome, "bytes long; the kernel keeps at most");
        let named = outcome.report.diagnostics.iter().any(|d| {
            d.split_whitespace()
                .filter_map(|w| w.parse::<usize>().ok())
                .any(|n| n >= len && n > xtask::cmdline::MAX_LEN)
        });
        assert!(named, "no diagnostic names a length of at least {len}:\n{}", outcome.describe());
        Coverage::Covered
    }),
    // The example kernel (Multiboot2, mapped high): its shadow stack on the CET CPU...
    entry("example_minimal_bochs", Machine::Bochs, None, None, || {
        assert_example_passes(&boot(&example_options(MINIMAL, Machine::Bochs)), true);
        Coverage::Covered
    }),
    // ... and skipped without CET.
    entry("example_minimal_qemu", Machine::Qemu, None, None, || {
        assert_example_passes(&boot(&example_options(MINIMAL, Machine::Qemu)), false);
        Coverage::Covered
    }),
];

/// The host may or may not pass CET through, so either path is right. A
/// host whose KVM cannot deliver #BP (every result before it ok or skip)
/// covers nothing: NOT COVERED, with the reason.
fn qemu_kvm() -> Coverage {
    if let Err(reason) = xtask::kvm_usable() {
        return Coverage::NotCovered(format!("qemu-kvm NOT RUN: /dev/kvm not usable: {reason}"));
    }
    let outcome = boot(&options(Machine::QemuKvm));
    if let Some(k) = &outcome.kvm_internal_error {
        assert!(k.clean_up_to_host_limit(), "{k}\n{}", outcome.describe());
        return Coverage::NotCovered(k.to_string());
    }
    assert_passes_with_path(&outcome, "path=");
    assert!(
        outcome.report.has_diagnostic_containing("path=cet")
            || outcome.report.has_diagnostic_containing("path=fallback"),
        "no path=cet or path=fallback diagnostic:\n{}",
        outcome.describe()
    );
    Coverage::Covered
}

fn main() -> ExitCode {
    harness::main(MATRIX)
}
