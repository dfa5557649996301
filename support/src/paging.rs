//! Page-table entry encoding for the kernel's mappings, and the invariant
//! that keeps kernel text from ever becoming a WRSS target.

use bitflags::bitflags;

bitflags! {
    /// x86-64 page-table entry flags (4-level paging).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Pte: u64 {
        const PRESENT = 1 << 0;
        const WRITABLE = 1 << 1;
        const USER = 1 << 2;
        const WRITE_THROUGH = 1 << 3;
        const NO_CACHE = 1 << 4;
        const ACCESSED = 1 << 5;
        const DIRTY = 1 << 6;
        /// PS in a PDE/PDPTE: this entry maps a large page.
        const HUGE = 1 << 7;
        const GLOBAL = 1 << 8;
        const NO_EXECUTE = 1 << 63;
    }
}

/// Physical-address bits of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
pub const PAGE_SIZE: u64 = 4096;
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
pub const ENTRIES: usize = 512;

/// What a leaf maps; each kind has exactly one encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Kernel text: read-only, executable, never Dirty.
    Text,
    /// Read-only data.
    Rodata,
    /// Read-write data, stacks, heap: never executable.
    Data,
    /// A supervisor shadow-stack page: R/W=0 with Dirty=1, never executable.
    ShadowStack,
    /// The sealed area: read-only data (same encoding as `Rodata`: R/W=0,
    /// D=0, so never shadow-stack-like), writable only through the poke alias.
    Sealed,
    /// The temporary writable alias used to poke text, rodata or the sealed
    /// area: writable, not executable, not global (it lives only in the
    /// patching CPU's private page tables).
    PokeAlias,
    /// Device registers (the local APIC): writable, uncached, not executable.
    Mmio,
}

impl Kind {
    pub const fn flags(self) -> Pte {
        match self {
            Kind::Text => Pte::PRESENT.union(Pte::ACCESSED),
            Kind::Rodata | Kind::Sealed => Pte::PRESENT.union(Pte::ACCESSED).union(Pte::NO_EXECUTE),
            Kind::Data | Kind::PokeAlias => {
                Pte::PRESENT.union(Pte::WRITABLE).union(Pte::ACCESSED).union(Pte::DIRTY).union(Pte::NO_EXECUTE)
            }
            Kind::ShadowStack => Pte::PRESENT.union(Pte::ACCESSED).union(Pte::DIRTY).union(Pte::NO_EXECUTE),
            Kind::Mmio => Kind::Data.flags().union(Pte::NO_CACHE).union(Pte::WRITE_THROUGH),
        }
    }
}

/// A 4 KiB leaf entry mapping `phys` as `kind`.
pub const fn leaf(phys: u64, kind: Kind) -> u64 {
    (phys & ADDR_MASK) | kind.flags().bits()
}

/// A 2 MiB leaf entry (in a page directory) mapping `phys` as `kind`.
pub const fn large_leaf(phys: u64, kind: Kind) -> u64 {
    (phys & ADDR_MASK) | kind.flags().union(Pte::HUGE).bits()
}

/// A non-leaf entry pointing at the next-level table at `phys`. Non-leaf
/// levels stay writable: the leaf alone decides (R/W=0 + Dirty = shadow stack).
pub const fn table(phys: u64) -> u64 {
    (phys & ADDR_MASK) | Pte::PRESENT.union(Pte::WRITABLE).bits()
}

/// Does this present leaf make its page a shadow-stack page (R/W=0, Dirty=1)?
/// Any such page is a valid WRSS target, so only registered shadow stacks may
/// look like this.
pub const fn is_shadow_stack_leaf(entry: u64) -> bool {
    let f = Pte::from_bits_retain(entry);
    f.contains(Pte::PRESENT) && !f.contains(Pte::WRITABLE) && f.contains(Pte::DIRTY)
}

/// Bits of a linear address that index one page-table level (9).
const INDEX_BITS: u32 = 9;
/// Bits of the offset inside a 4 KiB page (12).
const PAGE_SHIFT: u32 = 12;

