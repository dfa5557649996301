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

/// CPUs this kernel can run (stacks are allocated statically for each).
pub const MAX_CPUS: usize = 8;
/// Pages of each CPU's shadow stack.
pub const PRIMARY_SHSTK_PAGES: usize = 4;
/// IST stacks: #DF, NMI, #MC, #DB and the self-test vector.
pub const IST_COUNT: usize = 5;
pub const IST_STACK_SIZE: usize = 16 * 1024;
/// Kernel stack of each application processor (the boot CPU uses the boot stack).
pub const KSTACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);

/// Shadow stacks of one CPU, each between unmapped guard pages:
/// guard | primary (PRIMARY_SHSTK_PAGES) | guard | ist1 | guard | ... | ist5 | guard | spare | guard.
/// The spare page is a shadow-stack page no CPU uses (the write-fault test
/// stores to it).
const SHADOW_AREA_PAGES: usize = 1 + PRIMARY_SHSTK_PAGES + 1 + 2 * IST_COUNT + 2;

/// A normal stack above an unmapped guard page.
#[repr(C, align(4096))]
struct Guarded<const N: usize> {
    guard: Page,
    stack: [u8; N],
}

/// Every stack of one CPU.
#[repr(C, align(4096))]
struct CpuStacks {
    kernel: Guarded<KSTACK_SIZE>,
    ist: [Guarded<IST_STACK_SIZE>; IST_COUNT],
    shadow: [Page; SHADOW_AREA_PAGES],
}

struct Shared<T>(UnsafeCell<T>);
// SAFETY: the contents are only touched during single-threaded boot, by the
// CPU that owns them (stacks), or through the poke lock (page tables).
unsafe impl<T> Sync for Shared<T> {}

// The #BP exit (asm/entry.S) finds a CPU's trampoline-record page from the
// stack area that holds its SSP: it needs this array's address.
#[export_name = "sc_stacks"]
static STACKS: Shared<[CpuStacks; MAX_CPUS]> = Shared(UnsafeCell::new(
    [const {
        CpuStacks {
            kernel: Guarded { guard: Page([0; 4096]), stack: [0; KSTACK_SIZE] },
            ist: [const { Guarded { guard: Page([0; 4096]), stack: [0; IST_STACK_SIZE] } }; IST_COUNT],
            shadow: [const { Page([0; 4096]) }; SHADOW_AREA_PAGES],
        }
    }; MAX_CPUS],
));

#[repr(C, align(4096))]
struct Table([u64; ENTRIES]);
struct Tables {
    pml4: Table,
    pdpt: Table,
    pd: Table,
    fine: [Table; FINE_PTS],
    poke: Table,
    /// 3..4 GiB: only the local APIC's page.
    pd_high: Table,
    pt_apic: Table,
}
static TABLES: Shared<Tables> = Shared(UnsafeCell::new(Tables {
    pml4: Table([0; ENTRIES]),
    pdpt: Table([0; ENTRIES]),
    pd: Table([0; ENTRIES]),
    fine: [const { Table([0; ENTRIES]) }; FINE_PTS],
    poke: Table([0; ENTRIES]),
    pd_high: Table([0; ENTRIES]),
    pt_apic: Table([0; ENTRIES]),
}));

/// The local APIC's registers (xAPIC mode).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
const GIB: u64 = 1 << 30;

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

fn stacks(cpu: usize) -> *const CpuStacks {
    // SAFETY: only the address is computed.
    unsafe { addr_of!((*STACKS.0.get())[cpu]) }
}
fn shadow_page(cpu: usize, i: usize) -> u64 {
    // SAFETY: only the address is computed.
    unsafe { addr_of!((*stacks(cpu)).shadow) as u64 + i as u64 * PAGE_SIZE }
}

