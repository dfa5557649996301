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

/// Where `cargo build --release` in kernel/ puts the ELF.
pub fn kernel_elf() -> PathBuf {
    kernel_dir().join("target/x86_64-unknown-none/release/shadowcall-kernel")
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
    let dir = kernel_dir();
    install::ensure_rust_target(&dir, policy)?;
    println!("==> building the kernel (cargo build --release in {})", dir.display());
    let mut cmd = Command::new(cargo());
    cmd.args(["build", "--release"]).current_dir(&dir);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    let status = cmd.status().context(|| "cannot run cargo")?;
    if !status.success() {
        return Err(Error::new(format!("kernel build failed ({status}); see the cargo output above")));
    }
    let elf = kernel_elf();
    if !elf.is_file() {
        return Err(Error::new(format!("the kernel build succeeded but {} does not exist", elf.display())));
    }
    Ok(elf)
}
