//! The example kernels under examples/ (`cargo xtask run --example NAME`):
//! other kernels that embed the shadowcall crate, each its own cargo
//! workspace built for x86_64-unknown-none, booted by GRUB through
//! Multiboot2 from an ISO on every machine (QEMU's `-kernel` speaks only
//! Multiboot v1). They read no command line.

use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};
use crate::install::Policy;
use crate::kernel;

/// One example kernel: examples/<name>/, whose binary is `bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Example {
    pub name: &'static str,
    pub bin: &'static str,
}

/// examples/minimal: Multiboot2, mapped high, CET where the CPU has it.
pub const MINIMAL: Example = Example { name: "minimal", bin: "minimal" };
/// Every example, by the name `--example` takes.
pub const EXAMPLES: [Example; 1] = [MINIMAL];

/// The Multiboot2 header: its magic, where it may be (the first 32 KiB,
/// 8-byte aligned), and the architecture field of 32-bit protected-mode i386.
const MB2_MAGIC: u32 = 0xE852_50D6;
const MB2_SEARCH: usize = 32 * 1024;
const MB2_ALIGN: usize = 8;
const MB2_ARCH_I386: u32 = 0;

impl Example {
    /// The example called `name`; the error lists the available ones.
    pub fn from_name(name: &str) -> std::result::Result<Example, String> {
        EXAMPLES
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| format!("unknown example `{name}`; the examples are: {}", names().join(", ")))
    }

    pub fn dir(self) -> PathBuf {
        kernel::repo_root().join("examples").join(self.name)
    }

    pub fn elf(self) -> PathBuf {
        self.dir().join("target/x86_64-unknown-none/release").join(self.bin)
    }

    /// `cargo build --release` in examples/<name>/; returns the ELF path.
    pub fn build(self, policy: Policy) -> Result<PathBuf> {
        kernel::cargo_build(&self.dir(), &["build", "--release"], &format!("example `{}`", self.name), policy)?;
        let elf = self.elf();
        if !elf.is_file() {
            return Err(Error::new(format!("the example build succeeded but {} does not exist", elf.display())));
        }
        Ok(elf)
    }
}

/// The names of all examples.
pub fn names() -> Vec<&'static str> {
    EXAMPLES.iter().map(|e| e.name).collect()
}

/// Finds a Multiboot2 header (in the first 32 KiB, 8-aligned, i386, valid checksum).
pub fn check_multiboot2_header(elf: &[u8]) -> std::result::Result<(), String> {
    let window = &elf[..elf.len().min(MB2_SEARCH)];
    let word = |at: usize| window.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    for at in (0..window.len()).step_by(MB2_ALIGN) {
        if word(at) != Some(MB2_MAGIC) {
            continue;
        }
        let (Some(arch), Some(len), Some(sum)) = (word(at + 4), word(at + 8), word(at + 12)) else { break };
        if MB2_MAGIC.wrapping_add(arch).wrapping_add(len).wrapping_add(sum) != 0 {
            return Err(format!("the Multiboot2 header at file offset {at:#x} has a bad checksum"));
        }
        if arch != MB2_ARCH_I386 {
            return Err(format!("the Multiboot2 header at file offset {at:#x} has architecture {arch}, not i386 (0)"));
        }
        return Ok(());
    }
    Err("no Multiboot2 header (magic 0xE85250D6, 8-byte aligned) in the first 32 KiB".into())
}

/// The check before booting an example ELF.
pub fn check_example_elf(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).context(|| format!("cannot read example {}", path.display()))?;
    check_multiboot2_header(&bytes).map_err(|e| Error::new(format!("example {} cannot be booted: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(arch: u32, len: u32, sum_delta: u32) -> Vec<u8> {
        let sum = 0u32.wrapping_sub(MB2_MAGIC.wrapping_add(arch).wrapping_add(len)).wrapping_add(sum_delta);
        [MB2_MAGIC, arch, len, sum].iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn names_match_the_directories() {
        let mut on_disk: Vec<String> = std::fs::read_dir(kernel::repo_root().join("examples"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().join("Cargo.toml").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut listed = names();
        listed.sort();
        assert_eq!(on_disk, listed);
        assert_eq!(Example::from_name("minimal"), Ok(MINIMAL));
        let e = Example::from_name("tiny").unwrap_err();
        assert!(e.contains("`tiny`") && e.contains("minimal"), "{e}");
    }

    #[test]
    fn multiboot2_header_found_and_checked() {
        let mut elf = vec![0u8; 0x1000];
        elf.extend(header(0, 24, 0));
        assert_eq!(check_multiboot2_header(&elf), Ok(()));
        let mut bad = vec![0u8; 0x1000];
        bad.extend(header(0, 24, 1));
        assert!(check_multiboot2_header(&bad).unwrap_err().contains("checksum"));
        let mut mips = vec![0u8; 0x1000];
        mips.extend(header(4, 24, 0));
        assert!(check_multiboot2_header(&mips).unwrap_err().contains("architecture 4"));
        let mut unaligned = vec![0u8; 0x1004];
        unaligned.extend(header(0, 24, 0));
        assert!(check_multiboot2_header(&unaligned).unwrap_err().contains("no Multiboot2 header"));
        let mut late = vec![0u8; MB2_SEARCH];
        late.extend(header(0, 24, 0));
        assert!(check_multiboot2_header(&late).is_err());
    }
}
