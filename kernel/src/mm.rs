//! Memory: the kernel's page tables (W^X, shadow-stack pages, guard pages),
//! its stacks, the heap, the sealed area, and the private address space in
//! which the patching CPU writes text through a temporary alias.
//!
//! Layout of the shared page tables (every CPU's CR3; identity-mapped,
//! physical = virtual, PML4 slot 0 only):
//! - `[0, FINE_LIMIT)`: 4 KiB pages. Page 0 and guard pages unmapped, text RX,
//!   rodata and the sealed area R+NX, shadow stacks R/W=0+Dirty, everything
//!   else RW+NX.
//! - `[FINE_LIMIT, 1 GiB)`: 2 MiB pages RW+NX (the heap lives here).
//!
//! Each CPU has its own private poking tables (`TextAlias`): the shared
//! PML4's entries plus PML4 slot `POKE_PML4_INDEX`, whose one PTE maps
//! `POKE_ALIAS_VA` RW+NX to the page being written. Only that CPU loads
//! them, and only while it holds a `TextAlias`.

use core::cell::UnsafeCell;
#[cfg(feature = "test-hooks")]
use core::marker::PhantomData;
use core::ptr::addr_of;
use core::sync::atomic::{AtomicBool, Ordering};

use linked_list_allocator::LockedHeap;
use shadowcall::shstk::{self, StackBounds};
use shadowcall_support::paging::{self, Kind, ENTRIES, LARGE_PAGE_SIZE, PAGE_SIZE};
use x86_64::instructions::interrupts;
#[cfg(feature = "test-hooks")]
use x86_64::instructions::tlb;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;
#[cfg(feature = "test-hooks")]
use x86_64::VirtAddr;

/// Everything below this is mapped with 4 KiB pages (the kernel image lives here).
pub const FINE_LIMIT: u64 = 32 << 20;
const FINE_PTS: usize = (FINE_LIMIT / LARGE_PAGE_SIZE) as usize;
/// The heap: right above the finely mapped region.
pub const HEAP_START: u64 = FINE_LIMIT;
pub const HEAP_SIZE: u64 = 32 << 20;
/// The PML4 slot of the poke alias: a 512 GiB region that the shared tables
/// never map (they use slot 0 only), present only in the private tables.
const POKE_PML4_INDEX: usize = 1;
/// Where the page being poked appears, writable, in the private tables.
pub const POKE_ALIAS_VA: u64 = paging::entry_span(4, 0, POKE_PML4_INDEX).0;
/// RAM and firmware tables are mapped up to here (the first GiB).
const RAM_MAP_LIMIT: u64 = GIB;

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
// SAFETY: the contents are only touched during single-threaded boot, or by
// the CPU that owns them (stacks; a CPU's private poking tables, while it
// holds a TextAlias).
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
#[repr(C)]
struct Tables {
    /// The shared top level: every CPU's CR3 except while it pokes.
    pml4: Table,
    pdpt: Table,
    pd: Table,
    fine: [Table; FINE_PTS],
    /// 3..4 GiB: only the local APIC's page.
    pd_high: Table,
    pt_apic: Table,
    /// Each CPU's private poking tables.
    poke: [PokeTables; MAX_CPUS],
}

/// One CPU's private poking tables: `pml4` holds the shared PML4's entries
/// (sharing every lower-level table) plus slot POKE_PML4_INDEX -> pdpt -> pd
/// -> pt, whose one used entry maps POKE_ALIAS_VA while a TextAlias writes.
#[repr(C)]
struct PokeTables {
    pml4: Table,
    pdpt: Table,
    pd: Table,
    pt: Table,
}
// The exception exit compares CR3 with this address (the shared PML4, the
// first field) to tell a CPU inside its private poking window.
#[export_name = "sc_shared_tables"]
static TABLES: Shared<Tables> = Shared(UnsafeCell::new(Tables {
    pml4: Table([0; ENTRIES]),
    pdpt: Table([0; ENTRIES]),
    pd: Table([0; ENTRIES]),
    fine: [const { Table([0; ENTRIES]) }; FINE_PTS],
    pd_high: Table([0; ENTRIES]),
    pt_apic: Table([0; ENTRIES]),
    poke: [const {
        PokeTables {
            pml4: Table([0; ENTRIES]),
            pdpt: Table([0; ENTRIES]),
            pd: Table([0; ENTRIES]),
            pt: Table([0; ENTRIES]),
        }
    }; MAX_CPUS],
}));

