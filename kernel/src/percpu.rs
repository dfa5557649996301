//! Per-CPU state, found through the GS base: `gs:[0]` holds a pointer to
//! the running CPU's `PerCpu` (set by `init_this` before any other use).

use core::sync::atomic::{
    compiler_fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use x86_64::registers::model_specific::GsBase;
use x86_64::VirtAddr;

use crate::mm::MAX_CPUS;

use shadowcall::emul::EmulLifo;

/// Nesting depth of fault-recovery points (test wrapper, one inside a test,
/// the patcher's hook, the NMI handler's own, and spares).
pub const TRY_DEPTH: usize = 8;

#[derive(Default)]
pub struct Counters {
    /// int3s that were not patch sites (reported, not emulated).
    pub breakpoints: AtomicU64,
    pub nmis: AtomicU64,
    /// Timer interrupts pending in the IRR when a window ended.
    pub irq_pending_at_exit: AtomicU64,
    /// Of those, delivered as the first thing after the window.
    pub irq_delivered_after: AtomicU64,
    /// Timer interrupts taken while inside a window.
    pub irq_taken_in_window: AtomicU64,
    pub timer_ticks: AtomicU64,
    pub nmi_in_window: AtomicU64,
    /// NMIs that arrived while a trampoline emulation was between its two traps.
    pub nmi_between_traps: AtomicU64,
    /// Emulations done from inside an NMI handler.
    pub nmi_nested: AtomicU64,
}

#[repr(C)]
pub struct PerCpu {
    /// Must stay first: `this_cpu` reads it at gs:[0].
    self_ptr: AtomicU64,
    pub index: usize,
    pub apic_id: AtomicU32,
    /// This CPU's kernel stack and shadow stack (cached for the #BP handler).
    pub kstack: [AtomicU64; 2],
    pub shstk: [AtomicU64; 2],
    pub online: AtomicBool,
    /// Sync IPIs this CPU handled (each ends in a serializing IRET).
    pub syncs: AtomicU64,
    /// Work the boot CPU hands an application processor (see smp::run_on).
    pub work: AtomicU64,
    pub work_arg: AtomicU64,
    pub work_done: AtomicU64,
    /// The engine's state of this CPU (LIFO, emulation counters, batch
    /// reference).
    pub engine: shadowcall::engine::CpuState,
    /// Fault-recovery points (innermost last), used by this CPU only, from
    /// thread and exception context (see push_try for the ordering).
    /// This CPU's recovery points (`recover::TryCtx`, opaque here so that
    /// per-CPU data does not depend on the recovery code).
    tries: [AtomicPtr<u8>; TRY_DEPTH],
    try_depth: AtomicUsize,
    pub counters: Counters,
    /// Self-test hook for the #BP handler (see patching::BpTestHook).
    pub bp_test_hook: AtomicU8,
    /// A self-test expects the #BP handler to refuse: its report says
    /// "expected:" instead of "SECURITY:" (the refusal itself is the same).
    pub expect_refusal: AtomicBool,
    /// Inside the NMI handler.
    pub in_nmi: AtomicBool,
    /// A timer interrupt was pending when a window ended; the next tick is it.
    pub irq_expect_after: AtomicBool,
    /// Rotates the NMI injection point of the nmi_in_window test.
    pub nmi_rotor: AtomicU64,
}

// SAFETY: each PerCpu is only touched by its own CPU; nested users (exception
// handlers) follow the LIFO discipline documented on EmulLifo and TryCtx.
unsafe impl Sync for PerCpu {}

const fn new_cpu(index: usize) -> PerCpu {
    PerCpu {
        self_ptr: AtomicU64::new(0),
        index,
        apic_id: AtomicU32::new(0),
        kstack: [AtomicU64::new(0), AtomicU64::new(0)],
        shstk: [AtomicU64::new(0), AtomicU64::new(0)],
        online: AtomicBool::new(false),
        syncs: AtomicU64::new(0),
        work: AtomicU64::new(0),
        work_arg: AtomicU64::new(0),
        work_done: AtomicU64::new(0),
        engine: shadowcall::engine::CpuState::new(),
        tries: [const { AtomicPtr::new(core::ptr::null_mut()) }; TRY_DEPTH],
        try_depth: AtomicUsize::new(0),
        counters: Counters {
            breakpoints: AtomicU64::new(0),
            nmis: AtomicU64::new(0),
            irq_pending_at_exit: AtomicU64::new(0),
            irq_delivered_after: AtomicU64::new(0),
            irq_taken_in_window: AtomicU64::new(0),
            timer_ticks: AtomicU64::new(0),
            nmi_in_window: AtomicU64::new(0),
            nmi_between_traps: AtomicU64::new(0),
            nmi_nested: AtomicU64::new(0),
        },
        bp_test_hook: AtomicU8::new(0),
        expect_refusal: AtomicBool::new(false),
        in_nmi: AtomicBool::new(false),
        irq_expect_after: AtomicBool::new(false),
        nmi_rotor: AtomicU64::new(0),
    }
}

static CPUS: [PerCpu; MAX_CPUS] =
    [new_cpu(0), new_cpu(1), new_cpu(2), new_cpu(3), new_cpu(4), new_cpu(5), new_cpu(6), new_cpu(7)];

/// Point this CPU's GS base at `CPUS[index]`. First thing every CPU does.
pub fn init_this(index: usize) {
    let c = &CPUS[index];
    let addr = c as *const PerCpu as u64;
    c.self_ptr.store(addr, Ordering::Relaxed);
    let (k, s) = (crate::mm::kernel_stack(index), crate::mm::primary_shadow_stack(index));
    for (slot, v) in c.kstack.iter().zip([k.lo, k.hi]).chain(c.shstk.iter().zip([s.lo, s.hi])) {
        slot.store(v, Ordering::Relaxed);
    }
    GsBase::write(VirtAddr::new(addr));
}

/// The running CPU's state.
pub fn this_cpu() -> &'static PerCpu {
    let p: u64;
    // SAFETY: gs:[0] is the self pointer of this CPU's PerCpu (init_this ran first).
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags)) };
    // SAFETY: it points into the static CPUS array.
    unsafe { &*(p as *const PerCpu) }
}

