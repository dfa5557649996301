//! Per-CPU state. Only the boot CPU runs today; every access goes through
//! `this_cpu()` so that SMP can switch it to a GS-based lookup unchanged.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use shadowcall::emul::{EmulLifo, GuardError};

use crate::interrupts::TryCtx;

/// Nesting depth of fault-recovery points (test wrapper + one inside a test + spare).
pub const TRY_DEPTH: usize = 4;

#[derive(Default)]
pub struct Counters {
    /// int3 emulations started at a patch site (first traps).
    pub emulations: AtomicU64,
    /// Of those, calls sent through the trampoline.
    pub tramp_calls: AtomicU64,
    /// Second traps that completed (both stacks rewritten).
    pub second_traps: AtomicU64,
    /// Calls emulated with the one-trap shadow gap.
    pub shadow_gap_calls: AtomicU64,
    /// Calls emulated the classic way (normal stack only).
    pub classic_calls: AtomicU64,
    /// int3s that were not patch sites (reported, not emulated).
    pub breakpoints: AtomicU64,
    /// Second traps that refused to write.
    pub refusals: AtomicU64,
    /// Writes the #BP handler made to slots of the interrupted normal stack.
    pub stack_writes: AtomicU64,
    /// WRSS writes the #BP handler made to slots of the interrupted shadow
    /// stack (not counting the exception frame's own LIP/SSP slots).
    pub shadow_writes: AtomicU64,
    pub nmis: AtomicU64,
    /// RFLAGS.IF seen by the last second trap (1 would mean interrupts were on inside the window).
    pub last_second_trap_if: AtomicU64,
}

pub struct PerCpu {
    lifo: UnsafeCell<EmulLifo>,
    tries: UnsafeCell<([*mut TryCtx; TRY_DEPTH], usize)>,
    pub last_refusal: UnsafeCell<Option<GuardError>>,
    pub counters: Counters,
    /// Self-test hook for the #BP handler (see patching::BpTestHook).
    pub bp_test_hook: AtomicU8,
    /// Self-test override: emulate calls the classic way even with shadow stacks on.
    pub force_classic: AtomicU8,
}

// SAFETY: each PerCpu is only touched by its own CPU; nested users (exception
// handlers) follow the LIFO discipline documented on EmulLifo and TryCtx.
unsafe impl Sync for PerCpu {}

static CPU0: PerCpu = PerCpu {
    lifo: UnsafeCell::new(EmulLifo::new()),
    tries: UnsafeCell::new(([core::ptr::null_mut(); TRY_DEPTH], 0)),
    last_refusal: UnsafeCell::new(None),
    counters: Counters {
        emulations: AtomicU64::new(0),
        tramp_calls: AtomicU64::new(0),
        second_traps: AtomicU64::new(0),
        shadow_gap_calls: AtomicU64::new(0),
        classic_calls: AtomicU64::new(0),
        breakpoints: AtomicU64::new(0),
        refusals: AtomicU64::new(0),
        stack_writes: AtomicU64::new(0),
        shadow_writes: AtomicU64::new(0),
        nmis: AtomicU64::new(0),
        last_second_trap_if: AtomicU64::new(0),
    },
    bp_test_hook: AtomicU8::new(0),
    force_classic: AtomicU8::new(0),
};

pub fn this_cpu() -> &'static PerCpu {
    &CPU0
}

impl PerCpu {
    /// The emulation LIFO. Only this CPU uses it, with interrupts off or from
    /// an exception handler.
    #[allow(clippy::mut_from_ref)]
    pub fn lifo(&self) -> &mut EmulLifo {
        // SAFETY: per-CPU, and nested handlers complete before the interrupted user resumes.
        unsafe { &mut *self.lifo.get() }
    }

    pub fn push_try(&self, ctx: *mut TryCtx) {
        // SAFETY: per-CPU; see lifo().
        let t = unsafe { &mut *self.tries.get() };
        assert!(t.1 < TRY_DEPTH, "fault-recovery points nested too deep");
        t.0[t.1] = ctx;
        t.1 += 1;
    }
    pub fn pop_try(&self) {
        // SAFETY: per-CPU; see lifo().
        let t = unsafe { &mut *self.tries.get() };
        t.1 -= 1;
    }
    pub fn top_try(&self) -> Option<*mut TryCtx> {
        // SAFETY: per-CPU; see lifo().
        let t = unsafe { &*self.tries.get() };
        t.1.checked_sub(1).map(|i| t.0[i])
    }

    pub fn count(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
