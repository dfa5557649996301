//! The production kernel's WRSS instructions all lie inside its critical
//! regions (DESIGN.md §11): code outside them gets its registers back from
//! an NMI's or #MC's ordinary trap frame, so a WRSS there could be steered
//! by a store into that frame (the sixth review found the unwind routine
//! outside every region). Compiled Rust has no WRSS in the production build
//! at all: its operands might be spilled to the stack. Checked after every
//! production build by decoding the kernel's executable code.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use object::elf::{FileHeader64, SHF_EXECINSTR, SHT_PROGBITS};
use object::read::elf::{FileHeader, SectionHeader};
use object::LittleEndian;

use crate::elfcheck::symbol;

/// The critical regions, as `(start, end)` symbol pairs (asm/entry.S,
/// asm/poke.S, asm/recover.S).
pub const REGIONS: [(&str, &str); 4] = [
    ("sc_bpx_region_start", "sc_bpx_region_end"),
    ("sc_poke_region_start", "sc_poke_region_end"),
    ("sc_isr_region_start", "sc_isr_region_end"),
    ("sc_unwind_region_start", "sc_unwind_region_end"),
];

const LE: LittleEndian = LittleEndian;
const BITNESS: u32 = 64;

/// The addresses of the WRSS instructions in `code` (linear sweep from
/// `base`; an undecodable byte is skipped).
pub fn wrss_addresses(code: &[u8], base: u64) -> Vec<u64> {
    let mut decoder = Decoder::with_ip(BITNESS, code, base, DecoderOptions::NONE);
    let mut found = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if matches!(insn.mnemonic(), Mnemonic::Wrssd | Mnemonic::Wrssq) {
            found.push(insn.ip());
        }
    }
    found
}

/// The WRSS instructions of the ELF `elf` that lie outside every region of
/// [`REGIONS`]. An error when a region's symbols are missing.
pub fn wrss_outside_regions(elf: &[u8]) -> Result<Vec<u64>, String> {
    let mut regions = Vec::new();
    for (start, end) in REGIONS {
        match (symbol(elf, start)?, symbol(elf, end)?) {
            (Some(s), Some(e)) if s <= e => regions.push((s, e)),
            _ => return Err(format!("no critical region {start}..{end} in the kernel")),
        }
    }
    let h = FileHeader64::<LittleEndian>::parse(elf).map_err(|e| format!("not an ELF64: {e}"))?;
    let sections = h.sections(LE, elf).map_err(|e| format!("bad section headers: {e}"))?;
    let mut outside = Vec::new();
    for s in sections.iter() {
        if s.sh_type(LE) != SHT_PROGBITS || s.sh_flags(LE).0 & SHF_EXECINSTR.0 == 0 {
            continue;
        }
        let code = s.data(LE, elf).map_err(|e| format!("an executable section lies outside the file: {e}"))?;
        for at in wrss_addresses(code, s.sh_addr(LE)) {
            if !regions.iter().any(|&(lo, hi)| at >= lo && at < hi) {
                outside.push(at);
            }
        }
    }
    Ok(outside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_wrss_among_other_instructions() {
        // nop; wrssq %rax,(%rdi); ret; wrssd %eax,(%rdi); (bad byte) int3
        let code = [0x90, 0x48, 0x0f, 0x38, 0xf6, 0x07, 0xc3, 0x0f, 0x38, 0xf6, 0x07, 0xcc];
        assert_eq!(wrss_addresses(&code, 0x1000), [0x1001, 0x1007]);
        assert!(wrss_addresses(&[0x90, 0xc3], 0).is_empty());
    }

    /// The production kernel, when it has been built (the matrix builds it):
    /// every WRSS inside a critical region.
    #[test]
    fn the_production_kernel_has_no_wrss_outside_its_regions() {
        let path = crate::kernel::kernel_elf_of(crate::kernel::Build::Production);
        let Ok(elf) = std::fs::read(&path) else {
            eprintln!("skipped: {} not built", path.display());
            return;
        };
        let outside = wrss_outside_regions(&elf).expect("regions");
        assert!(outside.is_empty(), "WRSS outside the critical regions at {outside:#x?}");
    }
}
