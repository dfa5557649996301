//! What the lower layers (the exception dispatcher, the patcher) call into
//! the self-tests and benchmarks for: function pointers that `main` installs
//! once at boot, so that no lower module imports the self-tests (no circular
//! imports: DESIGN.md §1). The hooks behind `test-hooks` exist only in the
//! self-test build; the production build has none of them on the #BP path.

use shadowcall::frame::TrapFrame;
use spin::Once;

/// Handlers of the kernel's own vectors and of the NMI body.
pub struct Handlers {
    /// The local APIC timer (after EOI is left to the dispatcher).
    pub timer_tick: fn(),
    /// The self-test vector delivered on its own IST stack.
    pub ist_probe: fn(&mut TrapFrame),
    /// The NMI handler's body, run under the NMI's own recovery point.
    pub nmi_body: fn(&mut TrapFrame),
    /// Around the NMI body (nesting checks).
    pub nmi_enter: fn(),
    pub nmi_exit: fn(),
}

/// Forgery and race points of the threat-model self-tests.
#[cfg(feature = "test-hooks")]
pub struct TestHooks {
    /// First in the dispatcher: forge the trap frame (another CPU's stores).
    pub before_dispatch: fn(&mut TrapFrame),
    /// Then: a nested NMI/#MC the test armed (true: handled).
    pub nested: fn(&mut TrapFrame) -> bool,
    /// Last in the dispatcher.
    pub after_dispatch: fn(&mut TrapFrame),
    /// The #BP handler's frame address, for the alignment test.
    pub record_frame: fn(u64),
    /// After the #BP handler's checks, before its exit.
    pub after_bp_checks: fn(&mut TrapFrame),
    /// The #BP handler between "no batch" and reading the site.
    pub race_window: fn(u64),
    /// The sealed copy before it is written.
    pub forge_sealed_copy: fn(&mut [u8]),
}

static HANDLERS: Once<Handlers> = Once::new();
#[cfg(feature = "test-hooks")]
static TEST_HOOKS: Once<TestHooks> = Once::new();

/// Install the handlers (once, on the boot CPU, before interrupts are on).
pub fn install(h: Handlers) {
    HANDLERS.call_once(|| h);
}

/// Install the self-test hooks (once, before the self-tests run).
#[cfg(feature = "test-hooks")]
pub fn install_test_hooks(h: TestHooks) {
    TEST_HOOKS.call_once(|| h);
}

/// The installed handlers (None before `install`).
#[inline]
pub fn handlers() -> Option<&'static Handlers> {
    HANDLERS.get()
}

/// The installed self-test hooks (None before `install_test_hooks`).
#[cfg(feature = "test-hooks")]
#[inline]
pub fn test_hooks() -> Option<&'static TestHooks> {
    TEST_HOOKS.get()
}
