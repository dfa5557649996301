//! Memory: the kernel's page tables (W^X, shadow-stack pages, guard pages),
//! its stacks, the heap, and the temporary alias through which text is poked.
//!
//! Layout (identity-mapped, physical = virtual):
//! - `[0, FINE_LIMIT)`: 4 KiB pages. Page 0 and guard pages unmapped, text RX,
//!   rodata R, shadow stacks R/W=0+Dirty, everything else RW+NX.
//! - `[FINE_LIMIT, RAM end)`: 2 MiB pages RW+NX (the heap lives here).
//! - `POKE_ALIAS_VA`: one 4 KiB page, mapped RW+NX to a text page only while
//!   the patcher writes it.

use core::cell::UnsafeCell;
use core::ptr::addr_of;

use linked_list_allocator::LockedHeap;
use shadowcall::paging::{self, Kind, ENTRIES, LARGE_PAGE_SIZE, PAGE_SIZE};
use shadowcall::shstk::{self, StackBounds};
use x86_64::instructions::tlb;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// Everything below this is mapped with 4 KiB pages (the kernel image lives here).
pub const FINE_LIMIT: u64 = 32 << 20;
const FINE_PTS: usize = (FINE_LIMIT / LARGE_PAGE_SIZE) as usize;
/// The heap: right above the finely mapped region.
pub const HEAP_START: u64 = FINE_LIMIT;
pub const HEAP_SIZE: u64 = 32 << 20;
/// The last 2 MiB of the first GiB hold the poke alias.
const POKE_PD_INDEX: usize = ENTRIES - 1;
pub const POKE_ALIAS_VA: u64 = POKE_PD_INDEX as u64 * LARGE_PAGE_SIZE;
/// RAM above this is not mapped (the alias's 2 MiB slot is reserved).
const RAM_MAP_LIMIT: u64 = POKE_ALIAS_VA;

/// Pages of the boot CPU's shadow stack.
pub const PRIMARY_SHSTK_PAGES: usize = 4;
/// IST stacks: #DF, NMI, #MC, #DB and the self-test vector.
pub const IST_COUNT: usize = 5;
pub const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);

/// Shadow stacks, each between unmapped guard pages:
/// guard | primary (PRIMARY_SHSTK_PAGES) | guard | ist1 | guard | ... | ist5 | guard | spare | guard.
/// The spare page is a shadow-stack page no CPU uses (the write-fault test
/// stores to it).
const SHADOW_AREA_PAGES: usize = 1 + PRIMARY_SHSTK_PAGES + 1 + 2 * IST_COUNT + 2;
#[repr(C, align(4096))]
struct ShadowArea([Page; SHADOW_AREA_PAGES]);

/// Normal IST stacks, each above an unmapped guard page.
#[repr(C, align(4096))]
struct IstStack {
    guard: Page,
    stack: [u8; IST_STACK_SIZE],
}

struct Shared<T>(UnsafeCell<T>);
// SAFETY: the contents are only touched during single-threaded boot, by the
// CPU itself (shadow stacks), or through the poke lock (page tables).
unsafe impl<T> Sync for Shared<T> {}

static SHADOW_AREA : Shared<ShadowArea> = Shared(UnsafeCell::new(ShadowArea([const { Page([0; 4096]) }; SHADOW_AREA_PAGES])));
static IST_STACKS : Shared<[IstStack; IST_COUNT]> =
    Shared(UnsafeCell::new([const { IstStack { guard: Page([0; 4096]), stack: [0; IST_STACK_SIZE] } }; IST_COUNT]));

#[repr(C, align(4096))]
struct Table([u64; ENTRIES]);
struct Tables {
    pml4: Table,
    pdpt: Table,
    pd: Table,
    fine: [Table; FINE_PTS],
    poke: Table,
}
static TABLES : Shared<Tables> = Shared(UnsafeCell::new(Tables {
    pml4: Table([0; ENTRIES]),
    pdpt: Table([0; ENTRIES]),
    pd: Table([0; ENTRIES]),
    fine: [const { Table([0; ENTRIES]) }; FINE_PTS],
    poke: Table([0; ENTRIES]),
}));

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static boot_stack_guard: u8;
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
}

fn sym(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// Kernel text `[start, end)`.
pub fn text_range() -> (u64, u64) {
    // SAFETY: linker-script symbols; only their addresses are used.
    unsafe { (sym(&__text_start), sym(&__text_end)) }
}
fn rodata_range() -> (u64, u64) {
    // SAFETY: as above.
    unsafe { (sym(&__rodata_start), sym(&__rodata_end)) }
}

/// Kernel text as bytes (readable: text is mapped R+X).
pub fn text() -> shadowcall::patch::Text<'static> {
    let (s, e) = text_range();
    // SAFETY: [s, e) is the mapped, never-freed kernel text; writes to it go
    // through the poke alias only, with this CPU serializing afterwards.
    shadowcall::patch::Text { base: s, bytes: unsafe { core::slice::from_raw_parts(s as *const u8, (e - s) as usize) } }
}