/// CPU `index`'s state.
pub fn cpu(index: usize) -> &'static PerCpu {
    &CPUS[index]
}

/// The CPUs that are online.
pub fn online() -> impl Iterator<Item = &'static PerCpu> {
    CPUS.iter().filter(|c| c.online.load(Ordering::Acquire))
}

impl PerCpu {
    #[inline]
    pub fn kernel_stack(&self) -> shadowcall::shstk::StackBounds {
        shadowcall::shstk::StackBounds {
            lo: self.kstack[0].load(Ordering::Relaxed),
            hi: self.kstack[1].load(Ordering::Relaxed),
        }
    }

    /// This CPU's primary shadow stack (cached by `init_this`).
    #[inline]
    pub fn shadow_stack(&self) -> shadowcall::shstk::StackBounds {
        shadowcall::shstk::StackBounds {
            lo: self.shstk[0].load(Ordering::Relaxed),
            hi: self.shstk[1].load(Ordering::Relaxed),
        }
    }

    /// The emulation LIFO. Only this CPU uses it, with interrupts off or from
    /// an exception handler.
    #[allow(clippy::mut_from_ref)]
    pub fn lifo(&self) -> &mut EmulLifo {
        // SAFETY: per-CPU, and nested handlers complete before the interrupted user resumes.
        unsafe { self.engine.lifo() }
    }

    /// Register a recovery point. Only this CPU uses its try stack, but an
    /// interrupt or NMI can run between any two instructions here and push
    /// and pop its own point. So the depth is raised first and the slot
    /// written after (compiler fences keep the order): a nested handler sees
    /// the slot reserved and pushes above it, never into it. (Writing first
    /// would let a nested push overwrite the slot before the depth covered
    /// it, leaving the nested handler's dead point as ours.) A nested handler
    /// that faults between the two steps finds no marker of ours on the shadow
    /// stack yet, so `recover::fault` does not pair the stale slot with it.
    pub fn push_try(&self, ctx: *mut u8) {
        let d = self.try_depth.load(Ordering::Relaxed);
        assert!(d < TRY_DEPTH, "fault-recovery points nested too deep");
        self.try_depth.store(d + 1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        self.tries[d].store(ctx, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }
    /// Drop the innermost recovery point (its `sc_try_call` has returned).
    pub fn pop_try(&self) {
        compiler_fence(Ordering::SeqCst);
        let d = self.try_depth.load(Ordering::Relaxed);
        self.try_depth.store(d - 1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }
    pub fn top_try(&self) -> Option<*mut u8> {
        let d = self.try_depth.load(Ordering::Relaxed);
        d.checked_sub(1).map(|i| self.tries[i].load(Ordering::Relaxed))
    }

    pub fn count(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
