//! Host-side runner for shadowcall: builds the kernel, boots it in Bochs or
//! QEMU, streams its output and judges its KTAP report.
//!
//! The binary (`cargo xtask ...`) is a thin layer over this library; the
//! `qemu-tests` crate uses [`run`] to boot the test matrix.

pub mod args;
pub mod bench;
pub mod benchchart;
pub mod bochs;
pub mod elfcheck;
pub mod emulator;
pub mod error;
pub mod install;
pub mod iso;
pub mod kernel;
pub mod ktap;
pub mod kvm;
pub mod machines;
pub mod qemu;
pub mod rundir;
pub mod runner;
pub mod smp;

use std::path::PathBuf;
use std::process::Command;

pub use error::{Error, Result};
pub use kernel::build_kernel;
pub use machines::{Cet, Emul, Machine};
pub use qemu::kvm_usable;
pub use runner::{run, RunOptions, RunOutcome};

use error::Context;

fn banner(step: &str) {
    println!("\n======== {step} ========");
}

/// `cargo xtask test`: install what is missing, then `cargo test --workspace`.
pub fn test_everything() -> Result<()> {
    banner("step 1/3: host tools for all machines (bochs, bochs-nocet, qemu, qemu-kvm)");
    install::ensure_machines(&Machine::ALL)?;
    println!("all host tools present");
    banner("step 2/3: Rust target x86_64-unknown-none");
    install::ensure_rust_target(&kernel::kernel_dir())?;
    println!("target present");
    banner(
        "step 3/3: cargo test --workspace --no-fail-fast (host unit tests and the emulator matrix,\n\
         SMP included: qemu --smp 4 and bochs --smp 2 print an `SMP ...` line each)",
    );
    let status = Command::new(kernel::cargo())
        .args(["test", "--workspace", "--no-fail-fast"])
        .current_dir(kernel::repo_root())
        .status()
        .context(|| "cannot run cargo test")?;
    if !status.success() {
        return Err(Error::new(format!("cargo test --workspace failed ({status}); see the test output above")));
    }
    banner("all tests passed");
    Ok(())
}

/// `cargo xtask iso`: a GRUB ISO for real hardware at target/shadowcall.iso.
pub fn hardware_iso(opts: &args::IsoOptions) -> Result<PathBuf> {
    install::ensure(install::GRUB_ISO)?;
    let elf = match &opts.kernel {
        Some(k) => k.clone(),
        None => build_kernel()?,
    };
    elfcheck::check_kernel_elf(&elf)?;
    let words = machines::kernel_words(None, opts.cet, opts.emul, &opts.append);
    let out_dir = kernel::repo_root().join("target");
    std::fs::create_dir_all(&out_dir).context(|| format!("cannot create {}", out_dir.display()))?;
    let out = out_dir.join("shadowcall.iso");
    let staging = rundir::RunDir::create("shadowcall-iso")?;
    let built = iso::build_iso(&elf, &words, &staging.join("iso-root"), &out);
    if let Err(e) = staging.remove() {
        eprintln!("warning: {e}");
    }
    built?;
    println!("kernel command line: {}", words.join(" "));
    Ok(out)
}
