//! Live text patching with the int3 protocol, and the #BP handler that
//! emulates a site's new instruction while the patch is in flight.
//!
//! The protocol (like Linux `text_poke_bp`), for a whole batch at once:
//!   1. write int3 over the first byte of every site; sync.
//!   2. write bytes 1..4 of every new instruction; sync.
//!   3. write the first byte of every new instruction; sync.
//!
//! Between steps 1 and 3 a CPU that runs a site traps into `handle_bp`, which
//! finds the site in the sorted batch (binary search) and emulates it.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use shadowcall::emul::record::{IN_EXIT_WORD, RECORD_PAGE_SIZE, REC_RSP_IF, REC_SITE, REC_TARGET};
use shadowcall::emul::{check_tramp_slots, GuardError, PendingCall, StackKind};
use shadowcall::frame::{TrapFrame, RFLAGS_IF};
use shadowcall::patch::{
    build_batch, classify, Batch, CodeRange, CodeRegion, Entry, NewInsn, PatchError, Registry, SealedBatch,
    SealedEntry, SealedFlaw, SiteKind, INT3, KIND_CALL, KIND_JMP, KIND_NOP, SITE_LEN,
};
use shadowcall::shstk::ShadowFrame;
use shadowcall::tramp::{self, TrampLayout, TRAMP_TRAP_OFF};
use shadowcall_cmdline::EmulStrategy;
use shadowcall_support::paging::PAGE_SIZE;
use spin::Once;

use crate::percpu::{this_cpu, PerCpu};
use crate::recover::{FaultInfo, GUARD_REFUSAL};
use crate::{cet, cpu, mm};

/// Where the self-test hook (`Hook`) is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// After step 1: every site is int3 (the emulation window).
    Int3Written,
    /// After step 2: int3 followed by the new tail (still the window).
    TailsWritten,
}

/// What one `patch` call did.
#[derive(Clone, Copy, Debug, Default)]
pub struct PatchStats {
    pub sites: usize,
    pub sync_rounds: u64,
    pub table_bytes: usize,
    /// A fault the hook raised (caught; the protocol still ran to the end).
    pub hook_fault: Option<FaultInfo>,
}

static TRAMP: Once<TrampLayout> = Once::new();
static STRATEGY: AtomicU8 = AtomicU8::new(0);
/// What the #BP handler does for a CALL: STRATEGY, except that the shadow
/// gap without shadow stacks is the classic emulation (nothing to push).
static CALL_CODE: AtomicU8 = AtomicU8::new(0);
static IN_FLIGHT: AtomicBool = AtomicBool::new(false);
pub static SYNC_ROUNDS: AtomicU64 = AtomicU64::new(0);
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
/// page, exception entry (`.text.entry`), CET bring-up (`.text.cet`).
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

const CODE_CLASSIC: u8 = 0;
const CODE_TRAMPOLINE: u8 = 1;
const CODE_SHADOW_GAP: u8 = 2;

fn strategy_code(s: EmulStrategy) -> u8 {
    match s {
        EmulStrategy::Classic => CODE_CLASSIC,
        EmulStrategy::Trampoline => CODE_TRAMPOLINE,
        EmulStrategy::ShadowGap => CODE_SHADOW_GAP,
    }
}

/// The call-emulation strategy in force.
pub fn strategy() -> EmulStrategy {
    match STRATEGY.load(Ordering::Relaxed) {
        CODE_TRAMPOLINE => EmulStrategy::Trampoline,
        CODE_SHADOW_GAP => EmulStrategy::ShadowGap,
        _ => EmulStrategy::Classic,
    }
}

/// The strategies that work with this CPU's shadow-stack setting (classic
/// needs shadow stacks off; the shadow gap without them is classic).
pub fn strategies_here() -> alloc::vec::Vec<EmulStrategy> {
    if cet::active() {
        alloc::vec![EmulStrategy::Trampoline, EmulStrategy::ShadowGap]
    } else {
        alloc::vec![EmulStrategy::Classic, EmulStrategy::Trampoline]
    }
}

/// Switch the call-emulation strategy (benchmarks compare them in one boot).
pub fn set_strategy(s: EmulStrategy) {
    STRATEGY.store(strategy_code(s), Ordering::Relaxed);
    let code = match s {
        EmulStrategy::ShadowGap if !cet::active() => CODE_CLASSIC,
        _ => strategy_code(s),
    };
    CALL_CODE.store(code, Ordering::Relaxed);
}

