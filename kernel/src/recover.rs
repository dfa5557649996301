//! Fault recovery: a self-test (or the NMI handler) runs code under a
//! recovery point (`try_run`); a fault inside it unwinds both stacks to that
//! point (`fault`), found by its marker on the shadow stack, never by an SSP
//! taken from ordinary memory (DESIGN.md §4, §11).

use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall::emul::record::{RECORDS_PER_PAGE, RECORD_PAGE_SIZE, RECORD_SIZE, REC_SSP};
use shadowcall::frame::TrapFrame;
use shadowcall::frame::RFLAGS_IF;
use shadowcall::shstk::{CpError, ShadowFrame, StackBounds, SLOT};
use shadowcall_support::paging::PAGE_SIZE;
use x86_64::instructions::segmentation::{Segment, CS};

use crate::mm::ShadowStackId;
use crate::percpu::this_cpu;
use crate::{cet, mm};

pub const VEC_NMI: u64 = 2;
pub const VEC_MC: u64 = 18;
pub const VEC_UD: u64 = 6;
#[allow(dead_code)] // used by the self-tests of the test-hooks build
pub const VEC_GP: u64 = 13;
pub const VEC_PF: u64 = 14;
pub const VEC_CP: u64 = CpError::VECTOR as u64;
/// Not a CPU vector: a fault record made when the #BP handler refused to write.
pub const GUARD_REFUSAL: u64 = 0x100;

core::arch::global_asm!(
    concat!(include_str!("../../asm/stack_cpu.S"), include_str!("../asm/recover.S")),
    TRY_RSP = const offset_of!(TryCtx, rsp),
    TRY_SSP = const offset_of!(TryCtx, ssp),
    TRY_RFLAGS = const offset_of!(TryCtx, rflags),
    SF_PREV_SSP = const ShadowFrame::PREV_SSP,
    SF_LIP = const ShadowFrame::LIP,
    SF_CS = const ShadowFrame::CS,
    SF_SLOTS = const ShadowFrame::SLOTS,
    UNWIND_MAX_SLOTS = const UNWIND_MAX_SLOTS,
    TEST_HOOKS = const cfg!(feature = "test-hooks") as u8,
    IRETQ_LEN = const IRETQ.len(),
    IRETQ_WORD = const u16::from_le_bytes(IRETQ),
    RECORD_PAGE_SHIFT = const RECORD_PAGE_SIZE.trailing_zeros(),
    RECORDS_PER_PAGE = const RECORDS_PER_PAGE,
    RECORD_SIZE = const RECORD_SIZE,
    REC_SSP = const REC_SSP,
    UNWIND_ERR_NO_FRAME = const UnwindError::NoFrame as u64,
    UNWIND_ERR_BAD_PREV = const UnwindError::BadPrev as u64,
    UNWIND_ERR_IST_IRET = const UnwindError::IstIret as u64,
    UNWIND_ERR_ACROSS_FRAME = const UnwindError::AcrossFrame as u64,
    UNWIND_ERR_NO_MARKER = const UnwindError::NoMarker as u64,
    options(att_syntax)
);

// TryCtx is only passed by pointer; asm touches its leading u64 fields.
#[allow(improper_ctypes)]
extern "C" {
    fn sc_try_call(f: extern "C" fn(u64) -> u64, arg: u64, ctx: *mut TryCtx) -> u64;
    fn sc_try_recover();
    /// Every shadow-stack write of a fault unwind (see `unwind_shadow`).
    fn sc_unwind_shadow() -> u64;
    /// The return address `sc_try_call`'s call pushes: the recovery point's marker.
    static sc_try_marker: u8;
}

/// The recovery points' marker: the return address `sc_try_call`'s call pushes.
pub fn try_marker() -> u64 {
    core::ptr::addr_of!(sc_try_marker) as u64
}

/// A fault a self-test caught.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultInfo {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cr2: u64,
}

/// A recovery point (asm/recover.S `sc_try_call` fills the first three
/// fields). It lives on the normal stack, so under the threat model
/// (DESIGN.md) an attacker may rewrite any of it: `fault` never takes an SSP
/// from it (`ssp` is recorded for diagnostics only, and a mismatch is
/// counted in `FORGED_TRY_CTX`), checks `rsp` against the marker and the
/// return address on the shadow stack, and keeps only IF of `rflags`.
#[repr(C)]
#[derive(Default)]
pub struct TryCtx {
    pub rsp: u64,
    pub ssp: u64,
    pub rflags: u64,
    pub fault: Option<FaultInfo>,
    lifo_depth: usize,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    window_depth: u64,
}

