//! A minimal kernel that embeds shadowcall: booted by GRUB through
//! Multiboot2, mapped in the high half, with its own GDT/TSS/IDT and, where
//! the CPU has them, CET supervisor shadow stacks. It hosts the engine
//! (`host.rs`), declares patch sites, live-patches them while calling them
//! under each strategy, and reports KTAP on COM1 and port 0xE9
//! (`cargo xtask run --example minimal`).
#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod console;
mod cet;
mod cpu;
mod host;

use alloc::format;
use alloc::string::String;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use host::PATCHER;
use linked_list_allocator::LockedHeap;
use shadowcall::patch::{self, NewInsn, PatchError, SiteKind, SITE_LEN};
use shadowcall::site::SiteFn;
use x86_64::instructions::port::Port;
use x86_64::instructions::tlb;

/// Where the kernel is linked (linker.ld says the same): physical address + this.
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;
/// What GRUB leaves in EAX for a Multiboot2 kernel.
const MB2_BOOTLOADER_MAGIC: u32 = 0x36d7_6289;
const STACK_SIZE: usize = 64 * 1024;
/// The boot page tables map 4 KiB pages.
const PAGE_SHIFT: u64 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// The GDT, TSS and IDT, and the diagnostics' strings.
const HEAP_SIZE: usize = 64 * 1024;
/// QEMU's isa-debug-exit port (the runner adds the device); Bochs ignores it.
const QEMU_EXIT_PORT: u16 = 0xf4;
/// The line the runner waits for (xtask::ktap::END_MARKER).
const END_MARKER: &str = "# shadowcall: end of report";

core::arch::global_asm!(
    include_str!("../asm/boot.S"),
    include_str!("../asm/cet.S"),
    include_str!("../asm/engine.S"),
    KERNEL_VMA = const KERNEL_VMA,
    PAGE_SIZE = const PAGE_SIZE,
    STACK_SIZE = const STACK_SIZE,
    FAULT_VECTORS = const cpu::FAULT_VECTORS,
    FAULT_STUB_SIZE = const cpu::FAULT_STUB_SIZE,
    options(att_syntax)
);

extern "C" {
    static mut boot_pml4: [u64; 512];
    static mut boot_pt: [u64; 1024];
    static boot_stack_top: u8;
    static mut __sites_start: u64;
    static mut __sites_end: u64;
    static mut __targets_start: u64;
    static mut __targets_end: u64;
}

/// Calls of the patch targets.
static CALLS_A: AtomicU64 = AtomicU64::new(0);
static CALLS_B: AtomicU64 = AtomicU64::new(0);
static HOOK_CALLS: AtomicU64 = AtomicU64::new(0);
/// What each target returns.
const A: u64 = 1;
const B: u64 = 2;

extern "C" fn target_a() -> u64 {
    CALLS_A.fetch_add(1, Ordering::Relaxed);
    A
}
extern "C" fn target_b() -> u64 {
    CALLS_B.fetch_add(1, Ordering::Relaxed);
    B
}
extern "C" fn hook() {
    HOOK_CALLS.fetch_add(1, Ordering::Relaxed);
}
/// Declared for no site: a patch to it must be refused.
extern "C" fn undeclared() -> u64 {
    0
}

shadowcall::patch_site! {
    /// A static call: calls `target_a`, may be pointed at `target_b`.
    static SITE: extern "C" fn() -> u64 = target_a, [target_b];
}
shadowcall::patch_site! {
    /// A jump label: calls `hook`, may be turned into a NOP and back.
    static HOOK: extern "C" fn() = hook;
}

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();
static mut HEAP_SPACE: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

static BOOT_MAGIC: AtomicU32 = AtomicU32::new(0);

/// The boot page-table entry that maps the high-half page at `vaddr`.
pub fn boot_pte(vaddr: u64) -> *mut u64 {
    let index = ((vaddr - KERNEL_VMA) >> PAGE_SHIFT) as usize;
    // SAFETY: only the address is taken; the index is < 1024 (the kernel ends below 4 MiB).
    unsafe { addr_of_mut!(boot_pt[index]) }
}

