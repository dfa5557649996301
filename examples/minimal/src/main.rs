//! A minimal kernel that embeds shadowcall: booted by GRUB through
//! Multiboot2, mapped in the high half, with its own GDT/TSS/IDT and, where
//! the CPU has them, CET supervisor shadow stacks. It declares a patch site
//! and reports KTAP on COM1 and port 0xE9 (`cargo xtask run --example minimal`).
#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod console;
mod cet;
mod cpu;

use alloc::format;
use alloc::string::String;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use linked_list_allocator::LockedHeap;
use shadowcall::patch::{self, Registry, SiteKind, SITE_LEN};
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
/// The GDT, TSS and IDT, and the diagnostics' strings.
const HEAP_SIZE: usize = 64 * 1024;
/// QEMU's isa-debug-exit port (the runner adds the device); Bochs ignores it.
const QEMU_EXIT_PORT: u16 = 0xf4;
/// The line the runner waits for (xtask::ktap::END_MARKER).
const END_MARKER: &str = "# shadowcall: end of report";

core::arch::global_asm!(
    include_str!("../asm/boot.S"),
    include_str!("../asm/cet.S"),
    KERNEL_VMA = const KERNEL_VMA,
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

extern "C" fn target_a() -> u64 {
    CALLS_A.fetch_add(1, Ordering::Relaxed) + 1
}
extern "C" fn target_b() -> u64 {
    CALLS_B.fetch_add(1, Ordering::Relaxed) + 1
}

shadowcall::patch_site! {
    /// The example's patch site: calls `target_a`, may be pointed at `target_b`.
    static SITE: extern "C" fn() -> u64 = target_a, [target_b];
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
    // the image is writable (this example does not map .rodata read-only).
    unsafe {
        shadowcall::site::sort_table(addr_of_mut!(__sites_start), addr_of_mut!(__sites_end));
        shadowcall::site::sort_table(addr_of_mut!(__targets_start), addr_of_mut!(__targets_end));
    }
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

const TESTS: [Test; 3] =
    [("example_boot", test_boot), ("example_shadow_stack", test_shadow_stack), ("example_call_site", test_call_site)];

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
    // SAFETY: the linker brackets the two tables of 8-byte addresses with these symbols.
    let (sites, targets) = unsafe {
        (
            table(addr_of!(__sites_start), addr_of!(__sites_end)),
            table(addr_of!(__targets_start), addr_of!(__targets_end)),
        )
    };
    let site = SITE.addr();
    let target = SITE.default_target().addr();
    let registry = Registry::new(sites, targets, &[]);
    if !registry.is_site(site) || !registry.is_target(target) {
        return Verdict::Fail(format!("site {site:#x} or target {target:#x} is not registered"));
    }
    // SAFETY: the site's 5 bytes are our own text.
    let bytes = unsafe { core::slice::from_raw_parts(site as *const u8, SITE_LEN) };
    match patch::classify(bytes, site) {
        Ok(SiteKind::Call(t)) if t == target => {}
        other => return Verdict::Fail(format!("site {site:#x} holds {other:x?}, not a call to {target:#x}")),
    }
    let before = CALLS_A.load(Ordering::Relaxed);
    let returned = SITE.get()();
    let calls = CALLS_A.load(Ordering::Relaxed) - before;
    if returned != CALLS_A.load(Ordering::Relaxed) || CALLS_B.load(Ordering::Relaxed) != 0 {
        return Verdict::Fail(format!("the call through the site returned {returned}, not target_a's count"));
    }
    if calls != 1 {
        return Verdict::Fail(format!("the call through the site ran the target {calls} times, not once"));
    }
    Verdict::Ok(format!("site {site:#x} calls {target:#x}"))
}

/// # Safety
/// `[start, end)` is a linker-made table of u64.
unsafe fn table(start: *const u64, end: *const u64) -> &'static [u64] {
    // SAFETY: per the caller.
    unsafe { core::slice::from_raw_parts(start, end.offset_from(start) as usize) }
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
