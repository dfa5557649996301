//! Patch batches: validation of patch sites (the fixed forms of [`crate::insn`]), encoding of the
//! new instructions, and the sorted table the #BP handler searches.
//!
//! A batch is a set of `(site, new instruction)` pairs. Each site must be a
//! registered patch site (the kernel's `.shadowcall_sites` table, like Linux's
//! static-call and jump-label tables) holding a 5-byte instruction of a kind
//! we can emulate, inside kernel text; each call/jmp target must be a
//! registered target (the `.shadowcall_targets` table), in text and in rel32
//! range; sites must not overlap; no site and no target may lie in code the
//! #BP handler runs (exception entry, CET bring-up, the trampoline page: the
//! registry's forbidden [`CodeRange`]s). Validation writes nothing: a rejected
//! batch leaves text byte-identical.
//!
//! A validated batch can be written out as a flat, position-independent
//! [`SealedBatch`] (no pointers, only offsets) that the kernel copies into
//! read-only memory and searches from the #BP handler.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;

use crate::insn;

/// Length of every patch site.
pub const SITE_LEN: usize = 5;
/// The one-byte breakpoint `int3` (opcode CC): step 1 of the patch protocol
/// writes it on every site, and it pads a patched `ret`.
pub const INT3: u8 = 0xcc;
/// Opcode of `call rel32` (E8 cd).
pub const OPC_CALL_REL32: u8 = 0xe8;
/// Opcode of `jmp rel32` (E9 cd).
pub const OPC_JMP_REL32: u8 = 0xe9;
/// Opcode of the near `ret` (C3).
pub const OPC_RET: u8 = 0xc3;
/// The 5-byte NOP `nopl 0x0(%rax,%rax,1)`.
pub const NOP5: [u8; SITE_LEN] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// The instruction a site is patched to: the set Linux `static_call` and jump
/// labels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewInsn {
    /// `call rel32` to the given absolute target.
    Call(u64),
    /// `jmp rel32` to the given absolute target (a tail call).
    Jmp(u64),
    /// The 5-byte NOP [`NOP5`].
    Nop,
    /// `ret` padded with int3.
    Ret,
}

impl NewInsn {
    /// The call/jmp target; `None` for `Nop` and `Ret`.
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
    /// `call rel32`, with its absolute target.
    Call(u64),
    /// `jmp rel32`, with its absolute target.
    Jmp(u64),
    /// A 5-byte `nop r/m32`.
    Nop,
    /// `ret` followed by four int3.
    Ret,
}

/// Decode the instruction at the start of `bytes` (at address `ip`) and say
/// whether it is a patchable 5-byte instruction: exactly `call rel32`,
/// `jmp rel32`, a 5-byte `nop r/m32` or `ret` padded with int3 (the forms of
/// [`crate::insn`]). Anything else is `UnsupportedInstruction` if it is an
/// instruction ([`insn::insn_len`]), else `Undecodable`.
pub fn classify(bytes: &[u8], ip: u64) -> Result<SiteKind, PatchError> {
    if let Some(b) = insn::rel32_branch(bytes, ip) {
        return Ok(match b.kind {
            insn::BranchKind::Call => SiteKind::Call(b.target),
            insn::BranchKind::Jmp => SiteKind::Jmp(b.target),
        });
    }
    if insn::is_nop5(bytes) {
        return Ok(SiteKind::Nop);
    }
    if insn::is_padded_ret(bytes) {
        return Ok(SiteKind::Ret);
    }
    let len = insn::insn_len(bytes).ok_or(PatchError::Undecodable { site: ip })?;
    let mut first = [0; SITE_LEN];
    let n = bytes.len().min(SITE_LEN);
    first[..n].copy_from_slice(&bytes[..n]);
    Err(PatchError::UnsupportedInstruction { site: ip, bytes: first, len })
}

/// Why a batch was rejected. Each kind of bad input has its own variant.
///
/// In every variant `site` is the address of the offending site as the
/// batch gave it, and `target` the call/jmp target the batch asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// The batch has no site.
    EmptyBatch,
    /// The site's first byte is not in kernel text.
    AddressOutsideText {
        /// The site.
        site: u64,
    },
    /// The site starts in text but its 5 bytes run past the end of text.
    SiteCrossesTextEnd {
        /// The site.
        site: u64,
    },
    /// The batch names the same site twice.
    DuplicateSite {
        /// The site.
        site: u64,
    },
    /// Two sites of the batch are less than 5 bytes apart.
    OverlappingSites {
        /// The lower site.
        first: u64,
        /// The higher site.
        second: u64,
    },
    /// The site lies inside a registered site's 5 bytes, not at its start.
    MidInstruction {
        /// The site.
        site: u64,
        /// The registered site whose instruction contains it.
        insn_start: u64,
    },
    /// The site is not in the registered site table.
    UnknownSite {
        /// The site.
        site: u64,
    },
    /// The bytes at the site do not decode as an instruction.
    Undecodable {
        /// The site.
        site: u64,
    },
    /// An instruction of another kind: its first bytes (zero-padded if
    /// fewer) and its length.
    UnsupportedInstruction {
        /// The site.
        site: u64,
        /// The first 5 bytes at the site (zero-padded if text ends earlier).
        bytes: [u8; SITE_LEN],
        /// The length of the instruction found there.
        len: usize,
    },
    /// The target is more than ±2 GiB from the end of the site (no rel32 reaches it).
    TargetOutOfRange {
        /// The site.
        site: u64,
        /// The target.
        target: u64,
    },
    /// The target is not in kernel text.
    TargetOutsideText {
        /// The site.
        site: u64,
        /// The target.
        target: u64,
    },
    /// Another batch is between validation and retirement (one batch at a time).
    BatchInFlight,
    /// More sites than a batch may have (at most 2^32 - 1: the search index holds u32 slots).
    TooManySites {
        /// The number of sites given.
        count: usize,
    },
    /// A site whose bytes overlap code the #BP handler runs.
    SiteInHandlerCode {
        /// The site.
        site: u64,
        /// The forbidden region it overlaps.
        region: CodeRegion,
    },
    /// A call/jmp target inside the trampoline page.
    TargetInTrampoline {
        /// The site.
        site: u64,
        /// The target.
        target: u64,
    },
    /// A call/jmp target inside exception entry code.
    TargetInEntryCode {
        /// The site.
        site: u64,
        /// The target.
        target: u64,
    },
    /// A call/jmp target inside the CET bring-up code.
    TargetInCetCode {
        /// The site.
        site: u64,
        /// The target.
        target: u64,
    },
    /// A call/jmp target inside the instruction at a registered target.
    TargetMidInstruction {
        /// The site.
        site: u64,
        /// The target.
        target: u64,
        /// The registered target whose first instruction contains it.
        insn_start: u64,
    },
    /// A call/jmp target that is not a registered patch target.
    UnknownTarget {
        /// The site.
        site: u64,
        /// The target.
        target: u64,
    },
    /// The target table registers an address in code the #BP handler runs.
    RegisteredTargetInHandlerCode {
        /// The registered target.
        target: u64,
        /// The forbidden region it lies in.
        region: CodeRegion,
    },
    /// A sealed batch that does not hold what [`Batch::write_sealed`] writes.
    BadSealedBatch {
        /// What is wrong with it.
        flaw: SealedFlaw,
    },
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
            UnsupportedInstruction { site, bytes, len } => write!(
                f,
                "site {site:#x} holds a {len}-byte instruction {bytes:02x?}; only 5-byte call/jmp rel32, nop5 and padded ret can be patched"
            ),
            TargetOutOfRange { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is out of rel32 range")
            }
            TargetOutsideText { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is outside kernel text")
            }
            BatchInFlight => f.write_str("another patch batch is in flight"),
            TooManySites { count } => write!(f, "{count} sites in one batch; at most 2^32 - 1"),
            SiteInHandlerCode { site, region } => {
                write!(f, "site {site:#x} lies in code the #BP handler runs ({region}); it cannot be patched")
            }
            TargetInTrampoline { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is inside the trampoline page")
            }
            TargetInEntryCode { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is inside exception entry code")
            }
            TargetInCetCode { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is inside the CET bring-up code")
            }
            TargetMidInstruction { site, target, insn_start } => write!(
                f,
                "site {site:#x}: target {target:#x} is inside the instruction that starts at the registered target {insn_start:#x}"
            ),
            UnknownTarget { site, target } => {
                write!(f, "site {site:#x}: target {target:#x} is not a registered patch target")
            }
            RegisteredTargetInHandlerCode { target, region } => {
                write!(f, "registered target {target:#x} lies in code the #BP handler runs ({region})")
            }
            BadSealedBatch { flaw } => write!(f, "sealed batch rejected: {flaw}"),
        }
    }
}