/// Bytes from the RSP `sc_try_call` records to its caller's return address
/// (padding + 6 callee-saved registers; see asm/recover.S).
pub const TRY_RET_OFFSET: u64 = 7 * SLOT;
/// Slots of `sc_try_call`'s normal-stack frame checked at recovery: the
/// marker below the recorded RSP, the 7 words at it, the return address.
const TRY_FRAME_SLOTS: u64 = 1 + 7 + 1;
/// `sc_try_call` records a 16-byte aligned RSP (the ABI alignment at a call).
const TRY_RSP_ALIGN: u64 = 16;
/// RFLAGS bit 1 reads as 1.
const RFLAGS_FIXED: u64 = 1 << 1;
/// IRETQ (REX.W CF).
const IRETQ: [u8; 2] = [0x48, 0xcf];

/// Faults inside an NMI handler that the NMI's own recovery point caught.
pub static NMI_FAULTS: AtomicU64 = AtomicU64::new(0);
/// Vector and CR2 of the last of those (atomics: the NMI must not take a lock).
pub static NMI_LAST_FAULT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Recoveries whose TryCtx disagreed with the shadow stack (a forged or stale
/// `ssp` or `rsp`): counted, never obeyed.
pub static FORGED_TRY_CTX: AtomicU64 = AtomicU64::new(0);

/// The normal stack of CPU `cpu` holding `addr` (static layout).
fn normal_stack_at(addr: u64, cpu: usize) -> Option<StackBounds> {
    (0..=mm::IST_COUNT).map(|ist| ShadowStackId::of(cpu, ist).normal()).find(|b| addr >= b.lo && addr < b.hi)
}

/// The kernel code selector, from the CS register. A shadow-stack slot
/// holding it is the CS slot of an exception frame: no return address
/// (a kernel text address) can equal it.
fn kernel_cs() -> u64 {
    CS::get_reg().0 as u64
}

/// The innermost exception frame on the running shadow stack: the first
/// slot at or above RDSSP that holds the kernel CS is its CS slot. Bounded
/// by the end of that stack from the static layout. CET only.
fn innermost_shadow_frame() -> Result<(ShadowFrame, ShadowStackId), &'static str> {
    let ssp = cet::rdssp();
    let Some(stack) = mm::shadow_stack_at(ssp) else {
        return Err("SSP is not on a shadow stack of the static layout");
    };
    let cs = kernel_cs();
    let mut slot = ssp;
    while stack.bounds.holds_slots(slot, 1) {
        if cet::read_slot(slot) == cs {
            let base = slot - ShadowFrame::CS;
            if base < ssp {
                return Err("an exception frame straddles the current SSP");
            }
            return Ok((ShadowFrame::at(base), stack));
        }
        slot += SLOT;
    }
    Err("no exception frame on the running shadow stack")
}

/// The shadow frame of `frame`, the exception being handled: found from
/// RDSSP, and only accepted if it is the frame the entry stub recorded and
/// its LIP and CS slots match the saved RIP and CS. CET only.
fn shadow_frame_of(frame: &TrapFrame) -> Result<(ShadowFrame, ShadowStackId), &'static str> {
    let (f, stack) = innermost_shadow_frame()?;
    if f.base != frame.ssp {
        return Err("the recorded SSP is not the shadow frame found from RDSSP");
    }
    if !stack.bounds.holds_slots(f.base, ShadowFrame::SLOTS) {
        return Err("shadow frame crosses its stack's end");
    }
    if cet::read_slot(f.lip_slot()) != frame.rip || cet::read_slot(f.cs_slot()) != frame.cs {
        return Err("shadow frame's LIP/CS slots do not match the IRET frame");
    }
    Ok((f, stack))
}

/// A recovery point's marker found on a shadow stack.
#[derive(Clone, Copy)]
struct Marker {
    /// The slot holding `sc_try_marker`; the recovery SSP is `slot + 8`.
    slot: u64,
    stack: ShadowStackId,
}

/// Why `sc_unwind_shadow` wrote nothing (its return values below a page;
/// any other value is the recovery SSP it set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum UnwindError {
    NoFrame = 1,
    BadPrev = 2,
    IstIret = 3,
    AcrossFrame = 4,
    NoMarker = 5,
}

impl UnwindError {
    const ALL: [UnwindError; 5] = [
        UnwindError::NoFrame,
        UnwindError::BadPrev,
        UnwindError::IstIret,
        UnwindError::AcrossFrame,
        UnwindError::NoMarker,
    ];

    fn why(self) -> &'static str {
        match self {
            UnwindError::NoFrame => "no exception frame on the running shadow stack",
            UnwindError::BadPrev => "the frame's previous SSP is not on this CPU's shadow stacks",
            UnwindError::IstIret => {
                "a fault at the IRET of a handler that switched shadow stacks (IST): its token stays busy"
            }
            UnwindError::AcrossFrame => {
                "the nearest recovery point lies across another exception frame: \
                 a fault in an exception handler (NMI, #BP, IST) is not unwound into the code it interrupted"
            }
            UnwindError::NoMarker => "no recovery point on the interrupted shadow stack",
        }
    }
}

