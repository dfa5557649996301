//! This kernel as the engine's host: `KernelPlatform` implements
//! `shadowcall::engine::Platform` (its text window, sync, stacks, per-CPU
//! state), and `PATCHER` is the one `Patcher`. The protocol and the #BP
//! decisions are the engine's; this module adds the kernel's fault recovery
//! around them, its self-test probes, and the entry points the asm stub
//! calls (`sc_bp_handler`, `sc_bp_exit_refused`).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shadowcall::emul::record::RECORD_PAGE_SIZE;
use shadowcall::emul::{GuardError, PendingCall};
use shadowcall::engine::{self, Event, Exit, Int3, Patcher, Platform, Pokes, Strategy};
use shadowcall::frame::TrapFrame;
use shadowcall::patch::{CodeRange, CodeRegion, NewInsn, PatchError, Registry, SealedEntry, Text};
use shadowcall::shstk::StackBounds;
use shadowcall::tramp::{self, TrampLayout};
use shadowcall_cmdline::EmulStrategy;
use shadowcall_support::paging::PAGE_SIZE;
use spin::Once;

pub use shadowcall::engine::Step;

use crate::percpu::{this_cpu, PerCpu};
use crate::recover::{FaultInfo, GUARD_REFUSAL};
use crate::{cet, cpu, mm};

/// What one `patch` call did.
#[derive(Clone, Copy, Debug, Default)]
pub struct PatchStats {
    pub sites: usize,
    pub sync_rounds: u64,
    pub table_bytes: usize,
    /// A fault the hook raised (caught; the protocol still ran to the end).
    pub hook_fault: Option<FaultInfo>,
}

impl PatchStats {
    fn of(s: engine::PatchStats, hook_fault: Option<FaultInfo>) -> Self {
        PatchStats { sites: s.sites, sync_rounds: s.sync_rounds, table_bytes: s.table_bytes, hook_fault }
    }
}

static HAS_SERIALIZE: AtomicBool = AtomicBool::new(false);
/// QEMU TCG workaround. TCG keeps translated code per physical page and
/// drops it when a store hits a page it tracks; with several vCPUs, a store
/// through an alias whose TLB entry was filled while the page had no
/// translations can miss a translation another vCPU made just before, which
/// then runs the old bytes forever (seen with 4 vCPUs: a CPU executing the
/// old `call` over an int3 in memory). Writing each step a second time
/// through a freshly mapped alias makes TCG drop every translation made from
/// the old bytes (any made after the first write already saw the new ones).
/// Identical stores: harmless anywhere, only enabled under TCG.
static REWRITE_STEPS: AtomicBool = AtomicBool::new(false);

extern "C" {
    static __sites_start: u64;
    static __sites_end: u64;
    static __targets_start: u64;
    static __targets_end: u64;
    static __entry_text_start: u8;
    static __entry_text_end: u8;
    static __cet_text_start: u8;
    static __cet_text_end: u8;
    static sc_tramp_page: u8;
}

/// The u64 table the linker script brackets with `start`/`end`.
///
/// # Safety
/// `start`/`end` must bracket a read-only table of u64s in the kernel image.
unsafe fn linker_table(start: *const u64, end: *const u64) -> &'static [u64] {
    // SAFETY: the caller's obligation; the image is never unmapped.
    unsafe { core::slice::from_raw_parts(start, end.offset_from(start) as usize) }
}

/// The registered sites, read in place (`.shadowcall_sites`, read-only).
fn sites_table() -> &'static [u64] {
    // SAFETY: the linker script brackets the .shadowcall_sites table with these symbols.
    unsafe { linker_table(core::ptr::addr_of!(__sites_start), core::ptr::addr_of!(__sites_end)) }
}

/// The registered targets, read in place (`.shadowcall_targets`, read-only).
fn targets_table() -> &'static [u64] {
    // SAFETY: the linker script brackets the .shadowcall_targets table with these symbols.
    unsafe { linker_table(core::ptr::addr_of!(__targets_start), core::ptr::addr_of!(__targets_end)) }
}

