//! The emulator matrix: one test per configuration. Each boots the kernel
//! (built once) in its own run directory and checks the KTAP verdict.

use qemu_tests::{assert_cmdline_rejected, assert_passes_with_path, boot, options};
use xtask::{Cet, Machine};

#[test]
fn bochs() {
    let outcome = boot(&options(Machine::Bochs));
    assert_passes_with_path(&outcome, "path=cet");
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
fn qemu_kvm() {
    if let Err(reason) = xtask::kvm_usable() {
        eprintln!("\n{}", "!".repeat(72));
        eprintln!("!!! qemu-kvm NOT RUN: /dev/kvm not usable: {reason}");
        eprintln!("{}\n", "!".repeat(72));
        return;
    }
    // The host may or may not pass CET through, so either path is right.
    let outcome = boot(&options(Machine::QemuKvm));
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
