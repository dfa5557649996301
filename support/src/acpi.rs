//! Just enough ACPI to find the CPUs: the RSDP, the RSDT/XSDT, and the
//! MADT's local APIC (type 0) and local x2APIC (type 9) entries.
//!
//! Everything works on byte slices the kernel reads out of physical memory,
//! so the parsing is host-tested.

use alloc::vec::Vec;

pub const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
pub const MADT_SIGNATURE: &[u8; 4] = b"APIC";
/// Length of the common header of every system description table.
pub const SDT_HEADER_LEN: usize = 36;
const MADT_ENTRIES_OFFSET: usize = SDT_HEADER_LEN + 8;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_X2APIC: u8 = 9;
const MADT_ENABLED: u32 = 1 << 0;
const MADT_ONLINE_CAPABLE: u32 = 1 << 1;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Where the RSDP says the root table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// 32-bit entries (ACPI 1.0).
    Rsdt(u64),
    /// 64-bit entries (ACPI 2.0+).
    Xsdt(u64),
}

/// Find a valid RSDP in `region` (searched on 16-byte boundaries, as the
/// spec requires); `region` starts at physical address `base`.
pub fn find_rsdp(region: &[u8], base: u64) -> Option<(u64, Root)> {
    (0..region.len().saturating_sub(20)).step_by(16).find_map(|off| {
        let r = &region[off..];
        if &r[..8] != RSDP_SIGNATURE || sum(&r[..20]) != 0 {
            return None;
        }
        let revision = r[15];
        if revision >= 2 && r.len() >= 36 {
            let len = u32_at(r, 20)? as usize;
            if len >= 36 && len <= r.len() && sum(&r[..len]) == 0 {
                return Some((base + off as u64, Root::Xsdt(u64_at(r, 24)?)));
            }
        }
        Some((base + off as u64, Root::Rsdt(u32_at(r, 16)? as u64)))
    })
}

/// Is `table` a complete SDT with a valid checksum? Returns its length.
pub fn sdt_len(table: &[u8]) -> Option<usize> {
    let len = u32_at(table, 4)? as usize;
    (len >= SDT_HEADER_LEN && len <= table.len() && sum(&table[..len]) == 0).then_some(len)
}

/// The table pointers of a root table (RSDT or XSDT) whose bytes are `table`.
pub fn root_entries(table: &[u8], root: Root) -> Option<Vec<u64>> {
    let len = sdt_len(table)?;
    let body = &table[SDT_HEADER_LEN..len];
    Some(match root {
        Root::Rsdt(_) => body.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64).collect(),
        Root::Xsdt(_) => body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect(),
    })
}

/// A processor the MADT lists as usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub apic_id: u32,
    /// Listed as enabled (false: online-capable, i.e. may be hot-added).
    pub enabled: bool,
}

/// What the MADT says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Madt {
    pub local_apic_addr: u32,
    pub cpus: Vec<Cpu>,
}

/// Parse a MADT. Processors that are neither enabled nor online-capable are
/// left out; duplicates (a CPU listed as both type 0 and type 9) appear once.
pub fn parse_madt(table: &[u8]) -> Option<Madt> {
    if table.get(..4)? != MADT_SIGNATURE {
        return None;
    }
    let len = sdt_len(table)?;
    let mut m = Madt { local_apic_addr: u32_at(table, SDT_HEADER_LEN)?, cpus: Vec::new() };
    let mut off = MADT_ENTRIES_OFFSET;
    while off + 2 <= len {
        let (kind, elen) = (table[off], table[off + 1] as usize);
        if elen < 2 || off + elen > len {
            return None;
        }
        let e = &table[off..off + elen];
        let entry = match (kind, elen) {
            (MADT_LOCAL_APIC, 8) => Some((e[3] as u32, u32_at(e, 4)?)),
            (MADT_LOCAL_X2APIC, 16) => Some((u32_at(e, 4)?, u32_at(e, 8)?)),
            _ => None,
        };
        if let Some((apic_id, flags)) = entry {
            if flags & (MADT_ENABLED | MADT_ONLINE_CAPABLE) != 0 && !m.cpus.iter().any(|c| c.apic_id == apic_id) {
                m.cpus.push(Cpu { apic_id, enabled: flags & MADT_ENABLED != 0 });
            }
        }
        off += elen;
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn fix_checksum(t: &mut [u8], at: usize, len: usize) {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(sum(&t[..len]));
    }

    fn sdt(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; SDT_HEADER_LEN];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let n = t.len();
        fix_checksum(&mut t, 9, n);
        t
    }

    fn madt() -> Vec<u8> {
        let mut body = vec![];
        body.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes()); // flags: PC-AT compatible
        body.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]); // CPU apic 0, enabled
        body.extend_from_slice(&[0, 8, 1, 1, 1, 0, 0, 0]); // CPU apic 1, enabled
        body.extend_from_slice(&[0, 8, 2, 2, 0, 0, 0, 0]); // CPU apic 2, disabled
        body.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]); // an I/O APIC
        let mut x2 = vec![9, 16, 0, 0];
        x2.extend_from_slice(&300u32.to_le_bytes());
        x2.extend_from_slice(&2u32.to_le_bytes()); // online-capable
        x2.extend_from_slice(&7u32.to_le_bytes());
        body.extend_from_slice(&x2);
        sdt(MADT_SIGNATURE, &body)
    }

    #[test]
    fn madt_lists_usable_cpus() {
        let m = parse_madt(&madt()).unwrap();
        assert_eq!(m.local_apic_addr, 0xfee0_0000);
        assert_eq!(
            m.cpus,
            vec![
                Cpu { apic_id: 0, enabled: true },
                Cpu { apic_id: 1, enabled: true },
                Cpu { apic_id: 300, enabled: false }
            ]
        );
    }

    #[test]
    fn bad_tables_are_rejected() {
        let mut t = madt();
        t[50] ^= 1;
        assert_eq!(parse_madt(&t), None, "checksum");
        let mut t = madt();
        t[0] = b'X';
        assert_eq!(parse_madt(&t), None, "signature");
        let t = madt();
        assert_eq!(parse_madt(&t[..t.len() - 1]), None, "truncated");
    }

    #[test]
    fn rsdp_and_root_tables() {
        let mut region = vec![0u8; 64];
        let mut r = vec![0u8; 20];
        r[..8].copy_from_slice(RSDP_SIGNATURE);
        r[16..20].copy_from_slice(&0x7fe_1000u32.to_le_bytes());
        fix_checksum(&mut r, 8, 20);
        region[32..52].copy_from_slice(&r);
        assert_eq!(find_rsdp(&region, 0xe0000), Some((0xe0020, Root::Rsdt(0x7fe_1000))));
        region[40] ^= 0xff;
        assert_eq!(find_rsdp(&region, 0xe0000), None);

        let rsdt = sdt(b"RSDT", &[0x00, 0x10, 0, 0, 0x00, 0x20, 0, 0]);
        assert_eq!(root_entries(&rsdt, Root::Rsdt(0)), Some(vec![0x1000, 0x2000]));
        let xsdt = sdt(b"XSDT", &0x1_0000_0000u64.to_le_bytes());
        assert_eq!(root_entries(&xsdt, Root::Xsdt(0)), Some(vec![0x1_0000_0000]));
    }
}
