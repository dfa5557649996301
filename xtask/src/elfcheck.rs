//! Checks that the kernel ELF can be loaded through the Multiboot v1 "a.out
//! kludge" (header flag bit 16), which GRUB and `qemu -kernel` use: the loader
//! copies ONE file range to ONE address and zeroes a bss after it. So every
//! PT_LOAD must have the same `p_vaddr - p_offset`, and no segment with a
//! zero-filled tail (memsz > filesz) may be followed by file-backed data.

use std::path::Path;

use crate::error::{Context, Error, Result};

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
/// Largest file gap between two loaded segments that is only alignment padding.
const MAX_PADDING: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Reads the PT_LOAD program headers of a little-endian x86-64 ELF64.
pub fn load_segments(elf: &[u8]) -> std::result::Result<Vec<LoadSegment>, String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf.get(5) != Some(&1) {
        return Err("not a little-endian 64-bit ELF (ELFCLASS64, ELFDATA2LSB)".into());
    }
    let short = || "truncated ELF header".to_string();
    let machine = u16_at(elf, 0x12).ok_or_else(short)?;
    if machine != EM_X86_64 {
        return Err(format!(
            "ELF machine is {machine}, not x86-64 ({EM_X86_64})"
        ));
    }
    let phoff = u64_at(elf, 0x20).ok_or_else(short)? as usize;
    let phentsize = u16_at(elf, 0x36).ok_or_else(short)? as usize;
    let phnum = u16_at(elf, 0x38).ok_or_else(short)? as usize;
    if phentsize < 56 {
        return Err(format!(
            "program header entry size {phentsize} is smaller than 56"
        ));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let bad = || format!("program header {i} lies outside the file");
        if u32_at(elf, at).ok_or_else(bad)? != PT_LOAD {
            continue;
        }
        segments.push(LoadSegment {
            offset: u64_at(elf, at + 8).ok_or_else(bad)?,
            vaddr: u64_at(elf, at + 16).ok_or_else(bad)?,
            filesz: u64_at(elf, at + 32).ok_or_else(bad)?,
            memsz: u64_at(elf, at + 40).ok_or_else(bad)?,
        });
    }
    Ok(segments)
}

/// The a.out-kludge rules described in the module comment.
pub fn check_segments(segments: &[LoadSegment]) -> std::result::Result<(), String> {
    let Some(first) = segments.first() else {
        return Err("the ELF has no PT_LOAD segment".into());
    };
    let delta = first.vaddr.wrapping_sub(first.offset);
    for (i, s) in segments.iter().enumerate() {
        let d = s.vaddr.wrapping_sub(s.offset);
        if d != delta {
            return Err(format!(
                "PT_LOAD {i} (vaddr {:#x}, offset {:#x}) has vaddr-offset {d:#x}, but PT_LOAD 0 has {delta:#x}: \
                 a Multiboot a.out-kludge loader copies one file range, so all segments need the same delta \
                 (check the linker script)",
                s.vaddr, s.offset
            ));
        }
    }
    let mut sorted: Vec<&LoadSegment> = segments.iter().collect();
    sorted.sort_by_key(|s| s.vaddr);
    let file_backed: Vec<&&LoadSegment> = sorted.iter().filter(|s| s.filesz > 0).collect();
    for pair in file_backed.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let a_end = a.offset + a.filesz;
        if b.offset < a_end {
            return Err(format!(
                "PT_LOADs at vaddr {:#x} and {:#x} overlap in the file",
                a.vaddr, b.vaddr
            ));
        }
        if b.offset - a_end >= MAX_PADDING {
            return Err(format!(
                "file-backed PT_LOADs at vaddr {:#x} and {:#x} are not contiguous: a gap of {:#x} bytes \
                 (the Multiboot loader copies one file range)",
                a.vaddr,
                b.vaddr,
                b.offset - a_end
            ));
        }
    }
    let Some(last_file) = file_backed.last() else {
        return Ok(());
    };
    let bss_before_data = sorted
        .iter()
        .find(|s| s.vaddr < last_file.vaddr && s.memsz > s.filesz);
    if let Some(s) = bss_before_data {
        return Err(format!(
            "PT_LOAD at vaddr {:#x} has a zero-filled part (memsz {:#x} > filesz {:#x}) but file-backed \
             data follows it at {:#x}: the Multiboot loader would fill it with file bytes; put .bss last",
            s.vaddr, s.memsz, s.filesz, last_file.vaddr
        ));
    }
    Ok(())
}

/// Finds a Multiboot v1 header (in the first 8 KiB, 4-aligned, valid
/// checksum) and checks it has the address fields (flag bit 16).
pub fn check_multiboot_header(elf: &[u8]) -> std::result::Result<(), String> {
    let window = &elf[..elf.len().min(8192)];
    for at in (0..window.len().saturating_sub(11)).step_by(4) {
        let (Some(magic), Some(flags), Some(sum)) = (
            u32_at(window, at),
            u32_at(window, at + 4),
            u32_at(window, at + 8),
        ) else {
            break;
        };
        if magic == 0x1BAD_B002 && magic.wrapping_add(flags).wrapping_add(sum) == 0 {
            if flags & (1 << 16) == 0 {
                return Err(format!(
                    "the Multiboot header at file offset {at:#x} lacks flag bit 16 (address fields), \
                     which an ELF64 kernel needs"
                ));
            }
            return Ok(());
        }
    }
    Err("no Multiboot v1 header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB".into())
}