/// CPU `cpu`'s shadow stack.
pub fn primary_shadow_stack(cpu: usize) -> StackBounds {
    StackBounds { lo: shadow_page(cpu, 1), hi: shadow_page(cpu, 1 + PRIMARY_SHSTK_PAGES) }
}
/// CPU `cpu`'s shadow stack for IST `ist` (1-based).
pub fn ist_shadow_stack(cpu: usize, ist: usize) -> StackBounds {
    let p = shadow_page(cpu, 2 + PRIMARY_SHSTK_PAGES + 2 * (ist - 1));
    StackBounds { lo: p, hi: p + PAGE_SIZE }
}
/// A shadow-stack page that no CPU uses.
pub fn spare_shadow_page() -> u64 {
    shadow_page(0, SHADOW_AREA_PAGES - 2)
}
/// CPU `cpu`'s kernel stack.
pub fn kernel_stack(cpu: usize) -> StackBounds {
    if cpu == 0 {
        // SAFETY: linker/asm symbols; only their addresses are used.
        return unsafe { StackBounds { lo: sym(&boot_stack_bottom), hi: sym(&boot_stack_top) } };
    }
    // SAFETY: only the address is computed.
    let s = unsafe { addr_of!((*stacks(cpu)).kernel.stack) } as u64;
    StackBounds { lo: s, hi: s + KSTACK_SIZE as u64 }
}
/// CPU `cpu`'s normal stack for IST `ist` (1-based).
pub fn ist_stack(cpu: usize, ist: usize) -> StackBounds {
    // SAFETY: only the address is computed.
    let s = unsafe { addr_of!((*stacks(cpu)).ist[ist - 1].stack) } as u64;
    StackBounds { lo: s, hi: s + IST_STACK_SIZE as u64 }
}

fn this() -> usize {
    crate::percpu::this_cpu().index
}

/// The shadow stack of the running CPU that holds `addr`, if any (its
/// primary stack is checked first: the #BP handler's common case). Stacks
/// of other CPUs never qualify: a handler writes only to its own CPU's stacks.
#[inline]
pub fn shadow_stack_of(addr: u64) -> Option<StackBounds> {
    let p = crate::percpu::this_cpu().shadow_stack();
    if addr >= p.lo && addr < p.hi {
        return Some(p);
    }
    ist_shadow_stack_of(addr)
}

#[inline(never)]
fn ist_shadow_stack_of(addr: u64) -> Option<StackBounds> {
    let cpu = this();
    (1..=IST_COUNT).map(|i| ist_shadow_stack(cpu, i)).find(|b| addr >= b.lo && addr < b.hi)
}

/// The running CPU's normal stack holding `addr`, if any (kernel stack first).
#[inline]
pub fn normal_stack_of(addr: u64) -> Option<StackBounds> {
    let k = crate::percpu::this_cpu().kernel_stack();
    if addr >= k.lo && addr < k.hi {
        return Some(k);
    }
    ist_stack_of(addr)
}

#[inline(never)]
fn ist_stack_of(addr: u64) -> Option<StackBounds> {
    let cpu = this();
    (1..=IST_COUNT).map(|i| ist_stack(cpu, i)).find(|b| addr >= b.lo && addr < b.hi)
}

/// What a page of the static stack area is.
#[derive(PartialEq, Eq)]
enum StackPage {
    Guard,
    Shadow,
    Normal,
}

fn stack_page(addr: u64) -> Option<StackPage> {
    let base = stacks(0) as u64;
    let size = core::mem::size_of::<CpuStacks>() as u64;
    // SAFETY: symbol address only.
    if addr == unsafe { sym(&boot_stack_guard) } {
        return Some(StackPage::Guard);
    }
    if addr < base || addr >= base + size * MAX_CPUS as u64 {
        return None;
    }
    let cpu = ((addr - base) / size) as usize;
    if addr == kernel_stack(cpu).lo - PAGE_SIZE || (1..=IST_COUNT).any(|i| ist_stack(cpu, i).lo - PAGE_SIZE == addr) {
        return Some(StackPage::Guard);
    }
    let area = shadow_page(cpu, 0);
    if addr >= area {
        let i = ((addr - area) / PAGE_SIZE) as usize;
        let shadow = (1..=PRIMARY_SHSTK_PAGES).contains(&i)
            || (i > PRIMARY_SHSTK_PAGES + 1
                && i < SHADOW_AREA_PAGES - 2
                && (i - PRIMARY_SHSTK_PAGES).is_multiple_of(2))
            || (cpu == 0 && i == SHADOW_AREA_PAGES - 2);
        return Some(if shadow { StackPage::Shadow } else { StackPage::Guard });
    }
    Some(StackPage::Normal)
}

/// How the page at `addr` is mapped (None: not present).
pub fn classify(addr: u64) -> Option<Kind> {
    let (ts, te) = text_range();
    let (rs, re) = rodata_range();
    let page = stack_page(addr);
    if addr < PAGE_SIZE || page == Some(StackPage::Guard) {
        None
    } else if addr >= ts && addr < te {
        Some(Kind::Text)
    } else if addr >= rs && addr < re {
        Some(Kind::Rodata)
    } else if page == Some(StackPage::Shadow) || is_tramp_record_page(addr) {
        Some(Kind::ShadowStack)
    } else {
        Some(Kind::Data)
    }
}