/// Sort the site registry, emit the trampoline into its text page, choose
/// the strategy.
pub fn init(strategy: EmulStrategy, has_serialize: bool, tcg: bool) -> Result<(), tramp::TrampError> {
    HAS_SERIALIZE.store(has_serialize, Ordering::Relaxed);
    REWRITE_STEPS.store(tcg, Ordering::Relaxed);
    set_strategy(strategy);
    // The tables are searched in place (nothing in writable memory steers
    // validation): they must be sorted, and hold nothing in handler code.
    let registry = Registry::new(sites_table(), targets_table(), &forbidden_code());
    if !registry.tables_in_place() {
        crate::diag!("PANIC: patch registry: .shadowcall_sites or .shadowcall_targets is not sorted by address");
        crate::exit(false);
    }
    if let Err(e) = registry.check() {
        crate::diag!("PANIC: patch registry: {e}");
        crate::exit(false);
    }
    let base = tramp_page();
    let layout = tramp::layout_at(base);
    // The read-only source must be the trampoline (it is a copy of the
    // const the host tests prove), then the writer copies it (asm, no
    // argument: no byte or length passes through ordinary memory).
    tramp::verify(&mm::SC_TRAMP_BYTES, &layout)?;
    poke(mm::Poke::Tramp);
    sync();
    // Prove what is in text now against the fixed layout, and that the rest
    // of the page is still its int3 fill. Fail closed: the kernel stops
    // (the writer is once only, so there is no second write to undo it).
    if let Err(e) = tramp_page_intact() {
        crate::diag!("PANIC: the trampoline page does not hold the trampoline: {e}");
        crate::exit(false);
    }
    TRAMP.call_once(|| layout);
    Ok(())
}

pub fn tramp_page() -> u64 {
    core::ptr::addr_of!(sc_tramp_page) as u64
}

/// Does the trampoline page hold exactly the trampoline (decoded against its
/// fixed layout, and equal to the read-only `TRAMP_BYTES`) followed by its
/// build-time int3 fill up to the end of the page?
pub fn tramp_page_intact() -> Result<(), tramp::TrampError> {
    let layout = tramp::layout_at(tramp_page());
    tramp::verify(tramp_bytes(&layout), &layout)?;
    // SAFETY: the trampoline page is one page of mapped, readable kernel text.
    let page = unsafe { core::slice::from_raw_parts(tramp_page() as *const u8, PAGE_SIZE as usize) };
    let (code, fill) = page.split_at(tramp::TRAMP_LEN);
    if code != tramp::TRAMP_BYTES {
        return Err(tramp::TrampError::Shape("bytes differ from TRAMP_BYTES"));
    }
    if fill.iter().any(|&b| b != INT3) {
        return Err(tramp::TrampError::Shape("the page past the trampoline is not int3 fill"));
    }
    Ok(())
}

/// The trampoline as it is in text.
pub fn tramp_bytes(l: &TrampLayout) -> &'static [u8] {
    // SAFETY: the trampoline lies in mapped, readable kernel text.
    unsafe { core::slice::from_raw_parts(l.base as *const u8, l.len) }
}

pub fn trampoline() -> Option<&'static TrampLayout> {
    TRAMP.get()
}

/// The registered sites, sorted (checked by `init`), in read-only memory.
pub fn registry() -> &'static [u64] {
    sites_table()
}

/// What a batch is validated against: the read-only tables in place and the
/// forbidden code ranges from linker symbols (nothing from writable memory).
pub fn patch_registry() -> Registry<'static> {
    Registry::in_place(sites_table(), targets_table(), &forbidden_code())
}

/// Make every CPU see the text written so far: this CPU serializes itself
/// (SERIALIZE or CPUID), every other online CPU takes a sync IPI whose
/// handler ends in IRET, and we wait until each one has.
pub fn sync() {
    cpu::serialize(HAS_SERIALIZE.load(Ordering::Relaxed));
    crate::smp::sync_others();
    SYNC_ROUNDS.fetch_add(1, Ordering::Relaxed);
}

/// Patch a batch of sites with the int3 protocol. `hook` runs after steps 1
/// and 2, inside the emulation window; a fault inside it is caught so that
/// the protocol always completes. On error nothing has been written to text.
pub fn patch(sites: &[(u64, NewInsn)], mut hook: impl FnMut(Step)) -> Result<PatchStats, PatchError> {
    let mut hook_fault = None;
    let mut hook = |step| {
        if let Err(f) = crate::recover::try_run(|| {
            hook(step);
            0
        }) {
            hook_fault.get_or_insert(f);
        }
    };
    let flight = begin(sites)?;
    hook(Step::Int3Written);
    write_tails();
    hook(Step::TailsWritten);
    Ok(PatchStats { hook_fault, ..finish(flight) })
}

/// A batch between `begin` and `finish`: sealed, live, int3s in text.
pub struct InFlight {
    rounds0: u64,
}

/// Validate `sites`, seal the batch (read-only, live) and write step 1
/// (int3 on every site); sync. On error nothing is written to text and no
/// batch is live.
pub fn begin(sites: &[(u64, NewInsn)]) -> Result<InFlight, PatchError> {
    if IN_FLIGHT.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return Err(PatchError::BatchInFlight);
    }
    let rounds0 = SYNC_ROUNDS.load(Ordering::Relaxed);
    if let Err(e) = build_batch(&mm::text(), &patch_registry(), sites).and_then(|b| seal(&b)) {
        IN_FLIGHT.store(false, Ordering::Release);
        return Err(e);
    }
    // 1. int3 on every site.
    write_step(Write::Int3);
    Ok(InFlight { rounds0 })
}

/// Step 2: the tails of the new instructions; sync.
pub fn write_tails() {
    write_step(Write::Tails);
}