/// The alias's entry in a `PokeTables::pt` (and the indices above it).
const ALIAS_PT_INDEX: usize = paging::table_index(1, POKE_ALIAS_VA);
const ALIAS_PD_INDEX: usize = paging::table_index(2, POKE_ALIAS_VA);
const ALIAS_PDPT_INDEX: usize = paging::table_index(3, POKE_ALIAS_VA);

fn table_addr(t: &Table) -> u64 {
    t as *const Table as u64
}

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
    static __sealed_start: u8;
    static __sealed_end: u8;
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
/// Kernel read-only data `[start, end)` (the site table included).
pub fn rodata_range() -> (u64, u64) {
    // SAFETY: as above.
    unsafe { (sym(&__rodata_start), sym(&__rodata_end)) }
}

/// The sealed area `[start, end)`: page-aligned, mapped read-only + NX (D=0)
/// by the shared tables, written only through `TextAlias`.
pub fn sealed_area() -> (u64, u64) {
    // SAFETY: linker-script symbols; only their addresses are used.
    unsafe { (sym(&__sealed_start), sym(&__sealed_end)) }
}

/// Does `[addr, addr + len)` lie inside the sealed area?
pub fn is_sealed(addr: u64, len: u64) -> bool {
    let (s, e) = sealed_area();
    within(addr, len, s, e)
}

/// Does `[addr, addr + len)` lie inside `[start, end)` (no wrap-around)?
fn within(addr: u64, len: u64, start: u64, end: u64) -> bool {
    addr >= start && addr.checked_add(len).is_some_and(|e| e <= end)
}

/// Does `[start, end)` overlap kernel text, read-only data or the sealed area?
fn overlaps_pokeable(start: u64, end: u64) -> bool {
    [text_range(), rodata_range(), sealed_area()].iter().any(|&(s, e)| start < e && s < end)
}