/// Write the free supervisor tokens at the top of every shadow stack of
/// every CPU. Must run before `init_paging` makes those pages read-only.
pub fn write_shadow_tokens() {
    let all = (0..MAX_CPUS).flat_map(|c| {
        core::iter::once(primary_shadow_stack(c)).chain((1..=IST_COUNT).map(move |i| ist_shadow_stack(c, i)))
    });
    for b in all {
        let t = shstk::token_addr(b.hi);
        // SAFETY: the page is still an ordinary writable data page (boot tables).
        unsafe { (t as *mut u64).write_volatile(shstk::supervisor_token(t)) };
    }
}

/// Build the final page tables and switch to them. Everything of the first
/// GiB above the finely mapped part is mapped RW+NX (RAM, and the ACPI
/// tables the firmware keeps at its top); `ram_end` must leave room for the heap.
pub fn init_paging(ram_end: u64) {
    assert!(
        ram_end >= HEAP_START + HEAP_SIZE,
        "shadowcall needs at least {} MiB of RAM",
        (HEAP_START + HEAP_SIZE) >> 20
    );
    let ram_end = RAM_MAP_LIMIT;
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
    t.pdpt.0[(LAPIC_BASE / GIB) as usize] = paging::table(phys(&t.pd_high));
    t.pd_high.0[((LAPIC_BASE % GIB) / LARGE_PAGE_SIZE) as usize] = paging::table(phys(&t.pt_apic));
    t.pt_apic.0[((LAPIC_BASE % LARGE_PAGE_SIZE) / PAGE_SIZE) as usize] = paging::leaf(LAPIC_BASE, Kind::Mmio);
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

// ---- Trampoline records --------------------------------------------------

/// Bytes of one CPU's stack area (`sc_stacks` + cpu * this).
pub const CPU_STACKS_SIZE: usize = core::mem::size_of::<CpuStacks>();

#[repr(C, align(4096))]
struct RecordPages([Page; MAX_CPUS]);

/// One page per CPU for its pending trampoline emulations, mapped as
/// shadow-stack memory (R/W=0, Dirty): only WRSS writes it, an ordinary
/// store faults, and no CPU ever uses it as its stack (no token). The #BP
/// exit (asm/entry.S) fills and consumes records; see shadowcall::emul::record.
#[export_name = "sc_tramp_records"]
static TRAMP_RECORDS: Shared<RecordPages> = Shared(UnsafeCell::new(RecordPages([const { Page([0; 4096]) }; MAX_CPUS])));

fn tramp_records_base() -> u64 {
    addr_of!(*TRAMP_RECORDS.0.get()) as u64
}

fn is_tramp_record_page(addr: u64) -> bool {
    let base = tramp_records_base();
    addr >= base && addr < base + MAX_CPUS as u64 * PAGE_SIZE
}

/// The CPU whose stack area holds `addr` (static layout, no per-CPU data).
fn cpu_of_stack_addr(addr: u64) -> Option<usize> {
    let base = stacks(0) as u64;
    let cpu = (addr.checked_sub(base)? / CPU_STACKS_SIZE as u64) as usize;
    (cpu < MAX_CPUS).then_some(cpu)
}

/// The trampoline-record page of the CPU whose shadow stack holds `ssp`
/// (the same arithmetic as the #BP exit's).
pub fn tramp_record_page(ssp: u64) -> u64 {
    let cpu = cpu_of_stack_addr(ssp).unwrap_or(0);
    tramp_records_base() + cpu as u64 * PAGE_SIZE
}

/// Do the `n` slots at `addr` lie in the same shadow stack as `anchor`
/// (a CPU's primary or one of its IST shadow stacks)? From the static
/// layout only: nothing here is read from writable memory.
pub fn same_shadow_stack(anchor: u64, addr: u64, n: u64) -> bool {
    let Some(cpu) = cpu_of_stack_addr(anchor) else { return false };
    let stacks = core::iter::once(primary_shadow_stack(cpu)).chain((1..=IST_COUNT).map(|i| ist_shadow_stack(cpu, i)));
    for b in stacks {
        if anchor >= b.lo && anchor < b.hi {
            return b.holds_slots(addr, n);
        }
    }
    false
}
