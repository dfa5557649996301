//! This kernel as the engine's host: [`ExamplePlatform`] implements
//! `shadowcall::engine::Platform`, [`PATCHER`] is the one `Patcher`, and
//! the #BP entry stub (the crate's `sc_isr_3`) calls `sc_bp_handler` and
//! `sc_bp_exit_refused` below. One CPU, one normal and one shadow stack.

use core::ptr::{addr_of, addr_of_mut};

use shadowcall::cet;
use shadowcall::emul::record::{RECORDS_PER_PAGE, RECORD_SIZE, REC_SSP};
use shadowcall::engine::{CpuState, Event, Exit, Int3, Patcher, Platform, Poke, Pokes};
use shadowcall::frame::TrapFrame;
use shadowcall::patch::{CodeRange, CodeRegion, SealedEntry, Text, SEALED_MAGIC, SITE_LEN};
use shadowcall::shstk::StackBounds;
use shadowcall::tramp::TRAMP_BYTES;
use x86_64::instructions::{interrupts, tlb};
use x86_64::VirtAddr;

use crate::{boot_pte, KERNEL_VMA, PAGE_SIZE};

/// PTE bits: present, writable, dirty (present + dirty, not writable: a
/// shadow-stack page).
pub const PTE_PRESENT: u64 = 1;
pub const PTE_WRITABLE: u64 = 1 << 1;
pub const PTE_DIRTY: u64 = 1 << 6;
/// Bytes of the sealed batch's magic word (at the sealed area's start).
const MAGIC_LEN: u64 = 8;

extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __entry_text_start: u8;
    static __entry_text_end: u8;
    static __cet_text_start: u8;
    static __cet_text_end: u8;
    static __sites_start: u64;
    static __sites_end: u64;
    static __targets_start: u64;
    static __targets_end: u64;
    static __sealed_start: u8;
    static sc_stacks: u8;
    static sc_tramp_records: u8;
    static sc_tramp_page: u8;
    static example_poke_window: u8;
    static boot_stack: u8;
    static boot_stack_top: u8;
}

/// The address of a linker or asm symbol.
macro_rules! sym {
    ($s:ident) => {
        addr_of!($s) as u64
    };
}

/// Map the high-half page at `va` onto its own physical page with `flags`.
pub fn map(va: u64, flags: u64) {
    // SAFETY: the PTE of a page of our image; the caller picks the flags.
    unsafe { boot_pte(va).write_volatile((va - KERNEL_VMA) | flags) };
    tlb::flush(VirtAddr::new(va));
}

/// Text and read-only data (the tables, sorted by now) read-only; the
/// sealed area read-only; the record page a shadow-stack page; the text
/// window unmapped. Once, at boot.
pub fn protect() {
    let pages = |lo: u64, hi: u64| (lo..hi).step_by(PAGE_SIZE as usize);
    pages(sym!(__text_start), sym!(__rodata_end)).for_each(|p| map(p, PTE_PRESENT));
    map(sym!(__sealed_start), PTE_PRESENT);
    map(sym!(sc_tramp_records), PTE_PRESENT | PTE_DIRTY);
    // SAFETY: the window's PTE; nothing uses the window outside `poke`.
    unsafe { boot_pte(sym!(example_poke_window)).write_volatile(0) };
    tlb::flush_all();
    let range = |start, end, region| CodeRange { start, end, region };
    let forbidden = [
        range(sym!(sc_tramp_page), sym!(sc_tramp_page) + PAGE_SIZE, CodeRegion::Trampoline),
        range(sym!(__entry_text_start), sym!(__entry_text_end), CodeRegion::ExceptionEntry),
        range(sym!(__cet_text_start), sym!(__cet_text_end), CodeRegion::CetBringUp),
    ];
    // SAFETY: one CPU at boot; the engine reads it only from the first patch on.
    unsafe { addr_of_mut!(FORBIDDEN).write(forbidden) };
}

/// Code no site or target may lie in (`protect` fills it in).
static mut FORBIDDEN: [CodeRange; 3] = [CodeRange { start: 0, end: 0, region: CodeRegion::Trampoline }; 3];

/// The shadow stack `[lo, hi)`: this CPU's whole stack area.
pub fn shadow_stack() -> StackBounds {
    StackBounds { lo: sym!(sc_stacks), hi: sym!(sc_stacks) + PAGE_SIZE }
}

/// The u64 table `[start, end)` of the linker script.
fn table(start: *const u64, end: *const u64) -> &'static [u64] {
    // SAFETY: the linker brackets each read-only table of u64 with its two symbols.
    unsafe { core::slice::from_raw_parts(start, end.offset_from(start) as usize) }
}

/// This kernel, as the engine sees it.
pub struct ExamplePlatform;

/// The patcher.
pub static PATCHER: Patcher<ExamplePlatform> = Patcher::new(ExamplePlatform);
/// The one CPU's engine state.
static CPU: CpuState = CpuState::new();

