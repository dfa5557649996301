//! Host tools each machine needs, and installing the missing ones.
//!
//! Only `cargo xtask` commands install ([`Policy::Install`]): as root,
//! missing Debian packages are installed with `apt-get install -y
//! --no-install-recommends --no-remove` (apt-get update once first), the
//! exact command printed before it runs; `--no-remove` makes apt-get stop
//! rather than remove an installed package to resolve a conflict. Not as
//! root, the exact `sudo` command is printed and the run fails.
//!
//! A library user such as `cargo test --workspace` (the emulator matrix)
//! never installs ([`Policy::ReportOnly`]): a missing tool is an error
//! naming it and the command that installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::error::{Context, Error, Result};
use crate::machines::Machine;

/// Whether missing host tools may be installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Install them (`cargo xtask` commands).
    Install,
    /// Fail with what is missing and how to install it (`cargo test`).
    ReportOnly,
}

/// apt-get's options for every install: no recommended extras, and never
/// remove an installed package.
pub const APT_INSTALL_OPTIONS: [&str; 4] = ["install", "-y", "--no-install-recommends", "--no-remove"];

/// The apt-get arguments that install `pkgs`.
pub fn apt_install_args<'a>(pkgs: &[&'a str]) -> Vec<&'a str> {
    APT_INSTALL_OPTIONS.iter().copied().chain(pkgs.iter().copied()).collect()
}

/// Something that must exist on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// An executable found on PATH.
    Exe(&'static str),
    /// A file or directory at a fixed path.
    Path(&'static str),
    /// A file whose name starts with `prefix` in one of `dirs`.
    FileIn { dirs: &'static [&'static str], prefix: &'static str },
}

/// A need and the Debian package that fulfils it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    pub need: Need,
    pub package: &'static str,
}

const fn req(need: Need, package: &'static str) -> Requirement {
    Requirement { need, package }
}

/// What building a GRUB rescue ISO needs.
pub const GRUB_ISO: &[Requirement] = &[
    req(Need::Exe("grub-mkrescue"), "grub-common"),
    req(Need::Path("/usr/lib/grub/i386-pc"), "grub-pc-bin"),
    req(Need::Exe("xorriso"), "xorriso"),
    req(Need::Exe("mformat"), "mtools"),
];

/// Where Debian-style systems put Bochs' plugins.
pub const BOCHS_PLUGIN_DIRS: &[&str] =
    &["/usr/lib/x86_64-linux-gnu/bochs/plugins", "/usr/lib/bochs/plugins", "/usr/lib64/bochs/plugins"];

const BOCHS: &[Requirement] = &[
    req(Need::Exe("bochs"), "bochs"),
    req(Need::Path("/usr/share/bochs/BIOS-bochs-latest"), "bochsbios"),
    req(Need::Path("/usr/share/vgabios/vgabios.bin"), "vgabios"),
    req(Need::FileIn { dirs: BOCHS_PLUGIN_DIRS, prefix: "libbx_sdl2" }, "bochs-sdl"),
];

const QEMU: &[Requirement] = &[req(Need::Exe("qemu-system-x86_64"), "qemu-system-x86")];

/// Everything `machine` needs.
pub fn requirements(machine: Machine) -> Vec<Requirement> {
    if machine.is_bochs() {
        BOCHS.iter().chain(GRUB_ISO).copied().collect()
    } else {
        QEMU.to_vec()
    }
}

/// Looks `name` up on PATH.
pub fn find_exe(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

impl Need {
    pub fn is_met(&self) -> bool {
        match *self {
            Need::Exe(name) => find_exe(name).is_some(),
            Need::Path(p) => Path::new(p).exists(),
            Need::FileIn { dirs, prefix } => dirs.iter().any(|d| dir_has_prefix(Path::new(d), prefix)),
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Need::Exe(name) => format!("executable `{name}` on PATH"),
            Need::Path(p) => p.to_string(),
            Need::FileIn { dirs, prefix } => format!("{prefix}* in one of {}", dirs.join(", ")),
        }
    }
}

fn dir_has_prefix(dir: &Path, prefix: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with(prefix))
}

/// The unmet requirements among `reqs`, without duplicates.
pub fn missing(reqs: &[Requirement]) -> Vec<Requirement> {
    let mut out: Vec<Requirement> = Vec::new();
    for r in reqs {
        if !r.need.is_met() && !out.contains(r) {
            out.push(*r);
        }
    }
    out
}

fn packages_of(reqs: &[Requirement]) -> Vec<&'static str> {
    let mut pkgs: Vec<&'static str> = reqs.iter().map(|r| r.package).collect();
    pkgs.sort_unstable();
    pkgs.dedup();
    pkgs
}

/// Whether we run as root, asked from `id -u` (no libc binding needed).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Serialises installs (tests boot machines in parallel) and remembers
/// whether `apt-get update` already ran in this process.
static APT: Mutex<bool> = Mutex::new(false);

