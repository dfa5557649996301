//! The production kernel's shadow-stack writers all lie inside its critical
//! regions (DESIGN.md §11): code outside them gets its registers back from
//! an NMI's or #MC's ordinary trap frame, so a WRSS or an INCSSP there could
//! be steered by a store into that frame (the sixth review found the unwind
//! routine outside every region; the seventh an INCSSP in a probe). Compiled
//! Rust has none in the production build. Checked after every production
//! build by scanning the kernel's executable sections for the instructions'
//! byte patterns at every offset (a linear disassembly can lose sync on a
//! data byte and miss one: the seventh review).

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
/// WRSSD/WRSSQ: `[REX] 0F 38 F6 /r` with a memory operand and no 66/F2/F3
/// prefix (66 makes it ADCX, F3 ADOX).
const WRSS_OPCODE: [u8; 3] = [0x0f, 0x38, 0xf6];
/// INCSSPD/INCSSPQ: `F3 [REX] 0F AE /5` with a register operand.
const INCSSP_OPCODE: [u8; 2] = [0x0f, 0xae];
const PREFIX_OPSIZE: u8 = 0x66;
const PREFIX_REPNE: u8 = 0xf2;
const PREFIX_REP: u8 = 0xf3;
const MODRM_MOD_REG: u8 = 0b11;
const MODRM_REG_INCSSP: u8 = 5;

fn is_rex(b: u8) -> bool {
    b & 0xf0 == 0x40
}

/// The byte before the opcode, skipping one REX prefix.
fn prefix_before(code: &[u8], op: usize) -> Option<u8> {
    let mut i = op.checked_sub(1)?;
    if is_rex(code[i]) {
        i = i.checked_sub(1)?;
    }
    Some(code[i])
}

/// Where the instruction whose opcode starts at `op` starts (its REX and
/// mandatory prefix included).
fn start_of(code: &[u8], op: usize, prefix: bool) -> usize {
    let mut i = op;
    if i > 0 && is_rex(code[i - 1]) {
        i -= 1;
    }
    if prefix {
        i -= 1;
    }
    i
}

/// The addresses of every byte sequence in `code` (at `base`) that decodes
/// as a WRSS or an INCSSP, at any offset.
pub fn shadow_writer_addresses(code: &[u8], base: u64) -> Vec<u64> {
    let mut found = Vec::new();
    for op in 0..code.len() {
        let rest = &code[op..];
        if rest.len() > WRSS_OPCODE.len() && rest.starts_with(&WRSS_OPCODE) {
            let modrm = rest[WRSS_OPCODE.len()];
            let prefixed = matches!(prefix_before(code, op), Some(PREFIX_OPSIZE | PREFIX_REPNE | PREFIX_REP));
            if modrm >> 6 != MODRM_MOD_REG && !prefixed {
                found.push(base + start_of(code, op, false) as u64);
            }
        }
        if rest.len() > INCSSP_OPCODE.len() && rest.starts_with(&INCSSP_OPCODE) {
            let modrm = rest[INCSSP_OPCODE.len()];
            let rep = prefix_before(code, op) == Some(PREFIX_REP);
            if rep && modrm >> 6 == MODRM_MOD_REG && (modrm >> 3) & 7 == MODRM_REG_INCSSP {
                found.push(base + start_of(code, op, true) as u64);
            }
        }
    }
    found
}

/// The WRSS/INCSSP of the ELF `elf` that lie outside every region of
/// [`REGIONS`]. An error when a region's symbols are missing.
pub fn writers_outside_regions(elf: &[u8]) -> Result<Vec<u64>, String> {
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
        for at in shadow_writer_addresses(code, s.sh_addr(LE)) {
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

    const WRSSQ_RAX_RDI: [u8; 5] = [0x48, 0x0f, 0x38, 0xf6, 0x07];
    const WRSSD_EAX_RDI: [u8; 4] = [0x0f, 0x38, 0xf6, 0x07];
    const INCSSPQ_RDX: [u8; 5] = [0xf3, 0x48, 0x0f, 0xae, 0xea];

    #[test]
    fn finds_wrss_and_incssp_among_other_instructions() {
        let mut code = vec![0x90];
        code.extend(WRSSQ_RAX_RDI); // at 1
        code.push(0xc3);
        code.extend(WRSSD_EAX_RDI); // at 7
        code.extend(INCSSPQ_RDX); // at 11
        code.extend([0x66, 0x0f, 0x38, 0xf6, 0xc1]); // adcx: not a WRSS
        code.extend([0xf3, 0x0f, 0x1e, 0xc8]); // rdsspd: not a writer
        assert_eq!(shadow_writer_addresses(&code, 0x1000), [0x1001, 0x1007, 0x100b]);
        assert!(shadow_writer_addresses(&[0x90, 0xc3], 0).is_empty());
    }

    /// The seventh review: one data byte (0x0f) in front of a WRSS made a
    /// linear disassembly decode it as something else and miss it.
    #[test]
    fn a_data_byte_before_a_wrss_does_not_hide_it() {
        let mut code = vec![0x0f];
        code.extend(WRSSQ_RAX_RDI);
        code.push(0xc3);
        assert_eq!(shadow_writer_addresses(&code, 0x2000), [0x2001]);
    }

    /// The production kernel, when it has been built (the matrix builds it):
    /// every WRSS and INCSSP inside a critical region.
    #[test]
    fn the_production_kernel_has_no_shadow_writer_outside_its_regions() {
        let path = crate::kernel::kernel_elf_of(crate::kernel::Build::Production);
        let Ok(elf) = std::fs::read(&path) else {
            eprintln!("skipped: {} not built", path.display());
            return;
        };
        let outside = writers_outside_regions(&elf).expect("regions");
        assert!(outside.is_empty(), "WRSS/INCSSP outside the critical regions at {outside:#x?}");
    }
}