/// Read-only view of kernel text.
#[derive(Clone, Copy)]
pub struct Text<'a> {
    /// Address of the first byte of text.
    pub base: u64,
    /// The text's bytes, `bytes[i]` at address `base + i`.
    pub bytes: &'a [u8],
}

impl Text<'_> {
    /// One past the last byte of text.
    pub fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
    /// Is `addr` a byte of text?
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
    fn site_bytes(&self, site: u64) -> &[u8] {
        let off = (site - self.base) as usize;
        &self.bytes[off..off + SITE_LEN]
    }
}

/// Code the #BP handler runs (or that runs before it can): no patch site may
/// overlap it and no call/jmp target may point into it. A site there could
/// recurse into the handler while the batch is in flight (its own int3 in its
/// own entry path); a target there would let a patch enter the handler, the
/// trampoline or the shadow-stack bring-up at an arbitrary point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeRegion {
    /// The trampoline page (emitted at boot).
    Trampoline,
    /// Exception and interrupt entry: the stubs, the common entry and exit,
    /// fault recovery (asm/entry.S, linker section `.text.entry`), and any
    /// handler code the kernel places in that section.
    ExceptionEntry,
    /// Turning shadow stacks on (`sc_cet_enter`, `cet::enable_and_continue`:
    /// linker section `.text.cet`).
    CetBringUp,
}

impl fmt::Display for CodeRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CodeRegion::Trampoline => "trampoline page",
            CodeRegion::ExceptionEntry => "exception entry code",
            CodeRegion::CetBringUp => "CET bring-up code",
        })
    }
}

/// A forbidden code range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeRange {
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Which code it is (named in the refusal).
    pub region: CodeRegion,
}

impl CodeRange {
    /// Do the `len` bytes at `addr` overlap this range?
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        addr < self.end && addr.saturating_add(len) > self.start
    }
}

/// What a batch is validated against: the registered sites and targets (the
/// kernel's read-only `.shadowcall_sites` and `.shadowcall_targets` tables)
/// and the code ranges no site or target may be in.
///
/// A table that is already sorted is used in place (no copy: lookups read
/// the read-only image); otherwise a sorted copy is made.
#[derive(Clone, Debug, Default)]
pub struct Registry<'a> {
    sites: Cow<'a, [u64]>,
    targets: Cow<'a, [u64]>,
    forbidden: Cow<'a, [CodeRange]>,
}

/// Used in place when non-decreasing (a target may be registered by
/// several `patch_site!`s; the searches find an equal word either way).
fn sorted_table(raw: &[u64]) -> Cow<'_, [u64]> {
    if raw.windows(2).all(|w| w[0] <= w[1]) {
        Cow::Borrowed(raw)
    } else {
        let mut v = raw.to_vec();
        v.sort_unstable();
        v.dedup();
        Cow::Owned(v)
    }
}

impl<'a> Registry<'a> {
    /// A registry of the `sites` and `targets` tables (each used in place
    /// when sorted, else copied sorted) and the `forbidden` code ranges.
    pub fn new(sites: &'a [u64], targets: &'a [u64], forbidden: &[CodeRange]) -> Self {
        Registry {
            sites: sorted_table(sites),
            targets: sorted_table(targets),
            forbidden: Cow::Owned(forbidden.to_vec()),
        }
    }
    /// The tables as they are, without the O(n) sortedness check: for tables
    /// `new` found sorted (`tables_in_place`) once. (Unsorted tables make
    /// searches miss entries, so a batch is wrongly refused, never wrongly
    /// accepted: a search only succeeds on an equal entry.) Allocates nothing.
    pub fn in_place(sites: &'a [u64], targets: &'a [u64], forbidden: &'a [CodeRange]) -> Self {
        Registry { sites: Cow::Borrowed(sites), targets: Cow::Borrowed(targets), forbidden: Cow::Borrowed(forbidden) }
    }
    /// The registered sites, sorted.
    pub fn sites(&self) -> &[u64] {
        &self.sites
    }
    /// The registered targets, sorted.
    pub fn targets(&self) -> &[u64] {
        &self.targets
    }
    /// The code ranges no site may overlap and no target may lie in.
    pub fn forbidden(&self) -> &[CodeRange] {
        &self.forbidden
    }
    /// Are both tables used in place (not copied)?
    pub fn tables_in_place(&self) -> bool {
        matches!(self.sites, Cow::Borrowed(_)) && matches!(self.targets, Cow::Borrowed(_))
    }
    /// The forbidden region the `len` bytes at `addr` overlap, if any.
    pub fn region_of(&self, addr: u64, len: u64) -> Option<CodeRegion> {
        self.forbidden.iter().find(|r| r.overlaps(addr, len)).map(|r| r.region)
    }
    /// Check the tables themselves (at boot): no registered site overlaps,
    /// and no registered target lies in, the forbidden code. `build_batch`
    /// checks each batch again, registered or not.
    pub fn check(&self) -> Result<(), PatchError> {
        for &site in self.sites.iter() {
            if let Some(region) = self.region_of(site, SITE_LEN as u64) {
                return Err(PatchError::SiteInHandlerCode { site, region });
            }
        }
        for &target in self.targets.iter() {
            if let Some(region) = self.region_of(target, 1) {
                return Err(PatchError::RegisteredTargetInHandlerCode { target, region });
            }
        }
        Ok(())
    }
    /// The index hints of a validated entry (see [`SITE_INDEX_SHIFT`]): the
    /// positions of its site and target in the tables as this registry
    /// holds them (the read-only tables themselves when `tables_in_place`).
    /// An index that does not fit [`INDEX_BITS`] is left 0 (the check then
    /// refuses: an availability limit, never an acceptance).
    pub fn index_hints(&self, e: &Entry) -> u64 {
        let hint = |table: &[u64], v: u64| {
            table.binary_search(&v).ok().map(|i| i as u64).filter(|&i| i <= INDEX_MASK).unwrap_or(0)
        };
        let site = hint(&self.sites, e.site) << SITE_INDEX_SHIFT;
        let target = e.insn.target().map_or(0, |t| hint(&self.targets, t) << TARGET_INDEX_SHIFT);
        site | target
    }
    /// Is `addr` a registered site (binary search of the site table)?
    pub fn is_site(&self, addr: u64) -> bool {
        self.sites.binary_search(&addr).is_ok()
    }
    /// Is `addr` a registered target (binary search of the target table)?
    pub fn is_target(&self, addr: u64) -> bool {
        self.targets.binary_search(&addr).is_ok()
    }
}

/// One validated site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The site's address (a registered site).
    pub site: u64,
    /// The instruction it is patched to.
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
    /// Per entry: the registry index hints, already shifted into place
    /// (see [`SITE_INDEX_SHIFT`]); empty for a batch not built against a
    /// registry.
    hints: Vec<u64>,
    /// `tree[k]` (1 <= k < 2^depth) is a site address or padding; `tree[0]` is unused.
    tree: Vec<u64>,
    /// `slot[k]`: the index in `entries` of `tree[k]`.
    slot: Vec<u32>,
    depth: u32,
}