#[no_mangle]
extern "C" fn kmain(magic: u32, _boot_info: u64) -> ! {
    console::init();
    // SAFETY: the linker brackets the two tables; nothing else runs yet and
    // the image is still writable (`host::protect` maps it read-only next).
    unsafe {
        shadowcall::site::sort_table(addr_of_mut!(__sites_start), addr_of_mut!(__sites_end));
        shadowcall::site::sort_table(addr_of_mut!(__targets_start), addr_of_mut!(__targets_end));
    }
    host::protect();
    // SAFETY: the heap space is handed to the allocator once and used by nothing else.
    unsafe { HEAP.lock().init(addr_of_mut!(HEAP_SPACE).cast(), HEAP_SIZE) };
    cpu::init();
    // Nothing runs at the identity mapping any more: drop it (GDT and IDT are high now).
    // SAFETY: the PML4 entry of the low 512 GiB; we run and keep data in the high half.
    unsafe { addr_of_mut!(boot_pml4[0]).write_volatile(0) };
    tlb::flush_all();
    BOOT_MAGIC.store(magic, Ordering::Relaxed);
    println!("KTAP version 1");
    println!("1..{}", TESTS.len());
    let rsp = addr_of!(boot_stack_top) as u64 - 8;
    if cet::supported() {
        // SAFETY: the boot stack is abandoned for good (kmain never returns); CET_SS is present.
        unsafe { cet::enable_and_continue(run_tests, rsp) }
    }
    run_tests()
}