/// Step 3 (the first bytes; sync) and retirement of the batch.
pub fn finish(flight: InFlight) -> PatchStats {
    write_step(Write::Heads);
    let (sites, table_bytes) = live_batch().map(|b| (b.len(), b.header().total_len as usize)).unwrap_or_default();
    // Retire the batch: no CPU can fetch one of its int3s any more (sync
    // above), and a handler that did has finished (it ran with interrupts
    // off, so it acked the sync only after leaving) or is counted in
    // BATCH_USERS, which it raised before it looked at the sealed batch.
    unseal();
    while BATCH_USERS.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
    IN_FLIGHT.store(false, Ordering::Release);
    PatchStats {
        sites,
        sync_rounds: SYNC_ROUNDS.load(Ordering::Relaxed) - flight.rounds0,
        table_bytes,
        hook_fault: None,
    }
}

/// The three writes of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// 1. int3 over the first byte of every site.
    Int3,
    /// 2. bytes 1..5 of every new instruction.
    Tails,
    /// 3. the first byte of every new instruction.
    Heads,
}

/// One step of the protocol for every entry of the sealed batch, then a
/// sync. Each step writes through a fresh private alias (under QEMU TCG
/// twice: see REWRITE_STEPS). The bytes come only from the sealed
/// (read-only) batch.
fn write_step(what: Write) {
    poke_retrying("a step of the patch protocol", || write_step_now(what));
    sync();
}

/// Tries of one alias write that exceptions keep aborting.
const POKE_TRIES: u32 = 8;

/// Alias writes redone because an exception aborted the poking window.
pub static POKES_REDONE: AtomicU64 = AtomicU64::new(0);

/// Run `f`, a sequence of alias writes that can be repeated (every byte it
/// writes comes from read-only data or from its own arguments), until no
/// exception took this CPU out of its poking window meanwhile (see
/// asm/entry.S `sc_isr_common` and `mm::poke_aborted`): the writer then may
/// hold registers restored from an ordinary trap frame, but no alias; it
/// stopped (or faulted at its next alias store, unwound here) and is redone
/// from scratch. Any other fault stops the kernel: a step of the protocol is
/// never abandoned half-way with int3s in text.
fn poke_retrying(what: &str, f: impl Fn()) {
    for _ in 0..POKE_TRIES {
        let r = crate::recover::try_run(|| {
            f();
            0
        });
        let aborted = mm::poke_aborted();
        match r {
            Ok(_) if !aborted => return,
            Ok(_) => {}
            Err(_) if aborted => mm::poke_reset_after_abort(),
            Err(fault) => {
                crate::diag!("PANIC: a fault interrupted {what}: {fault}; stopping");
                crate::exit(false);
            }
        }
        POKES_REDONE.fetch_add(1, Ordering::Relaxed);
    }
    crate::diag!("PANIC: {what} was aborted {POKE_TRIES} times in a row; stopping");
    crate::exit(false);
}

/// One alias write of the patcher (asm/poke.S), redone if an exception
/// aborts it.
fn poke(p: mm::Poke<'_>) {
    poke_retrying("an alias write", || mm::poke_all(core::iter::once(p)));
}

fn write_step_now(what: Write) {
    let Some(batch) = live_batch() else { return };
    for _ in 0..if REWRITE_STEPS.load(Ordering::Relaxed) { 2 } else { 1 } {
        mm::poke_all(batch.entries().iter().map(|e| match what {
            Write::Int3 => mm::Poke::Int3(e),
            Write::Tails => mm::Poke::Tails(e),
            Write::Heads => mm::Poke::Head(e),
        }));
    }
}

/// Copy a validated batch into the sealed area and validate the read-only
/// copy again: the batch in ordinary memory may have changed since it was
/// built (threat model), the sealed copy cannot. Live when this returns Ok.
/// That verification runs in Rust on ordinary memory, so it decides only
/// whether the patch goes ahead: what the exits and the step writers trust
/// is each entry they use, checked again in asm against the read-only site
/// and target tables (asm/sealed.S `CHECKED_ENTRY`, DESIGN §11).
fn seal(batch: &Batch) -> Result<(), PatchError> {
    let (start, end) = mm::sealed_area();
    let len = batch.sealed_len();
    if len > (end - start) as usize {
        return Err(PatchError::BadSealedBatch { flaw: SealedFlaw::TooShort });
    }
    let mut buf = alloc::vec![0u8; len];
    batch.write_sealed(&mut buf)?;
    #[cfg(feature = "test-hooks")]
    if let Some(h) = crate::hooks::test_hooks() {
        (h.forge_sealed_copy)(&mut buf);
    }
    // Everything but the magic word: not live yet. (The previous batch's
    // magic was cleared when it retired.)
    poke(mm::Poke::Sealed { offset: MAGIC_LEN as u64, bytes: &buf[MAGIC_LEN..] });
    // SAFETY: the sealed area is mapped read-only for the kernel's life and
    // only this patcher (IN_FLIGHT held) writes it.
    let unpublished = unsafe { SealedBatch::from_raw_unpublished(start as *const u8, (end - start) as usize) };
    let checked = unpublished.and_then(|b| b.verify().map(|_| b)).and_then(|b| {
        // Every sealed entry must be what validation makes of its own
        // (site, instruction) pair: registered site, registered target,
        // patchable bytes in text now.
        let pairs: Vec<(u64, NewInsn)> = b.entries().iter().filter_map(|e| e.insn().map(|i| (e.site, i))).collect();
        let again = build_batch(&mm::text(), &patch_registry(), &pairs)?;
        match (0..again.len()).zip(b.entries()).position(|(i, y)| again.sealed_entry(i) != *y) {
            None if again.len() == b.len() => Ok(()),
            i => Err(PatchError::BadSealedBatch { flaw: SealedFlaw::BadEntry { index: i.unwrap_or(0) as u64 } }),
        }
    });
    // Published (the magic word written) only once the read-only copy passed.
    if checked.is_ok() {
        poke(mm::Poke::Publish);
    }
    checked
}

