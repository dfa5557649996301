//! Checks that the kernel ELF can be loaded through the Multiboot v1 "a.out
//! kludge" (header flag bit 16), which GRUB and `qemu -kernel` use: the loader
//! copies ONE file range to ONE address and zeroes a bss after it. So every
//! PT_LOAD must have the same `p_vaddr - p_offset`, and no segment with a
//! zero-filled tail (memsz > filesz) may be followed by file-backed data.

//!
//! The ELF file is read with the `object` crate.

use std::path::Path;

use object::elf::{FileHeader64, EM_X86_64, PT_LOAD, SHT_SYMTAB};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym};
use object::LittleEndian;

use crate::error::{Context, Error, Result};

/// Largest file gap between two loaded segments that is only alignment padding.
const MAX_PADDING: u64 = 4096;
/// The ELF magic at the start of the file.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// The section holding the kernel's patch-site table (when not merged into .rodata).
const SITES_SECTION: &[u8] = b".shadowcall_sites";
/// The bytes of one site address in the table.
const SITE_BYTES: usize = 8;
/// The Multiboot v1 header: magic, where it may be, and the flag that
/// says the address fields are valid (needed for an ELF64 kernel).
const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
const MULTIBOOT_SEARCH: usize = 8192;
const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;

const LE: LittleEndian = LittleEndian;
type Header = FileHeader64<LittleEndian>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// The ELF header of a little-endian x86-64 ELF64.
fn header(elf: &[u8]) -> std::result::Result<&Header, String> {
    if elf.get(..ELF_MAGIC.len()) != Some(&ELF_MAGIC[..]) {
        return Err("not an ELF file".into());
    }
    let h = Header::parse(elf).map_err(|e| format!("not a little-endian 64-bit ELF (ELFCLASS64, ELFDATA2LSB): {e}"))?;
    h.endian().map_err(|e| format!("not a little-endian 64-bit ELF (ELFCLASS64, ELFDATA2LSB): {e}"))?;
    let machine = h.e_machine(LE);
    if machine != EM_X86_64 {
        return Err(format!("ELF machine is {machine}, not x86-64 ({EM_X86_64})"));
    }
    Ok(h)
}

fn load_headers(elf: &[u8]) -> std::result::Result<Vec<&<Header as FileHeader>::ProgramHeader>, String> {
    let h = header(elf)?;
    let all = h.program_headers(LE, elf).map_err(|e| format!("bad program headers (outside the file?): {e}"))?;
    Ok(all.iter().filter(|p| p.p_type(LE) == PT_LOAD).collect())
}

/// The PT_LOAD program headers of a little-endian x86-64 ELF64.
pub fn load_segments(elf: &[u8]) -> std::result::Result<Vec<LoadSegment>, String> {
    Ok(load_headers(elf)?
        .into_iter()
        .map(|p| LoadSegment {
            offset: p.p_offset(LE),
            vaddr: p.p_vaddr(LE),
            filesz: p.p_filesz(LE),
            memsz: p.p_memsz(LE),
        })
        .collect())
}

/// The value of the first symbol called `name` in `.symtab`, if any.
pub fn symbol(elf: &[u8], name: &str) -> std::result::Result<Option<u64>, String> {
    let h = header(elf)?;
    let sections = h.sections(LE, elf).map_err(|e| format!("bad section headers: {e}"))?;
    let symbols = sections.symbols(LE, elf, SHT_SYMTAB).map_err(|e| format!("bad symbol table: {e}"))?;
    Ok(symbols
        .iter()
        .find(|sym| sym.st_name(LE) != 0 && sym.name(LE, symbols.strings()) == Ok(name.as_bytes()))
        .map(|sym| sym.st_value(LE)))
}

/// `len` bytes at virtual address `vaddr`, from the file-backed part of a PT_LOAD.
pub fn bytes_at_vaddr(elf: &[u8], vaddr: u64, len: u64) -> Option<&[u8]> {
    load_headers(elf).ok()?.into_iter().find_map(|p| p.data_range(LE, elf, vaddr, len).ok().flatten())
}