fn shadow_page(i: usize) -> u64 {
    SHADOW_AREA.0.get() as u64 + i as u64 * PAGE_SIZE
}

/// The boot CPU's shadow stack.
pub fn primary_shadow_stack() -> StackBounds {
    StackBounds { lo: shadow_page(1), hi: shadow_page(1 + PRIMARY_SHSTK_PAGES) }
}
/// The shadow stack of IST `ist` (1-based).
pub fn ist_shadow_stack(ist: usize) -> StackBounds {
    let p = shadow_page(2 + PRIMARY_SHSTK_PAGES + 2 * (ist - 1));
    StackBounds { lo: p, hi: p + PAGE_SIZE }
}
/// A shadow-stack page that no CPU uses.
pub fn spare_shadow_page() -> u64 {
    shadow_page(SHADOW_AREA_PAGES - 2)
}
fn is_shadow_page(addr: u64) -> bool {
    let p = primary_shadow_stack();
    (addr >= p.lo && addr < p.hi)
        || (1..=IST_COUNT).any(|i| ist_shadow_stack(i).lo == addr)
        || addr == spare_shadow_page()
}
/// The registered shadow stack holding `addr`, if any (the primary one is
/// checked first: the #BP handler's common case).
pub fn shadow_stack_of(addr: u64) -> Option<StackBounds> {
    let p = primary_shadow_stack();
    if addr >= p.lo && addr < p.hi {
        return Some(p);
    }
    (1..=IST_COUNT).map(ist_shadow_stack).find(|b| addr >= b.lo && addr < b.hi)
}

/// The boot CPU's kernel stack.
pub fn boot_stack() -> StackBounds {
    // SAFETY: linker/asm symbols; only their addresses are used.
    unsafe { StackBounds { lo: sym(&boot_stack_bottom), hi: sym(&boot_stack_top) } }
}
/// Top of the normal stack of IST `ist` (1-based).
pub fn ist_stack(ist: usize) -> StackBounds {
    // SAFETY: only the address of the static is taken.
    let s = unsafe { addr_of!((*IST_STACKS.0.get())[ist - 1].stack) } as u64;
    StackBounds { lo: s, hi: s + IST_STACK_SIZE as u64 }
}
/// The kernel stack holding `addr`, if any (the boot CPU's kernel stack first).
pub fn normal_stack_of(addr: u64) -> Option<StackBounds> {
    let k = boot_stack();
    if addr >= k.lo && addr < k.hi {
        return Some(k);
    }
    (1..=IST_COUNT).map(ist_stack).find(|b| addr >= b.lo && addr < b.hi)
}

fn is_guard_page(addr: u64) -> bool {
    // SAFETY: symbol address only.
    let boot_guard = unsafe { sym(&boot_stack_guard) };
    if addr == boot_guard {
        return true;
    }
    if (1..=IST_COUNT).any(|i| ist_stack(i).lo - PAGE_SIZE == addr) {
        return true;
    }
    let area = shadow_page(0);
    if addr >= area && addr < shadow_page(SHADOW_AREA_PAGES) {
        return !is_shadow_page(addr);
    }
    false
}

/// How the page at `addr` is mapped (None: not present).
pub fn classify(addr: u64) -> Option<Kind> {
    let (ts, te) = text_range();
    let (rs, re) = rodata_range();
    if addr < PAGE_SIZE || is_guard_page(addr) {
        None
    } else if addr >= ts && addr < te {
        Some(Kind::Text)
    } else if addr >= rs && addr < re {
        Some(Kind::Rodata)
    } else if is_shadow_page(addr) {
        Some(Kind::ShadowStack)
    } else {
        Some(Kind::Data)
    }
}

/// Write the free supervisor tokens at the top of every shadow stack. Must
/// run before `init_paging` makes those pages read-only.
pub fn write_shadow_tokens() {
    for b in core::iter::once(primary_shadow_stack()).chain((1..=IST_COUNT).map(ist_shadow_stack)) {
        let t = shstk::token_addr(b.hi);
        // SAFETY: the page is still an ordinary writable data page (boot tables).
        unsafe { (t as *mut u64).write_volatile(shstk::supervisor_token(t)) };
    }
}

