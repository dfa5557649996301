//! GRUB rescue ISOs that boot the kernel through Multiboot (the examples through Multiboot2).

use std::path::Path;
use std::process::Command;

use crate::error::{Context, Error, Result};

/// Where the kernel lives inside the ISO.
pub const KERNEL_IN_ISO: &str = "/boot/shadowcall.elf";

/// The boot protocol GRUB loads the kernel with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loader {
    /// Multiboot v1: the reference kernel.
    Multiboot,
    /// Multiboot2: the examples (examples/).
    Multiboot2,
}

impl Loader {
    /// The grub.cfg command.
    pub fn command(self) -> &'static str {
        match self {
            Loader::Multiboot => "multiboot",
            Loader::Multiboot2 => "multiboot2",
        }
    }
}

/// A grub.cfg that boots the kernel at once with `words` as its command line.
pub fn grub_cfg(loader: Loader, words: &[String]) -> String {
    let mut line = format!("{} {KERNEL_IN_ISO}", loader.command());
    for w in words {
        line.push(' ');
        line.push_str(w);
    }
    format!("set timeout=0\nset default=0\n\nmenuentry \"shadowcall\" {{\n    {line}\n    boot\n}}\n")
}

/// Lays out `staging` (boot/grub/grub.cfg, boot/shadowcall.elf) and runs
/// `grub-mkrescue -o out staging`.
pub fn build_iso(kernel: &Path, loader: Loader, words: &[String], staging: &Path, out: &Path) -> Result<()> {
    let grub_dir = staging.join("boot/grub");
    std::fs::create_dir_all(&grub_dir).context(|| format!("cannot create {}", grub_dir.display()))?;
    std::fs::write(grub_dir.join("grub.cfg"), grub_cfg(loader, words)).context(|| "cannot write grub.cfg")?;
    let dest = staging.join(KERNEL_IN_ISO.trim_start_matches('/'));
    std::fs::copy(kernel, &dest).context(|| format!("cannot copy {} to {}", kernel.display(), dest.display()))?;
    let output = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(out)
        .arg(staging)
        .output()
        .context(|| "cannot run grub-mkrescue")?;
    if !output.status.success() || !out.is_file() {
        return Err(Error::new(format!(
            "grub-mkrescue failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_has_one_entry_with_the_words() {
        let cfg = grub_cfg(Loader::Multiboot, &["cet=auto".into(), "expect_cet=1".into()]);
        assert!(cfg.contains("set timeout=0\n"));
        assert_eq!(cfg.matches("menuentry").count(), 1);
        assert!(cfg.contains("    multiboot /boot/shadowcall.elf cet=auto expect_cet=1\n    boot\n"));
        let cfg = grub_cfg(Loader::Multiboot2, &[]);
        assert!(cfg.contains("    multiboot2 /boot/shadowcall.elf\n    boot\n"), "{cfg}");
    }
}
