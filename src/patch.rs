//! Patch batches: validation of patch sites with iced-x86, encoding of the
//! new instructions, and the sorted table the #BP handler searches.
//!
//! A batch is a set of `(site, new instruction)` pairs. Each site must be a
//! registered patch site (the kernel's `.shadowcall_sites` table, like Linux's
//! static-call and jump-label tables) holding a 5-byte instruction of a kind
//! we can emulate, inside kernel text; targets must be in text and in rel32
//! range; sites must not overlap. Validation writes nothing: a rejected batch
//! leaves text byte-identical.

use alloc::vec::Vec;
use core::fmt;

use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic};

/// Length of every patch site.
pub const SITE_LEN: usize = 5;
pub const INT3: u8 = 0xcc;
pub const OPC_CALL_REL32: u8 = 0xe8;
pub const OPC_JMP_REL32: u8 = 0xe9;
pub const OPC_RET: u8 = 0xc3;
/// The 5-byte NOP `nopl 0x0(%rax,%rax,1)`.
pub const NOP5: [u8; SITE_LEN] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// The instruction a site is patched to: the set Linux `static_call` and jump
/// labels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewInsn {
    Call(u64),
    Jmp(u64),
    Nop,
    /// `ret` padded with int3.
    Ret,
}

impl NewInsn {
    pub fn target(self) -> Option<u64> {
        match self {
            NewInsn::Call(t) | NewInsn::Jmp(t) => Some(t),
            NewInsn::Nop | NewInsn::Ret => None,
        }
    }

    /// The five bytes of this instruction placed at `site`.
    pub fn encode(self, site: u64) -> Result<[u8; SITE_LEN], PatchError> {
        let rel = |opc: u8, target: u64| -> Result<[u8; SITE_LEN], PatchError> {
            let rel = rel32(site, target).ok_or(PatchError::TargetOutOfRange { site, target })?;
            let r = rel.to_le_bytes();
            Ok([opc, r[0], r[1], r[2], r[3]])
        };
        match self {
            NewInsn::Call(t) => rel(OPC_CALL_REL32, t),
            NewInsn::Jmp(t) => rel(OPC_JMP_REL32, t),
            NewInsn::Nop => Ok(NOP5),
            NewInsn::Ret => Ok([OPC_RET, INT3, INT3, INT3, INT3]),
        }
    }
}

/// The rel32 displacement from a 5-byte instruction at `site` to `target`.
pub fn rel32(site: u64, target: u64) -> Option<i32> {
    let next = site.checked_add(SITE_LEN as u64)?;
    i32::try_from(target.wrapping_sub(next) as i64).ok()
}

/// What a site holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteKind {
    Call(u64),
    Jmp(u64),
    Nop,
    Ret,
}

/// Decode the instruction at the start of `bytes` (at address `ip`) and say
/// whether it is a patchable 5-byte instruction.
pub fn classify(bytes: &[u8], ip: u64) -> Result<SiteKind, PatchError> {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return Err(PatchError::Undecodable { site: ip });
    }
    let unsupported = PatchError::UnsupportedInstruction { site: ip, mnemonic: insn.mnemonic(), len: insn.len() };
    match insn.code() {
        Code::Call_rel32_64 if insn.len() == SITE_LEN => Ok(SiteKind::Call(insn.near_branch_target())),
        Code::Jmp_rel32_64 if insn.len() == SITE_LEN => Ok(SiteKind::Jmp(insn.near_branch_target())),
        Code::Nop_rm32 if insn.len() == SITE_LEN => Ok(SiteKind::Nop),
        Code::Retnq if bytes.len() >= SITE_LEN && bytes[1..SITE_LEN].iter().all(|&b| b == INT3) => Ok(SiteKind::Ret),
        _ => Err(unsupported),
    }
}