/// Bytes of the sealed header's magic word (written last, cleared first).
const MAGIC_LEN: usize = 8;

// The exits find a CPU's record page by shifting its index.
const _: () = assert!(RECORD_PAGE_SIZE == PAGE_SIZE && RECORD_PAGE_SIZE.is_power_of_two());
const _: () = assert!(IN_EXIT_WORD + 8 <= RECORD_PAGE_SIZE);

/// Clear the sealed batch's magic: no batch is live.
fn unseal() {
    poke(mm::Poke::Unseal);
}

/// #BP handlers that may be looking at the batch in flight (all CPUs).
static BATCH_USERS: AtomicU64 = AtomicU64::new(0);

// ---- The #BP handler ------------------------------------------------------
//
// `sc_bp_handler` decides; the exit in asm/entry.S writes the shadow stack.
// With shadow stacks on, the site is LIP-1 read from the shadow frame (not the
// saved RIP), the instruction comes from the sealed batch (read-only), and
// the handler returns an action with the sealed entry; the exit checks the
// entry again against the shadow frame and derives every value it writes
// from the shadow stack and read-only memory (DESIGN.md, "Threat model").
// With shadow stacks off the handler changes the trap frame itself.

/// What the #BP exit does (asm/entry.S `sc_bpx_table`, same order).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpAction {
    /// IRET as the frame is (no shadow-stack write).
    Plain = 0,
    /// Shadow-gap call: rebuild the frame one slot lower (argument: entry).
    CallShadowGap = 1,
    /// LIP := the entry's jmp target.
    Jmp = 2,
    /// LIP := the entry's call target, nothing pushed (the negative control).
    Classic = 3,
    /// LIP := site + 5.
    Nop = 4,
    /// Pop both stacks.
    Ret = 5,
    /// First trampoline trap: claim a record, LIP := trampoline entry.
    Tramp1 = 6,
    /// Second trampoline trap: write the record's target and return address.
    Tramp2 = 7,
    /// LIP := the site (execute it again).
    ResumeSite = 8,
    /// The `iret_rip_and_lip` probe: LIP := the probe's landing.
    TestLanding = 9,
}

/// Number of actions (the exit treats anything else as `Plain`).
pub const BPX_COUNT: u64 = 10;

/// The handler's answer, returned in RAX:RDX.
#[repr(C)]
pub struct BpExit {
    pub action: u64,
    pub arg: u64,
}

impl BpExit {
    const PLAIN: BpExit = BpExit { action: BpAction::Plain as u64, arg: 0 };
    fn with(action: BpAction, arg: u64) -> BpExit {
        BpExit { action: action as u64, arg }
    }
}

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
    static sc_t_iret_int3: u8;
    static sc_t_iret_landing: u8;
    static sc_b_int3: u8;
}

/// The live sealed batch, if a patch is in flight.
#[inline(always)]
fn live_batch() -> Option<SealedBatch<'static>> {
    let (start, end) = mm::sealed_area();
    // SAFETY: the sealed area is mapped read-only for the kernel's whole
    // life; only the patcher changes it (through its private alias), and not
    // while a handler can be using the batch (DESIGN §8.2).
    unsafe { SealedBatch::from_raw(start as *const u8, (end - start) as usize) }.ok()
}

/// Number of stack frames a misaligned handler entry was seen in (the
/// `frame_alignment` test reads it; must stay 0).
pub static MISALIGNED_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Every Rust handler is entered with RSP a multiple of 16 at the stub's
/// `call` (the frame pointer it passes is that RSP).
#[inline(always)]
pub fn note_frame_alignment(frame: &TrapFrame) {
    let at = frame as *const TrapFrame as u64;
    if !at.is_multiple_of(16) {
        MISALIGNED_FRAMES.fetch_add(1, Ordering::Relaxed);
    }
    #[cfg(feature = "test-hooks")]
    if let Some(h) = crate::hooks::test_hooks() {
        (h.record_frame)(at);
    }
}

