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
        return Err(format!("ELF machine is {machine}, not x86-64 ({EM_X86_64})"));
    }
    let phoff = u64_at(elf, 0x20).ok_or_else(short)? as usize;
    let phentsize = u16_at(elf, 0x36).ok_or_else(short)? as usize;
    let phnum = u16_at(elf, 0x38).ok_or_else(short)? as usize;
    if phentsize < 56 {
        return Err(format!("program header entry size {phentsize} is smaller than 56"));
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

const SHT_SYMTAB: u32 = 2;

/// One section header, with its name resolved through `.shstrtab`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub kind: u32,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    pub link: u32,
}

fn cstr_at(b: &[u8], at: usize) -> Option<&str> {
    let tail = b.get(at..)?;
    let len = tail.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&tail[..len]).ok()
}

/// The section headers of a little-endian ELF64 (checked as in [`load_segments`]).
pub fn sections(elf: &[u8]) -> std::result::Result<Vec<Section>, String> {
    load_segments(elf)?;
    let short = || "truncated ELF header".to_string();
    let shoff = u64_at(elf, 0x28).ok_or_else(short)? as usize;
    let shentsize = u16_at(elf, 0x3a).ok_or_else(short)? as usize;
    let shnum = u16_at(elf, 0x3c).ok_or_else(short)? as usize;
    let shstrndx = u16_at(elf, 0x3e).ok_or_else(short)? as usize;
    if shnum == 0 {
        return Ok(Vec::new());
    }
    if shentsize < 64 {
        return Err(format!("section header entry size {shentsize} is smaller than 64"));
    }
    let mut raw = Vec::new();
    for i in 0..shnum {
        let at = shoff + i * shentsize;
        let bad = || format!("section header {i} lies outside the file");
        raw.push((
            u32_at(elf, at).ok_or_else(bad)?,
            Section {
                name: String::new(),
                kind: u32_at(elf, at + 4).ok_or_else(bad)?,
                addr: u64_at(elf, at + 16).ok_or_else(bad)?,
                offset: u64_at(elf, at + 24).ok_or_else(bad)?,
                size: u64_at(elf, at + 32).ok_or_else(bad)?,
                link: u32_at(elf, at + 40).ok_or_else(bad)?,
            },
        ));
    }
    let strtab = raw
        .get(shstrndx)
        .map(|(_, s)| s.offset as usize)
        .ok_or_else(|| format!("section name table index {shstrndx} out of range"))?;
    raw.into_iter()
        .map(|(name_off, mut s)| {
            s.name = cstr_at(elf, strtab + name_off as usize)
                .ok_or_else(|| "a section name lies outside the file".to_string())?
                .to_string();
            Ok(s)
        })
        .collect()
}

/// The bytes of `section` in the file (empty for NOBITS).
pub fn section_bytes<'a>(elf: &'a [u8], section: &Section) -> std::result::Result<&'a [u8], String> {
    if section.kind == 8 {
        return Ok(&[]);
    }
    let (start, size) = (section.offset as usize, section.size as usize);
    elf.get(start..start.saturating_add(size)).ok_or_else(|| format!("section {} lies outside the file", section.name))
}

/// The value of the first symbol called `name` in `.symtab`, if any.
pub fn symbol(elf: &[u8], name: &str) -> std::result::Result<Option<u64>, String> {
    let secs = sections(elf)?;
    for symtab in secs.iter().filter(|s| s.kind == SHT_SYMTAB) {
        let strtab =
            secs.get(symtab.link as usize).ok_or_else(|| "the symbol table links to no string table".to_string())?;
        let table = section_bytes(elf, symtab)?;
        for sym in table.chunks_exact(24) {
            let name_off = u32_at(sym, 0).unwrap_or(0) as usize;
            if name_off == 0 {
                continue;
            }
            if cstr_at(elf, strtab.offset as usize + name_off) == Some(name) {
                return Ok(u64_at(sym, 8));
            }
        }
    }
    Ok(None)
}

/// `len` bytes at virtual address `vaddr`, from the file-backed part of a PT_LOAD.
pub fn bytes_at_vaddr(elf: &[u8], vaddr: u64, len: u64) -> Option<&[u8]> {
    let seg = load_segments(elf)
        .ok()?
        .into_iter()
        .find(|s| vaddr >= s.vaddr && vaddr.checked_add(len).is_some_and(|e| e <= s.vaddr + s.filesz))?;
    let start = (seg.offset + (vaddr - seg.vaddr)) as usize;
    elf.get(start..start + len as usize)
}

