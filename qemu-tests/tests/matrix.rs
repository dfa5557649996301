//! The emulator matrix: one test per configuration. Each boots the kernel
//! (built once) in its own run directory and checks the KTAP verdict.

use qemu_tests::{
    assert_classic_fails_with_cp, assert_cmdline_rejected, assert_passes_with_path, boot, options,
    options_with,
};
use xtask::{Cet, Emul, Machine};

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
