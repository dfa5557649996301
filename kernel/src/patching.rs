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

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};

use shadowcall::cmdline::EmulStrategy;
use shadowcall::emul::{check_tramp_slots, GuardError, PendingCall, StackKind};
use shadowcall::frame::{TrapFrame, RFLAGS_IF};
use shadowcall::paging::PAGE_SIZE;
use shadowcall::patch::{
    build_batch, classify, Batch, CodeRange, CodeRegion, Entry, NewInsn, PatchError, Registry, SiteKind, INT3, SITE_LEN,
};
use shadowcall::shstk::ShadowFrame;
use shadowcall::tramp::{self, TrampLayout};
use spin::Once;

use crate::interrupts::{self, FaultInfo, GUARD_REFUSAL};
use crate::percpu::{this_cpu, PerCpu};
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
/// The batch in flight (null outside a patch).
static ACTIVE: AtomicPtr<Batch> = AtomicPtr::new(core::ptr::null_mut());
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
    let (bytes, layout) = tramp::emit(base)?;
    {
        let mut alias = mm::TextAlias::new();
        alias.write(base, &bytes);
    }
    sync();
    // Prove what is in text now (not only what we meant to write).
    tramp::verify(tramp_bytes(&layout), &layout)?;
    TRAMP.call_once(|| layout);
    Ok(())
}

pub fn tramp_page() -> u64 {
    core::ptr::addr_of!(sc_tramp_page) as u64
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

/// #BP handlers that may be looking at the batch in flight (all CPUs).
static BATCH_USERS: AtomicU64 = AtomicU64::new(0);

/// Patch a batch of sites with the int3 protocol. `hook` runs after steps 1
/// and 2, inside the emulation window; a fault inside it is caught so that
/// the protocol always completes. On error nothing has been written.
pub fn patch(sites: &[(u64, NewInsn)], mut hook: impl FnMut(Step)) -> Result<PatchStats, PatchError> {
    let mut hook_fault = None;
    let mut hook = |step| {
        if let Err(f) = interrupts::try_run(|| {
            hook(step);
            0
        }) {
            hook_fault.get_or_insert(f);
        }
    };
    if IN_FLIGHT.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return Err(PatchError::BatchInFlight);
    }
    let result = build_batch(&mm::text(), &patch_registry(), sites).map(|mut batch| {
        let rounds0 = SYNC_ROUNDS.load(Ordering::Relaxed);
        ACTIVE.store(&mut batch, Ordering::Release);
        // Each step writes through a fresh alias, removed (and its TLB entry
        // flushed) before the sync. Under QEMU TCG the step is written twice:
        // see REWRITE_STEPS.
        let write_all = |what: &dyn Fn(&Entry) -> (u64, &[u8])| {
            for _ in 0..if REWRITE_STEPS.load(Ordering::Relaxed) { 2 } else { 1 } {
                let mut alias = mm::TextAlias::new();
                for e in batch.entries() {
                    let (at, bytes) = what(e);
                    alias.write(at, bytes);
                }
            }
        };

        // 1. int3 on every site.
        write_all(&|e| (e.site, &[INT3]));
        sync();
        hook(Step::Int3Written);

        // 2. the tails.
        write_all(&|e| (e.site + 1, &e.bytes[1..]));
        sync();
        hook(Step::TailsWritten);

        // 3. the first bytes.
        write_all(&|e| (e.site, &e.bytes[..1]));
        sync();

        // Retire the batch: no CPU can fetch one of its int3s any more (sync
        // above), and a handler that did has finished (it ran with interrupts
        // off, so it acked the sync only after leaving) or is counted in
        // BATCH_USERS, which it raised before it read ACTIVE.
        ACTIVE.store(core::ptr::null_mut(), Ordering::SeqCst);
        while BATCH_USERS.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
        PatchStats {
            sites: batch.len(),
            sync_rounds: SYNC_ROUNDS.load(Ordering::Relaxed) - rounds0,
            table_bytes: batch.table_bytes(),
            hook_fault: None,
        }
    });
    IN_FLIGHT.store(false, Ordering::Release);
    result.map(|s| PatchStats { hook_fault, ..s })
}

// ---- The #BP handler ------------------------------------------------------

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