/// The kernel's registered patch sites: the little-endian u64 addresses of
/// the `.shadowcall_sites` section, or, when the linker script merged that
/// input section into `.rodata`, of the table between the symbols
/// `__sites_start` and `__sites_end`.
pub fn patch_sites(elf: &[u8]) -> std::result::Result<Vec<u64>, String> {
    let h = header(elf)?;
    let sections = h.sections(LE, elf).map_err(|e| format!("bad section headers: {e}"))?;
    let table = match sections.section_by_name(LE, SITES_SECTION) {
        Some((_, s)) => {
            s.data(LE, elf).map_err(|e| format!("the .shadowcall_sites section lies outside the file: {e}"))?
        }
        None => match (symbol(elf, "__sites_start")?, symbol(elf, "__sites_end")?) {
            (Some(start), Some(end)) if end >= start => bytes_at_vaddr(elf, start, end - start)
                .ok_or_else(|| format!("the site table {start:#x}..{end:#x} is not file-backed in a PT_LOAD"))?,
            _ => return Err("no .shadowcall_sites section and no __sites_start/__sites_end symbols".into()),
        },
    };
    if table.len() % SITE_BYTES != 0 {
        return Err(format!("the site table is {} bytes, not a multiple of {SITE_BYTES}", table.len()));
    }
    Ok(table.chunks_exact(SITE_BYTES).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; SITE_BYTES]))).collect())
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
    let window = &elf[..elf.len().min(MULTIBOOT_SEARCH)];
    let words: Vec<u32> = window.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    for (i, w) in words.windows(3).enumerate() {
        let (magic, flags, sum) = (w[0], w[1], w[2]);
        if magic == MULTIBOOT_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0 {
            if flags & MULTIBOOT_AOUT_KLUDGE == 0 {
                return Err(format!(
                    "the Multiboot header at file offset {:#x} lacks flag bit 16 (address fields), \
                     which an ELF64 kernel needs",
                    i * 4
                ));
            }
            return Ok(());
        }
    }
    Err("no Multiboot v1 header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB".into())
}

/// All checks on the kernel file at `path`.
/// The kernel's read-only patch tables, each bracketed by two linker symbols.
/// The #BP exits and the alias writers binary-search them in place (asm/sealed.S
/// `TABLE_HAS`); the kernel checks at boot that they are strictly increasing.
/// The tables and whether a value may appear twice: a target may (two
/// `patch_site!` sites can declare the same function), a site may not.
pub const PATCH_TABLES: [(&str, &str, bool); 2] =
    [("__sites_start", "__sites_end", false), ("__targets_start", "__targets_end", true)];

/// Sort the u64 tables of `PATCH_TABLES` in the ELF image `elf` in place
/// (the post-link step: the linker emits them in registration order). Returns
/// how many tables were changed. A table that is missing, not file-backed or
/// not whole words, or a site table that holds a value twice, is an error.
pub fn sort_patch_tables_in(elf: &mut [u8]) -> std::result::Result<usize, String> {
    let mut changed = 0;
    for (start_sym, end_sym, dups) in PATCH_TABLES {
        changed += sort_table_in(elf, start_sym, end_sym, dups)? as usize;
    }
    Ok(changed)
}

/// Sort the u64 table between the symbols `start_sym` and `end_sym` in place;
/// true if it was not sorted. A value twice is an error unless `dups`.
fn sort_table_in(elf: &mut [u8], start_sym: &str, end_sym: &str, dups: bool) -> std::result::Result<bool, String> {
    let (start, end) = match (symbol(elf, start_sym)?, symbol(elf, end_sym)?) {
        (Some(s), Some(e)) if e >= s => (s, e),
        _ => return Err(format!("no {start_sym}/{end_sym} symbols bracketing a table")),
    };
    let len = end - start;
    if len % SITE_BYTES as u64 != 0 {
        return Err(format!("the table {start_sym}..{end_sym} is {len} bytes, not whole u64s"));
    }
    let off = match bytes_at_vaddr(elf, start, len) {
        Some(t) => t.as_ptr() as usize - elf.as_ptr() as usize,
        None => return Err(format!("the table {start:#x}..{end:#x} is not file-backed in a PT_LOAD")),
    };
    let table = &mut elf[off..off + len as usize];
    let mut words: Vec<u64> =
        table.chunks_exact(SITE_BYTES).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; SITE_BYTES]))).collect();
    let sorted = words.windows(2).all(|w| w[0] <= w[1]);
    words.sort_unstable();
    if let Some(w) = words.windows(2).find(|w| !dups && w[0] == w[1]) {
        return Err(format!("{:#x} is registered twice in the table {start_sym}..{end_sym}", w[0]));
    }
    if !sorted {
        for (c, w) in table.chunks_exact_mut(SITE_BYTES).zip(&words) {
            c.copy_from_slice(&w.to_le_bytes());
        }
    }
    Ok(!sorted)
}

