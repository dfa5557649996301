//! Building the kernel (its own cargo workspace in kernel/).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Context, Error, Result};
use crate::install::{self, Policy};

/// The repository root (the parent of xtask/).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

pub fn kernel_dir() -> PathBuf {
    repo_root().join("kernel")
}

/// Which kernel to build: the self-test kernel (with the `test-hooks`
/// feature: forgery and race hooks in the #BP path), or the production
/// build (`--no-default-features`: no hook compiled in), which the
/// benchmarks measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    SelfTest,
    Production,
}

/// Where `cargo build --release` in kernel/ puts the ELF (the production
/// build in its own target directory, so the two do not rebuild each other).
pub fn kernel_elf_of(build: Build) -> PathBuf {
    match build {
        Build::SelfTest => kernel_dir().join("target/x86_64-unknown-none/release/shadowcall-kernel"),
        Build::Production => kernel_dir().join("target/production/x86_64-unknown-none/release/shadowcall-kernel"),
    }
}

/// The self-test kernel's ELF.
pub fn kernel_elf() -> PathBuf {
    kernel_elf_of(Build::SelfTest)
}

/// The cargo that runs us (CARGO is set by `cargo run`/`cargo test`).
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Environment that would override kernel/.cargo/config.toml.
const SCRUBBED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
];

/// `cargo build --release` in kernel/; returns the ELF path. A missing
/// Rust target is added only under [`Policy::Install`].
pub fn build_kernel(policy: Policy) -> Result<PathBuf> {
    build_kernel_of(policy, Build::SelfTest)
}

/// `build_kernel` for either build.
pub fn build_kernel_of(policy: Policy, build: Build) -> Result<PathBuf> {
    let mut args = vec!["build", "--release"];
    if build == Build::Production {
        args.extend(["--no-default-features", "--target-dir", "target/production"]);
    }
    cargo_build(&kernel_dir(), &args, &format!("the kernel ({build:?})"), policy)?;
    let elf = kernel_elf_of(build);
    if !elf.is_file() {
        return Err(Error::new(format!("the kernel build succeeded but {} does not exist", elf.display())));
    }
    // Post-link: the patch tables sorted (DESIGN §11).
    crate::elfcheck::sort_patch_tables(&elf)?;
    if build == Build::Production {
        // Every WRSS and INCSSP of the production image inside a critical region (§11).
        let bytes = std::fs::read(&elf).context(|| format!("cannot read {}", elf.display()))?;
        let outside = crate::wrsslint::writers_outside_regions(&bytes).map_err(Error::new)?;
        if !outside.is_empty() {
            return Err(Error::new(format!(
                "{}: WRSS/INCSSP outside the critical regions at {outside:#x?} (DESIGN.md §11: code outside them gets its registers back from an ordinary trap frame)",
                elf.display()
            )));
        }
    }
    Ok(elf)
}

/// `cargo <args>` in `dir` (a crate with its own .cargo/config.toml, built
/// for x86_64-unknown-none), with the environment that would override that
/// config removed. A missing Rust target is added only under [`Policy::Install`].
pub fn cargo_build(dir: &Path, args: &[&str], what: &str, policy: Policy) -> Result<()> {
    install::ensure_rust_target(dir, policy)?;
    let mut cmd = Command::new(cargo());
    cmd.args(args).current_dir(dir);
    println!("==> building {what}: {args:?} in {}", dir.display());
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    let status = cmd.status().context(|| "cannot run cargo")?;
    if !status.success() {
        return Err(Error::new(format!("the build of {what} failed ({status}); see the cargo output above")));
    }
    Ok(())
}