/// #BP: the trampoline's second trap, a site of the batch in flight, or a
/// real breakpoint (reported, never emulated).
pub fn handle_bp(frame: &mut TrapFrame) {
    let addr = frame.rip - 1;
    if let Some(t) = TRAMP.get() {
        if addr == t.trap {
            return second_trap(frame, t);
        }
    }
    BATCH_USERS.fetch_add(1, Ordering::SeqCst);
    let batch = ACTIVE.load(Ordering::SeqCst);
    if !batch.is_null() {
        // SAFETY: the patcher keeps the batch alive while BATCH_USERS > 0.
        if let Some(e) = unsafe { &*batch }.lookup(addr) {
            emulate(frame, e);
            BATCH_USERS.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
    BATCH_USERS.fetch_sub(1, Ordering::SeqCst);
    if test_hook(frame, addr) {
        return;
    }
    if stale_int3(frame, addr) {
        return;
    }
    PerCpu::count(&this_cpu().counters.breakpoints);
    crate::diag!("breakpoint at {addr:#x}: not a site of a patch in flight; not emulated");
}

/// An int3 at a registered site that no longer holds one: see below.
#[cold]
#[inline(never)]
fn stale_int3(frame: &mut TrapFrame, addr: u64) -> bool {
    // SAFETY: addr is the int3 the CPU just executed: mapped, readable text.
    let now = unsafe { (addr as *const u8).read_volatile() };
    if now != INT3 && registry().binary_search(&addr).is_ok() {
        // A stale int3: this CPU executed the int3 of a batch that has
        // since been completed (the site holds its new instruction, which
        // no batch is changing: a site being patched is in ACTIVE). Emulate
        // that instruction, as decoded from text now, rather than resume at
        // the site: a CPU (an emulator) that still sees the stale int3 would
        // only trap again.
        PerCpu::count(&this_cpu().counters.stale_int3);
        // SAFETY: a registered site: 5 bytes of mapped, readable text.
        let bytes: [u8; SITE_LEN] = unsafe { (addr as *const [u8; SITE_LEN]).read_volatile() };
        let insn = match classify(&bytes, addr) {
            Ok(SiteKind::Call(t)) => NewInsn::Call(t),
            Ok(SiteKind::Jmp(t)) => NewInsn::Jmp(t),
            Ok(SiteKind::Nop) => NewInsn::Nop,
            Ok(SiteKind::Ret) => NewInsn::Ret,
            Err(_) => {
                set_ip(frame, addr);
                return true;
            }
        };
        emulate(frame, &Entry { site: addr, insn, bytes });
        return true;
    }
    false
}

fn test_hook(frame: &mut TrapFrame, addr: u64) -> bool {
    let (probe, landing) = (core::ptr::addr_of!(sc_t_iret_int3) as u64, core::ptr::addr_of!(sc_t_iret_landing) as u64);
    // The benchmark's bare trap: return at once.
    if addr == core::ptr::addr_of!(sc_b_int3) as u64 {
        return true;
    }
    if addr != probe {
        return false;
    }
    match this_cpu().bp_test_hook.swap(BpTestHook::None as u8, Ordering::Relaxed) {
        x if x == BpTestHook::RipOnly as u8 => {
            frame.rip = landing;
            true
        }
        x if x == BpTestHook::RipAndLip as u8 => {
            set_ip(frame, landing);
            true
        }
        _ => false,
    }
}

/// Self-test switches for the window (irq_in_window, nmi_in_window).
pub static WATCH_IRQ: AtomicBool = AtomicBool::new(false);
pub static INJECT_NMI: AtomicBool = AtomicBool::new(false);

/// Where in the window the nmi_in_window test sends this CPU an NMI.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NmiPoint {
    FirstTrapEntry = 0,
    FirstTrapExit = 1,
    SecondTrap = 2,
}

fn nmi_point(point: NmiPoint) {
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
    if WATCH_IRQ.load(Ordering::Relaxed) && crate::apic::irr_pending(crate::smp::VEC_TIMER) {
        PerCpu::count(&cpu.counters.irq_pending_at_exit);
        cpu.irq_expect_after.store(true, Ordering::Relaxed);
    }
}

/// Emulate `e`'s new instruction for the CPU that trapped on its int3.
#[inline(always)]
fn emulate(frame: &mut TrapFrame, e: &Entry) {
    let cpu = this_cpu();
    PerCpu::count(&cpu.counters.emulations);
    window_enter();
    // The trampoline's window lasts until its second trap.
    let window_open = emulate_insn(cpu, frame, e);
    nmi_point(NmiPoint::FirstTrapExit);
    if !window_open {
        window_exit();
    }
}

/// Returns true when the emulation continues in the trampoline.
#[inline(always)]
fn emulate_insn(cpu: &PerCpu, frame: &mut TrapFrame, e: &Entry) -> bool {
    match e.insn {
        NewInsn::Call(target) => {
            let code = if cpu.force_classic.load(Ordering::Relaxed) != 0 {
                CODE_CLASSIC
            } else {
                CALL_CODE.load(Ordering::Relaxed)
            };
            if code == CODE_SHADOW_GAP {
                emulate_call_shadow_gap(cpu, frame, e, target);
            } else if code == CODE_TRAMPOLINE {
                emulate_call_trampoline(frame, e, target);
                return true;
            } else {
                PerCpu::count(&cpu.counters.classic_calls);
                if push_normal(cpu, frame, e.ret_addr()) {
                    set_ip(frame, target);
                }
            }
        }
        NewInsn::Jmp(target) => set_ip(frame, target),
        NewInsn::Nop => set_ip(frame, e.ret_addr()),
        NewInsn::Ret => emulate_ret(frame),
    }
    false
}

/// First trap of the trampoline path: remember the call, run the trampoline
/// with interrupts off until the second trap.
fn emulate_call_trampoline(frame: &mut TrapFrame, e: &Entry, target: u64) {
    let cpu = this_cpu();
    let t = TRAMP.get().expect("trampoline emitted at boot");
    let pending = PendingCall { site: e.site, ret: e.ret_addr(), target, interrupts: frame.rflags & RFLAGS_IF != 0 };
    if cpu.lifo().push(pending).is_err() {
        crate::diag!("PANIC: emulation nesting deeper than the per-CPU LIFO");
        crate::exit(false);
    }
    PerCpu::count(&cpu.counters.tramp_calls);
    frame.rflags &= !RFLAGS_IF;
    set_ip(frame, t.entry);
}

/// Shadow-gap path: one trap. The normal stack gets the return address in
/// the entry stub's gap; the exit path (asm/entry.S `sc_shadow_gap_exit`)
/// pushes it on the shadow stack by rebuilding the exception frame one slot
/// lower. Checks here that the frame is where that rebuild expects it.
#[inline(always)]
fn emulate_call_shadow_gap(cpu: &PerCpu, frame: &mut TrapFrame, e: &Entry, target: u64) {
    let f = ShadowFrame::at(frame.ssp);
    // The rebuilt frame uses the slot below F, and the return address lands
    // in F+16: F-8 .. F+24 must lie in one of this CPU's shadow stacks.
    let room = own_shadow_slots(cpu, f.base.wrapping_sub(8), ShadowFrame::SLOTS + 1);
    let same_stack = cet::read_slot(f.prev_ssp_slot()) == f.above();
    let slots_ok = cet::read_slot(f.lip_slot()) == frame.rip && cet::read_slot(f.cs_slot()) == frame.cs;
    if !(room && same_stack && slots_ok) {
        return refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: f.base });
    }
    let ret = e.ret_addr();
    if push_normal(cpu, frame, ret) {
        PerCpu::count(&cpu.counters.shadow_gap_calls);
        frame.rip = target;
        frame.shadow_push = ret;
    }
}