/// `sort_patch_tables_in` on the kernel file at `path` (rewritten only if a table changed).
pub fn sort_patch_tables(path: &Path) -> Result<()> {
    let mut bytes = std::fs::read(path).context(|| format!("cannot read kernel {}", path.display()))?;
    let changed = sort_patch_tables_in(&mut bytes)
        .map_err(|e| Error::new(format!("kernel {}: patch tables: {e}", path.display())))?;
    if changed != 0 {
        std::fs::write(path, &bytes).context(|| format!("cannot write kernel {}", path.display()))?;
    }
    Ok(())
}

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
        put16(&mut b, 0x12, object::elf::EM_X86_64.0);
        put64(&mut b, 0x20, 64);
        put16(&mut b, 0x36, 56);
        put16(&mut b, 0x38, 1);
        let load_off = b.len();
        b.extend(text);
        let table_vaddr = base + text.len() as u64;
        let table_off = b.len();
        b.extend(sites.iter().flat_map(|s| s.to_le_bytes()));
        let filesz = (b.len() - load_off) as u64;
        put32(&mut b, 64, object::elf::PT_LOAD.0);
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
        b[0x12..0x14].copy_from_slice(&EM_X86_64.0.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(phnum as u16).to_le_bytes());
        let mut note = vec![0u8; 56];
        note[..4].copy_from_slice(&4u32.to_le_bytes());
        b.extend(note);
        for s in segments {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&PT_LOAD.0.to_le_bytes());
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
        let e = load_segments(&b).unwrap_err();
        assert!(e.contains("outside the file"), "{e}");
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
        // (the synthetic kernel's section renamed, and it has no symbols).
        let mut bare = synth::elf(0x100000, &text, &[], true);
        let at = bare.windows(SITES_SECTION.len()).position(|w| w == SITES_SECTION).unwrap();
        bare[at + 1] = b'x';
        assert!(patch_sites(&bare).unwrap_err().contains("__sites_start"));
    }

    #[test]
    fn post_link_sorts_a_table() {
        let text = [0x90u8; 8];
        let mut elf = synth::elf(0x100000, &text, &[0x100004, 0x100000, 0x100002], false);
        assert_eq!(sort_table_in(&mut elf, "__sites_start", "__sites_end", false), Ok(true));
        assert_eq!(patch_sites(&elf).unwrap(), [0x100000, 0x100002, 0x100004]);
        assert_eq!(sort_table_in(&mut elf, "__sites_start", "__sites_end", false), Ok(false));
        // The synthetic kernel has no target table: named in the error.
        assert!(sort_patch_tables_in(&mut elf).unwrap_err().contains("__targets_start"));
        let mut twice = synth::elf(0x100000, &text, &[0x100002, 0x100002], false);
        assert!(sort_table_in(&mut twice, "__sites_start", "__sites_end", false).unwrap_err().contains("twice"));
        // A table that allows a value twice (targets) keeps both, sorted.
        let mut dup = synth::elf(0x100000, &text, &[0x100004, 0x100002, 0x100002], false);
        assert_eq!(sort_table_in(&mut dup, "__sites_start", "__sites_end", true), Ok(true));
        assert_eq!(patch_sites(&dup).unwrap(), [0x100002, 0x100002, 0x100004]);
    }
}