/// The kernel's registered patch sites: the little-endian u64 addresses of
/// the `.shadowcall_sites` section, or, when the linker script merged that
/// input section into `.rodata`, of the table between the symbols
/// `__sites_start` and `__sites_end`.
pub fn patch_sites(elf: &[u8]) -> std::result::Result<Vec<u64>, String> {
    let secs = sections(elf)?;
    let table = if let Some(s) = secs.iter().find(|s| s.name == ".shadowcall_sites") {
        section_bytes(elf, s)?
    } else {
        match (symbol(elf, "__sites_start")?, symbol(elf, "__sites_end")?) {
            (Some(start), Some(end)) if end >= start => bytes_at_vaddr(elf, start, end - start)
                .ok_or_else(|| format!("the site table {start:#x}..{end:#x} is not file-backed in a PT_LOAD"))?,
            _ => return Err("no .shadowcall_sites section and no __sites_start/__sites_end symbols".into()),
        }
    };
    if table.len() % 8 != 0 {
        return Err(format!("the site table is {} bytes, not a multiple of 8", table.len()));
    }
    Ok(table.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
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
            return Err(format!("PT_LOADs at vaddr {:#x} and {:#x} overlap in the file", a.vaddr, b.vaddr));
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
    let bss_before_data = sorted.iter().find(|s| s.vaddr < last_file.vaddr && s.memsz > s.filesz);
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
        let (Some(magic), Some(flags), Some(sum)) =
            (u32_at(window, at), u32_at(window, at + 4), u32_at(window, at + 8))
        else {
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

/// Tiny synthetic kernels for unit tests.
#[cfg(test)]
pub(crate) mod synth {
    /// An ELF64 with one PT_LOAD holding `text` at `base`, directly followed
    /// by the site table (`sites` as LE u64s). With `as_section` the table is
    /// a `.shadowcall_sites` section; otherwise it is only bracketed by the
    /// symbols `__sites_start`/`__sites_end` in `.symtab` (as in the real
    /// kernel, whose linker script merges it into `.rodata`).
    pub fn elf(base: u64, text: &[u8], sites: &[u64], as_section: bool) -> Vec<u8> {
        let put16 = |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let put64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        let mut b = vec![0u8; 0x200];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        put16(&mut b, 0x12, super::EM_X86_64);
        put64(&mut b, 0x20, 64);
        put16(&mut b, 0x36, 56);
        put16(&mut b, 0x38, 1);
        let load_off = b.len();
        b.extend(text);
        let table_vaddr = base + text.len() as u64;
        let table_off = b.len();
        b.extend(sites.iter().flat_map(|s| s.to_le_bytes()));
        let filesz = (b.len() - load_off) as u64;
        put32(&mut b, 64, super::PT_LOAD);
        put64(&mut b, 64 + 8, load_off as u64);
        put64(&mut b, 64 + 16, base);
        put64(&mut b, 64 + 24, base);
        put64(&mut b, 64 + 32, filesz);
        put64(&mut b, 64 + 40, filesz);
        // String tables and the symbol table.
        let shstr = b"\0.text\0.shadowcall_sites\0.symtab\0.strtab\0.shstrtab\0";
        let name = |n: &str| {
            let pat = format!("\0{n}\0");
            shstr.windows(pat.len()).position(|w| w == pat.as_bytes()).unwrap() as u32 + 1
        };
        let shstr_off = b.len();
        b.extend(shstr);
        let str_off = b.len();
        b.extend(b"\0__sites_start\0__sites_end\0");
        let sym_off = b.len();
        b.extend([0u8; 24]);
        let table_len = (sites.len() * 8) as u64;
        for (name_off, value) in [(1u32, table_vaddr), (15, table_vaddr + table_len)] {
            let mut sym = [0u8; 24];
            sym[..4].copy_from_slice(&name_off.to_le_bytes());
            sym[6..8].copy_from_slice(&1u16.to_le_bytes());
            sym[8..16].copy_from_slice(&value.to_le_bytes());
            b.extend(sym);
        }
        let sym_len = (b.len() - sym_off) as u64;
        // (name, type, addr, offset, size, link)
        let mut headers = vec![(0, 0, 0, 0, 0, 0), (name(".text"), 1, base, load_off as u64, text.len() as u64, 0)];
        if as_section {
            headers.push((name(".shadowcall_sites"), 1, table_vaddr, table_off as u64, table_len, 0));
        }
        let n = headers.len() as u32;
        if !as_section {
            headers.push((name(".symtab"), 2, 0, sym_off as u64, sym_len, n + 1));
        }
        headers.push((name(".strtab"), 3, 0, str_off as u64, 27, 0));
        headers.push((name(".shstrtab"), 3, 0, shstr_off as u64, shstr.len() as u64, 0));
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        let shoff = b.len();
        for (nm, kind, addr, off, size, link) in &headers {
            let at = b.len();
            b.extend([0u8; 64]);
            put32(&mut b, at, *nm);
            put32(&mut b, at + 4, *kind);
            put64(&mut b, at + 16, *addr);
            put64(&mut b, at + 24, *off);
            put64(&mut b, at + 32, *size);
            put32(&mut b, at + 40, *link);
        }
        put64(&mut b, 0x28, shoff as u64);
        put16(&mut b, 0x3a, 64);
        put16(&mut b, 0x3c, headers.len() as u16);
        put16(&mut b, 0x3e, headers.len() as u16 - 1);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, vaddr: u64, filesz: u64, memsz: u64) -> LoadSegment {
        LoadSegment { offset, vaddr, filesz, memsz }
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
            for (at, v) in [(8, s.offset), (16, s.vaddr), (24, s.vaddr), (32, s.filesz), (40, s.memsz)] {
                ph[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            b.extend(ph);
        }
        b
    }

    #[test]
    fn parses_program_headers() {
        let segs = [seg(0x1000, 0x100000, 0x2000, 0x2000), seg(0x3000, 0x102000, 0x100, 0x5000)];
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
        let segs = [seg(0x1000, 0x100000, 0x1000, 0x1000), seg(0x2000, 0x200000, 0x1000, 0x1000)];
        assert!(check_segments(&segs).unwrap_err().contains("same delta"));
    }

    #[test]
    fn rejects_file_gap_and_bss_in_the_middle() {
        let gap = [seg(0x1000, 0x100000, 0x1000, 0x1000), seg(0x9000, 0x108000, 0x1000, 0x1000)];
        assert!(check_segments(&gap).unwrap_err().contains("not contiguous"));
        let bss_first = [seg(0x1000, 0x100000, 0x800, 0x1000), seg(0x2000, 0x101000, 0x1000, 0x1000)];
        assert!(check_segments(&bss_first).unwrap_err().contains("zero-filled"));
        let pure_bss_first = [seg(0x1000, 0x100000, 0, 0x1000), seg(0x2000, 0x101000, 0x10, 0x10)];
        assert!(check_segments(&pure_bss_first).unwrap_err().contains("zero-filled"));
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
        assert!(check_multiboot_header(&multiboot(0x3)).unwrap_err().contains("bit 16"));
        assert!(check_multiboot_header(&[0u8; 100]).unwrap_err().contains("no Multiboot"));
        let mut b = multiboot(0x10000);
        b[72] ^= 1;
        assert!(check_multiboot_header(&b).is_err());
    }

    #[test]
    fn sections_symbols_and_sites() {
        let text = [0x90u8, 0xcc, 0xe8, 1, 2, 3, 4, 0xc3];
        let sites = [0x100002u64, 0x100000];
        for as_section in [true, false] {
            let elf = synth::elf(0x100000, &text, &sites, as_section);
            let secs = sections(&elf).unwrap();
            assert_eq!(secs[1].name, ".text");
            assert_eq!(secs.iter().any(|s| s.name == ".shadowcall_sites"), as_section);
            assert_eq!(patch_sites(&elf).unwrap(), sites, "as_section={as_section}");
            assert_eq!(bytes_at_vaddr(&elf, 0x100001, 2), Some(&[0xcc, 0xe8][..]));
            assert_eq!(bytes_at_vaddr(&elf, 0x0fffff, 1), None);
            assert_eq!(bytes_at_vaddr(&elf, 0x100000 + 8 + 16, 1), None);
        }
        let elf = synth::elf(0x100000, &text, &sites, false);
        assert_eq!(symbol(&elf, "__sites_start").unwrap(), Some(0x100008));
        assert_eq!(symbol(&elf, "__sites_end").unwrap(), Some(0x100018));
        assert_eq!(symbol(&elf, "nope").unwrap(), None);
        // No table at all: an error that says what was looked for.
        let mut bare = synth::elf(0x100000, &text, &[], true);
        let secs = sections(&bare).unwrap();
        let shoff = u64_at(&bare, 0x28).unwrap() as usize;
        let i = secs.iter().position(|s| s.name == ".shadowcall_sites").unwrap();
        bare[shoff + i * 64 + 4] = 0; // make it unnamed-type, keep name
        bare[shoff + i * 64] = 0;
        assert!(patch_sites(&bare).unwrap_err().contains("__sites_start"));
    }
}