/// Code no patch site or target may be in (DESIGN.md §5): the trampoline
/// page, exception entry (`.text.entry`), CET bring-up (`.text.cet`). From
/// linker symbols only.
fn forbidden_code() -> [CodeRange; 3] {
    let a = |p: *const u8| p as u64;
    let tramp = tramp_page();
    // Linker-script symbols: only their addresses are used.
    let entry = (a(core::ptr::addr_of!(__entry_text_start)), a(core::ptr::addr_of!(__entry_text_end)));
    let cet = (a(core::ptr::addr_of!(__cet_text_start)), a(core::ptr::addr_of!(__cet_text_end)));
    [
        CodeRange { start: tramp, end: tramp + PAGE_SIZE, region: CodeRegion::Trampoline },
        CodeRange { start: entry.0, end: entry.1, region: CodeRegion::ExceptionEntry },
        CodeRange { start: cet.0, end: cet.1, region: CodeRegion::CetBringUp },
    ]
}

/// The forbidden ranges, computed once from linker symbols.
static FORBIDDEN: Once<[CodeRange; 3]> = Once::new();

/// This kernel, as the engine sees it.
pub struct KernelPlatform;

/// The patcher.
pub static PATCHER: Patcher<KernelPlatform> = Patcher::new(KernelPlatform);