impl Batch {
    /// Entry `i` as `write_sealed` writes it (with its index hints).
    pub fn sealed_entry(&self, i: usize) -> SealedEntry {
        let mut se = SealedEntry::of(&self.entries[i]);
        se.kind |= self.hints.get(i).copied().unwrap_or(0);
        se
    }
    /// The validated entries, sorted by site.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    /// Number of sites.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Does the batch hold no site? (Never for a batch from [`build_batch`].)
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
        let mut b = Batch {
            tree: alloc::vec![u64::MAX; nodes + 1],
            slot: alloc::vec![u32::MAX; nodes + 1],
            entries,
            depth,
            hints: Vec::new(),
        };
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

// ---- The sealed batch ------------------------------------------------------
//
// Layout (all offsets from the start, every field 8-byte aligned, native
// byte order; no pointers, so the bytes can be copied anywhere):
//
//   0             SealedHeader
//   keys_off      2^depth u64: the Eytzinger search tree (index 0 unused;
//                 padding u64::MAX), as in `Batch`
//   slots_off     2^depth u32: node k's index in the entries (u32::MAX: padding)
//   entries_off   len SealedEntry, sorted by site
//   total_len     end

/// The first word of a sealed batch ("SCSEALD1").
pub const SEALED_MAGIC: u64 = u64::from_le_bytes(*b"SCSEALD1");
/// The magic word while a publication is being decided (the reference
/// kernel's `sc_poke_publish`, DESIGN §8.2): this value with the claiming
/// CPU's index in its low [`PENDING_CPU_BITS`] bits. For no CPU is it 0 or
/// [`SEALED_MAGIC`]: no user takes a pending batch for a live one, no
/// sealed-area writer for an idle one.
pub const SEALED_PENDING: u64 = u64::from_le_bytes(*b"\0SCPEND1");
/// Low bits of [`SEALED_PENDING`] that name the claiming CPU.
pub const PENDING_CPU_BITS: u32 = 8;
const _: () = assert!(SEALED_PENDING & ((1 << PENDING_CPU_BITS) - 1) == 0);
const _: () = assert!(SEALED_PENDING >> PENDING_CPU_BITS != SEALED_MAGIC >> PENDING_CPU_BITS);
const _: () = assert!(SEALED_PENDING != 0);
/// [`SealedEntry::kind`] of a [`NewInsn::Call`].
pub const KIND_CALL: u64 = 1;
/// [`SealedEntry::kind`] of a [`NewInsn::Jmp`].
pub const KIND_JMP: u64 = 2;
/// [`SealedEntry::kind`] of a [`NewInsn::Nop`].
pub const KIND_NOP: u64 = 3;
/// [`SealedEntry::kind`] of a [`NewInsn::Ret`].
pub const KIND_RET: u64 = 4;
/// The bits of [`SealedEntry::kind`] that hold the kind itself.
pub const KIND_MASK: u64 = 0xff;
/// Where [`SealedEntry::kind`] keeps the index of the site in
/// `.shadowcall_sites`: a hint, not trusted. A user of the entry checks
/// `index < len && table[index] == site` against the read-only table, which
/// is exactly membership (O(1) instead of a binary search on the #BP path).
pub const SITE_INDEX_SHIFT: u32 = 8;
/// Where [`SealedEntry::kind`] keeps the index of a call/jmp target in
/// `.shadowcall_targets` (a hint, checked the same way; 0 for nop/ret).
pub const TARGET_INDEX_SHIFT: u32 = SITE_INDEX_SHIFT + INDEX_BITS;
/// Bits of each index hint: tables of up to 2^28 entries.
pub const INDEX_BITS: u32 = 28;
/// Mask of one index hint, once shifted down.
pub const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const WORD: usize = 8;
/// `SealedEntry::bytes` of every nop entry: `NOP5`, packed.
pub const NOP5_WORD: u64 = pack_const(NOP5);
/// The 5 bytes of a patched `ret`: the opcode, then int3 padding.
pub const RET5: [u8; SITE_LEN] = [OPC_RET, INT3, INT3, INT3, INT3];
/// `SealedEntry::bytes` of every ret entry: `RET5`, packed.
pub const RET_WORD: u64 = pack_const(RET5);
/// Padding key and slot of the search tree. The asm check of a sealed
/// batch (asm/sealed.S `SEALED_VALID`) compares keys with -1: all ones.
const PAD_KEY: u64 = u64::MAX;
const _: () = assert!(PAD_KEY == !0);
const PAD_SLOT: u32 = u32::MAX;

/// Why `SealedBatch::from_raw` or `SealedBatch::verify` refused some bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedFlaw {
    /// The base is null or not 8-byte aligned.
    Misaligned,
    /// Fewer bytes than the header, or than the header says.
    TooShort,
    /// The first word is not the expected magic ([`SEALED_MAGIC`], or 0 before publication).
    BadMagic,
    /// More entries than a batch may have.
    BadLength,
    /// The depth is not the one for `len` entries.
    BadDepth,
    /// An offset or the total length is not the one for `len` entries.
    BadLayout,
    /// A tree node does not hold the key and slot `Batch` would put there.
    BadIndex {
        /// The tree node (1-based, breadth-first).
        node: u64,
    },
    /// An entry is out of order, of an unknown kind, or its bytes are not
    /// the encoding of its instruction at its site.
    BadEntry {
        /// The entry's index (in site order).
        index: u64,
    },
}

impl fmt::Display for SealedFlaw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SealedFlaw::Misaligned => f.write_str("base is null or not 8-byte aligned"),
            SealedFlaw::TooShort => f.write_str("fewer bytes than the header or its total length"),
            SealedFlaw::BadMagic => f.write_str("bad magic"),
            SealedFlaw::BadLength => f.write_str("entry count above 2^32 - 1"),
            SealedFlaw::BadDepth => f.write_str("tree depth does not match the entry count"),
            SealedFlaw::BadLayout => f.write_str("offsets or total length do not match the entry count"),
            SealedFlaw::BadIndex { node } => write!(f, "search tree node {node} is inconsistent"),
            SealedFlaw::BadEntry { index } => write!(f, "entry {index} is out of order or not a valid encoding"),
        }
    }
}

/// The header at offset 0 of a sealed batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedHeader {
    /// [`SEALED_MAGIC`] once published (0 while unpublished).
    pub magic: u64,
    /// Number of entries.
    pub len: u64,
    /// Steps of every search: the tree has 2^depth - 1 nodes.
    pub depth: u64,
    /// Offset of the search tree's keys (2^depth u64, index 0 unused).
    pub keys_off: u64,
    /// Offset of the tree nodes' entry indices (2^depth u32).
    pub slots_off: u64,
    /// Offset of the `len` [`SealedEntry`]s, sorted by site.
    pub entries_off: u64,
    /// Bytes of the whole sealed batch, header included.
    pub total_len: u64,
}

/// One site of a sealed batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedEntry {
    /// The site's address.
    pub site: u64,
    /// The call/jmp target; 0 for nop and ret.
    pub target: u64,
    /// `KIND_CALL`, `KIND_JMP`, `KIND_NOP` or `KIND_RET` in the low byte
    /// ([`KIND_MASK`]), and the registry index hints of the site
    /// ([`SITE_INDEX_SHIFT`]) and target ([`TARGET_INDEX_SHIFT`]).
    pub kind: u64,
    /// The 5 new bytes, little-endian (byte 0 is the opcode); bits 40..63 zero.
    pub bytes: u64,
}

/// `pack_bytes` for constants.
const fn pack_const(b: [u8; SITE_LEN]) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < SITE_LEN {
        w |= (b[i] as u64) << (8 * i);
        i += 1;
    }
    w
}

fn pack_bytes(b: &[u8; SITE_LEN]) -> u64 {
    let mut w = [0u8; WORD];
    w[..SITE_LEN].copy_from_slice(b);
    u64::from_le_bytes(w)
}