fn apt_get(args: &[&str]) -> Result<()> {
    println!("+ DEBIAN_FRONTEND=noninteractive apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context(|| "cannot run apt-get")?;
    if !status.success() {
        return Err(Error::new(format!("`apt-get {}` failed ({status})", args.join(" "))));
    }
    Ok(())
}

/// Makes sure everything in `reqs` exists, installing packages as root
/// when `policy` allows it.
pub fn ensure(reqs: &[Requirement], policy: Policy) -> Result<()> {
    let mut updated = APT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let todo = missing(reqs);
    if todo.is_empty() {
        return Ok(());
    }
    let pkgs = packages_of(&todo);
    let what: Vec<String> = todo.iter().map(|r| r.need.describe()).collect();
    let command = format!("apt-get {}", apt_install_args(&pkgs).join(" "));
    if policy == Policy::ReportOnly {
        return Err(Error::new(format!(
            "missing host tools ({}). This command does not install anything; install them with \
             `cargo xtask test` (it installs what is missing, then runs all tests) or with:\n    sudo {command}",
            what.join("; ")
        )));
    }
    println!("missing host tools: {}", what.join("; "));
    if !is_root() {
        return Err(Error::new(format!(
            "missing host tools ({}); not root, so not installing. Install them with:\n    sudo {command}",
            what.join("; ")
        )));
    }
    if !*updated {
        apt_get(&["update"])?;
        *updated = true;
    }
    apt_get(&apt_install_args(&pkgs))?;
    let still: Vec<String> = missing(reqs).iter().map(|r| r.need.describe()).collect();
    if !still.is_empty() {
        return Err(Error::new(format!("still missing after installing {}: {}", pkgs.join(" "), still.join("; "))));
    }
    Ok(())
}

/// Everything the given machines need.
pub fn ensure_machines(machines: &[Machine], policy: Policy) -> Result<()> {
    let reqs: Vec<Requirement> = machines.iter().flat_map(|m| requirements(*m)).collect();
    ensure(&reqs, policy)
}

pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// Adds the kernel's Rust target if the toolchain used in `dir` lacks it
/// (rustup normally does it from rust-toolchain.toml already).
pub fn ensure_rust_target(dir: &Path, policy: Policy) -> Result<()> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .context(|| "cannot run `rustc --print sysroot`")?;
    if !out.status.success() {
        return Err(Error::new(format!("`rustc --print sysroot` failed ({})", out.status)));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if sysroot.join("lib/rustlib").join(KERNEL_TARGET).is_dir() {
        return Ok(());
    }
    if policy == Policy::ReportOnly {
        return Err(Error::new(format!(
            "the Rust target {KERNEL_TARGET} is missing; install it with `rustup target add {KERNEL_TARGET}` \
             (or run `cargo xtask test`, which does)"
        )));
    }
    println!("+ rustup target add {KERNEL_TARGET}");
    let status = Command::new("rustup")
        .args(["target", "add", KERNEL_TARGET])
        .current_dir(dir)
        .status()
        .context(|| "cannot run rustup")?;
    if !status.success() {
        return Err(Error::new(format!("`rustup target add {KERNEL_TARGET}` failed ({status})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_requirements() {
        let bochs = requirements(Machine::Bochs);
        let pkgs = packages_of(&bochs);
        for p in ["bochs", "bochsbios", "vgabios", "bochs-sdl", "grub-common", "grub-pc-bin", "xorriso", "mtools"] {
            assert!(pkgs.contains(&p), "{p} missing from {pkgs:?}");
        }
        assert_eq!(packages_of(&requirements(Machine::QemuKvm)), ["qemu-system-x86"]);
    }

    #[test]
    fn installs_never_remove() {
        let args = apt_install_args(&["bochs", "xorriso"]);
        assert_eq!(args, ["install", "-y", "--no-install-recommends", "--no-remove", "bochs", "xorriso"]);
    }

    #[test]
    fn report_only_names_the_command() {
        let r = req(Need::Exe("definitely-not-a-tool-xyz"), "some-package");
        let e = ensure(&[r], Policy::ReportOnly).unwrap_err().to_string();
        assert!(e.contains("definitely-not-a-tool-xyz"), "{e}");
        assert!(e.contains("sudo apt-get install -y --no-install-recommends --no-remove some-package"), "{e}");
        assert!(e.contains("cargo xtask test"), "{e}");
        assert!(ensure(&[req(Need::Exe("sh"), "dash")], Policy::ReportOnly).is_ok());
    }

    #[test]
    fn needs_are_checked() {
        assert!(Need::Exe("sh").is_met());
        assert!(!Need::Exe("definitely-not-a-tool-xyz").is_met());
        assert!(Need::Path("/").is_met());
        assert!(!Need::Path("/nonexistent/xyz").is_met());
        assert!(!Need::FileIn { dirs: &["/nonexistent"], prefix: "x" }.is_met());
        let r = req(Need::Exe("definitely-not-a-tool-xyz"), "p");
        assert_eq!(missing(&[r, r]), [r]);
    }
}