// SAFETY: the layout answers are linker symbols of this image (text mapped
// read-only and executable, the tables and the sealed area read-only by
// `protect`, the trampoline page int3 text used by nothing else); `poke`
// writes through a window page only this CPU maps, with interrupts off, and
// checks each destination against the read-only tables; one CPU, so `sync`
// is a serializing instruction; the stacks are the only ones this CPU runs on.
unsafe impl Platform for ExamplePlatform {
    fn text(&self) -> Text<'static> {
        let len = (sym!(__text_end) - sym!(__text_start)) as usize;
        // SAFETY: the text is mapped for good; it changes only through `poke`.
        Text { base: sym!(__text_start), bytes: unsafe { core::slice::from_raw_parts(addr_of!(__text_start), len) } }
    }
    fn sites(&self) -> &'static [u64] {
        table(addr_of!(__sites_start), addr_of!(__sites_end))
    }
    fn targets(&self) -> &'static [u64] {
        table(addr_of!(__targets_start), addr_of!(__targets_end))
    }
    fn forbidden_code(&self) -> &[CodeRange] {
        // SAFETY: written once by `protect`, before any patch.
        unsafe { &*addr_of!(FORBIDDEN) }
    }
    fn tramp_page(&self) -> u64 {
        sym!(sc_tramp_page)
    }
    fn sealed_area(&self) -> (u64, u64) {
        (sym!(__sealed_start), sym!(__sealed_start) + PAGE_SIZE)
    }
    fn poke(&self, pokes: Pokes<'_>) -> bool {
        interrupts::without_interrupts(|| pokes.iter().for_each(poke_one));
        true
    }
    fn sync(&self) {
        // CPUID serializes; one CPU: nobody else to wait for.
        let _ = core::arch::x86_64::__cpuid(0);
    }
    fn normal_stack(&self, addr: u64) -> Option<StackBounds> {
        let b = StackBounds { lo: sym!(boot_stack), hi: sym!(boot_stack_top) };
        (b.lo..b.hi).contains(&addr).then_some(b)
    }
    fn shadow_stack(&self, addr: u64) -> Option<StackBounds> {
        let b = shadow_stack();
        (b.lo..b.hi).contains(&addr).then_some(b)
    }
    fn find_record(&self, f_base: u64, bound_ssp: u64) -> Option<u64> {
        // The record page of the CPU whose stack area holds F: CPU 0's.
        self.shadow_stack(f_base)?;
        let page = sym!(sc_tramp_records);
        (0..RECORDS_PER_PAGE).map(|i| page + i * RECORD_SIZE).find(|&r| {
            // SAFETY: a word of the record page (mapped, a shadow-stack page).
            unsafe { cet::read_slot(r + REC_SSP) == bound_ssp }
        })
    }
    fn cpu(&self) -> &CpuState {
        &CPU
    }
    fn for_each_cpu(&self, f: &mut dyn FnMut(&CpuState)) {
        f(&CPU)
    }
    fn event(&self, e: Event<'_>) {
        match e {
            Event::Refused { frame, error } => {
                println!("# the #BP handler refused to write at rip {:#x}: {error}", frame.rip);
                crate::exit(false)
            }
            Event::StaleInt3 { addr } => println!("# a stale int3 at {addr:#x}"),
            Event::Int3Race { addr } => println!("# an int3 at {addr:#x} with no batch live"),
            // Reported by `sc_bp_handler` on `Int3::NotOurs`.
            Event::Breakpoint { .. } => {}
        }
    }
}

extern "C" {
    /// The crate's check of the sealed area before publication (asm/publish.S):
    /// 1 if every user may trust its content, else 0.
    fn sc_sealed_check() -> u64;
}