impl SealedEntry {
    /// The sealed form of a validated entry.
    pub fn of(e: &Entry) -> Self {
        let kind = match e.insn {
            NewInsn::Call(_) => KIND_CALL,
            NewInsn::Jmp(_) => KIND_JMP,
            NewInsn::Nop => KIND_NOP,
            NewInsn::Ret => KIND_RET,
        };
        SealedEntry { site: e.site, target: e.insn.target().unwrap_or(0), kind, bytes: pack_bytes(&e.bytes) }
    }
    /// Where an emulated call at this site returns to.
    pub fn ret_addr(&self) -> u64 {
        self.site.wrapping_add(SITE_LEN as u64)
    }
    /// The kind alone (`KIND_*`), without the index hints.
    pub fn kind_code(&self) -> u64 {
        self.kind & KIND_MASK
    }
    /// The new instruction, or None for an unknown kind.
    pub fn insn(&self) -> Option<NewInsn> {
        match self.kind_code() {
            KIND_CALL => Some(NewInsn::Call(self.target)),
            KIND_JMP => Some(NewInsn::Jmp(self.target)),
            KIND_NOP => Some(NewInsn::Nop),
            KIND_RET => Some(NewInsn::Ret),
            _ => None,
        }
    }
    /// The five new bytes.
    pub fn site_bytes(&self) -> [u8; SITE_LEN] {
        let w = self.bytes.to_le_bytes();
        [w[0], w[1], w[2], w[3], w[4]]
    }
    /// Is this entry what `of` makes for some valid entry (known kind,
    /// target 0 for nop/ret, bytes the encoding of the instruction here)?
    fn well_formed(&self) -> bool {
        let Some(insn) = self.insn() else { return false };
        if insn.target().is_none() && self.target != 0 {
            return false;
        }
        insn.encode(self.site).is_ok_and(|b| pack_bytes(&b) == self.bytes)
    }
}

/// Where each part of a sealed batch of `n` entries goes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct SealedLayout {
    depth: u64,
    nodes: usize,
    keys_off: usize,
    slots_off: usize,
    entries_off: usize,
    total: usize,
}

const fn tree_depth(n: usize) -> u32 {
    usize::BITS - n.leading_zeros()
}

impl SealedLayout {
    const fn of(n: usize) -> Self {
        let depth = tree_depth(n);
        // Keys and slots are indexed 0..2^depth (node 0 unused).
        let nodes = 1usize << depth;
        let keys_off = core::mem::size_of::<SealedHeader>();
        let slots_off = keys_off + nodes * core::mem::size_of::<u64>();
        let entries_off = (slots_off + nodes * core::mem::size_of::<u32>()).next_multiple_of(WORD);
        let total = entries_off + n * core::mem::size_of::<SealedEntry>();
        SealedLayout { depth: depth as u64, nodes, keys_off, slots_off, entries_off, total }
    }
}

/// The in-order position of node `k` (1-based, breadth-first) in a complete
/// tree of `depth` levels: the index of the sorted key `Batch::from_sorted`
/// puts there.
fn in_order_index(k: usize, depth: u32) -> usize {
    let level = usize::BITS - 1 - k.leading_zeros();
    let pos = k - (1usize << level);
    ((2 * pos + 1) << (depth - 1 - level)) - 1
}

fn put_u64(out: &mut [u8], off: usize, v: u64) {
    out[off..off + WORD].copy_from_slice(&v.to_ne_bytes());
}

impl Batch {
    /// Bytes `write_sealed` writes.
    pub fn sealed_len(&self) -> usize {
        SealedLayout::of(self.len()).total
    }

    /// Write this batch as a sealed batch into `out[..self.sealed_len()]`
    /// (any alignment; read it back with `SealedBatch::from_raw` from an
    /// 8-byte aligned copy).
    pub fn write_sealed(&self, out: &mut [u8]) -> Result<(), PatchError> {
        let node = |k: usize| if self.tree.is_empty() { (PAD_KEY, PAD_SLOT) } else { (self.tree[k], self.slot[k]) };
        write_sealed_image(out, self.len(), node, |i| self.sealed_entry(i))
    }
}

/// Bytes of a sealed batch of one site ([`write_sealed_one`]).
pub const SEALED_ONE_LEN: usize = SealedLayout::of(1).total;

/// Write the sealed batch of the one validated entry `e` (with its index
/// hints, as [`check_entry`] returns it) into `out`: what `write_sealed`
/// writes for a one-site batch, without allocating.
pub fn write_sealed_one(e: &SealedEntry, out: &mut [u8; SEALED_ONE_LEN]) -> Result<(), PatchError> {
    // One key: the tree has node 1 only (node 0 is unused padding).
    let node = |k: usize| if k == 1 { (e.site, 0) } else { (PAD_KEY, PAD_SLOT) };
    write_sealed_image(out, 1, node, |_| *e)
}

/// The sealed layout of `n` entries, from each tree node's (key, slot) and
/// each sealed entry.
fn write_sealed_image(
    out: &mut [u8],
    n: usize,
    node: impl Fn(usize) -> (u64, u32),
    entry: impl Fn(usize) -> SealedEntry,
) -> Result<(), PatchError> {
    let l = SealedLayout::of(n);
    if out.len() < l.total {
        return Err(PatchError::BadSealedBatch { flaw: SealedFlaw::TooShort });
    }
    let out = &mut out[..l.total];
    out.fill(0);
    let header =
        [SEALED_MAGIC, n as u64, l.depth, l.keys_off as u64, l.slots_off as u64, l.entries_off as u64, l.total as u64];
    for (i, v) in header.into_iter().enumerate() {
        put_u64(out, i * WORD, v);
    }
    for k in 0..l.nodes {
        let (key, slot) = node(k);
        put_u64(out, l.keys_off + k * WORD, key);
        let s = l.slots_off + k * core::mem::size_of::<u32>();
        out[s..s + 4].copy_from_slice(&slot.to_ne_bytes());
    }
    for i in 0..n {
        let se = entry(i);
        let off = l.entries_off + i * core::mem::size_of::<SealedEntry>();
        for (j, v) in [se.site, se.target, se.kind, se.bytes].into_iter().enumerate() {
            put_u64(out, off + j * WORD, v);
        }
    }
    Ok(())
}

/// A sealed batch read in place: the same search as `Batch::lookup` over
/// bytes that `Batch::write_sealed` wrote (and the kernel made read-only).
#[derive(Clone, Copy, Debug)]
pub struct SealedBatch<'a> {
    header: &'a SealedHeader,
    keys: &'a [u64],
    slots: &'a [u32],
    entries: &'a [SealedEntry],
}