/// The index of `va`'s entry in its table at `level` (1 = PT .. 4 = PML4).
pub const fn table_index(level: u32, va: u64) -> usize {
    ((va >> (PAGE_SHIFT + INDEX_BITS * (level - 1))) as usize) & (ENTRIES - 1)
}

/// The linear address range covered by entry `index` at `level` (1 = PT,
/// 2 = PD, 3 = PDPT, 4 = PML4) of a table whose range starts at `base`.
pub const fn entry_span(level: u32, base: u64, index: usize) -> (u64, u64) {
    let size = PAGE_SIZE << (INDEX_BITS * (level - 1));
    let start = base + index as u64 * size;
    (start, start + size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(leaf(0x10_1000, Kind::Text), 0x10_1000 | 0x21);
        assert!(!is_shadow_stack_leaf(leaf(0x10_1000, Kind::Text)));
        assert!(!is_shadow_stack_leaf(leaf(0x10_1000, Kind::Rodata)));
        assert!(!is_shadow_stack_leaf(leaf(0x10_1000, Kind::Data)));
        // The sealed area: read-only, clean, not executable; never a WRSS target.
        let sealed = Pte::from_bits_retain(leaf(0x40_0000, Kind::Sealed));
        assert!(!is_shadow_stack_leaf(sealed.bits()));
        assert!(!sealed.contains(Pte::WRITABLE) && !sealed.contains(Pte::DIRTY));
        assert!(sealed.contains(Pte::PRESENT | Pte::NO_EXECUTE));
        // The poke alias: writable, never executable, never global.
        let alias = Pte::from_bits_retain(leaf(0x10_1000, Kind::PokeAlias));
        assert!(alias.contains(Pte::WRITABLE | Pte::NO_EXECUTE) && !alias.contains(Pte::GLOBAL));
        assert!(!is_shadow_stack_leaf(alias.bits()));
        assert!(is_shadow_stack_leaf(leaf(0x10_1000, Kind::ShadowStack)));
        assert_eq!(leaf(0x10_1000, Kind::ShadowStack) & Pte::WRITABLE.bits(), 0);
        assert_ne!(leaf(0x10_1000, Kind::ShadowStack) & Pte::NO_EXECUTE.bits(), 0);
        assert_eq!(leaf(0x10_1000, Kind::Text) & Pte::NO_EXECUTE.bits(), 0);
        assert!(!is_shadow_stack_leaf(0));
        assert!(!is_shadow_stack_leaf(leaf(0xfee0_0000, Kind::Mmio)));
        assert_ne!(leaf(0xfee0_0000, Kind::Mmio) & Pte::NO_CACHE.bits(), 0);
        assert_eq!(large_leaf(0x20_0000, Kind::Data) & Pte::HUGE.bits(), Pte::HUGE.bits());
        assert_eq!(table(0x5000), 0x5003);
    }

    #[test]
    fn spans() {
        assert_eq!(entry_span(1, 0, 3), (0x3000, 0x4000));
        assert_eq!(entry_span(2, 0, 1), (0x20_0000, 0x40_0000));
        assert_eq!(entry_span(3, 0, 2), (0x8000_0000, 0xc000_0000));
        assert_eq!(entry_span(4, 0, 1), (0x80_0000_0000, 0x100_0000_0000));
    }

    #[test]
    fn indices() {
        let va = 0x80_0000_0000u64 | (3 << 30) | (5 << 21) | (7 << 12) | 0x123;
        assert_eq!([table_index(4, va), table_index(3, va), table_index(2, va), table_index(1, va)], [1, 3, 5, 7]);
        assert_eq!(table_index(4, 0xfee0_0000), 0);
        assert_eq!(table_index(3, 0xfee0_0000), 3);
        assert_eq!(table_index(2, 0xfee0_0000), 0x1f7);
        // Every index round-trips through entry_span.
        for level in 1..=4 {
            for i in [0usize, 1, 255, 511] {
                let (start, end) = entry_span(level, 0, i);
                assert_eq!(table_index(level, start), i);
                assert_eq!(table_index(level, end - 1), i);
            }
        }
    }
}