#[cfg(feature = "test-hooks")]
/// Can `TextAlias::write` write `[addr, addr + len)`? Only inside kernel
/// text, read-only data or the sealed area (each range wholly inside one).
pub fn pokeable(addr: u64, len: u64) -> bool {
    let (ts, te) = text_range();
    let (rs, re) = rodata_range();
    within(addr, len, ts, te) || within(addr, len, rs, re) || is_sealed(addr, len)
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
    let p = stacks(cpu) as u64 + ist_shadow_offset(ist) as u64;
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

/// CPU `cpu`'s normal stack holding `addr`, if any (kernel stack first).
#[inline]
pub fn normal_stack_of(cpu: usize, addr: u64) -> Option<StackBounds> {
    let k = kernel_stack(cpu);
    if addr >= k.lo && addr < k.hi {
        return Some(k);
    }
    ist_stack_of(cpu, addr)
}

#[inline(never)]
fn ist_stack_of(cpu: usize, addr: u64) -> Option<StackBounds> {
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
    let (ss, se) = sealed_area();
    let page = stack_page(addr);
    if addr < PAGE_SIZE || page == Some(StackPage::Guard) {
        None
    } else if addr >= ts && addr < te {
        Some(Kind::Text)
    } else if addr >= rs && addr < re {
        Some(Kind::Rodata)
    } else if addr >= ss && addr < se {
        Some(Kind::Sealed)
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
pub fn init_paging(ram_end: u64, map_xapic: bool) {
    assert!(
        ram_end >= HEAP_START + HEAP_SIZE,
        "shadowcall needs at least {} MiB of RAM",
        (HEAP_START + HEAP_SIZE) >> 20
    );
    let ram_end = RAM_MAP_LIMIT;
    let (_, sealed_end) = sealed_area();
    assert!(sealed_end <= FINE_LIMIT, "the kernel image and its sealed area end above {} MiB", FINE_LIMIT >> 20);
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
    // The xAPIC's registers are memory: whoever can store to that page can
    // send INIT/SIPI and restart a CPU outside paging and CET (threat model,
    // DESIGN §11). With x2APIC (MSRs only) the page is not mapped at all.
    if map_xapic {
        t.pdpt.0[(LAPIC_BASE / GIB) as usize] = paging::table(phys(&t.pd_high));
        t.pd_high.0[((LAPIC_BASE % GIB) / LARGE_PAGE_SIZE) as usize] = paging::table(phys(&t.pt_apic));
        t.pt_apic.0[((LAPIC_BASE % LARGE_PAGE_SIZE) / PAGE_SIZE) as usize] = paging::leaf(LAPIC_BASE, Kind::Mmio);
    }
    // The private poking tables: the shared top level plus the alias's slot,
    // which the shared top level never has. The shared PML4 does not change
    // after this, so the copy stays exact.
    assert_eq!(t.pml4.0[POKE_PML4_INDEX], 0, "the poke alias's PML4 slot is used by the shared tables");
    for p in t.poke.iter_mut() {
        p.pml4.0 = t.pml4.0;
        p.pml4.0[POKE_PML4_INDEX] = paging::table(phys(&p.pdpt));
        p.pdpt.0[ALIAS_PDPT_INDEX] = paging::table(phys(&p.pd));
        p.pd.0[ALIAS_PD_INDEX] = paging::table(phys(&p.pt));
    }
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

/// Serializes writers (any CPU may hold a TextAlias, one at a time). Only
/// serialization: isolation comes from the per-CPU private tables, which a
/// forged lock cannot make two CPUs share.
static POKE_LOCK: AtomicBool = AtomicBool::new(false);

/// Set by the exception entry (asm/entry.S `sc_isr_common`) when it took this
/// CPU out of its private poking window: the alias writer was interrupted
/// and its next alias store faults. Ordinary memory: forging it can only
/// cause a redone step (set) or a stop instead of a redo (cleared).
#[no_mangle]
pub static SC_POKE_ABORTED: AtomicBool = AtomicBool::new(false);

/// Was a poking window aborted by an exception since the last call? (Clears it.)
pub fn poke_aborted() -> bool {
    SC_POKE_ABORTED.swap(false, Ordering::AcqRel)
}

/// After a fault unwound an aborted `TextAlias` (its `drop` never ran):
/// clear this CPU's alias PTE and release the writers' lock. This CPU is
/// already back on the shared tables (the exception entry switched).
pub fn poke_reset_after_abort() {
    let marker = 0u8;
    let cpu = cpu_of_stack(addr_of!(marker) as u64).expect("poke_reset_after_abort: not on a kernel stack");
    // SAFETY: this CPU's private alias PTE; only this CPU uses it.
    unsafe { core::ptr::addr_of_mut!((*poke_tables(cpu)).pt.0[ALIAS_PT_INDEX]).write_volatile(0) };
    POKE_LOCK.store(false, Ordering::Release);
}

/// Self-test support: set CPU `cpu`'s private alias PTE to `value` (another
/// CPU "in its poking window", as the step writers see it: asm/poke.S
/// `POKE_CLAIM`). Test builds only.
#[cfg(feature = "test-hooks")]
pub fn test_set_alias_pte(cpu: usize, value: u64) {
    assert!(cpu < MAX_CPUS);
    // SAFETY: an entry of `cpu`'s private alias table; the self-test sets it
    // only while no CPU pokes, and a non-zero value only while it holds no
    // alias mapping this CPU uses (its CR3 is the shared tables').
    unsafe { core::ptr::addr_of_mut!((*poke_tables(cpu)).pt.0[ALIAS_PT_INDEX]).write_volatile(value) };
}

// The alias writers of the patcher (asm/poke.S): every address, byte and
// length they store is derived in registers from read-only data.
core::arch::global_asm!(
    concat!(
        include_str!("../../asm/stack_cpu.S"),
        include_str!("../../asm/sealed.S"),
        include_str!("../asm/poke.S")
    ),
    MAX_CPUS = const MAX_CPUS,
    POKE_TABLES_SIZE = const core::mem::size_of::<PokeTables>(),
    POKE_TABLES_OFF = const core::mem::offset_of!(Tables, poke),
    POKE_PT_OFF = const core::mem::offset_of!(PokeTables, pt),
    ALIAS_PT_INDEX = const ALIAS_PT_INDEX,
    ALIAS_FLAGS = const paging::leaf(0, Kind::PokeAlias),
    ALIAS_VA = const POKE_ALIAS_VA,
    SEALED_LIVE = const shadowcall::patch::SEALED_MAGIC,
    SEALED_STATE = const core::mem::offset_of!(shadowcall::patch::SealedHeader, magic),
    SEALED_ENTRIES_OFF = const core::mem::offset_of!(shadowcall::patch::SealedHeader, entries_off),
    SEALED_LEN = const core::mem::offset_of!(shadowcall::patch::SealedHeader, len),
    SEALED_HEADER_SIZE = const core::mem::size_of::<shadowcall::patch::SealedHeader>(),
    SEALED_DEPTH = const core::mem::offset_of!(shadowcall::patch::SealedHeader, depth),
    SEALED_KEYS_OFF = const core::mem::offset_of!(shadowcall::patch::SealedHeader, keys_off),
    SEALED_SLOTS_OFF = const core::mem::offset_of!(shadowcall::patch::SealedHeader, slots_off),
    SEALED_PENDING = const shadowcall::patch::SEALED_PENDING,
    WRITER = const shadowcall::emul::record::WRITER_WORD,
    ENTRY_SIZE = const core::mem::size_of::<shadowcall::patch::SealedEntry>(),
    ENTRY_SHIFT = const core::mem::size_of::<shadowcall::patch::SealedEntry>().trailing_zeros(),
    ENTRY_SITE = const core::mem::offset_of!(shadowcall::patch::SealedEntry, site),
    ENTRY_BYTES = const core::mem::offset_of!(shadowcall::patch::SealedEntry, bytes),
    ENTRY_TARGET = const core::mem::offset_of!(shadowcall::patch::SealedEntry, target),
    ENTRY_KIND = const core::mem::offset_of!(shadowcall::patch::SealedEntry, kind),
    KIND_CALL = const shadowcall::patch::KIND_CALL,
    KIND_JMP = const shadowcall::patch::KIND_JMP,
    KIND_NOP = const shadowcall::patch::KIND_NOP,
    KIND_MASK = const shadowcall::patch::KIND_MASK,
    SITE_INDEX_SHIFT = const shadowcall::patch::SITE_INDEX_SHIFT,
    TARGET_INDEX_SHIFT = const shadowcall::patch::TARGET_INDEX_SHIFT,
    INDEX_MASK = const shadowcall::patch::INDEX_MASK,
    KIND_RET = const shadowcall::patch::KIND_RET,
    OPC_CALL_REL32 = const shadowcall::patch::OPC_CALL_REL32,
    OPC_JMP_REL32 = const shadowcall::patch::OPC_JMP_REL32,
    NOP5_WORD = const shadowcall::patch::NOP5_WORD,
    RET_WORD = const shadowcall::patch::RET_WORD,
    IN_EXIT = const shadowcall::emul::record::IN_EXIT_WORD,
    RECORD_PAGE_SIZE = const shadowcall::emul::record::RECORD_PAGE_SIZE,
    SEALED_WAIT_SPINS = const SEALED_WAIT_SPINS,
    SITE_LEN = const shadowcall::patch::SITE_LEN,
    INT3 = const shadowcall::patch::INT3,
    CR4_CET_BIT = const 23,
    MAGIC_LEN = const core::mem::size_of::<u64>(),
    TRAMP_SRC = sym SC_TRAMP_BYTES,
    TRAMP_LEN = const TRAMP_LEN,
    options(att_syntax)
);

/// The trampoline's bytes, the only source of `sc_poke_tramp` (asm/poke.S):
/// an immutable static, so in .rodata, which no ordinary store reaches.
pub static SC_TRAMP_BYTES: [u8; TRAMP_LEN] = shadowcall::tramp::TRAMP_BYTES;
const TRAMP_LEN: usize = shadowcall::tramp::TRAMP_LEN;
// sc_poke_tramp copies at least one byte (its loop has no zero test) and
// stays inside the page.
const _: () = assert!(TRAMP_LEN > 0 && TRAMP_LEN as u64 <= PAGE_SIZE);

extern "C" {
    fn sc_poke_int3(e: *const shadowcall::patch::SealedEntry);
    fn sc_poke_tails(e: *const shadowcall::patch::SealedEntry);
    fn sc_poke_head(e: *const shadowcall::patch::SealedEntry);
    fn sc_poke_sealed(offset: u64, src: *const u8, len: u64);
    fn sc_poke_publish();
    fn sc_poke_unseal();
    fn sc_poke_tramp();
}

/// One of the patcher's alias writes (asm/poke.S): the engine's.
pub use shadowcall::engine::Poke;

/// Do `pokes` with this CPU's private alias: the writers' lock held and
/// interrupts off meanwhile. Each write checks its own destination in asm
/// (a sealed entry of the live batch, and that text at its site allows the
/// step: tails only behind an int3, the first byte only onto int3 + the
/// entry's new tails; the sealed area past its magic; the trampoline page,
/// once, from read-only bytes) and stops the kernel (#UD, then a fault report) on a
/// bad one. If an exception aborts the window, the remaining writes fault or
/// do nothing: the caller redoes them (`poke_aborted`).
pub fn poke_all<'a>(pokes: impl Iterator<Item = Poke<'a>>) {
    let was = interrupts::are_enabled();
    interrupts::disable();
    while POKE_LOCK.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
    for p in pokes {
        poke_one(p);
    }
    POKE_LOCK.store(false, Ordering::Release);
    if was {
        interrupts::enable();
    }
}

fn poke_one(p: Poke<'_>) {
    // SAFETY: each routine checks its destination itself (asm/poke.S) and
    // writes only text sites of the live, verified sealed batch, the sealed
    // area past its magic word, the magic word (constants), or the
    // trampoline page; the lock is held with interrupts off.
    unsafe {
        match p {
            Poke::Int3(e) => sc_poke_int3(e),
            Poke::Tails(e) => sc_poke_tails(e),
            Poke::Head(e) => sc_poke_head(e),
            Poke::Sealed { offset, bytes } => sc_poke_sealed(offset, bytes.as_ptr(), bytes.len() as u64),
            Poke::Publish => sc_poke_publish(),
            Poke::Unseal => sc_poke_unseal(),
            Poke::Tramp => sc_poke_tramp(),
        }
    }
}

/// Rounds the sealed-area writer (asm/poke.S `sc_poke_sealed`) waits for
/// every CPU's in-exit count to drop to 0 before it refuses (#UD). An exit
/// holds its count for a few dozen instructions, or as long as an NMI
/// taken inside it runs; a round reads `MAX_CPUS` words and pauses.
pub const SEALED_WAIT_SPINS: u64 = 1 << 20;

/// Self-test hook: run this (it sends this CPU an NMI) before the next
/// alias store. A function the self-test hands in, so mm needs no import
/// from the self-tests.
#[cfg(feature = "test-hooks")]
pub static IN_NEXT_POKE: spin::Mutex<Option<fn()>> = spin::Mutex::new(None);

#[cfg(feature = "test-hooks")]
fn frame_of(table: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(table))
}

/// The shared top-level table (every CPU's CR3 outside `TextAlias`).
const _: () = assert!(core::mem::offset_of!(Tables, pml4) == 0);

pub fn shared_pml4() -> u64 {
    // SAFETY: only the address is taken.
    table_addr(unsafe { &(*TABLES.0.get()).pml4 })
}

/// The top-level table this CPU runs on now.
pub fn current_pml4() -> u64 {
    Cr3::read().0.start_address().as_u64()
}

fn poke_tables(cpu: usize) -> *mut PokeTables {
    // SAFETY: only the address is computed.
    unsafe { core::ptr::addr_of_mut!((*TABLES.0.get()).poke[cpu]) }
}

/// The CPU whose kernel or IST stack holds `sp`, found from the static stack
/// layout (not from per-CPU data, which ordinary stores can change).
fn cpu_of_stack(sp: u64) -> Option<usize> {
    let on = |b: StackBounds| sp >= b.lo && sp < b.hi;
    let base = stacks(0) as u64;
    let size = core::mem::size_of::<CpuStacks>() as u64;
    let cpu = if on(kernel_stack(0)) {
        0
    } else if sp >= base && sp < base + size * MAX_CPUS as u64 {
        ((sp - base) / size) as usize
    } else {
        return None;
    };
    (on(kernel_stack(cpu)) || (1..=IST_COUNT).any(|i| on(ist_stack(cpu, i)))).then_some(cpu)
}

#[cfg(feature = "test-hooks")]
/// The CPU whose private poking tables CR3 points at, if it points at one.
fn poking_cpu() -> Option<usize> {
    let cr3 = current_pml4();
    // SAFETY: only addresses are compared.
    (0..MAX_CPUS).find(|&c| table_addr(unsafe { &(*poke_tables(c)).pml4 }) == cr3)
}

/// A temporary writable alias of kernel text, read-only data or the sealed
/// area, in an address space that only the CPU holding it uses.
///
/// `new` disables interrupts (restored by `drop`), takes the writers' lock,
/// and switches this CPU's CR3 to its own private poking tables: the shared
/// PML4's entries (the same lower-level tables, so the kernel runs on
/// unchanged) plus PML4 slot `POKE_PML4_INDEX`, which no shared table maps.
/// `write` maps one target page at a time at `POKE_ALIAS_VA` (RW+NX, not
/// global) in those tables and INVLPGs the old translation. `drop` clears
/// the PTE, INVLPGs it and goes back to the shared CR3 (which flushes every
/// non-global translation too).
///
/// Why no other CPU can write through the alias: a translation is only made
/// by a walk from a CR3, and no other CPU's CR3 can reach this CPU's slot
/// `POKE_PML4_INDEX` (the shared PML4 has it empty; each CPU's private PML4
/// is loaded by that CPU alone). So no other CPU can hold a TLB or
/// paging-structure-cache entry for the alias, and removing it needs no
/// shootdown. Which tables are this CPU's is derived from registers (RSP in
/// `new`, CR3 afterwards) and the static stack layout, never from ordinary
/// memory. The identity mappings never change: text stays RX and D=0, rodata
/// and the sealed area R+NX and D=0 (W^X; no shadow-stack-like page).
///
/// Interrupts and NMIs: with IF=0 no interrupt handler runs on the private
/// CR3, and no sync IPI is acked while an alias lives (the patcher drops its
/// alias before every sync). An NMI (or #MC) can still arrive: its handler
/// runs on the private CR3, which maps everything the shared one does, at
/// the same addresses and with the same rights, plus the alias page, which no
/// handler addresses (it is only reached through `POKE_ALIAS_VA`, used here
/// alone); its IRET returns here on the same CR3 (an NMI does not switch
/// CR3). So the handler reaches nothing it could not reach on the shared
/// tables, and for every other CPU nothing changes.
#[cfg(feature = "test-hooks")]
pub struct TextAlias {
    /// IF before `new` (restored by `drop`).
    interrupts: bool,
    /// Must be dropped on the CPU that made it (it owns that CPU's CR3).
    _cpu_bound: PhantomData<*const ()>,
}

#[cfg(feature = "test-hooks")]
impl TextAlias {
    /// Enter this CPU's private poking address space. Spins while another
    /// CPU holds an alias; panics if this CPU already holds one or runs on
    /// no kernel or IST stack.
    pub fn new() -> Self {
        let was = interrupts::are_enabled();
        interrupts::disable();
        let marker = 0u8;
        let sp = addr_of!(marker) as u64;
        let cpu = cpu_of_stack(sp).unwrap_or_else(|| panic!("TextAlias::new: {sp:#x} is on no CPU's kernel stack"));
        let (frame, flags) = Cr3::read();
        assert_eq!(
            frame.start_address().as_u64(),
            shared_pml4(),
            "TextAlias::new: CPU {cpu} is not on the shared page tables (already holding an alias?)"
        );
        while POKE_LOCK.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        // SAFETY: only the address is taken.
        let pml4 = table_addr(unsafe { &(*poke_tables(cpu)).pml4 });
        // SAFETY: the private tables map the kernel exactly as the shared
        // ones (same lower-level tables) plus the alias slot; only this CPU
        // uses them, with interrupts off until drop().
        unsafe { Cr3::write(frame_of(pml4), flags) };
        TextAlias { interrupts: was, _cpu_bound: PhantomData }
    }

    /// This CPU's private alias PTE (CR3 points at its private tables).
    /// None once an exception took this CPU out of its poking window.
    fn pte(&self) -> Option<*mut u64> {
        let cpu = poking_cpu()?;
        // SAFETY: only the address is computed.
        Some(unsafe { core::ptr::addr_of_mut!((*poke_tables(cpu)).pt.0[ALIAS_PT_INDEX]) })
    }

    /// Map `page` at the alias; false when the window was aborted.
    fn map(&mut self, page: u64) -> bool {
        let Some(pte) = self.pte() else { return false };
        let entry = paging::leaf(page, Kind::PokeAlias);
        // SAFETY: this CPU's private PTE; only this CPU uses it. Compared
        // with the PTE itself (not a copy in ordinary memory) so a forged
        // copy cannot make a write land on the previous page.
        unsafe {
            if pte.read_volatile() == entry {
                return true;
            }
            pte.write_volatile(entry);
        }
        // Only this CPU can have translated its alias (see the type's comment).
        tlb::flush(VirtAddr::new(POKE_ALIAS_VA));
        true
    }

    /// Write `bytes` at `addr` (may cross pages). `[addr, addr + len)` must
    /// lie inside kernel text, read-only data or the sealed area; anything
    /// else panics before any byte is written. If an exception takes this
    /// CPU out of its poking window meanwhile (`poke_aborted`), the write
    /// stops (at a page boundary, or with a fault at the next store): the
    /// caller redoes it (`patching::poke_retrying`).
    pub fn write(&mut self, addr: u64, bytes: &[u8]) {
        let len = bytes.len() as u64;
        assert!(
            pokeable(addr, len),
            "TextAlias::write: {len} bytes at {addr:#x} are not inside kernel text, .rodata or the sealed area"
        );
        let mut done = 0usize;
        while done < bytes.len() {
            let a = addr + done as u64;
            let offset = a & (PAGE_SIZE - 1);
            let n = ((PAGE_SIZE - offset) as usize).min(bytes.len() - done);
            if !self.map(a - offset) {
                return;
            }
            #[cfg(feature = "test-hooks")]
            if let Some(hook) = IN_NEXT_POKE.lock().take() {
                hook();
            }
            for (i, &b) in bytes[done..done + n].iter().enumerate() {
                // SAFETY: the alias maps the page of `a` writable right now.
                unsafe { ((POKE_ALIAS_VA + offset + i as u64) as *mut u8).write_volatile(b) };
            }
            done += n;
        }
    }
}

#[cfg(feature = "test-hooks")]
impl Drop for TextAlias {
    fn drop(&mut self) {
        match self.pte() {
            Some(pte) => {
                // SAFETY: this CPU's private PTE; removing the alias.
                unsafe { pte.write_volatile(0) };
                tlb::flush(VirtAddr::new(POKE_ALIAS_VA));
                let flags = Cr3::read().1;
                // SAFETY: back to the shared tables this CPU ran on before new().
                unsafe { Cr3::write(frame_of(shared_pml4()), flags) };
            }
            // Aborted: already on the shared tables; clear the PTE all the same.
            None => poke_reset_after_abort(),
        }
        POKE_LOCK.store(false, Ordering::Release);
        if self.interrupts {
            interrupts::enable();
        }
    }
}

/// No writable view of text, rodata or the sealed area exists: no alias is
/// held, every private alias PTE is empty, this CPU runs on the shared
/// tables, the shared PML4 does not have the alias's slot, and no writable
/// leaf of the shared tables maps a frame of text, rodata or the sealed area.
pub fn text_alias_unmapped() -> bool {
    // SAFETY: plain reads of page-table entries.
    let (ptes_clear, slot) = unsafe {
        let t = &*TABLES.0.get();
        (t.poke.iter().all(|p| p.pt.0[ALIAS_PT_INDEX] == 0), t.pml4.0[POKE_PML4_INDEX])
    };
    let mut writable_view = false;
    walk(shared_pml4(), 4, 0, &mut |_, e, size| {
        if e & paging::Pte::WRITABLE.bits() != 0 {
            let phys = e & paging::ADDR_MASK & !(size - 1);
            writable_view |= overlaps_pokeable(phys, phys + size);
        }
    });
    !POKE_LOCK.load(Ordering::Relaxed) && ptes_clear && slot == 0 && current_pml4() == shared_pml4() && !writable_view
}

/// The shared tables' leaf entry covering `va`, if present.
pub fn shared_leaf(va: u64) -> Option<u64> {
    let mut found = None;
    walk(shared_pml4(), 4, 0, &mut |start, e, size| {
        if va >= start && va - start < size {
            found = Some(e);
        }
    });
    found
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

/// Where IST stack `ist`'s normal stack (1-based) lies in a CPU's stack
/// area (`sc_stacks` + cpu * CPU_STACKS_SIZE + this): the #BP exit tells
/// NMI context from it.
pub const fn ist_stack_offset(ist: usize) -> usize {
    core::mem::offset_of!(CpuStacks, ist)
        + (ist - 1) * core::mem::size_of::<Guarded<IST_STACK_SIZE>>()
        + core::mem::offset_of!(Guarded<IST_STACK_SIZE>, stack)
}

/// Offset of the shadow stack for IST `ist` (1-based) in a CPU's stack area
/// (the page [`ist_shadow_stack`] names): the #BP fast path tells NMI context
/// from RDSSP with it.
pub const fn ist_shadow_offset(ist: usize) -> usize {
    core::mem::offset_of!(CpuStacks, shadow) + (2 + PRIMARY_SHSTK_PAGES + 2 * (ist - 1)) * PAGE_SIZE as usize
}

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

/// One page per CPU where an NMI or #MC that interrupted a critical region
/// (asm/entry.S) keeps the interrupted registers, mapped as shadow-stack
/// memory like the record pages: only WRSS writes it. Each of the two
/// vectors has its own area on the page (`SAVE_AREA_NMI`, `SAVE_AREA_MC`;
/// the layout of an area is shadowcall::emul::save), so a #MC nested in the
/// NMI path, or an NMI in the #MC path, never touches the outer one's save.
#[export_name = "sc_irq_save_pages"]
static IRQ_SAVE_PAGES: Shared<RecordPages> =
    Shared(UnsafeCell::new(RecordPages([const { Page([0; 4096]) }; MAX_CPUS])));

/// CPU `cpu`'s register-save page.
pub fn irq_save_page(cpu: usize) -> u64 {
    addr_of!(*IRQ_SAVE_PAGES.0.get()) as u64 + cpu as u64 * PAGE_SIZE
}

/// Bytes of one vector's area on a save page.
pub const SAVE_AREA_SIZE: u64 = 256;
/// The NMI's area on a save page (offset from the page).
pub const SAVE_AREA_NMI: u64 = 0;
/// The #MC's area on a save page.
pub const SAVE_AREA_MC: u64 = SAVE_AREA_SIZE;
const _: () = assert!(shadowcall::emul::save::IRET_PTR + shstk::SLOT <= SAVE_AREA_SIZE);
const _: () = assert!(SAVE_AREA_MC + SAVE_AREA_SIZE <= PAGE_SIZE);

fn tramp_records_base() -> u64 {
    addr_of!(*TRAMP_RECORDS.0.get()) as u64
}

fn is_tramp_record_page(addr: u64) -> bool {
    let within = |base: u64| addr >= base && addr < base + MAX_CPUS as u64 * PAGE_SIZE;
    within(tramp_records_base()) || within(irq_save_page(0))
}

/// The CPU whose stack area holds `addr` (static layout, no per-CPU data).
fn cpu_of_stack_addr(addr: u64) -> Option<usize> {
    let base = stacks(0) as u64;
    let cpu = (addr.checked_sub(base)? / CPU_STACKS_SIZE as u64) as usize;
    (cpu < MAX_CPUS).then_some(cpu)
}

/// The trampoline-record page of the CPU whose shadow stack holds `ssp`
/// (the same arithmetic as the #BP exit's).
pub fn tramp_record_page(ssp: u64) -> Option<u64> {
    cpu_of_stack_addr(ssp).map(tramp_record_page_of_cpu)
}

/// CPU `cpu`'s trampoline-record page.
pub fn tramp_record_page_of_cpu(cpu: usize) -> u64 {
    tramp_records_base() + cpu as u64 * PAGE_SIZE
}

/// One shadow stack of the static stack layout: CPU `cpu`'s primary stack
/// (`ist` = 0) or its stack for IST `ist`.
#[derive(Clone, Copy, Debug)]
pub struct ShadowStackId {
    pub cpu: usize,
    pub ist: usize,
    pub bounds: StackBounds,
}

impl ShadowStackId {
    pub fn of(cpu: usize, ist: usize) -> Self {
        let bounds = if ist == 0 { primary_shadow_stack(cpu) } else { ist_shadow_stack(cpu, ist) };
        ShadowStackId { cpu, ist, bounds }
    }
    /// The normal stack used together with this shadow stack.
    pub fn normal(self) -> StackBounds {
        if self.ist == 0 {
            kernel_stack(self.cpu)
        } else {
            ist_stack(self.cpu, self.ist)
        }
    }
}

/// The shadow stack holding `addr`, from the static layout only: nothing
/// here is read from writable memory.
pub fn shadow_stack_at(addr: u64) -> Option<ShadowStackId> {
    let cpu = cpu_of_stack_addr(addr)?;
    (0..=IST_COUNT).map(|ist| ShadowStackId::of(cpu, ist)).find(|s| addr >= s.bounds.lo && addr < s.bounds.hi)
}