/// Why a batch was rejected. Each kind of bad input has its own variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    EmptyBatch,
    AddressOutsideText { site: u64 },
    SiteCrossesTextEnd { site: u64 },
    DuplicateSite { site: u64 },
    OverlappingSites { first: u64, second: u64 },
    MidInstruction { site: u64, insn_start: u64 },
    UnknownSite { site: u64 },
    Undecodable { site: u64 },
    UnsupportedInstruction { site: u64, mnemonic: Mnemonic, len: usize },
    TargetOutOfRange { site: u64, target: u64 },
    TargetOutsideText { site: u64, target: u64 },
    BatchInFlight,
    TooManySites { count: usize },
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use PatchError::*;
        match *self {
            EmptyBatch => f.write_str("empty batch: nothing to patch"),
            AddressOutsideText { site } => write!(f, "site {site:#x} is outside kernel text"),
            SiteCrossesTextEnd { site } => write!(f, "site {site:#x}: its 5 bytes run past the end of kernel text"),
            DuplicateSite { site } => write!(f, "site {site:#x} appears twice in the batch"),
            OverlappingSites { first, second } => {
                write!(f, "sites {first:#x} and {second:#x} overlap (less than 5 bytes apart)")
            }
            MidInstruction { site, insn_start } => {
                write!(f, "site {site:#x} is inside the instruction that starts at {insn_start:#x}")
            }
            UnknownSite { site } => write!(f, "site {site:#x} is not a registered patch site"),
            Undecodable { site } => write!(f, "site {site:#x}: the bytes there do not decode"),
            UnsupportedInstruction { site, mnemonic, len } => write!(
                f,
                "site {site:#x} holds {mnemonic:?} ({len} bytes); only 5-byte call/jmp rel32, nop5 and padded ret can be patched"
            ),
            TargetOutOfRange { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is out of rel32 range")
            }
            TargetOutsideText { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is outside kernel text")
            }
            BatchInFlight => f.write_str("another patch batch is in flight"),
            TooManySites { count } => write!(f, "{count} sites in one batch; at most 2^32 - 1"),
        }
    }
}

/// Read-only view of kernel text.
#[derive(Clone, Copy)]
pub struct Text<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

impl Text<'_> {
    pub fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
    fn site_bytes(&self, site: u64) -> &[u8] {
        let off = (site - self.base) as usize;
        &self.bytes[off..off + SITE_LEN]
    }
}

/// One validated site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub site: u64,
    pub insn: NewInsn,
    /// The new instruction's bytes at `site`.
    pub bytes: [u8; SITE_LEN],
}

impl Entry {
    /// Where an emulated call at this site returns to.
    pub fn ret_addr(&self) -> u64 {
        self.site + SITE_LEN as u64
    }
}

/// A validated batch, sorted by site address, with a search index.
///
/// The index is the sorted site addresses laid out as an implicit binary
/// search tree in breadth-first (Eytzinger) order: node k's children are 2k
/// and 2k+1. A lookup is the same binary search as on the sorted array, but
/// each step is a compare and an add-with-carry (`k = 2k + (key < x)`), so
/// the #BP handler pays a few instructions per doubling of the batch. The
/// tree is complete (padded with `u64::MAX` keys, which are never a site),
/// so every search takes exactly `depth` steps and needs no bounds checks.
#[derive(Debug, Default)]
pub struct Batch {
    entries: Vec<Entry>,
    /// `tree[k]` (1 <= k < 2^depth) is a site address or padding; `tree[0]` is unused.
    tree: Vec<u64>,
    /// `slot[k]`: the index in `entries` of `tree[k]`.
    slot: Vec<u32>,
    depth: u32,
}

impl Batch {
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Bytes of the lookup table (entries and search index).
    pub fn table_bytes(&self) -> usize {
        self.entries.len() * core::mem::size_of::<Entry>() + self.tree.len() * 8 + self.slot.len() * 4
    }
    /// The entry for the int3 at `site`: binary search over the index.
    pub fn lookup(&self, site: u64) -> Option<&Entry> {
        if self.depth == 0 {
            return None;
        }
        let tree = &self.tree[..];
        let mut k = 1usize;
        for _ in 0..self.depth {
            // SAFETY: k < 2^depth == tree.len() before each step: it starts
            // at 1 and each of the `depth` steps at most doubles it plus one,
            // staying below 2^(step+1) <= 2^depth.
            let key = unsafe { *tree.get_unchecked(k) };
            k = 2 * k + (key < site) as usize;
        }
        // Undo the trailing "go right" steps and the last "go left": k is
        // then the node of the smallest key >= site (0: none).
        k >>= (!k).trailing_zeros() + 1;
        if k != 0 && tree[k] == site {
            // Padding nodes have no entry (slot u32::MAX): `get` says None.
            self.entries.get(self.slot[k] as usize)
        } else {
            None
        }
    }

