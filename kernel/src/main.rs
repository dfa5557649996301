//! shadowcall: a bare-metal x86-64 kernel that turns on CET supervisor
//! shadow stacks where the CPU has them, live-patches its own text with the
//! int3 protocol, emulates calls hit mid-patch in a shadow-stack-safe way,
//! and proves all of it with self-tests (KTAP) on every boot.
#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod console;
mod apic;
mod bench;
mod boot;
mod cet;
mod cpu;
mod hooks;
mod interrupts;
mod mm;
mod patching;
mod percpu;
mod records;
mod recover;
mod selftest;
mod smp;

use shadowcall_cmdline::{CetMode, EmulStrategy};
use spin::Once;

core::arch::global_asm!(
    concat!(include_str!("../asm/boot.S"), include_str!("../asm/ap_boot.S")),
    AP_TRAMPOLINE = const smp::AP_TRAMPOLINE,
    options(att_syntax)
);

/// What boot decided, for the code after the switch onto the shadow stack.
pub struct BootState {
    pub boot: boot::BootInfo,
    pub features: cpu::Features,
    /// Shadow stacks were requested and the CPU has them.
    pub want_shstk: bool,
    /// Problems with the command line (reported by the `cmdline` test).
    pub cmdline_errors: alloc::vec::Vec<alloc::string::String>,
    pub strategy: EmulStrategy,
}

/// What SMP start-up found (set once on the boot CPU).
pub static TOPOLOGY: Once<smp::Topology> = Once::new();

pub static STATE: Once<BootState> = Once::new();

pub fn state() -> &'static BootState {
    STATE.get().expect("boot state")
}

/// Wire the self-tests and benchmarks into the dispatcher and the patcher
/// (they sit above both: `hooks`).
fn install_hooks() {
    hooks::install(hooks::Handlers {
        timer_tick: selftest::smp_tests::timer_tick,
        ist_probe: selftest::cet_tests::ist_probe,
        nmi_body,
        nmi_enter: selftest::nmi_tests::nmi_depth_enter,
        nmi_exit: selftest::nmi_tests::nmi_depth_exit,
    });
    #[cfg(feature = "test-hooks")]
    hooks::install_test_hooks(hooks::TestHooks {
        before_dispatch: selftest::sec_recover::forge_nmi_frame,
        nested: selftest::sec_nested::nested_hook,
        after_dispatch: selftest::sec_tests::after_dispatch,
        record_frame: selftest::sec_tests::record_frame,
        after_bp_checks: selftest::sec_tests::after_bp_checks,
        race_window: selftest::sec_tests::race_window,
        forge_sealed_copy: selftest::sec_tests::forge_sealed_copy,
    });
}

/// The NMI handler's body: the self-tests' NMI work, then a pending
/// benchmark measurement.
fn nmi_body(frame: &mut shadowcall::frame::TrapFrame) {
    selftest::smp_tests::nmi(frame);
    bench::nmi_hook();
}

#[no_mangle]
extern "C" fn kmain(magic: u64, mbi: u64) -> ! {
    bench::TSC_KMAIN.store(bench::rdtsc(), core::sync::atomic::Ordering::Relaxed);
    percpu::init_this(0);
    install_hooks();
    let boot = boot::BootInfo::read(magic, mbi);
    let features = cpu::Features::detect();
    mm::write_shadow_tokens();
    mm::init_paging(boot.ram_end, !features.x2apic);
    mm::init_heap();
    interrupts::init(0);

    let mut errors = alloc::vec::Vec::new();
    if !boot.multiboot_ok {
        errors.push(alloc::format!("not started by a Multiboot loader (magic {magic:#x})"));
    }
    let cmdline = match shadowcall_cmdline::parse_multiboot(boot.cmdline()) {
        Ok(c) => c,
        Err(e) => {
            errors.push(alloc::format!("{e}"));
            Default::default()
        }
    };
    let want_shstk = match cmdline.cet {
        CetMode::Auto => features.cet.cet_ss,
        CetMode::Off => false,
        CetMode::On => {
            if !features.cet.cet_ss {
                errors.push(alloc::string::String::from(
                    "cet=on but this CPU has no CET supervisor shadow stacks (CPUID.(7,0):ECX[7] CET_SS=0)",
                ));
            }
            features.cet.cet_ss
        }
    };
    // With shadow stacks the one-trap shadow gap is the default (bench/
    // shows it is the cheapest CET path; DESIGN.md); without them, classic.
    let default = if want_shstk { EmulStrategy::ShadowGap } else { EmulStrategy::Classic };
    let strategy = cmdline.emul.unwrap_or(default);
    STATE.call_once(|| BootState {
        boot: boot.with_cmdline(cmdline),
        features,
        want_shstk,
        cmdline_errors: errors,
        strategy,
    });
    if want_shstk {
        cet::enable_and_continue(&features, 0, kmain_continue)
    } else {
        kmain_continue()
    }
}

/// Runs on a fresh kernel stack, on the shadow stack when CET is on. Never returns.
extern "C" fn kmain_continue() -> ! {
    let st = state();
    if st.want_shstk {
        // Shadow stacks are on (SETSSBSY ran): NMI/#MC may now enter through
        // the stubs that store registers with WRSS.
        interrupts::load_cet_idt();
    }
    crate::records::sync_word_online();
    apic::init(st.features.x2apic);
    TOPOLOGY.call_once(|| smp::start_aps(st.boot.ebda));
    let ok = selftest::run_all(st);
    let tsc_tests_end = bench::rdtsc();
    if st.boot.parsed.bench {
        bench::run_all(st, tsc_tests_end);
    }
    exit(ok)
}

/// End the run: QEMU's isa-debug-exit, then Bochs' magic breakpoint, then halt.
pub fn exit(success: bool) -> ! {
    use x86_64::instructions::port::Port;
    diag!("shadowcall: end of report");
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit when present, unused otherwise.
    unsafe { Port::<u32>::new(0xf4).write(if success { 0 } else { 1 }) };
    // SAFETY: `xchg %bx,%bx` is a no-op except under Bochs' magic_break.
    unsafe { core::arch::asm!("xchg bx, bx", options(nomem, nostack)) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    diag!("PANIC: {info}");
    exit(false)
}

/// Rust entry of an application processor (from asm/ap_boot.S).
#[no_mangle]
extern "C" fn ap_main(index: u64) -> ! {
    let index = index as usize;
    percpu::init_this(index);
    interrupts::init(index);
    apic::enable_local();
    let st = state();
    if st.want_shstk {
        cet::enable_and_continue(&st.features, index, ap_idle)
    } else {
        ap_idle()
    }
}

/// An AP's life after start-up: run work handed to it, sleep otherwise.
extern "C" fn ap_idle() -> ! {
    let me = percpu::this_cpu();
    if state().want_shstk {
        interrupts::load_cet_idt();
    }
    records::sync_word_online();
    me.online.store(true, core::sync::atomic::Ordering::Release);
    loop {
        x86_64::instructions::interrupts::disable();
        let work = me.work.swap(0, core::sync::atomic::Ordering::Acquire);
        if work != 0 {
            x86_64::instructions::interrupts::enable();
            // SAFETY: `run_on` stores a `fn(u64)` pointer.
            let f: fn(u64) = unsafe { core::mem::transmute(work as usize) };
            f(me.work_arg.load(core::sync::atomic::Ordering::Relaxed));
            me.work_done.fetch_add(1, core::sync::atomic::Ordering::Release);
        } else {
            // STI; HLT: an interrupt between the check and the halt still wakes us.
            x86_64::instructions::interrupts::enable_and_hlt();
        }
    }
}