/// Second trap: both stacks must hold exactly the trampoline's two return
/// addresses; only then are they replaced by (target, return address).
fn second_trap(frame: &mut TrapFrame, t: &TrampLayout) {
    let cpu = this_cpu();
    nmi_point(NmiPoint::SecondTrap);
    let verified = (|| -> Result<(PendingCall, Option<u64>), GuardError> {
        let p = cpu.lifo().top().ok_or(GuardError::NoPendingEmulation)?;
        let rsp = frame.rsp;
        if !own_normal_slots(cpu, rsp, 2) {
            return Err(GuardError::SlotOutsideStack { stack: StackKind::Normal, addr: rsp });
        }
        // SAFETY: two slots inside a kernel stack (checked above).
        let normal = unsafe { [(rsp as *const u64).read_volatile(), ((rsp + 8) as *const u64).read_volatile()] };
        check_tramp_slots(t, StackKind::Normal, normal)?;
        if !cet::active() {
            return Ok((p, None));
        }
        let f = ShadowFrame::at(frame.ssp);
        if !own_shadow_slots(cpu, f.base, ShadowFrame::SLOTS) {
            return Err(GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: f.base });
        }
        let ssp = cet::read_slot(f.prev_ssp_slot());
        if !own_shadow_slots(cpu, ssp, 2) {
            return Err(GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: ssp });
        }
        check_tramp_slots(t, StackKind::Shadow, [cet::read_slot(ssp), cet::read_slot(ssp + 8)])?;
        Ok((p, Some(ssp)))
    })();
    match verified {
        Ok((p, ssp)) => {
            let rsp = frame.rsp;
            // SAFETY: slots verified above to be the trampoline's, on this CPU's stacks.
            unsafe {
                (rsp as *mut u64).write_volatile(p.target);
                ((rsp + 8) as *mut u64).write_volatile(p.ret);
                if let Some(ssp) = ssp {
                    cet::wrss(ssp, p.target);
                    cet::wrss(ssp + 8, p.ret);
                }
            }
            cpu.counters.stack_writes.fetch_add(2, Ordering::Relaxed);
            if ssp.is_some() {
                cpu.counters.shadow_writes.fetch_add(2, Ordering::Relaxed);
            }
            cpu.counters.last_second_trap_if.store(frame.rflags & RFLAGS_IF, Ordering::Relaxed);
            cpu.lifo().pop();
            if p.interrupts {
                frame.rflags |= RFLAGS_IF;
            }
            PerCpu::count(&cpu.counters.second_traps);
            window_exit();
        }
        Err(e) => refuse(frame, e),
    }
}