    fn from_sorted(entries: Vec<Entry>) -> Self {
        let n = entries.len();
        if n == 0 {
            return Batch::default();
        }
        // Smallest complete tree with at least n nodes: 2^depth - 1 nodes.
        let depth = usize::BITS - n.leading_zeros();
        let nodes = (1usize << depth) - 1;
        let mut b =
            Batch { tree: alloc::vec![u64::MAX; nodes + 1], slot: alloc::vec![u32::MAX; nodes + 1], entries, depth };
        let mut next = 0usize;
        // In-order walk of the implicit tree assigns the sorted keys, then the padding.
        let mut stack: Vec<usize> = Vec::new();
        let mut k = 1usize;
        while k <= nodes || !stack.is_empty() {
            if k <= nodes {
                stack.push(k);
                k *= 2;
            } else {
                k = stack.pop().unwrap_or(0);
                if next < n {
                    b.tree[k] = b.entries[next].site;
                    b.slot[k] = next as u32;
                }
                next += 1;
                k = 2 * k + 1;
            }
        }
        b
    }
}

/// Validate `sites` against kernel `text` and the sorted `registry` of patch
/// sites, and build the sorted batch. Writes nothing.
pub fn build_batch(text: &Text<'_>, registry: &[u64], sites: &[(u64, NewInsn)]) -> Result<Batch, PatchError> {
    if sites.is_empty() {
        return Err(PatchError::EmptyBatch);
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(sites.len());
    for &(site, insn) in sites {
        entries.push(Entry { site, insn, bytes: [0; SITE_LEN] });
    }
    entries.sort_unstable_by_key(|e| e.site);
    for w in entries.windows(2) {
        let (a, b) = (w[0].site, w[1].site);
        if a == b {
            return Err(PatchError::DuplicateSite { site: a });
        }
        if b - a < SITE_LEN as u64 {
            return Err(PatchError::OverlappingSites { first: a, second: b });
        }
    }
    if entries.len() > u32::MAX as usize {
        return Err(PatchError::TooManySites { count: entries.len() });
    }
    for e in entries.iter_mut() {
        e.bytes = check_site(text, registry, e.site, e.insn)?;
    }
    Ok(Batch::from_sorted(entries))
}

fn check_site(text: &Text<'_>, registry: &[u64], site: u64, insn: NewInsn) -> Result<[u8; SITE_LEN], PatchError> {
    if !text.contains(site) {
        return Err(PatchError::AddressOutsideText { site });
    }
    if site + SITE_LEN as u64 > text.end() {
        return Err(PatchError::SiteCrossesTextEnd { site });
    }
    match registry.binary_search(&site) {
        Ok(_) => {}
        Err(i) => {
            return Err(match i.checked_sub(1).map(|j| registry[j]) {
                Some(start) if site - start < SITE_LEN as u64 => PatchError::MidInstruction { site, insn_start: start },
                _ => PatchError::UnknownSite { site },
            })
        }
    }
    classify(text.site_bytes(site), site)?;
    let bytes = insn.encode(site)?;
    if let Some(target) = insn.target() {
        if !text.contains(target) {
            return Err(PatchError::TargetOutsideText { site, target });
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const BASE: u64 = 0x10_0000;

    /// A little text segment: five registered sites and some other code.
    fn text() -> (Vec<u8>, Vec<u64>) {
        let mut t = vec![0x90u8; 64];
        // 0x00: call +0x20 (to 0x25)
        t[0..5].copy_from_slice(&[0xe8, 0x20, 0, 0, 0]);
        // 0x05: jmp -5 (to 0x05)
        t[5..10].copy_from_slice(&[0xe9, 0xfb, 0xff, 0xff, 0xff]);
        // 0x0a: nop5
        t[10..15].copy_from_slice(&NOP5);
        // 0x0f: ret; int3 x4
        t[15..20].copy_from_slice(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
        // 0x14: mov $1, %eax (5 bytes, registered but unsupported)
        t[20..25].copy_from_slice(&[0xb8, 1, 0, 0, 0]);
        // 0x19: an invalid opcode in 64-bit mode (push %es), registered
        t[25] = 0x06;
        // 0x1e: a call that is not registered
        t[30..35].copy_from_slice(&[0xe8, 0, 0, 0, 0]);
        (t, vec![BASE, BASE + 5, BASE + 10, BASE + 15, BASE + 20, BASE + 25])
    }

    fn build(sites: &[(u64, NewInsn)]) -> Result<Batch, PatchError> {
        let (t, reg) = text();
        build_batch(&Text { base: BASE, bytes: &t }, &reg, sites)
    }

    #[test]
    fn classify_kinds() {
        let (t, _) = text();
        assert_eq!(classify(&t[0..], BASE), Ok(SiteKind::Call(BASE + 0x25)));
        assert_eq!(classify(&t[5..], BASE + 5), Ok(SiteKind::Jmp(BASE + 5)));
        assert_eq!(classify(&t[10..], BASE + 10), Ok(SiteKind::Nop));
        assert_eq!(classify(&t[15..], BASE + 15), Ok(SiteKind::Ret));
        assert!(matches!(classify(&t[20..], BASE + 20), Err(PatchError::UnsupportedInstruction { len: 5, .. })));
        assert_eq!(classify(&t[25..], BASE + 25), Err(PatchError::Undecodable { site: BASE + 25 }));
        // A bare ret not padded with int3 is not a 5-byte site.
        assert!(classify(&[0xc3, 0x90, 0x90, 0x90, 0x90], 0).is_err());
    }

    #[test]
    fn encodings() {
        assert_eq!(NewInsn::Call(BASE + 5).encode(BASE), Ok([0xe8, 0, 0, 0, 0]));
        assert_eq!(NewInsn::Jmp(BASE).encode(BASE), Ok([0xe9, 0xfb, 0xff, 0xff, 0xff]));
        assert_eq!(NewInsn::Nop.encode(BASE), Ok(NOP5));
        assert_eq!(NewInsn::Ret.encode(BASE), Ok([0xc3, 0xcc, 0xcc, 0xcc, 0xcc]));
        assert_eq!(rel32(0, 5 + i32::MAX as u64), Some(i32::MAX));
        assert_eq!(rel32(0, 6 + i32::MAX as u64), None);
        assert_eq!(rel32(0x7fff_fffb, 0), Some(i32::MIN));
        assert_eq!(rel32(0x7fff_fffc, 0), None);
        // Every encoding decodes back to what it says.
        for (insn, kind) in [
            (NewInsn::Call(BASE + 40), SiteKind::Call(BASE + 40)),
            (NewInsn::Jmp(BASE + 3), SiteKind::Jmp(BASE + 3)),
            (NewInsn::Nop, SiteKind::Nop),
            (NewInsn::Ret, SiteKind::Ret),
        ] {
            assert_eq!(classify(&insn.encode(BASE + 8).unwrap(), BASE + 8), Ok(kind));
        }
    }

    #[test]
    fn good_batch_is_sorted_and_searchable() {
        let b = build(&[
            (BASE + 15, NewInsn::Call(BASE + 40)),
            (BASE, NewInsn::Nop),
            (BASE + 5, NewInsn::Ret),
            (BASE + 10, NewInsn::Jmp(BASE)),
        ])
        .unwrap();
        let sites: Vec<u64> = b.entries().iter().map(|e| e.site).collect();
        assert_eq!(sites, [BASE, BASE + 5, BASE + 10, BASE + 15]);
        assert_eq!(b.lookup(BASE + 15).unwrap().insn, NewInsn::Call(BASE + 40));
        assert_eq!(b.lookup(BASE + 15).unwrap().ret_addr(), BASE + 20);
        assert_eq!(b.lookup(BASE + 16), None);
        assert_eq!(b.lookup(BASE - 1), None);
    }

    #[test]
    fn every_bad_input_has_its_own_error() {
        use PatchError::*;
        let cases: Vec<(Vec<(u64, NewInsn)>, PatchError)> = vec![
            (vec![], EmptyBatch),
            (vec![(BASE - 8, NewInsn::Nop)], AddressOutsideText { site: BASE - 8 }),
            (vec![(BASE + 62, NewInsn::Nop)], SiteCrossesTextEnd { site: BASE + 62 }),
            (vec![(BASE, NewInsn::Nop), (BASE, NewInsn::Ret)], DuplicateSite { site: BASE }),
            (vec![(BASE, NewInsn::Nop), (BASE + 2, NewInsn::Ret)], OverlappingSites { first: BASE, second: BASE + 2 }),
            (vec![(BASE + 1, NewInsn::Nop)], MidInstruction { site: BASE + 1, insn_start: BASE }),
            (vec![(BASE + 30, NewInsn::Nop)], UnknownSite { site: BASE + 30 }),
            (vec![(BASE + 25, NewInsn::Nop)], Undecodable { site: BASE + 25 }),
            (
                vec![(BASE, NewInsn::Call(0xffff_ffff_8000_0000))],
                TargetOutOfRange { site: BASE, target: 0xffff_ffff_8000_0000 },
            ),
            (vec![(BASE, NewInsn::Jmp(BASE + 64))], TargetOutsideText { site: BASE, target: BASE + 64 }),
        ];
        for (sites, want) in cases {
            assert_eq!(build(&sites).unwrap_err(), want, "{sites:?}");
            assert!(!alloc::format!("{want}").is_empty());
        }
        assert!(matches!(build(&[(BASE + 20, NewInsn::Nop)]), Err(UnsupportedInstruction { len: 5, .. })));
    }

    #[test]
    fn lookup_matches_a_linear_search_for_every_size() {
        // Batches of 1..=70 sites at irregular addresses; probe every address around them.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for n in 1..=70usize {
            let mut addrs: Vec<u64> = Vec::new();
            let mut a = BASE;
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                a += 5 + seed % 11;
                addrs.push(a);
            }
            let entries: Vec<Entry> =
                addrs.iter().map(|&s| Entry { site: s, insn: NewInsn::Nop, bytes: NOP5 }).collect();
            let b = Batch::from_sorted(entries);
            for probe in BASE..a + 20 {
                let want = addrs.iter().position(|&s| s == probe);
                assert_eq!(b.lookup(probe).map(|e| e.site), want.map(|i| addrs[i]), "n={n} probe={probe:#x}");
            }
            assert!(b.lookup(0).is_none() && b.lookup(u64::MAX).is_none());
        }
        assert!(Batch::default().lookup(BASE).is_none());
    }

    #[test]
    fn large_batches_spanning_many_pages_of_entries() {
        // 4096 sites of `call` laid out every 6 bytes: binary search finds each one.
        let n = 4096u64;
        let mut t = vec![0xc3u8; (n * 6 + 16) as usize];
        let mut reg = Vec::new();
        for i in 0..n {
            let off = (i * 6) as usize;
            t[off..off + 5].copy_from_slice(&[0xe8, 0, 0, 0, 0]);
            reg.push(BASE + i * 6);
        }
        let sites: Vec<(u64, NewInsn)> = reg.iter().rev().map(|&s| (s, NewInsn::Call(BASE))).collect();
        let b = build_batch(&Text { base: BASE, bytes: &t }, &reg, &sites).unwrap();
        assert!(b.table_bytes() > 4096);
        for &s in &reg {
            assert_eq!(b.lookup(s).unwrap().site, s);
            assert!(b.lookup(s + 1).is_none());
        }
    }
}