/// #BP, from asm/entry.S `sc_isr_3`. `ssp` is RDSSP at the stub (the shadow
/// frame's base F), 0 with shadow stacks off.
#[no_mangle]
#[link_section = ".text.entry"]
extern "C" fn sc_bp_handler(frame: &mut TrapFrame, ssp: u64) -> BpExit {
    note_frame_alignment(frame);
    let f = (ssp != 0).then(|| ShadowFrame::at(ssp));
    // The int3's address: from the shadow frame's LIP when there is one.
    let addr = match f {
        Some(f) => cet::read_slot(f.lip_slot()).wrapping_sub(1),
        None => frame.rip.wrapping_sub(1),
    };
    let exit = bp_decide(frame, f, addr);
    #[cfg(feature = "test-hooks")]
    if let Some(h) = crate::hooks::test_hooks() {
        (h.after_bp_checks)(frame);
    }
    exit
}

#[inline(always)]
fn bp_decide(frame: &mut TrapFrame, f: Option<ShadowFrame>, addr: u64) -> BpExit {
    if addr == tramp_page() + TRAMP_TRAP_OFF {
        return second_trap(frame, f);
    }
    if let Some(exit) = emulate_live(frame, f, addr) {
        return exit;
    }
    #[cfg(feature = "test-hooks")]
    if let Some(h) = crate::hooks::test_hooks() {
        (h.race_window)(addr);
    }
    if let Some(exit) = test_hook(frame, addr) {
        return exit;
    }
    if let Some(exit) = registered_site_int3(frame, f, addr) {
        return exit;
    }
    let cpu = this_cpu();
    PerCpu::count(&cpu.counters.breakpoints);
    let how = if cpu.expect_refusal.load(Ordering::Relaxed) { "expected: " } else { "" };
    crate::diag!("{how}breakpoint at {addr:#x}: not a site of a patch in flight; not emulated");
    BpExit::PLAIN
}

/// Emulate the live sealed batch's instruction for `addr`, if it has one.
/// The reference taken in BATCH_USERS keeps the batch from being retired
/// meanwhile (DESIGN §8.2).
#[inline(always)]
fn emulate_live(frame: &mut TrapFrame, f: Option<ShadowFrame>, addr: u64) -> Option<BpExit> {
    BATCH_USERS.fetch_add(1, Ordering::SeqCst);
    let exit = live_batch().and_then(|b| b.lookup(addr)).map(|e| emulate(frame, f, e));
    BATCH_USERS.fetch_sub(1, Ordering::SeqCst);
    exit
}

/// The exit found the frame or the state changed after the handler's
/// checks (asm/entry.S `sc_bpx_refuse`): nothing was written.
#[no_mangle]
#[link_section = ".text.entry"]
extern "C" fn sc_bp_exit_refused(frame: &mut TrapFrame, ssp: u64) {
    // What the CPU pushed is on the shadow stack: put the saved RIP/CS and
    // the recorded SSP back to it, so that the refusal unwinds this very
    // frame (fault recovery cross-checks them).
    let f = ShadowFrame::at(ssp);
    frame.ssp = ssp;
    frame.rip = cet::read_slot(f.lip_slot());
    frame.cs = cet::read_slot(f.cs_slot());
    refuse(frame, GuardError::FrameChanged);
}

/// An int3 at a registered site that no live batch holds.
#[cold]
#[inline(never)]
fn registered_site_int3(frame: &mut TrapFrame, f: Option<ShadowFrame>, addr: u64) -> Option<BpExit> {
    if !is_registered_site(addr) {
        return None;
    }
    // SAFETY: a registered site: 5 bytes of mapped, readable text.
    let now = unsafe { (addr as *const u8).read_volatile() };
    if now == INT3 {
        // The int3 of a batch that was published after we looked (the
        // patcher publishes the sealed batch before it writes any int3, and
        // x86 keeps our two loads in order): look again. If the batch is
        // still not there, execute the site again; never resume at site+1,
        // the middle of the instruction.
        let exit = emulate_live(frame, f, addr);
        PerCpu::count(&this_cpu().counters.int3_races);
        return Some(exit.unwrap_or_else(|| resume_at(frame, f, addr)));
    }
    // A stale int3: this CPU executed the int3 of a batch that has since
    // been completed (seen under QEMU TCG only). With shadow stacks, run the
    // site again (its bytes in text are the new instruction). Without, emulate
    // that instruction as decoded from text now: an emulator that still sees
    // the stale int3 would only trap again.
    PerCpu::count(&this_cpu().counters.stale_int3);
    if f.is_some() {
        return Some(resume_at(frame, f, addr));
    }
    // SAFETY: as above.
    let bytes: [u8; SITE_LEN] = unsafe { (addr as *const [u8; SITE_LEN]).read_volatile() };
    let insn = match classify(&bytes, addr) {
        Ok(SiteKind::Call(t)) => NewInsn::Call(t),
        Ok(SiteKind::Jmp(t)) => NewInsn::Jmp(t),
        Ok(SiteKind::Nop) => NewInsn::Nop,
        Ok(SiteKind::Ret) => NewInsn::Ret,
        Err(_) => return Some(resume_at(frame, f, addr)),
    };
    let Ok(entry_bytes) = insn.encode(addr) else { return Some(resume_at(frame, f, addr)) };
    let e = SealedEntry::of(&Entry { site: addr, insn, bytes: entry_bytes });
    Some(emulate(frame, None, &e))
}

