//! Host-side runner for shadowcall: builds the kernel, boots it in Bochs or
//! QEMU, streams its output and judges its KTAP report.
//!
//! The binary (`cargo xtask ...`) is a thin layer over this library; the
//! `qemu-tests` crate uses [`run`] to boot the test matrix.

pub mod bench;
pub mod benchchart;
pub mod bochs;
pub mod cli;
pub mod elfcheck;
pub mod emulator;
pub mod error;
pub mod example;
pub mod install;
pub mod iso;
pub mod kernel;
pub mod ktap;
pub mod kvm;
pub mod machines;
pub mod modgraph;
pub mod qemu;
pub mod rundir;
pub mod runner;
pub mod smp;
pub mod trace;
pub mod wrsslint;

use std::path::PathBuf;
use std::process::Command;

pub use error::{Error, Result};
pub use install::Policy;
pub use kernel::build_kernel;
pub use machines::{Machine, MachineName};
pub use qemu::kvm_usable;
pub use runner::{run, Echo, RunOptions, RunOutcome};
/// The kernel's command-line vocabulary (shared with the kernel).
pub use shadowcall_cmdline::{self as cmdline, CetMode, EmulStrategy};

use error::Context;

fn banner(step: &str) {
    println!("\n======== {step} ========");
}

/// Environment variables through which `cargo xtask test --machine/--cet/--emul`
/// limit the emulator matrix (read by qemu-tests).
pub const MATRIX_MACHINES_ENV: &str = "SHADOWCALL_MATRIX_MACHINES";
pub const MATRIX_CET_ENV: &str = "SHADOWCALL_MATRIX_CET";
pub const MATRIX_EMUL_ENV: &str = "SHADOWCALL_MATRIX_EMUL";

/// `cargo xtask test`: install what is missing, then `cargo test --workspace`.
pub fn test_everything(args: &cli::TestArgs) -> Result<()> {
    banner("step 1/3: host tools for all machines (bochs, bochs-nocet, qemu, qemu-kvm)");
    install::ensure_machines(&Machine::ALL, Policy::Install)?;
    println!("all host tools present");
    banner("step 2/3: Rust target x86_64-unknown-none");
    install::ensure_rust_target(&kernel::kernel_dir(), Policy::Install)?;
    println!("target present");
    banner(
        "step 3/3: cargo test --workspace --no-fail-fast (host unit tests and the emulator matrix,\n\
         SMP included: qemu --smp 4 and bochs --smp 2 print an `SMP ...` line each)",
    );
    let mut cmd = Command::new(kernel::cargo());
    cmd.args(["test", "--workspace", "--no-fail-fast"]).current_dir(kernel::repo_root());
    let names: Vec<&str> = args.machine.iter().map(|m| m.name()).collect();
    for (var, value) in [
        (MATRIX_MACHINES_ENV, (!names.is_empty()).then(|| names.join(","))),
        (MATRIX_CET_ENV, args.cet.map(|c| c.name().to_string())),
        (MATRIX_EMUL_ENV, args.emul.map(|e| e.name().to_string())),
    ] {
        match value {
            Some(v) => cmd.env(var, v),
            None => cmd.env_remove(var),
        };
    }
    let status = cmd.status().context(|| "cannot run cargo test")?;
    if !status.success() {
        return Err(Error::new(format!("cargo test --workspace failed ({status}); see the test output above")));
    }
    banner("all tests passed");
    Ok(())
}

/// `cargo xtask iso`: a GRUB ISO for real hardware at target/shadowcall.iso.
pub fn hardware_iso(args: &cli::IsoArgs) -> Result<PathBuf> {
    let (machine, cet) = match args.machine {
        Some(name) => {
            let (m, c) = name.resolve(args.kernel.cet).map_err(Error::new)?;
            (Some(m), c)
        }
        None => (None, args.kernel.cet),
    };
    let runner_words = machines::RunnerWords { machine, cet, emul: args.kernel.emul, ..Default::default() };
    let words = machines::kernel_words(&runner_words, &args.kernel.append).map_err(Error::new)?;
    if let Some(w) = machines::length_warning(&words) {
        println!("{w}");
    }
    install::ensure(install::GRUB_ISO, Policy::Install)?;
    let elf = match &args.kernel.kernel {
        Some(k) => k.clone(),
        None => build_kernel(Policy::Install)?,
    };
    elfcheck::check_kernel_elf(&elf)?;
    let out_dir = kernel::repo_root().join("target");
    std::fs::create_dir_all(&out_dir).context(|| format!("cannot create {}", out_dir.display()))?;
    let out = out_dir.join("shadowcall.iso");
    let staging = rundir::RunDir::create("shadowcall-iso")?;
    let built = iso::build_iso(&elf, iso::Loader::Multiboot, &words, &staging.join("iso-root"), &out);
    if let Err(e) = staging.remove() {
        eprintln!("warning: {e}");
    }
    built?;
    println!("kernel command line: {}", words.join(" "));
    Ok(out)
}