/// Build the final page tables for `ram_end` bytes of RAM and switch to them.
pub fn init_paging(ram_end: u64) {
    let ram_end = ram_end.min(RAM_MAP_LIMIT) & !(LARGE_PAGE_SIZE - 1);
    // SAFETY: single-threaded boot; nothing else references the tables yet.
    let t = unsafe { &mut *TABLES.0.get() };
    let phys = |p: *const Table| p as u64;
    t.pml4.0[0] = paging::table(phys(&t.pdpt));
    t.pdpt.0[0] = paging::table(phys(&t.pd));
    for (i, pt) in t.fine.iter_mut().enumerate() {
        for (j, e) in pt.0.iter_mut().enumerate() {
            let addr = i as u64 * LARGE_PAGE_SIZE + j as u64 * PAGE_SIZE;
            *e = match classify(addr) {
                Some(k) => paging::leaf(addr, k),
                None => 0,
            };
        }
    }
    for i in 0..FINE_PTS {
        t.pd.0[i] = paging::table(phys(&t.fine[i]));
    }
    let mut addr = FINE_LIMIT;
    while addr < ram_end {
        t.pd.0[(addr / LARGE_PAGE_SIZE) as usize] = paging::large_leaf(addr, Kind::Data);
        addr += LARGE_PAGE_SIZE;
    }
    t.pd.0[POKE_PD_INDEX] = paging::table(phys(&t.poke));
    let frame = PhysFrame::containing_address(PhysAddr::new(phys(&t.pml4)));
    // SAFETY: the new tables map the running code, stack and data exactly as
    // before (identity), only with tighter permissions.
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
}

/// Hand `[HEAP_START, HEAP_START + HEAP_SIZE)` to the allocator.
pub fn init_heap() {
    // SAFETY: that range is RAM mapped RW+NX and used by nothing else.
    unsafe { HEAP.lock().init(HEAP_START as *mut u8, HEAP_SIZE as usize) };
}

/// A temporary writable alias of kernel text at `POKE_ALIAS_VA`, mapped
/// one text page at a time and removed (TLB entry flushed) when dropped. The
/// text mapping itself never becomes writable, so it never turns into a
/// read-only + Dirty (shadow-stack-like) page either: W^X holds throughout.
pub struct TextAlias {
    page: Option<u64>,
}

impl TextAlias {
    /// Only the patcher creates one, under its in-flight lock.
    pub fn new() -> Self {
        TextAlias { page: None }
    }

    fn map(&mut self, page: u64) {
        if self.page == Some(page) {
            return;
        }
        assert_eq!(classify(page), Some(Kind::Text), "poke outside kernel text");
        // SAFETY: the poke table entry is only used by the (single) TextAlias
        // alive under the patcher's lock; it maps a text page RW+NX.
        unsafe {
            (*TABLES.0.get()).poke.0[0] = paging::leaf(page, Kind::PokeAlias);
        }
        tlb::flush(VirtAddr::new(POKE_ALIAS_VA));
        self.page = Some(page);
    }

    /// Write `bytes` to kernel text at `addr` (may cross pages).
    pub fn write(&mut self, addr: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let a = addr + i as u64;
            self.map(a & !(PAGE_SIZE - 1));
            // SAFETY: the alias maps the page of `a` writable right now.
            unsafe { ((POKE_ALIAS_VA + (a & (PAGE_SIZE - 1))) as *mut u8).write_volatile(b) };
        }
    }
}

impl Drop for TextAlias {
    fn drop(&mut self) {
        if self.page.take().is_some() {
            // SAFETY: as in map(); removing the alias.
            unsafe { (*TABLES.0.get()).poke.0[0] = 0 };
            tlb::flush(VirtAddr::new(POKE_ALIAS_VA));
        }
    }
}

/// Is the poke alias unmapped (no writable view of text exists)?
pub fn text_alias_unmapped() -> bool {
    // SAFETY: plain read of the poke table entry.
    unsafe { (*TABLES.0.get()).poke.0[0] == 0 }
}

/// Visit every present leaf of the live page tables (from CR3): (linear address, entry, size).
pub fn for_each_leaf(mut f: impl FnMut(u64, u64, u64)) {
    let (frame, _) = Cr3::read();
    walk(frame.start_address().as_u64(), 4, 0, &mut f);
}

fn walk(table: u64, level: u32, base: u64, f: &mut impl FnMut(u64, u64, u64)) {
    // SAFETY: page tables live in identity-mapped memory.
    let entries = unsafe { core::slice::from_raw_parts(table as *const u64, ENTRIES) };
    for (i, &e) in entries.iter().enumerate() {
        if e & paging::Pte::PRESENT.bits() == 0 {
            continue;
        }
        let (start, end) = paging::entry_span(level, base, i);
        let leaf = level == 1 || (level < 4 && e & paging::Pte::HUGE.bits() != 0);
        if leaf {
            f(start, e, end - start);
        } else {
            walk(e & paging::ADDR_MASK, level - 1, start, f);
        }
    }
}