impl<'a> SealedBatch<'a> {
    /// View the `len` bytes at `base` as a sealed batch. Checks the header
    /// (magic, entry count, depth, every offset and the total length) in
    /// constant time, so that `lookup` stays in bounds whatever the rest
    /// holds; `verify` checks the contents.
    ///
    /// # Safety
    /// `base` must point to `len` readable bytes that stay valid and
    /// unchanged for `'a` (read-only memory).
    pub unsafe fn from_raw(base: *const u8, len: usize) -> Result<SealedBatch<'a>, PatchError> {
        // SAFETY: the caller's obligations are this function's.
        unsafe { Self::from_raw_with(base, len, SEALED_MAGIC) }
    }

    /// `from_raw` for a sealed batch written without its magic word yet
    /// (the word must be 0): the patcher verifies the read-only copy before
    /// it publishes it by writing the magic.
    ///
    /// # Safety
    /// As `from_raw`.
    pub unsafe fn from_raw_unpublished(base: *const u8, len: usize) -> Result<SealedBatch<'a>, PatchError> {
        // SAFETY: the caller's obligations are this function's.
        unsafe { Self::from_raw_with(base, len, 0) }
    }

    /// # Safety
    /// As `from_raw`.
    unsafe fn from_raw_with(base: *const u8, len: usize, magic: u64) -> Result<SealedBatch<'a>, PatchError> {
        let flaw = |flaw| Err(PatchError::BadSealedBatch { flaw });
        if base.is_null() || !(base as usize).is_multiple_of(WORD) {
            return flaw(SealedFlaw::Misaligned);
        }
        if len < core::mem::size_of::<SealedHeader>() {
            return flaw(SealedFlaw::TooShort);
        }
        // SAFETY: base is non-null, 8-byte aligned, and at least a header's
        // bytes are readable (caller's obligation, length checked above);
        // every bit pattern is a valid SealedHeader (seven u64s).
        let header = unsafe { &*(base as *const SealedHeader) };
        if header.magic != magic {
            return flaw(SealedFlaw::BadMagic);
        }
        let n = match usize::try_from(header.len) {
            Ok(n) if n <= u32::MAX as usize => n,
            _ => return flaw(SealedFlaw::BadLength),
        };
        let l = SealedLayout::of(n);
        if header.depth != l.depth {
            return flaw(SealedFlaw::BadDepth);
        }
        if (header.keys_off, header.slots_off, header.entries_off, header.total_len)
            != (l.keys_off as u64, l.slots_off as u64, l.entries_off as u64, l.total as u64)
        {
            return flaw(SealedFlaw::BadLayout);
        }
        if len < l.total {
            return flaw(SealedFlaw::TooShort);
        }
        // SAFETY: the layout of n entries lies within the len readable bytes
        // (checked above); each part's offset is 8-byte aligned from an
        // 8-byte aligned base; u64, u32 and SealedEntry (four u64s) are
        // valid for every bit pattern; the caller keeps the bytes unchanged for 'a.
        unsafe {
            Ok(SealedBatch {
                header,
                keys: core::slice::from_raw_parts(base.add(l.keys_off) as *const u64, l.nodes),
                slots: core::slice::from_raw_parts(base.add(l.slots_off) as *const u32, l.nodes),
                entries: core::slice::from_raw_parts(base.add(l.entries_off) as *const SealedEntry, n),
            })
        }
    }

    /// Check the contents: the entries strictly sorted by site and each a
    /// well-formed encoding, the tree exactly the one `Batch` builds.
    pub fn verify(&self) -> Result<(), PatchError> {
        let flaw = |flaw| Err(PatchError::BadSealedBatch { flaw });
        let depth = self.header.depth as u32;
        for (i, e) in self.entries.iter().enumerate() {
            let ordered = i == 0 || self.entries[i - 1].site < e.site;
            if !ordered || !e.well_formed() || e.site == PAD_KEY {
                return flaw(SealedFlaw::BadEntry { index: i as u64 });
            }
        }
        for k in 1..self.keys.len() {
            let idx = in_order_index(k, depth);
            let (key, slot) = match self.entries.get(idx) {
                Some(e) => (e.site, idx as u32),
                None => (PAD_KEY, PAD_SLOT),
            };
            if self.keys[k] != key || self.slots[k] != slot {
                return flaw(SealedFlaw::BadIndex { node: k as u64 });
            }
        }
        Ok(())
    }

    /// The header (checked by `from_raw`).
    pub fn header(&self) -> &'a SealedHeader {
        self.header
    }
    /// The entries, sorted by site once [`verify`](Self::verify) passed.
    pub fn entries(&self) -> &'a [SealedEntry] {
        self.entries
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Does it hold no entry?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for the int3 at `site`: the search of `Batch::lookup`.
    pub fn lookup(&self, site: u64) -> Option<&'a SealedEntry> {
        // The depth `from_raw` checked, from the slice it built (keys.len() ==
        // 2^depth), never the header again: the area may have changed since
        // (review8 F5).
        let depth = self.keys.len().trailing_zeros();
        if depth == 0 {
            return None;
        }
        let keys = self.keys;
        let mut k = 1usize;
        for _ in 0..depth {
            // SAFETY: keys.len() == 2^depth (from_raw checked the layout), and
            // k < 2^depth before each step, as in Batch::lookup.
            let key = unsafe { *keys.get_unchecked(k) };
            k = 2 * k + (key < site) as usize;
        }
        k >>= (!k).trailing_zeros() + 1;
        if k != 0 && keys[k] == site {
            self.entries.get(self.slots[k] as usize)
        } else {
            None
        }
    }
}

/// Validate `sites` against kernel `text` and the `registry` (registered
/// sites and targets, forbidden code), and build the sorted batch. Writes
/// nothing.
pub fn build_batch(text: &Text<'_>, registry: &Registry<'_>, sites: &[(u64, NewInsn)]) -> Result<Batch, PatchError> {
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
    let hints = entries.iter().map(|e| registry.index_hints(e)).collect();
    let mut batch = Batch::from_sorted(entries);
    batch.hints = hints;
    Ok(batch)
}

/// Validate one site without allocating: what [`build_batch`] checks for
/// it, as the sealed entry (with its index hints) a one-site batch holds.
pub fn check_entry(
    text: &Text<'_>,
    registry: &Registry<'_>,
    site: u64,
    insn: NewInsn,
) -> Result<SealedEntry, PatchError> {
    let e = Entry { site, insn, bytes: check_site(text, registry, site, insn)? };
    let mut se = SealedEntry::of(&e);
    se.kind |= registry.index_hints(&e);
    Ok(se)
}

fn check_site(
    text: &Text<'_>,
    registry: &Registry<'_>,
    site: u64,
    insn: NewInsn,
) -> Result<[u8; SITE_LEN], PatchError> {
    if !text.contains(site) {
        return Err(PatchError::AddressOutsideText { site });
    }
    if site + SITE_LEN as u64 > text.end() {
        return Err(PatchError::SiteCrossesTextEnd { site });
    }
    if let Some(region) = registry.region_of(site, SITE_LEN as u64) {
        return Err(PatchError::SiteInHandlerCode { site, region });
    }
    let sites = registry.sites();
    match sites.binary_search(&site) {
        Ok(_) => {}
        Err(i) => {
            return Err(match i.checked_sub(1).map(|j| sites[j]) {
                Some(start) if site - start < SITE_LEN as u64 => PatchError::MidInstruction { site, insn_start: start },
                _ => PatchError::UnknownSite { site },
            })
        }
    }
    classify(text.site_bytes(site), site)?;
    let bytes = insn.encode(site)?;
    if let Some(target) = insn.target() {
        check_target(text, registry, site, target)?;
    }
    Ok(bytes)
}

