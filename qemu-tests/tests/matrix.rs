//! The emulator matrix: one test per configuration. Each boots the kernel
//! (built once) in its own run directory and checks the KTAP verdict.

use std::time::Duration;

use qemu_tests::{
    assert_classic_fails_with_cp, assert_cmdline_rejected, assert_passes_with_path, assert_smp, boot,
    boot_needing_host_cpus, options, options_with, show,
};
use xtask::{Cet, Emul, Machine};

/// libtest starts tests in name order, two at a time on a 2-CPU host: this
/// module's name sorts first so that the longest boot (QEMU TCG, 4 CPUs)
/// starts at once instead of after the others. On a host with fewer than 4
/// CPUs it runs alone (the others wait; see `boot_needing_host_cpus`),
/// elsewhere beside them.
mod a_long_first {
    use super::*;

    /// Every CPU online, the cross-CPU sync, patching while 3 CPUs call
    /// the site, interrupts and NMIs in the emulation window.
    #[test]
    fn qemu_smp4() {
        let mut opts = options(Machine::Qemu);
        opts.smp = 4;
        opts.timeout = Some(Duration::from_secs(300));
        let outcome = boot_needing_host_cpus(&opts, 4);
        let summary = assert_smp(&outcome, 4, "path=fallback", false);
        show(&format!("SMP qemu --smp 4: {summary}"));
    }
}

/// Two CPUs with CET: each on its own shadow stack.
#[test]
fn bochs_smp2() {
    let mut opts = options(Machine::Bochs);
    opts.smp = 2;
    let outcome = boot(&opts);
    let summary = assert_smp(&outcome, 2, "path=cet-", true);
    show(&format!("SMP bochs --smp 2: {summary}"));
}

/// CET on, default strategy: the one-trap shadow gap.
#[test]
fn bochs() {
    let outcome = boot(&options(Machine::Bochs));
    assert_passes_with_path(&outcome, "path=cet-shadowgap");
}

#[test]
fn bochs_trampoline() {
    let opts = options_with(Machine::Bochs, Cet::Auto, Some(Emul::Trampoline));
    assert_passes_with_path(&boot(&opts), "path=cet-trampoline");
}

/// Negative control: classic emulation with shadow stacks on must make every
/// emulated CALL fail with a #CP near-return mismatch, and nothing else.
#[test]
fn bochs_classic_is_caught_by_cet() {
    let opts = options_with(Machine::Bochs, Cet::Auto, Some(Emul::Classic));
    assert_classic_fails_with_cp(&boot(&opts));
}

#[test]
fn bochs_cet_off_trampoline() {
    let opts = options_with(Machine::Bochs, Cet::Off, Some(Emul::Trampoline));
    assert_passes_with_path(&boot(&opts), "path=fallback-trampoline");
}

#[test]
fn bochs_cet_off_shadowgap() {
    let opts = options_with(Machine::Bochs, Cet::Off, Some(Emul::Shadowgap));
    assert_passes_with_path(&boot(&opts), "path=fallback-shadowgap");
}

#[test]
fn bochs_cet_off() {
    let mut opts = options(Machine::Bochs);
    opts.cet = Cet::Off;
    assert_passes_with_path(&boot(&opts), "path=fallback");
}

#[test]
fn bochs_nocet() {
    assert_passes_with_path(&boot(&options(Machine::BochsNocet)), "path=fallback");
}

#[test]
fn qemu() {
    assert_passes_with_path(&boot(&options(Machine::Qemu)), "path=fallback");
}

#[test]
fn qemu_trampoline() {
    let opts = options_with(Machine::Qemu, Cet::Auto, Some(Emul::Trampoline));
    assert_passes_with_path(&boot(&opts), "path=fallback-trampoline");
}

#[test]
fn qemu_shadowgap() {
    let opts = options_with(Machine::Qemu, Cet::Auto, Some(Emul::Shadowgap));
    assert_passes_with_path(&boot(&opts), "path=fallback-shadowgap");
}

#[test]
fn qemu_kvm() {
    if let Err(reason) = xtask::kvm_usable() {
        eprintln!("\n{}", "!".repeat(72));
        eprintln!("!!! qemu-kvm NOT RUN: /dev/kvm not usable: {reason}");
        eprintln!("{}\n", "!".repeat(72));
        return;
    }
    // The host may or may not pass CET through, so either path is right.
    let outcome = boot(&options(Machine::QemuKvm));
    if let Some(k) = &outcome.kvm_internal_error {
        // The runner has printed the banner on stderr. Only a host that
        // cannot deliver #BP, with every result before it ok or skip, passes.
        assert!(k.clean_up_to_host_limit(), "{k}\n{}", outcome.describe());
        return;
    }
    assert_passes_with_path(&outcome, "path=");
    assert!(
        outcome.report.has_diagnostic_containing("path=cet")
            || outcome.report.has_diagnostic_containing("path=fallback"),
        "no path=cet or path=fallback diagnostic:\n{}",
        outcome.describe()
    );
}

#[test]
fn qemu_cet_on_is_rejected() {
    let mut opts = options(Machine::Qemu);
    opts.cet = Cet::On;
    assert_cmdline_rejected(&boot(&opts), "cet=on");
}

#[test]
fn qemu_bogus_word_is_rejected() {
    let mut opts = options(Machine::Qemu);
    opts.append.push("bogus_word".to_string());
    assert_cmdline_rejected(&boot(&opts), "bogus_word");
}