// SAFETY: the layout answers are this kernel's linker symbols and static
// memory map (text mapped R+X, the tables and the sealed area read-only,
// the trampoline page int3-filled text used by nothing else); `poke` is the
// private alias of asm/poke.S whose writers check every destination; `sync`
// waits for every online CPU's IRET (smp::sync_others); the stacks are this
// CPU's; `cpu` is GS-based per-CPU data.
unsafe impl Platform for KernelPlatform {
    fn text(&self) -> Text<'static> {
        mm::text()
    }
    fn sites(&self) -> &'static [u64] {
        sites_table()
    }
    fn targets(&self) -> &'static [u64] {
        targets_table()
    }
    fn forbidden_code(&self) -> &[CodeRange] {
        FORBIDDEN.call_once(forbidden_code)
    }
    #[inline(always)]
    fn tramp_page(&self) -> u64 {
        tramp_page()
    }
    #[inline(always)]
    fn sealed_area(&self) -> (u64, u64) {
        mm::sealed_area()
    }
    fn poke(&self, pokes: Pokes<'_>) -> bool {
        let twice = matches!(pokes, Pokes::Sites { .. }) && REWRITE_STEPS.load(Ordering::Relaxed);
        window_completed("an alias write", || {
            for _ in 0..if twice { 2 } else { 1 } {
                mm::poke_all(pokes.iter());
            }
        })
    }
    fn sync(&self) {
        cpu::serialize(HAS_SERIALIZE.load(Ordering::Relaxed));
        crate::smp::sync_others();
    }
    #[inline(always)]
    fn normal_stack(&self, addr: u64) -> Option<StackBounds> {
        let cpu = this_cpu();
        let k = cpu.kernel_stack();
        if addr >= k.lo && addr < k.hi {
            return Some(k);
        }
        mm::normal_stack_of(cpu.index, addr)
    }
    #[inline(always)]
    fn shadow_stack(&self, addr: u64) -> Option<StackBounds> {
        // This CPU's primary shadow stack first (cached per CPU), then the
        // static layout (its IST shadow stacks).
        let s = this_cpu().shadow_stack();
        if addr >= s.lo && addr < s.hi {
            return Some(s);
        }
        mm::shadow_stack_at(addr).map(|s| s.bounds)
    }
    fn find_record(&self, f_base: u64, bound_ssp: u64) -> Option<u64> {
        crate::records::find_record(f_base, bound_ssp)
    }
    #[inline(always)]
    fn cpu(&self) -> &engine::CpuState {
        &this_cpu().engine
    }
    fn for_each_cpu(&self, f: &mut dyn FnMut(&engine::CpuState)) {
        crate::percpu::online().for_each(|c| f(&c.engine));
    }
    fn event(&self, e: Event<'_>) {
        if let Event::Refused { frame, error } = e {
            refused(frame, error);
        }
    }
    #[cfg(feature = "test-hooks")]
    fn test_point(&self, p: engine::TestPoint<'_>) {
        use engine::TestPoint;
        let cpu = this_cpu();
        match p {
            TestPoint::ForgeSealed(buf) => {
                if let Some(h) = crate::hooks::test_hooks() {
                    (h.forge_sealed_copy)(buf);
                }
            }
            TestPoint::RaceWindow(addr) => {
                if let Some(h) = crate::hooks::test_hooks() {
                    (h.race_window)(addr);
                }
            }
            TestPoint::WindowEnter => {
                if INJECT_NMI.load(Ordering::Relaxed) {
                    cpu.nmi_rotor.fetch_add(1, Ordering::Relaxed);
                    nmi_point_inject(NmiPoint::FirstTrapEntry);
                }
            }
            TestPoint::FirstTrapExit => nmi_point_inject(NmiPoint::FirstTrapExit),
            TestPoint::SecondTrap => nmi_point_inject(NmiPoint::SecondTrap),
            TestPoint::WindowExit => {
                // A timer interrupt pending now is delivered right after.
                if WATCH_IRQ.load(Ordering::Relaxed) && crate::apic::irr_pending(crate::apic::VEC_TIMER) {
                    PerCpu::count(&cpu.counters.irq_pending_at_exit);
                    cpu.irq_expect_after.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The engine refused to write: report loudly and unwind the trapped
/// context (or stop the kernel).
#[cold]
fn refused(frame: &mut TrapFrame, e: GuardError) {
    if this_cpu().expect_refusal.load(Ordering::Relaxed) {
        crate::diag!("expected: #BP handler refused to write at rip={:#x}: {e}", frame.rip);
    } else {
        crate::diag!("SECURITY: #BP handler refused to write at rip={:#x}: {e}", frame.rip);
    }
    crate::recover::fault(frame, FaultInfo { vector: GUARD_REFUSAL, error_code: 0, rip: frame.rip, cr2: 0 });
}

/// Tries of a test write that exceptions keep aborting.
#[cfg(feature = "test-hooks")]
const POKE_TRIES: u32 = engine::POKE_TRIES;

/// Alias writes redone because an exception aborted the poking window.
pub static POKES_REDONE: AtomicU64 = AtomicU64::new(0);

/// Run `f`, a sequence of alias writes that can be repeated (every byte it
/// writes comes from read-only data or from its own arguments). True if no
/// exception took this CPU out of its poking window meanwhile (see
/// asm/entry.S `sc_isr_common` and `mm::poke_aborted`); false if one did:
/// the writer then may hold registers restored from an ordinary trap frame,
/// but no alias; it stopped (or faulted at its next alias store, unwound
/// here) and is to be redone from scratch. Any other fault stops the kernel:
/// a step of the protocol is never abandoned half-way with int3s in text.
fn window_completed(what: &str, mut f: impl FnMut()) -> bool {
    let r = crate::recover::try_run(|| {
        f();
        0
    });
    let aborted = mm::poke_aborted();
    match r {
        Ok(_) if !aborted => return true,
        Ok(_) => {}
        Err(_) if aborted => mm::poke_reset_after_abort(),
        Err(fault) => {
            crate::diag!("PANIC: a fault interrupted {what}: {fault}; stopping");
            crate::exit(false);
        }
    }
    POKES_REDONE.fetch_add(1, Ordering::Relaxed);
    false
}

fn to_engine(s: EmulStrategy) -> Strategy {
    match s {
        EmulStrategy::Classic => Strategy::Classic,
        EmulStrategy::Trampoline => Strategy::Trampoline,
        EmulStrategy::ShadowGap => Strategy::ShadowGap,
    }
}

fn from_engine(s: Strategy) -> EmulStrategy {
    match s {
        Strategy::Classic => EmulStrategy::Classic,
        Strategy::Trampoline => EmulStrategy::Trampoline,
        Strategy::ShadowGap => EmulStrategy::ShadowGap,
    }
}

/// The call-emulation strategy in force.
pub fn strategy() -> EmulStrategy {
    from_engine(PATCHER.strategy())
}

/// The strategies that work with this CPU's shadow-stack setting.
pub fn strategies_here() -> alloc::vec::Vec<EmulStrategy> {
    PATCHER.strategies_here().into_iter().map(from_engine).collect()
}

/// Switch the call-emulation strategy (benchmarks compare them in one boot).
pub fn set_strategy(s: EmulStrategy) {
    PATCHER.set_strategy(to_engine(s));
}

/// Check the registry, emit the trampoline into its text page, choose the
/// strategy. Stops the kernel if the tables or the written trampoline are
/// wrong; `Err` if the read-only source is not the trampoline (nothing
/// written).
pub fn init(strategy: EmulStrategy, has_serialize: bool, tcg: bool) -> Result<(), tramp::TrampError> {
    HAS_SERIALIZE.store(has_serialize, Ordering::Relaxed);
    REWRITE_STEPS.store(tcg, Ordering::Relaxed);
    // The read-only source of asm/poke.S `sc_poke_tramp` must be the
    // trampoline (it is a copy of the const the host tests prove).
    tramp::verify(&mm::SC_TRAMP_BYTES, &tramp::layout_at(tramp_page()))?;
    if let Err(e) = PATCHER.init(to_engine(strategy)) {
        crate::diag!("PANIC: patcher: {e}");
        crate::exit(false);
    }
    Ok(())
}

pub fn tramp_page() -> u64 {
    core::ptr::addr_of!(sc_tramp_page) as u64
}

/// Does the trampoline page hold exactly the trampoline and its fill?
pub fn tramp_page_intact() -> Result<(), tramp::TrampError> {
    PATCHER.tramp_page_intact()
}

/// The trampoline as it is in text.
pub fn tramp_bytes(l: &TrampLayout) -> &'static [u8] {
    // SAFETY: the trampoline lies in mapped, readable kernel text.
    unsafe { core::slice::from_raw_parts(l.base as *const u8, l.len) }
}

pub fn trampoline() -> Option<TrampLayout> {
    PATCHER.trampoline()
}

/// What a batch is validated against.
pub fn patch_registry() -> Registry<'static> {
    PATCHER.registry()
}

/// Make every CPU see the text written so far.
pub fn sync() {
    PATCHER.sync();
}

/// Sync rounds since boot.
pub fn sync_rounds() -> u64 {
    PATCHER.sync_rounds()
}

/// Patch a batch of sites with the int3 protocol. `hook` runs after steps 1
/// and 2, inside the emulation window; a fault inside it is caught so that
/// the protocol always completes. On error nothing has been written to text.
pub fn patch(sites: &[(u64, NewInsn)], hook: impl FnMut(Step)) -> Result<PatchStats, PatchError> {
    catching_hook_faults(hook, |h| PATCHER.patch(sites, h))
}

/// Patch one site without allocating (`Patcher::patch_one`); the hook as
/// for `patch`.
pub fn patch_one(site: u64, insn: NewInsn, hook: impl FnMut(Step)) -> Result<PatchStats, PatchError> {
    catching_hook_faults(hook, |h| PATCHER.patch_one(site, insn, h))
}

/// Run a patch whose hook faults are caught (the protocol always completes)
/// and reported in the stats.
fn catching_hook_faults(
    mut hook: impl FnMut(Step),
    run: impl FnOnce(&mut dyn FnMut(Step)) -> Result<engine::PatchStats, PatchError>,
) -> Result<PatchStats, PatchError> {
    let mut hook_fault = None;
    let s = run(&mut |step| {
        if let Err(f) = crate::recover::try_run(|| {
            hook(step);
            0
        }) {
            hook_fault.get_or_insert(f);
        }
    })?;
    Ok(PatchStats::of(s, hook_fault))
}

pub use shadowcall::engine::InFlight;

/// Validate, seal, step 1 (see `Patcher::begin`).
pub fn begin(sites: &[(u64, NewInsn)]) -> Result<InFlight, PatchError> {
    PATCHER.begin(sites)
}

/// Step 2.
pub fn write_tails() {
    PATCHER.write_tails();
}

/// Step 3 and retirement.
pub fn finish(flight: InFlight) -> PatchStats {
    PatchStats::of(PATCHER.finish(flight), None)
}

// A CPU's record page is one page of the kernel's record area.
const _: () = assert!(RECORD_PAGE_SIZE == PAGE_SIZE);

/// Self-test hooks of the #BP handler, armed for one int3 at `sc_t_iret_int3`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpTestHook {
    None = 0,
    /// Change the saved RIP only (IRET must raise #CP(2)).
    RipOnly = 1,
    /// Change the saved RIP and the shadow frame's LIP slot.
    RipAndLip = 2,
}

extern "C" {
    static sc_b_int3: u8;
}
#[cfg(feature = "test-hooks")]
extern "C" {
    static sc_t_iret_int3: u8;
    static sc_t_iret_landing: u8;
}

/// Number of stack frames a misaligned handler entry was seen in (the
/// `frame_alignment` test reads it; must stay 0). Test builds only.
#[cfg(feature = "test-hooks")]
pub static MISALIGNED_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Every Rust handler is entered with RSP a multiple of 16 at the stub's
/// `call` (the frame pointer it passes is that RSP): counted, and reported
/// to the self-test hook, in test builds; nothing in production.
#[inline(always)]
pub fn note_frame_alignment(_frame: &TrapFrame) {
    #[cfg(feature = "test-hooks")]
    {
        let at = _frame as *const TrapFrame as u64;
        if !at.is_multiple_of(16) {
            MISALIGNED_FRAMES.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(h) = crate::hooks::test_hooks() {
            (h.record_frame)(at);
        }
    }
}

/// #BP, from the crate's asm/bp.S `sc_isr_3`. `ssp` is RDSSP at the stub (the shadow
/// frame's base F), 0 with shadow stacks off. The engine first; what is not
/// its own is this kernel's (its probes, or a real breakpoint: reported).
#[no_mangle]
#[link_section = ".text.entry"]
extern "C" fn sc_bp_handler(frame: &mut TrapFrame, ssp: u64) -> Exit {
    note_frame_alignment(frame);
    frame.ssp = ssp;
    // The benchmark's bare trap (`int3_iret`: the entry and the exit alone;
    // its PLAIN exit's site-table position computed once).
    let bench = core::ptr::addr_of!(sc_b_int3) as u64;
    if int3_addr(frame, ssp) == bench {
        return *BENCH_PLAIN.call_once(|| PATCHER.plain_at(bench));
    }
    let exit = match PATCHER.handle_int3(frame) {
        Int3::Handled(exit) => exit,
        Int3::NotOurs => not_ours(frame, ssp),
    };
    // sec_plain_live_site: the handler's answer forged to PLAIN at a live
    // site, with the frame back at the trap (review 8 F1's outcome).
    #[cfg(feature = "test-hooks")]
    if FORGE_PLAIN.swap(false, Ordering::Relaxed) {
        let addr = int3_addr(frame, ssp);
        frame.rip = addr.wrapping_add(1);
        return PATCHER.plain_at(addr);
    }
    #[cfg(feature = "test-hooks")]
    if let Some(h) = crate::hooks::test_hooks() {
        (h.after_bp_checks)(frame);
    }
    exit
}

/// An int3 the engine does not own: this kernel's probes, or a breakpoint.
#[cold]
fn not_ours(frame: &mut TrapFrame, ssp: u64) -> Exit {
    let addr = int3_addr(frame, ssp);
    #[cfg(feature = "test-hooks")]
    if let Some(exit) = iret_probe(frame, addr) {
        return exit;
    }
    let cpu = this_cpu();
    PerCpu::count(&cpu.counters.breakpoints);
    let how = if cpu.expect_refusal.load(Ordering::Relaxed) { "expected: " } else { "" };
    crate::diag!("{how}breakpoint at {addr:#x}: not a site of a patch in flight; not emulated");
    PATCHER.plain_at(addr)
}

/// Self-test switch of `sec_plain_live_site` (test builds only).
#[cfg(feature = "test-hooks")]
pub static FORGE_PLAIN: AtomicBool = AtomicBool::new(false);

/// The bench probe's PLAIN exit (the site table never changes).
static BENCH_PLAIN: Once<Exit> = Once::new();

/// The exit found the frame or the state changed after the handler's
/// checks (the crate's asm/bp.S `sc_bpx_refuse`): nothing was written.
#[no_mangle]
#[link_section = ".text.entry"]
extern "C" fn sc_bp_exit_refused(frame: &mut TrapFrame, ssp: u64) {
    PATCHER.exit_refused(frame, ssp);
}

/// The int3's address: the shadow frame's LIP - 1 with shadow stacks (the
/// saved RIP is ordinary memory), else the saved RIP - 1.
#[inline(always)]
fn int3_addr(frame: &TrapFrame, ssp: u64) -> u64 {
    match ssp {
        0 => frame.rip.wrapping_sub(1),
        _ => cet::read_slot(shadowcall::shstk::ShadowFrame::at(ssp).lip_slot()).wrapping_sub(1),
    }
}

/// The IRET probes of cp_iret_rip_only and iret_rip_and_lip (test builds).
#[cfg(feature = "test-hooks")]
fn iret_probe(frame: &mut TrapFrame, addr: u64) -> Option<Exit> {
    let (probe, landing) = (core::ptr::addr_of!(sc_t_iret_int3) as u64, core::ptr::addr_of!(sc_t_iret_landing) as u64);
    if addr != probe {
        return None;
    }
    match this_cpu().bp_test_hook.swap(BpTestHook::None as u8, Ordering::Relaxed) {
        x if x == BpTestHook::RipOnly as u8 => {
            frame.rip = landing;
            Some(PATCHER.plain_at(addr))
        }
        x if x == BpTestHook::RipAndLip as u8 => {
            frame.rip = landing;
            Some(if cet::active() { Exit::with(engine::Action::TestLanding, 0) } else { PATCHER.plain_at(addr) })
        }
        _ => None,
    }
}

/// Self-test switches for the window (irq_in_window, nmi_in_window):
/// injection points of the test-hooks build only.
#[cfg(feature = "test-hooks")]
pub static WATCH_IRQ: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "test-hooks")]
pub static INJECT_NMI: AtomicBool = AtomicBool::new(false);