enum Verdict {
    Ok(String),
    Skip(&'static str),
    Fail(String),
}

/// A KTAP test: its name (a contract) and its body.
type Test = (&'static str, fn() -> Verdict);

const TESTS: [Test; 4] = [
    ("example_boot", test_boot),
    ("example_shadow_stack", test_shadow_stack),
    ("example_call_site", test_call_site),
    ("example_patch_site", test_patch_site),
];

extern "C" fn run_tests() -> ! {
    let mut ok = true;
    for (i, (name, test)) in TESTS.iter().enumerate() {
        let n = i + 1;
        match test() {
            Verdict::Ok(note) => println!("# {name}: {note}\nok {n} {name}"),
            Verdict::Skip(why) => println!("ok {n} {name} # SKIP {why}"),
            Verdict::Fail(why) => {
                ok = false;
                println!("# {name}: {why}\nnot ok {n} {name}");
            }
        }
    }
    exit(ok)
}

/// Started by a Multiboot2 loader, running and stacked in the high half.
fn test_boot() -> Verdict {
    let magic = BOOT_MAGIC.load(Ordering::Relaxed);
    let rip = test_boot as fn() -> Verdict as usize as u64;
    let rsp = addr_of!(magic) as u64;
    // SAFETY: a read of our own page table.
    let identity = unsafe { addr_of!(boot_pml4[0]).read_volatile() };
    if magic != MB2_BOOTLOADER_MAGIC {
        Verdict::Fail(format!("boot magic {magic:#x}, not Multiboot2's {MB2_BOOTLOADER_MAGIC:#x}"))
    } else if rip < KERNEL_VMA || rsp < KERNEL_VMA || identity != 0 {
        Verdict::Fail(format!("code {rip:#x}, stack {rsp:#x}, identity map {identity:#x}: not high-half only"))
    } else {
        Verdict::Ok(format!("Multiboot2, code {rip:#x}, stack {rsp:#x}"))
    }
}

fn test_shadow_stack() -> Verdict {
    if !cet::supported() {
        return Verdict::Skip("no CET_SS");
    }
    match cet::check() {
        Ok(note) => Verdict::Ok(note),
        Err(e) => Verdict::Fail(e),
    }
}

/// The site is registered and holds a call to a registered target; calling
/// it runs that target once.
fn test_call_site() -> Verdict {
    let site = SITE.addr();
    let target = SITE.default_target().addr();
    let registry = PATCHER.registry();
    if !registry.is_site(site) || !registry.is_target(target) {
        return Verdict::Fail(format!("site {site:#x} or target {target:#x} is not registered"));
    }
    match patch::classify(&site_bytes(site), site) {
        Ok(SiteKind::Call(t)) if t == target => {}
        other => return Verdict::Fail(format!("site {site:#x} holds {other:x?}, not a call to {target:#x}")),
    }
    let before = CALLS_A.load(Ordering::Relaxed);
    let returned = SITE.get()();
    let calls = CALLS_A.load(Ordering::Relaxed) - before;
    if returned != A || calls != 1 || CALLS_B.load(Ordering::Relaxed) != 0 {
        return Verdict::Fail(format!("the call through the site returned {returned} and ran target_a {calls} times"));
    }
    Verdict::Ok(format!("site {site:#x} calls {target:#x}"))
}

/// The 5 bytes of text at `site`.
fn site_bytes(site: u64) -> [u8; SITE_LEN] {
    // SAFETY: a registered site: 5 bytes of our own mapped text.
    unsafe { (site as *const [u8; SITE_LEN]).read_volatile() }
}

/// Live patches with the engine, under each strategy this CPU can use: the
/// static call SITE pointed at target_b and back, the jump label HOOK
/// turned into a NOP and back, each called inside the window (it traps on
/// the int3 and the engine emulates the new instruction) and after. Then a
/// patch to an undeclared target is refused with text unchanged. Text is
/// read-only: only the engine's window (host.rs `poke`) writes it.
fn test_patch_site() -> Verdict {
    // SAFETY: a read of our own page table.
    if unsafe { boot_pte(SITE.addr()).read_volatile() } & host::PTE_WRITABLE != 0 {
        return Verdict::Fail("text is mapped writable".into());
    }
    let strategies = PATCHER.strategies_here();
    if let Err(e) = PATCHER.init(strategies[0]) {
        return Verdict::Fail(format!("Patcher::init: {e}"));
    }
    let mut notes = alloc::vec::Vec::new();
    for s in strategies {
        PATCHER.set_strategy(s);
        match live_patches() {
            Ok(n) => notes.push(format!("{s:?}: {n} calls emulated")),
            Err(e) => return Verdict::Fail(format!("{s:?}: {e}")),
        }
    }
    match refused_patch() {
        Ok(()) => Verdict::Ok(format!("{}; an undeclared target refused, text unchanged", notes.join(", "))),
        Err(e) => Verdict::Fail(e),
    }
}

/// Calls the window runs (one after each of the protocol's steps 1 and 2).
const WINDOW_CALLS: u64 = 2;

/// The four patches under the strategy in force; the number of calls emulated.
fn live_patches() -> Result<u64, String> {
    let hook_calls = || {
        let before = HOOK_CALLS.load(Ordering::Relaxed);
        HOOK.get()();
        HOOK_CALLS.load(Ordering::Relaxed) - before
    };
    let to_b = SITE.call_to(target_b).map_err(|e| format!("{e}"))?;
    let nop = HOOK.nop().map_err(|e| format!("{e}"))?;
    patch_live("SITE -> target_b", (SITE.addr(), to_b), || SITE.get()(), B)?;
    patch_live("SITE -> target_a", SITE.restore(), || SITE.get()(), A)?;
    patch_live("HOOK -> nop", (HOOK.addr(), nop), hook_calls, 0)?;
    patch_live("HOOK -> hook", HOOK.restore(), hook_calls, 1)?;
    Ok(4 * WINDOW_CALLS)
}

/// Patch `site` to `insn`, calling it in the window and after: each call
/// must give `want`, and text must hold `insn` after.
fn patch_live(what: &str, (site, insn): (u64, NewInsn), call: impl Fn() -> u64, want: u64) -> Result<(), String> {
    let mut seen = alloc::vec::Vec::new();
    // Each window call runs the site while it starts with int3: it can only
    // return through the engine's emulation (the #BP stub's fast path or
    // the handler; the engine's counters are a test-hooks feature).
    let mut trapped = true;
    PATCHER
        .patch(&[(site, insn)], |_step| {
            trapped &= site_bytes(site)[0] == shadowcall::patch::INT3;
            seen.push(call());
        })
        .map_err(|e| format!("{what}: {e}"))?;
    if !trapped {
        return Err(format!("{what}: the site did not hold int3 inside the window"));
    }
    seen.push(call());
    let text_ok = insn.encode(site).is_ok_and(|b| b == site_bytes(site));
    if seen != [want; WINDOW_CALLS as usize + 1] || !text_ok {
        return Err(format!("{what}: calls in the window and after gave {seen:?}, not {want}; text {text_ok}"));
    }
    Ok(())
}

/// A patch to a target no site declares: refused, nothing written.
fn refused_patch() -> Result<(), String> {
    let (site, before) = (SITE.addr(), site_bytes(SITE.addr()));
    let target = (undeclared as extern "C" fn() -> u64).addr();
    let mut window = false;
    let r = PATCHER.patch(&[(site, NewInsn::Call(target))], |_| window = true);
    match r {
        Err(PatchError::UnknownTarget { .. }) if !window && site_bytes(site) == before && !PATCHER.batch_live() => {
            Ok(())
        }
        other => Err(format!("a patch to undeclared {target:#x}: {other:?}, window run {window}")),
    }
}

/// End the run: the end marker, QEMU's isa-debug-exit, Bochs' magic breakpoint, halt.
pub fn exit(success: bool) -> ! {
    println!("{END_MARKER}");
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit when present, unused otherwise.
    unsafe { Port::<u32>::new(QEMU_EXIT_PORT).write(u32::from(!success)) };
    // SAFETY: `xchg %bx,%bx` is a no-op except under Bochs' magic_break.
    unsafe { core::arch::asm!("xchg bx, bx", options(nomem, nostack)) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("# PANIC: {info}");
    exit(false)
}