/// All checks on the kernel file at `path`.
pub fn check_kernel_elf(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).context(|| format!("cannot read kernel {}", path.display()))?;
    let fail = |e: String| Error::new(format!("kernel {} cannot be booted: {e}", path.display()));
    let segments = load_segments(&bytes).map_err(fail)?;
    check_segments(&segments).map_err(fail)?;
    check_multiboot_header(&bytes).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, vaddr: u64, filesz: u64, memsz: u64) -> LoadSegment {
        LoadSegment {
            offset,
            vaddr,
            filesz,
            memsz,
        }
    }

    /// A minimal ELF64 with the given PT_LOADs and one PT_NOTE.
    fn elf(segments: &[LoadSegment]) -> Vec<u8> {
        let phnum = segments.len() + 1;
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(phnum as u16).to_le_bytes());
        let mut note = vec![0u8; 56];
        note[..4].copy_from_slice(&4u32.to_le_bytes());
        b.extend(note);
        for s in segments {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            for (at, v) in [
                (8, s.offset),
                (16, s.vaddr),
                (24, s.vaddr),
                (32, s.filesz),
                (40, s.memsz),
            ] {
                ph[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            b.extend(ph);
        }
        b
    }

    #[test]
    fn parses_program_headers() {
        let segs = [
            seg(0x1000, 0x100000, 0x2000, 0x2000),
            seg(0x3000, 0x102000, 0x100, 0x5000),
        ];
        assert_eq!(load_segments(&elf(&segs)).unwrap(), segs);
        assert!(check_segments(&segs).is_ok());
    }

    #[test]
    fn rejects_non_elf64() {
        assert!(load_segments(b"MZ\0\0").unwrap_err().contains("not an ELF"));
        let mut b = elf(&[]);
        b[4] = 1;
        assert!(load_segments(&b).unwrap_err().contains("64-bit"));
        let mut b = elf(&[]);
        b[0x12] = 3;
        assert!(load_segments(&b).unwrap_err().contains("not x86-64"));
        let mut b = elf(&[seg(0, 0, 1, 1)]);
        b.truncate(64 + 56 + 20);
        assert!(load_segments(&b).unwrap_err().contains("outside the file"));
        assert!(check_segments(&[]).unwrap_err().contains("no PT_LOAD"));
    }

    #[test]
    fn rejects_different_deltas() {
        let segs = [
            seg(0x1000, 0x100000, 0x1000, 0x1000),
            seg(0x2000, 0x200000, 0x1000, 0x1000),
        ];
        assert!(check_segments(&segs).unwrap_err().contains("same delta"));
    }

    #[test]
    fn rejects_file_gap_and_bss_in_the_middle() {
        let gap = [
            seg(0x1000, 0x100000, 0x1000, 0x1000),
            seg(0x9000, 0x108000, 0x1000, 0x1000),
        ];
        assert!(check_segments(&gap).unwrap_err().contains("not contiguous"));
        let bss_first = [
            seg(0x1000, 0x100000, 0x800, 0x1000),
            seg(0x2000, 0x101000, 0x1000, 0x1000),
        ];
        assert!(check_segments(&bss_first)
            .unwrap_err()
            .contains("zero-filled"));
        let pure_bss_first = [
            seg(0x1000, 0x100000, 0, 0x1000),
            seg(0x2000, 0x101000, 0x10, 0x10),
        ];
        assert!(check_segments(&pure_bss_first)
            .unwrap_err()
            .contains("zero-filled"));
    }

    #[test]
    fn accepts_padding_and_trailing_bss() {
        let segs = [
            seg(0x1000, 0x100000, 0x123, 0x123),
            seg(0x2000, 0x101000, 0x1000, 0x1000),
            seg(0x3000, 0x102000, 0x10, 0x8000),
            seg(0x3010, 0x102010 + 0x8000 - 0x10, 0, 0x1000),
        ];
        // The last one has a different delta on purpose: must be rejected.
        assert!(check_segments(&segs).is_err());
        assert!(check_segments(&segs[..3]).is_ok());
    }

    fn multiboot(flags: u32) -> Vec<u8> {
        let mut b = vec![0u8; 256];
        let magic = 0x1BAD_B002u32;
        b[64..68].copy_from_slice(&magic.to_le_bytes());
        b[68..72].copy_from_slice(&flags.to_le_bytes());
        b[72..76].copy_from_slice(&0u32.wrapping_sub(magic.wrapping_add(flags)).to_le_bytes());
        b
    }

    #[test]
    fn multiboot_header() {
        assert!(check_multiboot_header(&multiboot(0x10000)).is_ok());
        assert!(check_multiboot_header(&multiboot(0x3))
            .unwrap_err()
            .contains("bit 16"));
        assert!(check_multiboot_header(&[0u8; 100])
            .unwrap_err()
            .contains("no Multiboot"));
        let mut b = multiboot(0x10000);
        b[72] ^= 1;
        assert!(check_multiboot_header(&b).is_err());
    }
}