/// Slots any scan of the unwind reads at most: a whole primary shadow stack
/// (the largest); every scan also stops at a stack's top token first.
const UNWIND_MAX_SLOTS: u64 = mm::PRIMARY_SHSTK_PAGES as u64 * PAGE_SIZE / SLOT;
/// `sc_unwind_shadow`'s error codes lie below this (an SSP never does).
const UNWIND_ERR_LIMIT: u64 = PAGE_SIZE;
const _: () = assert!((UnwindError::NoMarker as u64) < UNWIND_ERR_LIMIT);

/// Unwind the shadow stack of the exception being handled to its recovery
/// point, entirely in asm/recover.S `sc_unwind_shadow`: it finds the
/// faulting frame from RDSSP, the marker by scanning the interrupted shadow
/// stack upward (bounded by its top token), rewrites the frame's LIP and
/// previous SSP, and frees the trampoline records of emulations unwound
/// past. No operand of its WRSS passes through ordinary memory, so no Rust
/// code (whose values the compiler may spill to the stack, where another
/// CPU can change them) decides what is written. Returns the marker found.
/// CET only.
fn unwind_shadow() -> Result<Marker, UnwindError> {
    // SAFETY: shadow stacks are on (callers check); the routine writes only
    // the current exception's shadow frame and this CPU's record page, with
    // values it derives from the shadow stack and read-only data, and only
    // touches caller-saved registers.
    let r = unsafe { sc_unwind_shadow() };
    if r < UNWIND_ERR_LIMIT {
        let e = UnwindError::ALL.into_iter().find(|e| *e as u64 == r).unwrap_or(UnwindError::NoFrame);
        return Err(e);
    }
    let slot = r - SLOT;
    match mm::shadow_stack_at(slot) {
        Some(stack) => Ok(Marker { slot, stack }),
        None => Err(UnwindError::BadPrev),
    }
}

/// The normal-stack pointer to resume the recovery point with. `ctx.rsp`
/// is ordinary memory: it is used only if it points at `sc_try_call`'s frame,
/// i.e. the slot below it holds the marker and (with shadow stacks) the
/// return address slot above it equals the one on the shadow stack right
/// above the marker. Otherwise (forged or stale: counted) the frame is
/// searched upward from the interrupted RSP. Either way the final RET of
/// `sc_try_call` checks its return address against the shadow stack, so no
/// RSP can send control anywhere but to the real recovery point's caller.
fn recovery_rsp(frame: &TrapFrame, ctx: &TryCtx, m: Option<Marker>, cpu: usize) -> Result<u64, &'static str> {
    let marker = core::ptr::addr_of!(sc_try_marker) as u64;
    let (normal, ret) = match m {
        Some(m) => (m.stack.normal(), Some(cet::read_slot(m.slot + SLOT))),
        None => match normal_stack_at(frame.rsp, cpu) {
            Some(b) => (b, None),
            None => return Err("the interrupted RSP is not on this CPU's stacks"),
        },
    };
    let floor = if frame.rsp >= normal.lo && frame.rsp < normal.hi { frame.rsp } else { normal.lo };
    let read = |a: u64| {
        // SAFETY: callers pass slots checked to lie inside `normal`, a mapped stack.
        unsafe { (a as *const u64).read_volatile() }
    };
    let fits = |x: u64| {
        x.is_multiple_of(TRY_RSP_ALIGN)
            && x >= floor + SLOT
            && normal.holds_slots(x - SLOT, TRY_FRAME_SLOTS)
            && read(x - SLOT) == marker
            && ret.is_none_or(|r| read(x + TRY_RET_OFFSET) == r)
    };
    if fits(ctx.rsp) {
        return Ok(ctx.rsp);
    }
    FORGED_TRY_CTX.fetch_add(1, Ordering::Relaxed);
    let start = (floor + SLOT).next_multiple_of(TRY_RSP_ALIGN);
    let mut x = start;
    while normal.holds_slots(x - SLOT, TRY_FRAME_SLOTS) {
        if fits(x) {
            return Ok(x);
        }
        x += TRY_RSP_ALIGN;
    }
    Err("the recovery point's frame is not on the normal stack")
}

/// Report the fault and stop the kernel: it cannot be unwound safely.
fn refuse_unwind(frame: &TrapFrame, info: &FaultInfo, why: &str) -> ! {
    report(frame, info);
    crate::diag!("PANIC: cannot unwind to a recovery point: {why}");
    crate::exit(false);
}