/// One write through the text window. Stops the kernel on a destination
/// that is not what the engine may write (the values to write come from
/// read-only memory, but for the sealed batch's bytes, which the engine
/// verifies in place before it publishes them), and on a step that text at
/// the site does not allow (the protocol's order: tails only behind an
/// int3, the head only onto int3 followed by the entry's own tails).
fn poke_one(p: Poke<'_>) {
    let (sealed, sealed_end) = ExamplePlatform.sealed_area();
    // A site write: the entry must be the live (read-only) batch's own entry
    // for a registered site.
    let live_site = |e: &SealedEntry| {
        let live = PATCHER.live_entry(e.site).is_some_and(|l| core::ptr::eq(l, e));
        if !live || ExamplePlatform.sites().binary_search(&e.site).is_err() {
            println!("# PANIC: poke: {e:x?} is not the live batch's entry of a registered site");
            crate::exit(false)
        }
        (e.site, e.site_bytes())
    };
    let text_now = |site: u64| {
        // SAFETY: a registered site: 5 bytes of our own mapped text.
        unsafe { (site as *const [u8; SITE_LEN]).read_volatile() }
    };
    let refuse_step = |what: &str, site: u64| -> ! {
        println!("# PANIC: poke: {what} at {site:#x}: text holds {:02x?}", text_now(site));
        crate::exit(false)
    };
    match p {
        Poke::Int3(e) => alias_write(live_site(e).0, &[shadowcall::patch::INT3]),
        Poke::Tails(e) => {
            let (site, bytes) = live_site(e);
            if text_now(site)[0] != shadowcall::patch::INT3 {
                refuse_step("tails not behind an int3", site);
            }
            alias_write(site + 1, &bytes[1..SITE_LEN]);
        }
        Poke::Head(e) => {
            let (site, bytes) = live_site(e);
            let now = text_now(site);
            if !(now[0] == shadowcall::patch::INT3 || now[0] == bytes[0]) || now[1..] != bytes[1..] {
                refuse_step("a head not onto int3 and the entry's own tails", site);
            }
            alias_write(site, &bytes[..1]);
        }
        Poke::Sealed { offset, bytes } => {
            let end = offset.checked_add(bytes.len() as u64);
            if offset < MAGIC_LEN || end.is_none_or(|end| end > sealed_end - sealed) {
                println!("# PANIC: poke: {} bytes at offset {offset:#x} outside the sealed area", bytes.len());
                crate::exit(false)
            }
            // Never under a published (or claimed) batch: the #BP fast path
            // trusts a live one as it was checked (review 11 F3).
            // SAFETY: the sealed area's first word, mapped read-only.
            if unsafe { (sealed as *const u64).read_volatile() } != 0 {
                println!("# PANIC: poke: the sealed area written while its magic word is set");
                crate::exit(false)
            }
            alias_write(sealed + offset, bytes);
        }
        Poke::Publish => {
            // The crate decides publication (asm/publish.S, sealed.S
            // SEALED_VALID): every user trusts a live batch's header, tree
            // and entries from here on. One CPU with interrupts off: no
            // other writer of the area runs until the magic word is written.
            // SAFETY: reads only the sealed area and the read-only tables.
            if unsafe { sc_sealed_check() } != 1 {
                println!("# PANIC: poke: the sealed batch fails the crate's check (sc_sealed_check): not published");
                crate::exit(false)
            }
            alias_write(sealed, &SEALED_MAGIC.to_le_bytes())
        }
        Poke::Unseal => alias_write(sealed, &0u64.to_le_bytes()),
        Poke::Tramp => alias_write(sym!(sc_tramp_page), &TRAMP_BYTES),
    }
}

/// Write `bytes` at `dst` (read-only in the kernel's mapping) through the
/// window page, mapped writable onto each destination page in turn. Only
/// text and the sealed area are destinations (never the record page, a
/// shadow-stack page, nor anything else of the image).
fn alias_write(dst: u64, bytes: &[u8]) {
    let window = sym!(example_poke_window);
    let text = ExamplePlatform.text();
    let (sealed, sealed_end) = ExamplePlatform.sealed_area();
    let end = dst.checked_add(bytes.len() as u64);
    let inside = |lo: u64, hi: u64| dst >= lo && end.is_some_and(|end| end <= hi);
    if !(inside(text.base, text.end()) || inside(sealed, sealed_end)) {
        println!("# PANIC: poke: {} bytes at {dst:#x} are neither text nor the sealed area", bytes.len());
        crate::exit(false)
    }
    let mut done = 0;
    while done < bytes.len() {
        let at = dst + done as u64;
        let (page, off) = (at & !(PAGE_SIZE - 1), at & (PAGE_SIZE - 1));
        let n = (bytes.len() - done).min((PAGE_SIZE - off) as usize);
        // SAFETY: the window's PTE points at a page of our image, writable,
        // only while this CPU copies to it (interrupts off, one CPU).
        unsafe {
            boot_pte(window).write_volatile((page - KERNEL_VMA) | PTE_PRESENT | PTE_WRITABLE);
            tlb::flush(VirtAddr::new(window));
            core::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), (window + off) as *mut u8, n);
            boot_pte(window).write_volatile(0);
        }
        tlb::flush(VirtAddr::new(window));
        done += n;
    }
}

/// #BP, from the crate's `sc_isr_3`: the engine first; a breakpoint of
/// nobody's is reported and resumed after.
#[no_mangle]
#[link_section = ".text.entry"]
extern "C" fn sc_bp_handler(frame: &mut TrapFrame, ssp: u64) -> Exit {
    frame.ssp = ssp;
    match PATCHER.handle_int3(frame) {
        Int3::Handled(exit) => exit,
        Int3::NotOurs => {
            println!("# breakpoint at {:#x}: not a patch site", frame.rip - 1);
            PATCHER.plain(frame)
        }
    }
}

/// The exit found the frame changed after the handler's checks: nothing written.
#[no_mangle]
#[link_section = ".text.entry"]
extern "C" fn sc_bp_exit_refused(frame: &mut TrapFrame, ssp: u64) {
    PATCHER.exit_refused(frame, ssp);
}