/// Where in the window the nmi_in_window test sends this CPU an NMI.
#[cfg(feature = "test-hooks")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum NmiPoint {
    FirstTrapEntry = 0,
    FirstTrapExit = 1,
    SecondTrap = 2,
}

#[cfg(feature = "test-hooks")]
fn nmi_point_inject(point: NmiPoint) {
    let cpu = this_cpu();
    if INJECT_NMI.load(Ordering::Relaxed)
        && !cpu.in_nmi.load(Ordering::Relaxed)
        && cpu.nmi_rotor.load(Ordering::Relaxed) % 3 == point as u64
    {
        crate::apic::send(cpu.apic_id.load(Ordering::Relaxed), crate::apic::Delivery::Nmi, 0);
    }
}

/// Self-test support: record a pending emulation as a first trap would
/// (the per-CPU LIFO: the trampoline's record without shadow stacks).
pub fn test_push_pending(p: PendingCall) {
    let _ = this_cpu().lifo().push(p);
}

/// Is a sealed batch live?
pub fn batch_live() -> bool {
    PATCHER.batch_live()
}

/// The live sealed batch's entry for `site` (read-only memory).
pub fn live_entry(site: u64) -> Option<&'static SealedEntry> {
    PATCHER.live_entry(site)
}

/// Self-test support: write `bytes` to text at `addr` outside the protocol
/// (to plant a stale int3). Test builds only.
#[cfg(feature = "test-hooks")]
pub fn test_poke(addr: u64, bytes: &[u8]) {
    for _ in 0..POKE_TRIES {
        if window_completed("a test write", || mm::TextAlias::new().write(addr, bytes)) {
            sync();
            return;
        }
    }
    crate::diag!("PANIC: a test write was aborted {POKE_TRIES} times in a row; stopping");
    crate::exit(false);
}