/// A fault: unwind to the innermost recovery point, or report and stop.
///
/// With shadow stacks the shadow-stack side is `unwind_shadow` (asm): the
/// recovery point is found by its marker on the interrupted shadow stack and
/// the frame's previous SSP set to just above it, only ever a pop towards it
/// on the same stack, never an SSP taken from ordinary memory. Rust decides
/// only whether to unwind (a refusal stops the kernel: denial of service at
/// worst) and the normal-stack side (RIP, RSP, RFLAGS of the IRET frame,
/// which IRET and the final RET check against the shadow stack). The
/// per-CPU try stack only supplies the bookkeeping (`TryCtx`) of that
/// point. A fault whose nearest recovery point lies across another
/// exception frame (a fault inside the #BP handler, or in an NMI/IST handler
/// without its own recovery point) stops the kernel.
pub fn fault(frame: &mut TrapFrame, info: FaultInfo) {
    let cpu = this_cpu();
    let Some(ctx) = cpu.top_try().map(|p| p.cast::<TryCtx>()) else {
        report(frame, &info);
        crate::exit(false);
    };
    let marker = if cet::active() {
        // Read-only: the IRET frame being rewritten below must be the one of
        // the shadow frame the asm finds (refused otherwise).
        shadow_frame_of(frame).unwrap_or_else(|why| refuse_unwind(frame, &info, why));
        match unwind_shadow() {
            Ok(m) => Some(m),
            Err(e) => refuse_unwind(frame, &info, e.why()),
        }
    } else {
        None
    };
    // SAFETY: the try stack holds pointers to TryCtx of live try_run frames;
    // under the threat model it may be forged, which can redirect only this
    // ordinary-memory write and the checked values read below.
    let ctx = unsafe { &mut *ctx };
    if marker.is_some_and(|m| ctx.ssp != m.slot + SLOT) {
        FORGED_TRY_CTX.fetch_add(1, Ordering::Relaxed);
    }
    let home = marker.map_or(cpu.index, |m| m.stack.cpu);
    let rsp = recovery_rsp(frame, ctx, marker, home).unwrap_or_else(|why| refuse_unwind(frame, &info, why));
    ctx.fault = Some(info);
    frame.rip = sc_try_recover as *const () as u64;
    frame.rsp = rsp;
    frame.rflags = RFLAGS_FIXED | (ctx.rflags & RFLAGS_IF);
    cpu.lifo().truncate(ctx.lifo_depth);
    #[cfg(feature = "test-hooks")]
    cpu.engine.counters.window_depth.store(ctx.window_depth, Ordering::Relaxed);
}

/// Run `f` with a recovery point: a fault inside unwinds both stacks back
/// here and comes back as `Err`.
pub fn try_run<F: FnMut() -> u64>(mut f: F) -> Result<u64, FaultInfo> {
    extern "C" fn call<F: FnMut() -> u64>(p: u64) -> u64 {
        // SAFETY: p is the &mut F passed below, alive for the whole call.
        let f = unsafe { &mut *(p as *mut F) };
        f()
    }
    let cpu = this_cpu();
    let mut ctx = TryCtx {
        lifo_depth: cpu.lifo().depth(),
        // The engine's window depth (a self-test counter): 0 in production.
        #[cfg(feature = "test-hooks")]
        window_depth: cpu.engine.counters.window_depth.load(Ordering::Relaxed),
        ..TryCtx::default()
    };
    cpu.push_try((&mut ctx as *mut TryCtx).cast());
    // SAFETY: sc_try_call calls `call::<F>` with our pointer and returns
    // normally or through sc_try_recover with all callee-saved registers restored.
    let r = unsafe { sc_try_call(call::<F>, &mut f as *mut F as u64, &mut ctx) };
    cpu.pop_try();
    match ctx.fault {
        Some(info) => Err(info),
        None => Ok(r),
    }
}

pub fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        6 => "#UD",
        8 => "#DF",
        13 => "#GP",
        14 => "#PF",
        18 => "#MC",
        21 => "#CP",
        GUARD_REFUSAL => "#BP guard refusal",
        _ => "exception",
    }
}

/// Print a readable report of an unexpected fault.
pub fn report(frame: &TrapFrame, info: &FaultInfo) {
    crate::diag!(
        "PANIC: unexpected {} (vector {}) error={:#x} rip={:#x} rsp={:#x} ssp={:#x} cr2={:#x}",
        vector_name(info.vector),
        info.vector,
        info.error_code,
        frame.rip,
        frame.rsp,
        frame.ssp,
        info.cr2
    );
    if info.vector == VEC_CP {
        crate::diag!("PANIC: #CP error: {}", CpError::decode(info.error_code));
    }
}

impl core::fmt::Display for FaultInfo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} (vector {}) error={:#x} rip={:#x} cr2={:#x}",
            vector_name(self.vector),
            self.vector,
            self.error_code,
            self.rip,
            self.cr2
        )?;
        if self.vector == VEC_CP {
            write!(f, " [{}]", CpError::decode(self.error_code))?;
        }
        Ok(())
    }
}