/// A call/jmp target must be in text, outside the forbidden code, and a
/// registered target.
fn check_target(text: &Text<'_>, registry: &Registry<'_>, site: u64, target: u64) -> Result<(), PatchError> {
    if !text.contains(target) {
        return Err(PatchError::TargetOutsideText { site, target });
    }
    match registry.region_of(target, 1) {
        Some(CodeRegion::Trampoline) => return Err(PatchError::TargetInTrampoline { site, target }),
        Some(CodeRegion::ExceptionEntry) => return Err(PatchError::TargetInEntryCode { site, target }),
        Some(CodeRegion::CetBringUp) => return Err(PatchError::TargetInCetCode { site, target }),
        None => {}
    }
    let targets = registry.targets();
    let i = match targets.binary_search(&target) {
        Ok(_) => return Ok(()),
        Err(i) => i,
    };
    // Not registered: inside the first instruction of the registered target
    // just below it, or simply unknown.
    if let Some(&start) = i.checked_sub(1).map(|j| &targets[j]) {
        if text.contains(start) {
            let off = (start - text.base) as usize;
            if matches!(insn::insn_len(&text.bytes[off..]), Some(len) if target < start + len as u64) {
                return Err(PatchError::TargetMidInstruction { site, target, insn_start: start });
            }
        }
    }
    Err(PatchError::UnknownTarget { site, target })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const BASE: u64 = 0x10_0000;
    const TEXT_LEN: usize = 128;
    /// Forbidden code in the test text.
    const TRAMP: (u64, u64) = (BASE + 0x40, BASE + 0x50);
    const ENTRY: (u64, u64) = (BASE + 0x50, BASE + 0x60);
    const CET: (u64, u64) = (BASE + 0x60, BASE + 0x70);
    /// A registered target whose first instruction is 4 bytes long.
    const TARGET4: u64 = BASE + 0x28;

    fn forbidden() -> Vec<CodeRange> {
        vec![
            CodeRange { start: TRAMP.0, end: TRAMP.1, region: CodeRegion::Trampoline },
            CodeRange { start: ENTRY.0, end: ENTRY.1, region: CodeRegion::ExceptionEntry },
            CodeRange { start: CET.0, end: CET.1, region: CodeRegion::CetBringUp },
        ]
    }

    /// A little text segment: registered sites, registered targets, some
    /// other code, and three forbidden ranges that hold registered sites and
    /// targets (only the range check keeps them out of a batch).
    fn text() -> (Vec<u8>, Vec<u64>, Vec<u64>) {
        let mut t = vec![0x90u8; TEXT_LEN];
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
        // 0x28: a registered target: mov (%rsp), %rax (4 bytes); ret
        t[0x28..0x2d].copy_from_slice(&[0x48, 0x8b, 0x04, 0x24, 0xc3]);
        // 0x3c: a registered nop5 whose last byte is the trampoline's first.
        // 0x44, 0x54, 0x64: registered nop5 sites inside the forbidden ranges.
        for off in [0x3c, 0x44, 0x54, 0x64] {
            t[off..off + SITE_LEN].copy_from_slice(&NOP5);
        }
        let sites = vec![
            BASE,
            BASE + 5,
            BASE + 10,
            BASE + 15,
            BASE + 20,
            BASE + 25,
            BASE + 0x3c,
            BASE + 0x44,
            BASE + 0x54,
            BASE + 0x64,
        ];
        // Registered targets, also one in each forbidden range.
        let targets = vec![BASE, TARGET4, TRAMP.0, ENTRY.0 + 4, CET.0];
        (t, sites, targets)
    }

    fn build(sites: &[(u64, NewInsn)]) -> Result<Batch, PatchError> {
        let (t, reg, targets) = text();
        let f = forbidden();
        build_batch(&Text { base: BASE, bytes: &t }, &Registry::new(&reg, &targets, &f), sites)
    }

    #[test]
    fn classify_kinds() {
        let (t, _, _) = text();
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
            (vec![(BASE + 126, NewInsn::Nop)], SiteCrossesTextEnd { site: BASE + 126 }),
            (vec![(BASE, NewInsn::Nop), (BASE, NewInsn::Ret)], DuplicateSite { site: BASE }),
            (vec![(BASE, NewInsn::Nop), (BASE + 2, NewInsn::Ret)], OverlappingSites { first: BASE, second: BASE + 2 }),
            (vec![(BASE + 1, NewInsn::Nop)], MidInstruction { site: BASE + 1, insn_start: BASE }),
            (vec![(BASE + 30, NewInsn::Nop)], UnknownSite { site: BASE + 30 }),
            (vec![(BASE + 25, NewInsn::Nop)], Undecodable { site: BASE + 25 }),
            (
                vec![(BASE, NewInsn::Call(0xffff_ffff_8000_0000))],
                TargetOutOfRange { site: BASE, target: 0xffff_ffff_8000_0000 },
            ),
            (vec![(BASE, NewInsn::Jmp(BASE + 128))], TargetOutsideText { site: BASE, target: BASE + 128 }),
            (
                vec![(BASE + 0x54, NewInsn::Nop)],
                SiteInHandlerCode { site: BASE + 0x54, region: CodeRegion::ExceptionEntry },
            ),
            (vec![(BASE, NewInsn::Call(TRAMP.0))], TargetInTrampoline { site: BASE, target: TRAMP.0 }),
            (vec![(BASE, NewInsn::Jmp(ENTRY.0 + 4))], TargetInEntryCode { site: BASE, target: ENTRY.0 + 4 }),
            (vec![(BASE, NewInsn::Call(CET.0))], TargetInCetCode { site: BASE, target: CET.0 }),
            (
                vec![(BASE, NewInsn::Call(TARGET4 + 1))],
                TargetMidInstruction { site: BASE, target: TARGET4 + 1, insn_start: TARGET4 },
            ),
            (vec![(BASE, NewInsn::Call(BASE + 0x1e))], UnknownTarget { site: BASE, target: BASE + 0x1e }),
        ];
        for (sites, want) in cases {
            assert_eq!(build(&sites).unwrap_err(), want, "{sites:?}");
            assert!(!alloc::format!("{want}").is_empty());
        }
        assert!(matches!(build(&[(BASE + 20, NewInsn::Nop)]), Err(UnsupportedInstruction { len: 5, .. })));
    }

    #[test]
    fn no_site_or_target_in_handler_code() {
        use PatchError::*;
        let region_of = |site| match build(&[(site, NewInsn::Nop)]) {
            Err(SiteInHandlerCode { site: s, region }) if s == site => Some(region),
            other => panic!("{site:#x}: {other:?}"),
        };
        assert_eq!(region_of(BASE + 0x3c), Some(CodeRegion::Trampoline), "a site whose last byte is in the range");
        assert_eq!(region_of(BASE + 0x44), Some(CodeRegion::Trampoline));
        assert_eq!(region_of(BASE + 0x54), Some(CodeRegion::ExceptionEntry));
        assert_eq!(region_of(BASE + 0x64), Some(CodeRegion::CetBringUp));
        // Without the ranges, the same sites and targets are accepted: the
        // range check alone rejects them.
        let (t, reg, targets) = text();
        let open_registry = Registry::new(&reg, &targets, &[]);
        let text = Text { base: BASE, bytes: &t };
        for site in [BASE + 0x3c, BASE + 0x44, BASE + 0x54, BASE + 0x64] {
            assert!(build_batch(&text, &open_registry, &[(site, NewInsn::Nop)]).is_ok());
        }
        for target in [TRAMP.0, ENTRY.0 + 4, CET.0] {
            assert!(build_batch(&text, &open_registry, &[(BASE, NewInsn::Call(target))]).is_ok());
        }
        // Just past a registered target's first instruction: unknown, not mid-instruction.
        assert_eq!(
            build(&[(BASE, NewInsn::Call(TARGET4 + 4))]).unwrap_err(),
            UnknownTarget { site: BASE, target: TARGET4 + 4 }
        );
        for off in 1..4 {
            assert_eq!(
                build(&[(BASE + 5, NewInsn::Jmp(TARGET4 + off))]).unwrap_err(),
                TargetMidInstruction { site: BASE + 5, target: TARGET4 + off, insn_start: TARGET4 }
            );
        }
        // The call at a registered target's address, 5 bytes long.
        assert_eq!(
            build(&[(BASE + 10, NewInsn::Call(BASE + 4))]).unwrap_err(),
            TargetMidInstruction { site: BASE + 10, target: BASE + 4, insn_start: BASE }
        );
        assert!(build(&[(BASE + 10, NewInsn::Call(BASE))]).is_ok());
    }

    #[test]
    fn registry_check_refuses_tables_with_handler_code() {
        let (_, reg, targets) = text();
        let f = forbidden();
        let clean_sites: Vec<u64> = reg.iter().copied().filter(|&s| s < TRAMP.0 - 4).collect();
        let clean_targets = [BASE, TARGET4];
        assert_eq!(Registry::new(&clean_sites, &clean_targets, &f).check(), Ok(()));
        assert_eq!(
            Registry::new(&reg, &clean_targets, &f).check(),
            Err(PatchError::SiteInHandlerCode { site: BASE + 0x3c, region: CodeRegion::Trampoline })
        );
        assert_eq!(
            Registry::new(&clean_sites, &targets, &f).check(),
            Err(PatchError::RegisteredTargetInHandlerCode { target: TRAMP.0, region: CodeRegion::Trampoline })
        );
        let entry_target = [BASE, ENTRY.0 + 4];
        assert_eq!(
            Registry::new(&clean_sites, &entry_target, &f).check(),
            Err(PatchError::RegisteredTargetInHandlerCode { target: ENTRY.0 + 4, region: CodeRegion::ExceptionEntry })
        );
    }

    #[test]
    fn registry_tables_used_in_place_when_sorted() {
        let sorted = [1u64, 5, 9];
        let r = Registry::new(&sorted, &sorted, &[]);
        assert!(r.tables_in_place());
        assert_eq!(r.sites().as_ptr(), sorted.as_ptr());
        let unsorted = [9u64, 1, 5, 1];
        let r = Registry::new(&unsorted, &sorted, &[]);
        assert!(!r.tables_in_place());
        assert_eq!(r.sites(), [1, 5, 9]);
        assert!(r.is_site(5) && !r.is_site(2) && r.is_target(9) && !r.is_target(10));
        let r = Registry::in_place(&sorted, &sorted, &[]);
        assert!(r.tables_in_place() && r.is_site(9));
        let range = CodeRange { start: 10, end: 20, region: CodeRegion::CetBringUp };
        assert!(range.overlaps(6, 5) && range.overlaps(19, 1) && !range.overlaps(5, 5) && !range.overlaps(20, 5));
    }

    /// `n` irregularly spaced sites (5..15 bytes apart) from BASE on.
    fn spread_sites(n: usize) -> Vec<u64> {
        let mut seed = 0x2545_f491_4f6c_dd1du64 ^ n as u64;
        let mut addrs: Vec<u64> = Vec::new();
        let mut a = BASE;
        for _ in 0..n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            a += 5 + seed % 11;
            addrs.push(a);
        }
        addrs
    }

    /// A batch's sealed copy in an 8-byte aligned buffer.
    fn seal(b: &Batch) -> Vec<u64> {
        let mut words = vec![0u64; b.sealed_len().div_ceil(8)];
        // SAFETY: the buffer holds words.len() * 8 initialised bytes.
        let bytes = unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) };
        b.write_sealed(bytes).unwrap();
        words
    }

    fn open(words: &[u64]) -> Result<SealedBatch<'_>, PatchError> {
        // SAFETY: the words are readable and borrowed for the view's lifetime.
        unsafe { SealedBatch::from_raw(words.as_ptr() as *const u8, words.len() * 8) }
    }

    /// Probe every address around `addrs` in `b` and its sealed copy.
    fn check_lookups(addrs: &[u64], b: &Batch) {
        let words = seal(b);
        let sealed = open(&words).unwrap();
        assert_eq!(sealed.verify(), Ok(()));
        assert_eq!(sealed.len(), addrs.len());
        let n = addrs.len();
        let end = addrs.last().copied().unwrap_or(BASE) + 20;
        for probe in BASE..end {
            let want = addrs.binary_search(&probe).ok().map(|i| addrs[i]);
            assert_eq!(b.lookup(probe).map(|e| e.site), want, "n={n} probe={probe:#x}");
            assert_eq!(sealed.lookup(probe).map(|e| e.site), want, "sealed n={n} probe={probe:#x}");
        }
        for probe in [0, 1, BASE - 1, u64::MAX - 1, u64::MAX] {
            assert!(b.lookup(probe).is_none() && sealed.lookup(probe).is_none());
        }
    }

    #[test]
    fn lookup_matches_a_linear_search_for_every_size() {
        // Batches of 0..=300 and 65,536 sites at irregular addresses; probe
        // every address around them, in the batch and in its sealed copy.
        for n in (0..=300usize).chain([65536]) {
            let addrs = spread_sites(n);
            let entries: Vec<Entry> =
                addrs.iter().map(|&s| Entry { site: s, insn: NewInsn::Nop, bytes: NOP5 }).collect();
            check_lookups(&addrs, &Batch::from_sorted(entries));
        }
        assert!(Batch::default().lookup(BASE).is_none());
    }

    #[test]
    fn in_order_index_is_the_tree_from_sorted_builds() {
        for n in 1..=70usize {
            let entries: Vec<Entry> =
                (0..n as u64).map(|i| Entry { site: BASE + 5 * i, insn: NewInsn::Nop, bytes: NOP5 }).collect();
            let b = Batch::from_sorted(entries);
            for k in 1..b.tree.len() {
                let idx = in_order_index(k, b.depth);
                assert_eq!(b.slot[k], if idx < n { idx as u32 } else { PAD_SLOT }, "n={n} k={k}");
            }
        }
    }

    /// The fixed words the asm entry check (sealed.S CHECKED_ENTRY) compares
    /// nop/ret entries with are what `SealedEntry::of` stores for them.
    #[test]
    fn fixed_words_match_the_encodings() {
        for (insn, word) in [(NewInsn::Nop, NOP5_WORD), (NewInsn::Ret, RET_WORD)] {
            let e = Entry { site: BASE, insn, bytes: insn.encode(BASE).unwrap() };
            assert_eq!(SealedEntry::of(&e).bytes, word);
        }
    }

    #[test]
    fn sealed_entries_keep_every_kind() {
        let b = build(&[
            (BASE + 15, NewInsn::Call(TARGET4)),
            (BASE, NewInsn::Nop),
            (BASE + 5, NewInsn::Ret),
            (BASE + 10, NewInsn::Jmp(BASE)),
        ])
        .unwrap();
        let words = seal(&b);
        let s = open(&words).unwrap();
        assert_eq!(s.verify(), Ok(()));
        assert_eq!(s.header().magic, SEALED_MAGIC);
        assert_eq!(s.header().total_len as usize, b.sealed_len());
        for e in b.entries() {
            let se = s.lookup(e.site).unwrap();
            assert_eq!(se.insn(), Some(e.insn));
            assert_eq!(se.site_bytes(), e.bytes);
            assert_eq!(se.ret_addr(), e.ret_addr());
            assert_eq!(se.target, e.insn.target().unwrap_or(0));
        }
        let kinds: Vec<u64> = s.entries().iter().map(|e| e.kind_code()).collect();
        assert_eq!(kinds, [KIND_NOP, KIND_RET, KIND_JMP, KIND_CALL]);
        assert_eq!(s.entries()[3].bytes, 0x14e8, "call rel32 +0x14, little-endian");
        // Position independent: a copy elsewhere reads the same.
        let copy = words.clone();
        let c = open(&copy).unwrap();
        assert_eq!(c.entries(), s.entries());
        // Too small a buffer is refused, and nothing is written past it.
        let mut small = vec![0xaau8; b.sealed_len() - 1];
        assert_eq!(b.write_sealed(&mut small), Err(PatchError::BadSealedBatch { flaw: SealedFlaw::TooShort }));
        assert!(small.iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn one_site_sealed_without_a_batch_is_the_batch_image() {
        let code = [0xe8, 0, 0, 0, 0, 0x90, 0xe8, 0, 0, 0, 0, 0x90, 0xc3];
        let text = Text { base: 0x1000, bytes: &code };
        let (sites, targets) = ([0x1000u64, 0x1006], [0x100cu64, 0x2000]);
        let reg = Registry::new(&sites, &targets, &[]);
        for insn in [NewInsn::Call(0x100c), NewInsn::Nop, NewInsn::Jmp(0x100c)] {
            let b = build_batch(&text, &reg, &[(0x1006, insn)]).unwrap();
            let mut image = alloc::vec![0u8; b.sealed_len()];
            b.write_sealed(&mut image).unwrap();
            let e = check_entry(&text, &reg, 0x1006, insn).unwrap();
            assert_eq!(e, b.sealed_entry(0));
            let mut one = [0xaau8; SEALED_ONE_LEN];
            write_sealed_one(&e, &mut one).unwrap();
            assert_eq!(&one[..], &image[..], "{insn:?}");
        }
        // The same refusals as a batch.
        assert_eq!(
            check_entry(&text, &reg, 0x1006, NewInsn::Call(0x2004)),
            build_batch(&text, &reg, &[(0x1006, NewInsn::Call(0x2004))]).map(|b| b.sealed_entry(0))
        );
        assert!(matches!(check_entry(&text, &reg, 0x1007, NewInsn::Nop), Err(PatchError::MidInstruction { .. })));
    }

    #[test]
    fn sealed_entries_carry_registry_index_hints() {
        let code = [0xe8, 0, 0, 0, 0, 0x90, 0xe8, 0, 0, 0, 0, 0x90, 0xc3];
        let text = Text { base: 0x1000, bytes: &code };
        let (sites, targets) = ([0x1000u64, 0x1006], [0x100cu64, 0x2000]);
        let reg = Registry::new(&sites, &targets, &[]);
        let b = build_batch(&text, &reg, &[(0x1006, NewInsn::Call(0x100c)), (0x1000, NewInsn::Nop)]).unwrap();
        for (i, (site, target_index)) in [(0x1000u64, None), (0x1006, Some(0u64))].into_iter().enumerate() {
            let se = b.sealed_entry(i);
            assert_eq!(se.site, site);
            let site_index = (se.kind >> SITE_INDEX_SHIFT) & INDEX_MASK;
            assert_eq!(sites[site_index as usize], site);
            assert_eq!(se.kind >> TARGET_INDEX_SHIFT, target_index.unwrap_or(0));
            assert_eq!(se.kind_code(), if target_index.is_some() { KIND_CALL } else { KIND_NOP });
        }
        // The sealed image holds the same words.
        let mut buf = alloc::vec![0u8; b.sealed_len()];
        b.write_sealed(&mut buf).unwrap();
        // SAFETY: `buf` is a sealed image of its own length.
        let s = unsafe { SealedBatch::from_raw(buf.as_ptr(), buf.len()) }.unwrap();
        assert_eq!(s.entries(), &[b.sealed_entry(0), b.sealed_entry(1)]);
        s.verify().unwrap();
    }

    /// Eighth review, F5: `lookup` used to re-read the header's depth after
    /// `from_raw` checked it; a store to the sealed area in between (another
    /// CPU sealing the next batch while this CPU's handler holds the view) made
    /// the walk run past the tree (`get_unchecked` out of bounds). It now keeps
    /// the checked depth: the changed header has no effect on the walk.
    #[test]
    fn review8_lookup_rereads_depth() {
        let b = build(&[(BASE, NewInsn::Nop), (BASE + 5, NewInsn::Ret), (BASE + 10, NewInsn::Jmp(BASE))]).unwrap();
        let mut words = seal(&b);
        let p = words.as_mut_ptr();
        // SAFETY: the words are readable for the test's length.
        let sealed = unsafe { SealedBatch::from_raw(p as *const u8, words.len() * 8) }.unwrap();
        assert_eq!(sealed.lookup(BASE + 5).map(|e| e.site), Some(BASE + 5));
        let depth_at = core::mem::offset_of!(SealedHeader, depth) / 8;
        // SAFETY: a word of the buffer (what an alias store does to the area).
        unsafe { p.add(depth_at).write_volatile(p.add(depth_at).read_volatile() + 1) };
        // Below every key: with the re-read depth the walk went left depth + 1 times.
        assert_eq!(sealed.lookup(BASE - 1).map(|e| e.site), None);
        assert_eq!(sealed.lookup(BASE + 10).map(|e| e.site), Some(BASE + 10));
    }

    #[test]
    fn from_raw_rejects_a_corrupted_header() {
        let b = build(&[(BASE, NewInsn::Nop), (BASE + 5, NewInsn::Ret), (BASE + 10, NewInsn::Jmp(BASE))]).unwrap();
        let good = seal(&b);
        let flaw = |words: &[u64]| match open(words) {
            Err(PatchError::BadSealedBatch { flaw }) => Some(flaw),
            Err(e) => panic!("{e}"),
            Ok(_) => None,
        };
        assert_eq!(flaw(&good), None);
        // Unpublished (magic 0): refused as a live batch, accepted as unpublished.
        let mut unpublished = good.clone();
        unpublished[0] = 0;
        assert_eq!(flaw(&unpublished), Some(SealedFlaw::BadMagic));
        // SAFETY: `unpublished` is an aligned, live Vec of u64s.
        let u = unsafe { SealedBatch::from_raw_unpublished(unpublished.as_ptr() as *const u8, unpublished.len() * 8) };
        assert!(u.is_ok_and(|b| b.verify().is_ok()));
        // SAFETY: as above.
        assert!(unsafe { SealedBatch::from_raw_unpublished(good.as_ptr() as *const u8, good.len() * 8) }.is_err());
        // Header words: magic, len, depth, keys_off, slots_off, entries_off, total_len.
        let cases: [(usize, u64, SealedFlaw); 8] = [
            (0, SEALED_MAGIC ^ 1, SealedFlaw::BadMagic),
            (1, 1u64 << 32, SealedFlaw::BadLength),
            (1, 2, SealedFlaw::BadLayout),
            (2, 3, SealedFlaw::BadDepth),
            (3, good[3] + 8, SealedFlaw::BadLayout),
            (4, good[4] - 8, SealedFlaw::BadLayout),
            (5, good[5] + 8, SealedFlaw::BadLayout),
            (6, good[6] + 8, SealedFlaw::BadLayout),
        ];
        for (word, value, want) in cases {
            let mut w = good.clone();
            w[word] = value;
            assert_eq!(flaw(&w), Some(want), "header word {word} = {value:#x}");
        }
        // A len whose layout no longer fits the bytes.
        let mut w = good.clone();
        w[1] = 3 + 1;
        w[6] = SealedLayout::of(4).total as u64;
        w[5] = SealedLayout::of(4).entries_off as u64;
        w[4] = SealedLayout::of(4).slots_off as u64;
        w[2] = SealedLayout::of(4).depth;
        assert_eq!(flaw(&w), Some(SealedFlaw::TooShort));
        // Short buffers and a misaligned base.
        assert_eq!(flaw(&good[..3]), Some(SealedFlaw::TooShort));
        assert_eq!(flaw(&good[..good.len() - 1]), Some(SealedFlaw::TooShort));
        // SAFETY: the bytes from offset 4 are readable (the view is refused anyway).
        let r = unsafe { SealedBatch::from_raw((good.as_ptr() as *const u8).add(4), good.len() * 8 - 4) };
        assert_eq!(r.unwrap_err(), PatchError::BadSealedBatch { flaw: SealedFlaw::Misaligned });
        // SAFETY: a null base is refused before any read.
        let r = unsafe { SealedBatch::from_raw(core::ptr::null(), 64) };
        assert_eq!(r.unwrap_err(), PatchError::BadSealedBatch { flaw: SealedFlaw::Misaligned });
    }

    #[test]
    fn verify_rejects_corrupted_contents() {
        let b = build(&[(BASE, NewInsn::Nop), (BASE + 5, NewInsn::Ret), (BASE + 10, NewInsn::Jmp(BASE))]).unwrap();
        let good = seal(&b);
        let l = SealedLayout::of(3);
        let (keys, slots, entries) = (l.keys_off / 8, l.slots_off / 8, l.entries_off / 8);
        let entry = |i: usize, field: usize| entries + 4 * i + field;
        let cases: Vec<(usize, u64, SealedFlaw)> = vec![
            // The root's key (node 1 is the middle entry).
            (keys + 1, BASE + 7, SealedFlaw::BadIndex { node: 1 }),
            // Slots of nodes 0/1 share a word: node 1 is the upper half.
            (slots, good[slots] ^ (1 << 32), SealedFlaw::BadIndex { node: 1 }),
            // An entry moved, still in order: the tree no longer matches.
            (entry(0, 0), BASE + 1, SealedFlaw::BadIndex { node: 2 }),
            // Out of order, unknown kind, target on a nop, bytes that are not the encoding.
            (entry(0, 0), BASE + 6, SealedFlaw::BadEntry { index: 1 }),
            (entry(1, 2), 9, SealedFlaw::BadEntry { index: 1 }),
            (entry(2, 1), BASE + 5, SealedFlaw::BadEntry { index: 2 }),
            (entry(2, 3), good[entry(2, 3)] ^ 0x100, SealedFlaw::BadEntry { index: 2 }),
            (entry(1, 1), 5, SealedFlaw::BadEntry { index: 1 }),
        ];
        for (word, value, want) in cases {
            let mut w = good.clone();
            w[word] = value;
            let s = open(&w).unwrap();
            assert_eq!(s.verify(), Err(PatchError::BadSealedBatch { flaw: want }), "word {word} = {value:#x}");
        }
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
        let b = build_batch(&Text { base: BASE, bytes: &t }, &Registry::new(&reg, &[BASE], &[]), &sites).unwrap();
        assert!(b.table_bytes() > 4096);
        for &s in &reg {
            assert_eq!(b.lookup(s).unwrap().site, s);
            assert!(b.lookup(s + 1).is_none());
        }
    }
}