/// The handler will not write: report loudly and unwind (or stop the kernel).
fn refuse(frame: &mut TrapFrame, e: GuardError) {
    let cpu = this_cpu();
    PerCpu::count(&cpu.counters.refusals);
    // SAFETY: per-CPU slot, written only here.
    unsafe { *cpu.last_refusal.get() = Some(e) };
    crate::diag!("SECURITY: #BP handler refused to write at rip={:#x}: {e}", frame.rip);
    interrupts::fault(frame, FaultInfo { vector: GUARD_REFUSAL, error_code: 0, rip: frame.rip, cr2: 0 });
}

/// Emulate `push ret` on the interrupted stack (the entry stub's gap makes
/// room). Returns false (after refusing) if the slot is not ours to write.
/// Are `n` slots at `addr` inside one of this CPU's normal stacks? (Its
/// kernel stack first, from the per-CPU cache: the common case.)
#[inline(always)]
fn own_normal_slots(cpu: &PerCpu, addr: u64, n: u64) -> bool {
    cpu.kernel_stack().holds_slots(addr, n) || mm::normal_stack_of(addr).is_some_and(|b| b.holds_slots(addr, n))
}

/// Are `n` slots at `addr` inside one of this CPU's shadow stacks?
#[inline(always)]
fn own_shadow_slots(cpu: &PerCpu, addr: u64, n: u64) -> bool {
    cpu.shadow_stack().holds_slots(addr, n) || mm::shadow_stack_of(addr).is_some_and(|b| b.holds_slots(addr, n))
}

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
fn emulate_ret(frame: &mut TrapFrame) {
    let rsp = frame.rsp;
    if !mm::normal_stack_of(rsp).is_some_and(|b| b.holds_slots(rsp, 1)) {
        return refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Normal, addr: rsp });
    }
    // SAFETY: a slot of a kernel stack (checked above).
    let ret = unsafe { (rsp as *const u64).read_volatile() };
    let new_ssp = if cet::active() {
        let prev = cet::read_slot(ShadowFrame::at(frame.ssp).prev_ssp_slot());
        if !mm::shadow_stack_of(prev).is_some_and(|b| b.holds_slots(prev, 1)) {
            return refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: prev });
        }
        let shadow_ret = cet::read_slot(prev);
        if shadow_ret != ret {
            return refuse(
                frame,
                GuardError::SlotMismatch { stack: StackKind::Shadow, slot: 0, found: shadow_ret, expected: ret },
            );
        }
        Some(prev + 8)
    } else {
        None
    };
    if let Err(why) = interrupts::redirect(frame, ret, new_ssp) {
        crate::diag!("PANIC: RET emulation: {why}");
        crate::exit(false);
    }
    frame.rsp = rsp + 8;
}

/// Change where the trapped code resumes (RIP and, with shadow stacks, LIP).
fn set_ip(frame: &mut TrapFrame, ip: u64) {
    if let Err(why) = interrupts::redirect(frame, ip, None) {
        crate::diag!("PANIC: cannot redirect the #BP frame: {why}");
        crate::exit(false);
    }
}

/// Self-test support: record a pending emulation as a first trap would.
pub fn test_push_pending(p: PendingCall) {
    let _ = this_cpu().lifo().push(p);
}