fn resume_at(frame: &mut TrapFrame, f: Option<ShadowFrame>, addr: u64) -> BpExit {
    frame.rip = addr;
    if f.is_some() {
        BpExit::with(BpAction::ResumeSite, 0)
    } else {
        BpExit::PLAIN
    }
}

fn test_hook(frame: &mut TrapFrame, addr: u64) -> Option<BpExit> {
    // The benchmark's bare trap: return at once.
    if addr == core::ptr::addr_of!(sc_b_int3) as u64 {
        return Some(BpExit::PLAIN);
    }
    let (probe, landing) = (core::ptr::addr_of!(sc_t_iret_int3) as u64, core::ptr::addr_of!(sc_t_iret_landing) as u64);
    if addr != probe {
        return None;
    }
    match this_cpu().bp_test_hook.swap(BpTestHook::None as u8, Ordering::Relaxed) {
        x if x == BpTestHook::RipOnly as u8 => {
            frame.rip = landing;
            Some(BpExit::PLAIN)
        }
        x if x == BpTestHook::RipAndLip as u8 => {
            frame.rip = landing;
            Some(if cet::active() { BpExit::with(BpAction::TestLanding, 0) } else { BpExit::PLAIN })
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
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
enum NmiPoint {
    FirstTrapEntry = 0,
    FirstTrapExit = 1,
    SecondTrap = 2,
}

#[cfg_attr(not(feature = "test-hooks"), allow(unused_variables))]
#[inline(always)]
fn nmi_point(point: NmiPoint) {
    #[cfg(feature = "test-hooks")]
    nmi_point_inject(point);
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

/// A CPU entered an emulation window (first trap at a site).
fn window_enter() {
    let cpu = this_cpu();
    cpu.counters.window_depth.fetch_add(1, Ordering::Relaxed);
    #[cfg(feature = "test-hooks")]
    if INJECT_NMI.load(Ordering::Relaxed) {
        cpu.nmi_rotor.fetch_add(1, Ordering::Relaxed);
        nmi_point(NmiPoint::FirstTrapEntry);
    }
}

/// The emulated instruction has taken effect: the window ends when this
/// handler returns. A timer interrupt pending now is delivered right after.
fn window_exit() {
    let cpu = this_cpu();
    cpu.counters.window_depth.fetch_sub(1, Ordering::Relaxed);
    #[cfg(feature = "test-hooks")]
    if WATCH_IRQ.load(Ordering::Relaxed) && crate::apic::irr_pending(crate::apic::VEC_TIMER) {
        PerCpu::count(&cpu.counters.irq_pending_at_exit);
        cpu.irq_expect_after.store(true, Ordering::Relaxed);
    }
}

/// Emulate `e`'s new instruction for the CPU that trapped on its int3.
#[inline(always)]
fn emulate(frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> BpExit {
    let cpu = this_cpu();
    PerCpu::count(&cpu.counters.emulations);
    window_enter();
    // The trampoline's window lasts until its second trap.
    let (exit, window_open) = emulate_insn(cpu, frame, f, e);
    nmi_point(NmiPoint::FirstTrapExit);
    if !window_open {
        window_exit();
    }
    exit
}

/// Returns the exit action, and true when the emulation continues in the trampoline.
#[inline(always)]
fn emulate_insn(cpu: &PerCpu, frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> (BpExit, bool) {
    let entry = e as *const SealedEntry as u64;
    match e.kind_code() {
        KIND_CALL => {
            let code = if cpu.force_classic.load(Ordering::Relaxed) != 0 {
                CODE_CLASSIC
            } else {
                CALL_CODE.load(Ordering::Relaxed)
            };
            let target = e.target;
            if code == CODE_SHADOW_GAP {
                return (emulate_call_shadow_gap(cpu, frame, f, e), false);
            } else if code == CODE_TRAMPOLINE {
                return (emulate_call_trampoline(cpu, frame, f, e), true);
            }
            PerCpu::count(&cpu.counters.classic_calls);
            if !push_normal(cpu, frame, e.ret_addr()) {
                return (BpExit::PLAIN, false);
            }
            frame.rip = target;
            (action_if_shadow(f, BpAction::Classic, entry), false)
        }
        KIND_JMP => {
            frame.rip = e.target;
            (action_if_shadow(f, BpAction::Jmp, entry), false)
        }
        KIND_NOP => {
            frame.rip = e.ret_addr();
            (action_if_shadow(f, BpAction::Nop, entry), false)
        }
        _ => (emulate_ret(frame, f, entry), false),
    }
}

fn action_if_shadow(f: Option<ShadowFrame>, action: BpAction, entry: u64) -> BpExit {
    if f.is_some() {
        BpExit::with(action, entry)
    } else {
        BpExit::PLAIN
    }
}

/// First trap of the trampoline path: run the trampoline with interrupts
/// off until the second trap. With shadow stacks the exit records the call
/// on this CPU's record page (shadow-stack memory); without, the per-CPU LIFO
/// holds it (nothing to protect: no shadow stack).
fn emulate_call_trampoline(cpu: &PerCpu, frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> BpExit {
    let Some(f) = f else {
        let pending = PendingCall {
            site: e.site,
            ret: e.ret_addr(),
            target: e.target,
            interrupts: frame.rflags & RFLAGS_IF != 0,
            rsp: frame.rsp,
        };
        if cpu.lifo().push(pending).is_err() {
            crate::diag!("PANIC: emulation nesting deeper than the per-CPU LIFO");
            crate::exit(false);
        }
        PerCpu::count(&cpu.counters.tramp_calls);
        frame.rflags &= !RFLAGS_IF;
        frame.rip = tramp_page();
        return BpExit::PLAIN;
    };
    if cet::read_slot(f.prev_ssp_slot()) != f.above() {
        refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: f.base });
        return BpExit::PLAIN;
    }
    PerCpu::count(&cpu.counters.tramp_calls);
    frame.rip = tramp_page();
    BpExit::with(BpAction::Tramp1, e as *const SealedEntry as u64)
}

/// Shadow-gap path: one trap. The normal stack gets the return address in
/// the entry stub's gap; the exit (asm/entry.S `sc_bpx_call_sg`) pushes it
/// on the shadow stack by rebuilding the exception frame one slot lower.
/// Checks here that the frame is where that rebuild expects it.
#[inline(always)]
fn emulate_call_shadow_gap(cpu: &PerCpu, frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> BpExit {
    let Some(f) = f else {
        // No shadow stack: the classic emulation is all there is to do.
        PerCpu::count(&cpu.counters.classic_calls);
        if push_normal(cpu, frame, e.ret_addr()) {
            frame.rip = e.target;
        }
        return BpExit::PLAIN;
    };
    // The rebuilt frame uses the slot below F, and the return address lands
    // in F+16: F-8 .. F+24 must lie in one shadow stack.
    let room = mm::same_shadow_stack(f.base, f.base.wrapping_sub(8), ShadowFrame::SLOTS + 1);
    let same_stack = cet::read_slot(f.prev_ssp_slot()) == f.above();
    if !(room && same_stack) {
        refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: f.base });
        return BpExit::PLAIN;
    }
    if !push_normal(cpu, frame, e.ret_addr()) {
        return BpExit::PLAIN;
    }
    PerCpu::count(&cpu.counters.shadow_gap_calls);
    frame.rip = e.target;
    BpExit::with(BpAction::CallShadowGap, e as *const SealedEntry as u64)
}

/// Second trap: both stacks must hold exactly the trampoline's two return
/// addresses, and a first trap on these stacks must be pending; only then are
/// they replaced by (target, return address).
fn second_trap(frame: &mut TrapFrame, f: Option<ShadowFrame>) -> BpExit {
    let cpu = this_cpu();
    nmi_point(NmiPoint::SecondTrap);
    let t = trampoline_layout();
    let verified = (|| -> Result<(PendingCall, bool), GuardError> {
        let rsp = frame.rsp;
        let pending = match f {
            Some(f) => {
                // The record bound to this shadow stack: P+16 is the SSP of
                // the first trap (the trampoline pushed two slots since).
                let p = cet::read_slot(f.prev_ssp_slot());
                if p != f.above() {
                    return Err(GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: p });
                }
                let rec = crate::records::find_record(f.base, p + 16).ok_or(GuardError::NoPendingEmulation)?;
                let rsp_if = cet::read_slot(rec + REC_RSP_IF);
                if rsp_if & !1 != rsp.wrapping_add(16) {
                    return Err(GuardError::NoPendingEmulation);
                }
                check_tramp_slots(&t, StackKind::Shadow, [cet::read_slot(p), cet::read_slot(p + 8)])?;
                let site = cet::read_slot(rec + REC_SITE);
                PendingCall {
                    site,
                    ret: site + SITE_LEN as u64,
                    target: cet::read_slot(rec + REC_TARGET),
                    interrupts: rsp_if & 1 != 0,
                    rsp: rsp_if & !1,
                }
            }
            None => cpu.lifo().top().ok_or(GuardError::NoPendingEmulation)?,
        };
        if !own_normal_slots(cpu, rsp, 2) {
            return Err(GuardError::SlotOutsideStack { stack: StackKind::Normal, addr: rsp });
        }
        // SAFETY: two slots inside a kernel stack (checked above).
        let normal = unsafe { [(rsp as *const u64).read_volatile(), ((rsp + 8) as *const u64).read_volatile()] };
        check_tramp_slots(&t, StackKind::Normal, normal)?;
        // Without shadow stacks: the LIFO's record must be bound to this stack.
        if f.is_none() && pending.rsp != rsp.wrapping_add(16) {
            return Err(GuardError::NoPendingEmulation);
        }
        Ok((pending, f.is_some()))
    })();
    match verified {
        Ok((p, shadow)) => {
            let rsp = frame.rsp;
            // SAFETY: slots verified above to be the trampoline's, on this CPU's stack.
            unsafe {
                (rsp as *mut u64).write_volatile(p.target);
                ((rsp + 8) as *mut u64).write_volatile(p.ret);
            }
            cpu.counters.stack_writes.fetch_add(2, Ordering::Relaxed);
            if shadow {
                cpu.counters.shadow_writes.fetch_add(2, Ordering::Relaxed);
            } else {
                cpu.lifo().pop();
            }
            cpu.counters.last_second_trap_if.store(frame.rflags & RFLAGS_IF, Ordering::Relaxed);
            if p.interrupts {
                frame.rflags |= RFLAGS_IF;
            }
            PerCpu::count(&cpu.counters.second_traps);
            window_exit();
            if shadow {
                BpExit::with(BpAction::Tramp2, 0)
            } else {
                BpExit::PLAIN
            }
        }
        Err(e) => {
            refuse(frame, e);
            BpExit::PLAIN
        }
    }
}

/// The trampoline's fixed layout at its page (emitted and proved at boot).
fn trampoline_layout() -> TrampLayout {
    tramp::layout_at(tramp_page())
}

/// Is `addr` a registered patch site (the read-only, sorted site table)?
fn is_registered_site(addr: u64) -> bool {
    registry().binary_search(&addr).is_ok()
}

/// The handler will not write: report loudly and unwind (or stop the kernel).
fn refuse(frame: &mut TrapFrame, e: GuardError) {
    let cpu = this_cpu();
    PerCpu::count(&cpu.counters.refusals);
    // SAFETY: per-CPU slot, written only here.
    unsafe { *cpu.last_refusal.get() = Some(e) };
    if cpu.expect_refusal.load(Ordering::Relaxed) {
        crate::diag!("expected: #BP handler refused to write at rip={:#x}: {e}", frame.rip);
    } else {
        crate::diag!("SECURITY: #BP handler refused to write at rip={:#x}: {e}", frame.rip);
    }
    crate::recover::fault(frame, FaultInfo { vector: GUARD_REFUSAL, error_code: 0, rip: frame.rip, cr2: 0 });
}

/// Are `n` slots at `addr` inside one of this CPU's normal stacks? (Its
/// kernel stack first, from the per-CPU cache: the common case.)
#[inline(always)]
fn own_normal_slots(cpu: &PerCpu, addr: u64, n: u64) -> bool {
    cpu.kernel_stack().holds_slots(addr, n)
        || mm::normal_stack_of(cpu.index, addr).is_some_and(|b| b.holds_slots(addr, n))
}

/// Emulate `push ret` on the interrupted stack (the entry stub's gap makes
/// room). Returns false (after refusing) if the slot is not ours to write.
#[inline(always)]
fn push_normal(cpu: &PerCpu, frame: &mut TrapFrame, ret: u64) -> bool {
    let slot = frame.rsp.wrapping_sub(8);
    let frame_end = frame as *const TrapFrame as u64 + core::mem::size_of::<TrapFrame>() as u64;
    if !own_normal_slots(cpu, slot, 1) || slot < frame_end {
        refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Normal, addr: slot });
        return false;
    }
    // SAFETY: a slot of the interrupted kernel stack above our own frame.
    unsafe { (slot as *mut u64).write_volatile(ret) };
    PerCpu::count(&cpu.counters.stack_writes);
    frame.rsp = slot;
    true
}

/// Emulate `ret`: pop both stacks after checking their tops agree.
fn emulate_ret(frame: &mut TrapFrame, f: Option<ShadowFrame>, entry: u64) -> BpExit {
    let rsp = frame.rsp;
    if !mm::normal_stack_of(this_cpu().index, rsp).is_some_and(|b| b.holds_slots(rsp, 1)) {
        refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Normal, addr: rsp });
        return BpExit::PLAIN;
    }
    // SAFETY: a slot of a kernel stack (checked above).
    let ret = unsafe { (rsp as *const u64).read_volatile() };
    if let Some(f) = f {
        let prev = cet::read_slot(f.prev_ssp_slot());
        if prev != f.above() {
            refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: prev });
            return BpExit::PLAIN;
        }
        let shadow_ret = cet::read_slot(prev);
        if shadow_ret != ret {
            refuse(
                frame,
                GuardError::SlotMismatch { stack: StackKind::Shadow, slot: 0, found: shadow_ret, expected: ret },
            );
            return BpExit::PLAIN;
        }
    }
    frame.rip = ret;
    frame.rsp = rsp + 8;
    action_if_shadow(f, BpAction::Ret, entry)
}

/// Self-test support: record a pending emulation as a first trap would
/// (the per-CPU LIFO: the trampoline's record without shadow stacks).
pub fn test_push_pending(p: PendingCall) {
    let _ = this_cpu().lifo().push(p);
}

/// Is a sealed batch live?
pub fn batch_live() -> bool {
    live_batch().is_some()
}

/// The live sealed batch's entry for `site` (read-only memory).
pub fn live_entry(site: u64) -> Option<&'static SealedEntry> {
    live_batch().and_then(|b| b.lookup(site))
}

/// Self-test support: write `bytes` to text at `addr` outside the protocol
/// (to plant a stale int3). Test builds only.
#[cfg(feature = "test-hooks")]
pub fn test_poke(addr: u64, bytes: &[u8]) {
    poke_retrying("a test write", || mm::TextAlias::new().write(addr, bytes));
    sync();
}
