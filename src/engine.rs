//! The patcher and the #BP handler: what a host kernel drives.
//!
//! A host implements [`Platform`] (its memory layout, its text writers, its
//! CPUs) and keeps one [`Patcher`] (usually a `static`). The patcher runs
//! the int3 protocol, three numbered steps for a whole batch:
//!
//! 1. write int3 over the first byte of every site; sync;
//! 2. write bytes 1..5 of every new instruction; sync;
//! 3. write the first byte of every new instruction; sync.
//!
//! Between steps 1 and 3, a CPU that runs a site traps; the host's #BP
//! handler calls [`Patcher::handle_int3`], which emulates the site's new
//! instruction (returning [`Int3::Handled`] with the exit the entry stub
//! takes) or answers [`Int3::NotOurs`] so that the host chains its debugger
//! or kprobes after it.
//!
//! What the Rust code here decides is not trusted for a shadow-stack write:
//! with shadow stacks on, the exit (asm) checks the sealed entry it is handed
//! again against the read-only tables and the shadow frame, and derives every
//! value it writes from the shadow stack and read-only memory (DESIGN §11).
//! A forged decision can only make the exit refuse.
//!
//! ```no_run
//! use shadowcall::engine::{Int3, Patcher, Platform, Strategy};
//! use shadowcall::frame::TrapFrame;
//! use shadowcall::patch::NewInsn;
//!
//! fn demo<P: Platform>(patcher: &Patcher<P>, site: u64, f: u64, frame: &mut TrapFrame) {
//!     patcher.init(Strategy::ShadowGap).expect("trampoline");
//!     // Point the site at `f`, live, with every other CPU running.
//!     patcher.patch(&[(site, NewInsn::Call(f))], |_step| {}).expect("a valid batch");
//!     // In the host's #BP handler:
//!     match patcher.handle_int3(frame) {
//!         Int3::Handled(_exit) => { /* the entry stub takes `_exit` */ }
//!         Int3::NotOurs => {
//!             // The host's own breakpoint handling, then IRET as the frame
//!             // is: the PLAIN exit with its site-table position
//!             // (`plain`), which the exit checks.
//!             let _exit = patcher.plain(frame);
//!         }
//!     }
//! }
//! ```

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};

use crate::cet;
use crate::emul::record::{REC_RSP_IF, REC_SITE, REC_TARGET};
use crate::emul::{check_tramp_slots, EmulLifo, GuardError, PendingCall, StackKind};
use crate::frame::{TrapFrame, RFLAGS_IF};
use crate::patch::{
    build_batch, check_entry, classify, write_sealed_one, CodeRange, Entry, NewInsn, PatchError, Registry, SealedBatch,
    SealedEntry, SealedFlaw, SiteKind, Text, INT3, KIND_CALL, KIND_JMP, KIND_NOP, SEALED_ONE_LEN, SITE_LEN,
};
use crate::shstk::{ShadowFrame, StackBounds};
use crate::tramp::{self, TrampLayout, TRAMP_TRAP_OFF};

/// How a CALL is emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Push the return address on the normal stack only (no shadow stacks).
    Classic,
    /// Two traps through the `call; call` trampoline: both stacks get slots.
    Trampoline,
    /// One trap: the exit rebuilds the exception frame one slot lower on the
    /// shadow stack (classic when shadow stacks are off).
    ShadowGap,
}

/// What the #BP exit does (the host's entry stub jumps through a table in
/// this order; anything at or past [`ACTION_COUNT`] is `Plain`).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
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
    /// A host self-test probe: LIP := the probe's landing.
    TestLanding = 9,
}

/// Number of [`Action`]s.
pub const ACTION_COUNT: u64 = 10;

/// The handler's answer to the entry stub (returned in RAX:RDX).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// An [`Action`] as a number.
    pub action: u64,
    /// Its argument (a sealed entry's address, or 0).
    pub arg: u64,
}

impl Exit {
    /// IRET as the frame is, without a site-table position: enough without
    /// shadow stacks; with them a host returns [`Patcher::plain`].
    pub const PLAIN: Exit = Exit { action: Action::Plain as u64, arg: 0 };

    /// `action` with `arg`.
    pub const fn with(action: Action, arg: u64) -> Exit {
        Exit { action: action as u64, arg }
    }
}

/// What [`Patcher::handle_int3`] did with a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int3 {
    /// The engine's: the entry stub leaves through this exit.
    Handled(Exit),
    /// Not a site of the engine's: the host handles it (debugger, kprobes)
    /// and leaves through [`Patcher::plain`] (not [`Exit::PLAIN`]: with
    /// shadow stacks the PLAIN exit refuses a stray int3 without its
    /// site-table position).
    NotOurs,
}

/// Where the patch hook (`Patcher::patch`) is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// After step 1: every site is int3 (the emulation window).
    Int3Written,
    /// After step 2: int3 followed by the new tail (still the window).
    TailsWritten,
}

/// What one `patch` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchStats {
    /// Sites in the batch.
    pub sites: usize,
    /// Sync rounds the protocol took (3).
    pub sync_rounds: u64,
    /// Bytes of the sealed batch.
    pub table_bytes: usize,
}

/// One write through the host's private text window. The host's writers
/// check each destination themselves (DESIGN §11): these say what to write,
/// never bytes for text.
#[derive(Clone, Copy, Debug)]
pub enum Poke<'a> {
    /// Step 1 at a live sealed entry's site: int3.
    Int3(&'a SealedEntry),
    /// Step 2: the entry's bytes 1..5 behind its int3.
    Tails(&'a SealedEntry),
    /// Step 3: the entry's first byte.
    Head(&'a SealedEntry),
    /// Bytes into the sealed area past its magic word (not live yet).
    Sealed {
        /// Offset into the sealed area.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// Write the sealed batch's magic word: the batch is live. The host's
    /// writer decides it: only if the crate's check of the area passes,
    /// with the area's other writers excluded (`Platform` # Safety).
    Publish,
    /// Clear the magic word: no batch is live.
    Unseal,
    /// Copy the trampoline (read-only bytes) into its page, once.
    Tramp,
}

/// Which write of the protocol a [`Pokes::Sites`] does at each site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteWrite {
    /// 1. int3.
    Int3,
    /// 2. the tails.
    Tails,
    /// 3. the first bytes.
    Head,
}

/// The writes of one window: one write, or one step of the protocol at
/// every entry of the live batch. `iter` can be called again (a host
/// redoes an aborted window, or writes a step twice).
#[derive(Clone, Copy, Debug)]
pub enum Pokes<'a> {
    /// One write.
    One(Poke<'a>),
    /// One step at every entry.
    Sites {
        /// The step.
        write: SiteWrite,
        /// The live sealed batch's entries.
        entries: &'a [SealedEntry],
    },
}

impl<'a> Pokes<'a> {
    /// The writes, in order.
    pub fn iter(self) -> impl Iterator<Item = Poke<'a>> {
        let (one, entries, write) = match self {
            Pokes::One(p) => (Some(p), &[][..], SiteWrite::Int3),
            Pokes::Sites { write, entries } => (None, entries, write),
        };
        one.into_iter().chain(entries.iter().map(move |e| match write {
            SiteWrite::Int3 => Poke::Int3(e),
            SiteWrite::Tails => Poke::Tails(e),
            SiteWrite::Head => Poke::Head(e),
        }))
    }
}

/// What the engine tells the host.
#[derive(Debug)]
pub enum Event<'a> {
    /// The handler will not write (a check failed). The host reports it and
    /// unwinds the trapped context or stops; the exit writes nothing.
    Refused {
        /// The trap frame.
        frame: &'a mut TrapFrame,
        /// The failed check.
        error: GuardError,
    },
    /// An int3 of a completed batch, executed late: resumed at the site.
    StaleInt3 {
        /// The site.
        addr: u64,
    },
    /// A real breakpoint: an int3 the engine has no site for. The host's
    /// handler gets it next ([`Int3::NotOurs`]).
    Breakpoint {
        /// The int3's address.
        addr: u64,
    },
    /// An int3 at a registered site with no live batch at first look.
    Int3Race {
        /// The site.
        addr: u64,
    },
}

/// Self-test points of the engine (feature `test-hooks` only).
#[cfg(feature = "test-hooks")]
#[derive(Debug)]
pub enum TestPoint<'a> {
    /// The sealed copy of a batch before it is written: forge it.
    ForgeSealed(&'a mut [u8]),
    /// Between the live-batch lookup and the registered-site check.
    RaceWindow(u64),
    /// A first trap at a live site entered the window.
    WindowEnter,
    /// A first trap is about to return.
    FirstTrapExit,
    /// A second (trampoline) trap entered.
    SecondTrap,
    /// The emulated instruction took effect: the window ends.
    WindowExit,
}

/// Counters of one CPU's emulations, read by self-tests: compiled only
/// with the feature `test-hooks` (the production #BP path counts nothing).
#[cfg(feature = "test-hooks")]
#[derive(Debug, Default)]
pub struct Counters {
    /// First traps at a patch site.
    pub emulations: AtomicU64,
    /// Of those, calls sent through the trampoline.
    pub tramp_calls: AtomicU64,
    /// Second traps that completed (both stacks rewritten).
    pub second_traps: AtomicU64,
    /// Calls emulated with the one-trap shadow gap.
    pub shadow_gap_calls: AtomicU64,
    /// Calls emulated the classic way (normal stack only).
    pub classic_calls: AtomicU64,
    /// int3s of a completed batch executed late.
    pub stale_int3: AtomicU64,
    /// Refusals to write.
    pub refusals: AtomicU64,
    /// int3s at a registered site with no live batch at first look.
    pub int3_races: AtomicU64,
    /// Writes to slots of the interrupted normal stack.
    pub stack_writes: AtomicU64,
    /// WRSS writes to slots of the interrupted shadow stack (not counting
    /// the exception frame's own slots).
    pub shadow_writes: AtomicU64,
    /// Emulation windows this CPU is inside (first trap .. in effect).
    pub window_depth: AtomicU64,
    /// RFLAGS.IF the last second trap saw (1: interrupts on in the window).
    pub last_second_trap_if: AtomicU64,
}

#[cfg(feature = "test-hooks")]
impl Counters {
    /// All zero.
    pub const fn new() -> Self {
        Counters {
            emulations: AtomicU64::new(0),
            tramp_calls: AtomicU64::new(0),
            second_traps: AtomicU64::new(0),
            shadow_gap_calls: AtomicU64::new(0),
            classic_calls: AtomicU64::new(0),
            stale_int3: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            int3_races: AtomicU64::new(0),
            stack_writes: AtomicU64::new(0),
            shadow_writes: AtomicU64::new(0),
            window_depth: AtomicU64::new(0),
            last_second_trap_if: AtomicU64::new(0),
        }
    }
}

/// Count an event on this CPU (`test-hooks` builds only; the argument
/// picks the counter).
macro_rules! count {
    ($cpu:expr, $field:ident) => {
        #[cfg(feature = "test-hooks")]
        $cpu.counters.$field.fetch_add(1, Ordering::Relaxed);
    };
}

/// The engine's state of one CPU, kept by the host in its per-CPU data and
/// handed back by [`Platform::cpu`]. Only its own CPU touches it (from
/// thread context with interrupts off, or from exception handlers that
/// complete before the code they interrupted resumes).
pub struct CpuState {
    lifo: UnsafeCell<EmulLifo>,
    last_refusal: UnsafeCell<Option<GuardError>>,
    /// #BP handlers of this CPU looking at the batch in flight. Written only
    /// by this CPU, without a locked instruction; read by the patcher
    /// before it rewrites the sealed area (DESIGN §8.2).
    batch_refs: AtomicU64,
    /// Emulation counters (self-tests).
    #[cfg(feature = "test-hooks")]
    pub counters: Counters,
    /// Self-test override: emulate calls the classic way even with shadow
    /// stacks on (the negative control).
    #[cfg(feature = "test-hooks")]
    pub force_classic: AtomicBool,
}

// SAFETY: a CpuState is used only by its own CPU (see the type's
// documentation); other CPUs read only its atomics.
unsafe impl Sync for CpuState {}

impl Default for CpuState {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuState {
    /// A CPU that has emulated nothing.
    pub const fn new() -> Self {
        CpuState {
            lifo: UnsafeCell::new(EmulLifo::new()),
            last_refusal: UnsafeCell::new(None),
            batch_refs: AtomicU64::new(0),
            #[cfg(feature = "test-hooks")]
            counters: Counters::new(),
            #[cfg(feature = "test-hooks")]
            force_classic: AtomicBool::new(false),
        }
    }

    /// The pending trampoline calls without shadow stacks (with shadow
    /// stacks they are on the host's record page).
    ///
    /// # Safety
    /// Only the owning CPU calls it, and no other reference to the LIFO is
    /// alive (interrupts off, or from an exception handler).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn lifo(&self) -> &mut EmulLifo {
        // SAFETY: the caller's obligation.
        unsafe { &mut *self.lifo.get() }
    }

    /// Depth of the LIFO (0 with shadow stacks on).
    pub fn lifo_depth(&self) -> usize {
        // SAFETY: a read of this CPU's own LIFO; a nested handler pushes and
        // pops before the code it interrupted resumes.
        unsafe { (*self.lifo.get()).depth() }
    }

    /// The last refusal's reason.
    pub fn last_refusal(&self) -> Option<GuardError> {
        // SAFETY: as `lifo_depth`: only this CPU writes it.
        unsafe { *self.last_refusal.get() }
    }

    /// Emulate calls the classic way (a self-test's negative control).
    #[cfg(feature = "test-hooks")]
    pub fn set_force_classic(&self, on: bool) {
        self.force_classic.store(on, Ordering::Relaxed);
    }

    #[inline(always)]
    fn force_classic(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.force_classic.load(Ordering::Relaxed);
        #[cfg(not(feature = "test-hooks"))]
        false
    }
}

/// What a host kernel provides to the engine.
///
/// # Safety
/// The engine trusts the implementation for memory layout, not for data.
/// The implementer guarantees:
/// - `text` is the kernel text, mapped and readable for the kernel's life;
///   `sites` and `targets` are the sorted `.shadowcall_sites` and
///   `.shadowcall_targets` tables in read-only memory, and `forbidden_code`
///   covers at least the trampoline page, the exception entry code
///   (`.text.entry`, where the crate's asm lies) and the CET bring-up code;
/// - `tramp_page` is one page-aligned page of kernel text filled with int3
///   at link time and used by nothing else; `sealed_area` is a page-aligned
///   area mapped read-only for the kernel's life, zero at boot, written only
///   by `poke`;
/// - with the feature `entry`, the link-time layout symbols (README "Use it
///   in your kernel") describe the same memory as these answers
///   (`Patcher::init` checks what it can: the tables, the trampoline page,
///   the sealed area, alignments, `SC_MAX_CPUS`), every shadow stack a CPU
///   runs #BP on lies in that CPU's stack area, and the record pages are
///   zeroed shadow-stack pages (R/W=0, Dirty=1);
/// - `poke` writes only through a text window private to the calling CPU
///   (no other CPU can write through it), with interrupts off, and its
///   writers check each write against read-only data: a site write only at
///   an entry of the live sealed batch (whose fields the read-only tables
///   allow), and only in the order the protocol's text states allow (tails
///   behind an int3, the head onto int3 and the entry's own tails); sealed
///   writes past the magic word, inside the area, and not while a batch is
///   live or being published or any CPU is inside a #BP exit (its in-exit
///   count on its record page); a publication ([`Poke::Publish`]) only if
///   the crate's check of the area as it is then passes (asm/sealed.S
///   `SEALED_VALID` in the host's own asm, or `sc_sealed_check` of
///   asm/publish.S with the feature `entry`), with every other writer of
///   the area excluded from before that check until the batch retires
///   (DESIGN §8.2): the #BP path trusts a live batch's header, search tree
///   and entries as validated; an unseal only of a live batch; the
///   trampoline from read-only bytes, once. Writers that take these from
///   ordinary memory give an attacker text writes (DESIGN §11);
/// - `sync` returns only after every other online CPU has executed a
///   serializing instruction after the call began, and a CPU acknowledges
///   only with interrupts on (so a CPU inside the #BP handler, IF=0, has
///   left it before its acknowledgement: `finish` relies on this);
/// - the stack bounds are those of the current context (task or CPU);
///   `find_record` returns only a slot of the calling CPU's record page;
/// - `cpu` is the running CPU's state, `for_each_cpu` visits every online
///   CPU's;
/// - `event(Event::Refused)` does not simply return to a frame it left
///   alone: it unwinds the trapped context (a recovery point) or stops the
///   kernel, since the exit then writes nothing and resumes at the trap;
/// - #BP is an interrupt gate without IST to the crate's `sc_isr_3`, and the
///   host's NMI and #MC entries give a context interrupted in
///   `[sc_bpx_region_start, sc_bpx_region_end)` its registers back from a
///   page only WRSS writes (or the host has no NMI/#MC sources).
///
/// The exits re-check every shadow-stack write against the shadow stack
/// and read-only data: a wrong answer here can make them refuse, not write
/// elsewhere; wrong layout symbols or weak text writers can.
pub unsafe trait Platform: Sync {
    /// Kernel text, readable, for validation.
    fn text(&self) -> Text<'static>;
    /// The sorted, read-only site table.
    fn sites(&self) -> &'static [u64];
    /// The sorted, read-only target table.
    fn targets(&self) -> &'static [u64];
    /// Code no site or target may lie in (exception entry, CET bring-up,
    /// the trampoline page).
    fn forbidden_code(&self) -> &[CodeRange];
    /// The trampoline's text page.
    fn tramp_page(&self) -> u64;
    /// The sealed area `[start, end)`.
    fn sealed_area(&self) -> (u64, u64);
    /// Do `pokes` through this CPU's private text window. Returns false if
    /// an exception aborted the window (the engine redoes all of them).
    fn poke(&self, pokes: Pokes<'_>) -> bool;
    /// Serialize this CPU and every other online CPU, and wait for them.
    fn sync(&self);
    /// The current context's normal stack holding `addr`.
    fn normal_stack(&self, addr: u64) -> Option<StackBounds>;
    /// The current context's shadow stack holding `addr`.
    fn shadow_stack(&self, addr: u64) -> Option<StackBounds>;
    /// The pending trampoline record of the shadow stack whose first trap
    /// left SSP `bound_ssp` (the record page of the shadow frame at `f_base`).
    fn find_record(&self, f_base: u64, bound_ssp: u64) -> Option<u64>;
    /// The running CPU's engine state.
    fn cpu(&self) -> &CpuState;
    /// Every online CPU's engine state.
    fn for_each_cpu(&self, f: &mut dyn FnMut(&CpuState));
    /// Something the host is told (see [`Event`]).
    fn event(&self, e: Event<'_>);
    /// A self-test point (feature `test-hooks`).
    #[cfg(feature = "test-hooks")]
    fn test_point(&self, _p: TestPoint<'_>) {}
}

pub(crate) const CODE_CLASSIC: u8 = 0;
pub(crate) const CODE_TRAMPOLINE: u8 = 1;
pub(crate) const CODE_SHADOW_GAP: u8 = 2;

/// The CALL emulation in force, for the #BP stub's fast path (asm/bp.S,
/// production builds): the last `set_strategy` of any patcher (an image has
/// one: the sealed area and the exits are global too). Ordinary memory: a
/// forged value only sends a CALL to the handler or to the shadow-gap exit,
/// which checks everything it writes.
#[doc(hidden)]
#[no_mangle]
pub static SC_CALL_STRATEGY: AtomicU8 = AtomicU8::new(CODE_CLASSIC);

const fn strategy_code(s: Strategy) -> u8 {
    match s {
        Strategy::Classic => CODE_CLASSIC,
        Strategy::Trampoline => CODE_TRAMPOLINE,
        Strategy::ShadowGap => CODE_SHADOW_GAP,
    }
}

/// Tries of one window of writes that exceptions keep aborting.
pub const POKE_TRIES: u32 = 8;

/// Why [`Patcher::init`] failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitError {
    /// `.shadowcall_sites` or `.shadowcall_targets` is not sorted.
    TablesNotSorted,
    /// A site or target is invalid (in forbidden code, misaligned ...).
    Registry(PatchError),
    /// The trampoline's bytes or its page are not what they must be.
    Trampoline(tramp::TrampError),
    /// The host's text window kept being aborted.
    PokeAborted,
    /// The host's layout symbols (feature `entry`) are not what the asm
    /// needs or disagree with the `Platform`.
    Layout(&'static str),
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::TablesNotSorted => {
                write!(f, ".shadowcall_sites or .shadowcall_targets is not sorted by address")
            }
            InitError::Registry(e) => write!(f, "patch registry: {e}"),
            InitError::Trampoline(e) => write!(f, "the trampoline page does not hold the trampoline: {e}"),
            InitError::PokeAborted => write!(f, "the text window was aborted {POKE_TRIES} times in a row"),
            InitError::Layout(e) => write!(f, "layout symbols: {e}"),
        }
    }
}

/// A batch between [`Patcher::begin`] and [`Patcher::finish`]: sealed,
/// live, int3s in text.
#[must_use = "a batch in flight must be finished"]
pub struct InFlight {
    rounds0: u64,
}

/// The patcher: what were a kernel's statics (strategy, trampoline, batch in
/// flight), generic over the host so that the #BP path stays inlined.
pub struct Patcher<P> {
    platform: P,
    tramp: AtomicU64,
    strategy: AtomicU8,
    /// What the handler does for a CALL: the strategy, except that the
    /// shadow gap without shadow stacks is the classic emulation.
    call_code: AtomicU8,
    in_flight: AtomicBool,
    sync_rounds: AtomicU64,
}

/// Bytes of the sealed header's magic word (written last, cleared first).
const MAGIC_LEN: usize = 8;

/// Bytes of the trampoline's page.
const PAGE_BYTES: usize = 4096;

/// A shadow-stack slot of the trapped context (the shadow frame, the
/// record page, the slots above the frame).
#[inline(always)]
fn slot(addr: u64) -> u64 {
    // SAFETY: every address passed is derived from the shadow frame's base
    // (RDSSP in the entry stub) or from a record the host's `find_record`
    // located on its record page: mapped shadow-stack memory, readable.
    unsafe { cet::read_slot(addr) }
}

impl<P: Platform> Patcher<P> {
    /// A patcher for `platform`; [`init`](Self::init) before use.
    pub const fn new(platform: P) -> Self {
        Patcher {
            platform,
            tramp: AtomicU64::new(0),
            strategy: AtomicU8::new(CODE_CLASSIC),
            call_code: AtomicU8::new(CODE_CLASSIC),
            in_flight: AtomicBool::new(false),
            sync_rounds: AtomicU64::new(0),
        }
    }

    /// The host.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Check the read-only tables, write the trampoline into its page and
    /// prove it there, choose the strategy. Once, on the boot CPU.
    pub fn init(&self, strategy: Strategy) -> Result<(), InitError> {
        self.set_strategy(strategy);
        let registry = self.registry();
        if !registry.tables_in_place() {
            return Err(InitError::TablesNotSorted);
        }
        registry.check().map_err(InitError::Registry)?;
        #[cfg(feature = "entry")]
        crate::entry::Layout::linked().check(&self.platform, cet::rdssp()).map_err(InitError::Layout)?;
        let layout = tramp::layout_at(self.platform.tramp_page());
        // The writer copies its read-only bytes (no argument: nothing passes
        // through ordinary memory); the page is proved afterwards.
        self.poke(Pokes::One(Poke::Tramp)).map_err(|()| InitError::PokeAborted)?;
        self.sync();
        self.tramp_page_intact().map_err(InitError::Trampoline)?;
        self.tramp.store(layout.base, Ordering::Release);
        Ok(())
    }

    /// The trampoline, once `init` wrote it.
    pub fn trampoline(&self) -> Option<TrampLayout> {
        match self.tramp.load(Ordering::Acquire) {
            0 => None,
            base => Some(tramp::layout_at(base)),
        }
    }

    /// Does the trampoline page hold exactly the trampoline, followed by its
    /// int3 fill up to the end of the page?
    pub fn tramp_page_intact(&self) -> Result<(), tramp::TrampError> {
        let base = self.platform.tramp_page();
        let layout = tramp::layout_at(base);
        // SAFETY: the trampoline page is one page of mapped, readable text
        // (Platform contract).
        let page = unsafe { core::slice::from_raw_parts(base as *const u8, PAGE_BYTES) };
        tramp::verify(&page[..layout.len], &layout)?;
        let (code, fill) = page.split_at(tramp::TRAMP_LEN);
        if code != tramp::TRAMP_BYTES {
            return Err(tramp::TrampError::Shape("bytes differ from TRAMP_BYTES"));
        }
        if fill.iter().any(|&b| b != INT3) {
            return Err(tramp::TrampError::Shape("the page past the trampoline is not int3 fill"));
        }
        Ok(())
    }

    /// The call-emulation strategy in force.
    pub fn strategy(&self) -> Strategy {
        match self.strategy.load(Ordering::Relaxed) {
            CODE_TRAMPOLINE => Strategy::Trampoline,
            CODE_SHADOW_GAP => Strategy::ShadowGap,
            _ => Strategy::Classic,
        }
    }

    /// Switch the call-emulation strategy (no batch may be in flight).
    pub fn set_strategy(&self, s: Strategy) {
        self.strategy.store(strategy_code(s), Ordering::Relaxed);
        let code = match s {
            Strategy::ShadowGap if !cet::active() => CODE_CLASSIC,
            _ => strategy_code(s),
        };
        self.call_code.store(code, Ordering::Relaxed);
        SC_CALL_STRATEGY.store(code, Ordering::Relaxed);
    }

    /// The strategies that work with this CPU's shadow-stack setting
    /// (classic needs shadow stacks off; the shadow gap without them is
    /// classic).
    pub fn strategies_here(&self) -> [Strategy; 2] {
        if cet::active() {
            [Strategy::Trampoline, Strategy::ShadowGap]
        } else {
            [Strategy::Classic, Strategy::Trampoline]
        }
    }

    /// What a batch is validated against: the read-only tables in place.
    pub fn registry(&self) -> Registry<'_> {
        Registry::in_place(self.platform.sites(), self.platform.targets(), self.platform.forbidden_code())
    }

    /// Sync rounds since boot.
    pub fn sync_rounds(&self) -> u64 {
        self.sync_rounds.load(Ordering::Relaxed)
    }

    /// Make every CPU see the text written so far.
    pub fn sync(&self) {
        self.platform.sync();
        self.sync_rounds.fetch_add(1, Ordering::Relaxed);
    }

    /// Patch a batch of sites with the int3 protocol. `hook` runs after
    /// steps 1 and 2, inside the emulation window. On error nothing has
    /// been written to text.
    pub fn patch(&self, sites: &[(u64, NewInsn)], mut hook: impl FnMut(Step)) -> Result<PatchStats, PatchError> {
        let flight = self.begin(sites)?;
        hook(Step::Int3Written);
        self.write_tails();
        hook(Step::TailsWritten);
        Ok(self.finish(flight))
    }

    /// Validate `sites`, seal the batch (read-only, live) and write step 1;
    /// sync. On error nothing is written to text and no batch is live.
    pub fn begin(&self, sites: &[(u64, NewInsn)]) -> Result<InFlight, PatchError> {
        self.begin_with(|| build_batch(&self.platform.text(), &self.registry(), sites).and_then(|b| self.seal(&b)))
    }

    /// Patch one site with the int3 protocol, without allocating: the
    /// static-call and jump-label case. `hook` as for [`patch`](Self::patch).
    pub fn patch_one(&self, site: u64, insn: NewInsn, mut hook: impl FnMut(Step)) -> Result<PatchStats, PatchError> {
        let flight = self.begin_with(|| self.seal_one(site, insn))?;
        hook(Step::Int3Written);
        self.write_tails();
        hook(Step::TailsWritten);
        Ok(self.finish(flight))
    }

    /// Take the patcher, seal (`seal` makes a batch live or fails with
    /// nothing live), write step 1.
    fn begin_with(&self, seal: impl FnOnce() -> Result<(), PatchError>) -> Result<InFlight, PatchError> {
        if self.in_flight.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Err(PatchError::BatchInFlight);
        }
        let rounds0 = self.sync_rounds();
        if let Err(e) = seal() {
            self.in_flight.store(false, Ordering::Release);
            return Err(e);
        }
        // 1. int3 on every site.
        self.write_step(SiteWrite::Int3);
        Ok(InFlight { rounds0 })
    }

    /// 2. The tails of the new instructions; sync.
    pub fn write_tails(&self) {
        self.write_step(SiteWrite::Tails);
    }

    /// 3. The first bytes; sync. Then the batch retires.
    pub fn finish(&self, flight: InFlight) -> PatchStats {
        self.write_step(SiteWrite::Head);
        let (sites, table_bytes) =
            self.live_batch().map(|b| (b.len(), b.header().total_len as usize)).unwrap_or_default();
        // Retire the batch: no CPU can fetch one of its int3s any more (sync
        // above), and a handler that did has finished (it ran with
        // interrupts off, so it acked the sync only after leaving) or holds
        // a reference on its CPU, taken before it looked at the batch.
        self.poke_or_stop(Pokes::One(Poke::Unseal));
        fence(Ordering::SeqCst);
        self.platform.for_each_cpu(&mut |c| {
            while c.batch_refs.load(Ordering::Acquire) != 0 {
                core::hint::spin_loop();
            }
        });
        if !cet::active() {
            // Without shadow stacks no in-exit count (WRSS) keeps the sealed
            // area from being rewritten under the #BP stub's fast path,
            // which takes no batch reference: one more round, after which
            // every CPU has left any #BP entered before the unseal (it acks
            // with interrupts on), so none still reads this batch (review 10 F2).
            self.sync();
        }
        self.in_flight.store(false, Ordering::Release);
        PatchStats { sites, sync_rounds: self.sync_rounds() - flight.rounds0, table_bytes }
    }

    /// Is a sealed batch live?
    pub fn batch_live(&self) -> bool {
        self.live_batch().is_some()
    }

    /// The live sealed batch's entry for `site` (read-only memory).
    pub fn live_entry(&self, site: u64) -> Option<&'static SealedEntry> {
        self.live_batch().and_then(|b| b.lookup(site))
    }

    /// Is `addr` a registered site?
    pub fn is_registered_site(&self, addr: u64) -> bool {
        self.platform.sites().binary_search(&addr).is_ok()
    }

    /// The host's window, redone while an exception aborts it.
    fn poke(&self, pokes: Pokes<'_>) -> Result<(), ()> {
        for _ in 0..POKE_TRIES {
            if self.platform.poke(pokes) {
                return Ok(());
            }
        }
        Err(())
    }

    /// A write of the protocol is never abandoned half-way.
    fn poke_or_stop(&self, pokes: Pokes<'_>) {
        if self.poke(pokes).is_err() {
            panic!("shadowcall: the text window was aborted {POKE_TRIES} times in a row");
        }
    }

    /// One step for every entry of the live batch, then a sync. The bytes
    /// come only from the sealed (read-only) batch.
    fn write_step(&self, write: SiteWrite) {
        if let Some(batch) = self.live_batch() {
            self.poke_or_stop(Pokes::Sites { write, entries: batch.entries() });
        }
        self.sync();
    }

    /// Copy a validated batch into the sealed area and validate the
    /// read-only copy again (the batch in ordinary memory may have changed
    /// since it was built). Live when this returns Ok.
    fn seal(&self, batch: &crate::patch::Batch) -> Result<(), PatchError> {
        let mut buf = alloc::vec![0u8; batch.sealed_len()];
        batch.write_sealed(&mut buf)?;
        self.seal_image(&mut buf, |b| {
            // Every sealed entry must be what validation makes of its own
            // (site, instruction) pair.
            let pairs: alloc::vec::Vec<(u64, NewInsn)> =
                b.entries().iter().filter_map(|e| e.insn().map(|i| (e.site, i))).collect();
            let again = build_batch(&self.platform.text(), &self.registry(), &pairs)?;
            match (0..again.len()).zip(b.entries()).position(|(i, y)| again.sealed_entry(i) != *y) {
                None if again.len() == b.len() => Ok(()),
                i => Err(PatchError::BadSealedBatch { flaw: SealedFlaw::BadEntry { index: i.unwrap_or(0) as u64 } }),
            }
        })
    }

    /// `seal` for one site, in a buffer on the stack.
    fn seal_one(&self, site: u64, insn: NewInsn) -> Result<(), PatchError> {
        let entry = check_entry(&self.platform.text(), &self.registry(), site, insn)?;
        let mut buf = [0u8; SEALED_ONE_LEN];
        write_sealed_one(&entry, &mut buf)?;
        self.seal_image(&mut buf, |b| {
            let bad = PatchError::BadSealedBatch { flaw: SealedFlaw::BadEntry { index: 0 } };
            let [y] = b.entries() else { return Err(bad) };
            let insn = y.insn().ok_or(bad)?;
            if check_entry(&self.platform.text(), &self.registry(), y.site, insn)? != *y {
                return Err(bad);
            }
            Ok(())
        })
    }

    /// Write a sealed image past its magic word, check the read-only copy
    /// with `verify` and `again` (its entries are what validation makes of
    /// them now), and only then publish it. This verdict decides only
    /// whether the patch goes ahead: the host's publication runs the
    /// crate's asm check of the area itself, with the area's other writers
    /// excluded (`Platform` # Safety, DESIGN §8.2).
    fn seal_image(
        &self,
        buf: &mut [u8],
        again: impl FnOnce(SealedBatch<'static>) -> Result<(), PatchError>,
    ) -> Result<(), PatchError> {
        let (start, end) = self.platform.sealed_area();
        if buf.len() > (end - start) as usize {
            return Err(PatchError::BadSealedBatch { flaw: SealedFlaw::TooShort });
        }
        #[cfg(feature = "test-hooks")]
        self.platform.test_point(TestPoint::ForgeSealed(buf));
        // Everything but the magic word: not live yet.
        self.poke_or_stop(Pokes::One(Poke::Sealed { offset: MAGIC_LEN as u64, bytes: &buf[MAGIC_LEN..] }));
        // SAFETY: the sealed area is mapped read-only for the kernel's life
        // and only this patcher (in_flight held) writes it.
        let unpublished = unsafe { SealedBatch::from_raw_unpublished(start as *const u8, (end - start) as usize) };
        let checked = unpublished.and_then(|b| b.verify().map(|_| b)).and_then(again);
        if checked.is_ok() {
            self.poke_or_stop(Pokes::One(Poke::Publish));
        }
        checked
    }

    #[inline(always)]
    fn live_batch(&self) -> Option<SealedBatch<'static>> {
        let (start, end) = self.platform.sealed_area();
        // SAFETY: the sealed area is mapped read-only for the kernel's life;
        // only the patcher changes it, and not while a handler holds a
        // reference (DESIGN §8.2).
        unsafe { SealedBatch::from_raw(start as *const u8, (end - start) as usize) }.ok()
    }

    // ---- The #BP handler -------------------------------------------------

    /// The PLAIN exit for an int3 at `addr` (IRET as the frame is). With
    /// shadow stacks the exit resumes at the shadow frame's LIP, and refuses
    /// if LIP-1 holds an int3 at a registered site (a site resumed at its
    /// second byte: the handler's answer is ordinary data, review 8): `arg`
    /// is `addr`'s position in the site table, which the exit checks in
    /// O(1) against LIP-1 (a wrong one can only make it refuse). A host
    /// returns this for an int3 the engine answered `NotOurs`.
    pub fn plain_at(&self, addr: u64) -> Exit {
        Exit::with(Action::Plain, self.platform.sites().partition_point(|&s| s < addr) as u64)
    }

    /// [`plain_at`](Self::plain_at) the frame's RIP - 1 (where it resumes,
    /// after an emulation without shadow stacks or a refusal's unwind).
    pub fn plain(&self, frame: &TrapFrame) -> Exit {
        self.plain_at(frame.rip.wrapping_sub(1))
    }

    /// Handle a #BP. With shadow stacks on, `frame.ssp` is the base of the
    /// shadow frame the CPU pushed (RDSSP in the entry stub), and the int3's
    /// address is its LIP - 1; the exit re-checks everything it writes.
    #[inline(always)]
    pub fn handle_int3(&self, frame: &mut TrapFrame) -> Int3 {
        let f = (frame.ssp != 0).then(|| ShadowFrame::at(frame.ssp));
        let addr = match f {
            Some(f) => slot(f.lip_slot()).wrapping_sub(1),
            None => frame.rip.wrapping_sub(1),
        };
        let exit = if addr == self.platform.tramp_page() + TRAMP_TRAP_OFF {
            self.second_trap(frame, f)
        } else if let Some(exit) = self.emulate_live(frame, f, addr) {
            exit
        } else {
            #[cfg(feature = "test-hooks")]
            self.platform.test_point(TestPoint::RaceWindow(addr));
            match self.registered_site_int3(frame, f, addr) {
                Some(exit) => exit,
                None => {
                    self.platform.event(Event::Breakpoint { addr });
                    return Int3::NotOurs;
                }
            }
        };
        // With shadow stacks, a PLAIN exit carries where the frame resumes,
        // for its check (without them the exit checks nothing: no search).
        Int3::Handled(if exit.action == Action::Plain as u64 && f.is_some() { self.plain(frame) } else { exit })
    }

    /// The exit found the frame or the state changed after the handler's
    /// checks: nothing was written. `ssp` is the shadow frame's base.
    pub fn exit_refused(&self, frame: &mut TrapFrame, ssp: u64) {
        // What the CPU pushed is on the shadow stack: put the saved RIP/CS
        // and the recorded SSP back to it, so that the refusal unwinds this
        // very frame.
        let f = ShadowFrame::at(ssp);
        frame.ssp = ssp;
        frame.rip = slot(f.lip_slot());
        frame.cs = slot(f.cs_slot());
        self.refuse(frame, GuardError::FrameChanged);
    }

    /// Emulate the live batch's instruction for `addr`, if it has one. The
    /// reference on this CPU keeps the batch from being retired meanwhile.
    #[inline(always)]
    fn emulate_live(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>, addr: u64) -> Option<Exit> {
        let refs = &self.platform.cpu().batch_refs;
        // Only this CPU writes its count (a nested handler restores it
        // before the code it interrupted resumes): no locked instruction.
        refs.store(refs.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        // The raised count is visible before the magic word is read (a
        // store, then a load: Dekker with `finish`).
        fence(Ordering::SeqCst);
        let exit = self.live_batch().and_then(|b| b.lookup(addr)).map(|e| self.emulate(frame, f, e));
        refs.store(refs.load(Ordering::Relaxed) - 1, Ordering::Release);
        exit
    }

    /// An int3 at a registered site that no live batch holds.
    #[cold]
    #[inline(never)]
    fn registered_site_int3(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>, addr: u64) -> Option<Exit> {
        if !self.is_registered_site(addr) {
            return None;
        }
        // SAFETY: a registered site: 5 bytes of mapped, readable text.
        let now = unsafe { (addr as *const u8).read_volatile() };
        if now == INT3 {
            // The int3 of a batch published after we looked: look again; if
            // it is still not there, execute the site again (never resume at
            // site+1, the middle of the instruction).
            let exit = self.emulate_live(frame, f, addr);
            count!(self.platform.cpu(), int3_races);
            self.platform.event(Event::Int3Race { addr });
            return Some(exit.unwrap_or_else(|| resume_at(frame, f, addr)));
        }
        // A stale int3 of a completed batch. With shadow stacks, run the site
        // again; without, emulate what text holds now (an emulator that
        // still sees the stale int3 would only trap again).
        count!(self.platform.cpu(), stale_int3);
        self.platform.event(Event::StaleInt3 { addr });
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
        Some(self.emulate(frame, None, &e))
    }

    fn window_enter(&self) {
        count!(self.platform.cpu(), window_depth);
        #[cfg(feature = "test-hooks")]
        self.platform.test_point(TestPoint::WindowEnter);
    }

    fn window_exit(&self) {
        #[cfg(feature = "test-hooks")]
        {
            self.platform.cpu().counters.window_depth.fetch_sub(1, Ordering::Relaxed);
            self.platform.test_point(TestPoint::WindowExit);
        }
    }

    /// Emulate `e`'s new instruction for the CPU that trapped on its int3.
    #[inline(always)]
    fn emulate(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> Exit {
        count!(self.platform.cpu(), emulations);
        self.window_enter();
        // The trampoline's window lasts until its second trap.
        let (exit, window_open) = self.emulate_insn(frame, f, e);
        #[cfg(feature = "test-hooks")]
        self.platform.test_point(TestPoint::FirstTrapExit);
        if !window_open {
            self.window_exit();
        }
        exit
    }

    /// The exit, and true when the emulation continues in the trampoline.
    #[inline(always)]
    fn emulate_insn(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> (Exit, bool) {
        let cpu = self.platform.cpu();
        let entry = e as *const SealedEntry as u64;
        match e.kind_code() {
            KIND_CALL => {
                let code = if cpu.force_classic() { CODE_CLASSIC } else { self.call_code.load(Ordering::Relaxed) };
                if code == CODE_SHADOW_GAP {
                    return (self.emulate_call_shadow_gap(frame, f, e), false);
                } else if code == CODE_TRAMPOLINE {
                    return (self.emulate_call_trampoline(frame, f, e), true);
                }
                count!(cpu, classic_calls);
                if !self.push_normal(frame, e.ret_addr()) {
                    return (Exit::PLAIN, false);
                }
                frame.rip = e.target;
                (action_if_shadow(f, Action::Classic, entry), false)
            }
            KIND_JMP => {
                frame.rip = e.target;
                (action_if_shadow(f, Action::Jmp, entry), false)
            }
            KIND_NOP => {
                frame.rip = e.ret_addr();
                (action_if_shadow(f, Action::Nop, entry), false)
            }
            _ => (self.emulate_ret(frame, f, entry), false),
        }
    }

    /// First trap of the trampoline path: run the trampoline with interrupts
    /// off until the second trap. With shadow stacks the exit records the
    /// call on the host's record page (shadow-stack memory); without, the
    /// per-CPU LIFO holds it.
    fn emulate_call_trampoline(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> Exit {
        let cpu = self.platform.cpu();
        let tramp = self.platform.tramp_page();
        let Some(f) = f else {
            let pending = PendingCall {
                site: e.site,
                ret: e.ret_addr(),
                target: e.target,
                interrupts: frame.rflags & RFLAGS_IF != 0,
                rsp: frame.rsp,
            };
            // SAFETY: this CPU's LIFO, from its #BP handler (interrupts off).
            if unsafe { cpu.lifo() }.push(pending).is_err() {
                panic!("shadowcall: emulation nesting deeper than the per-CPU LIFO");
            }
            count!(cpu, tramp_calls);
            frame.rflags &= !RFLAGS_IF;
            frame.rip = tramp;
            return Exit::PLAIN;
        };
        if slot(f.prev_ssp_slot()) != f.above() {
            self.refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: f.base });
            return Exit::PLAIN;
        }
        count!(cpu, tramp_calls);
        frame.rip = tramp;
        Exit::with(Action::Tramp1, e as *const SealedEntry as u64)
    }

    /// Shadow-gap path: one trap. The normal stack gets the return address
    /// in the entry stub's gap; the exit pushes it on the shadow stack by
    /// rebuilding the exception frame one slot lower.
    #[inline(always)]
    fn emulate_call_shadow_gap(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>, e: &SealedEntry) -> Exit {
        let Some(f) = f else {
            // No shadow stack: the classic emulation is all there is to do.
            count!(self.platform.cpu(), classic_calls);
            if self.push_normal(frame, e.ret_addr()) {
                frame.rip = e.target;
            }
            return Exit::PLAIN;
        };
        // The rebuilt frame uses the slot below F, and the return address
        // lands in F+16: F-8 .. F+24 must lie in one shadow stack.
        let room = self
            .platform
            .shadow_stack(f.base)
            .is_some_and(|s| s.holds_slots(f.base.wrapping_sub(8), ShadowFrame::SLOTS + 1));
        let same_stack = slot(f.prev_ssp_slot()) == f.above();
        if !(room && same_stack) {
            self.refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: f.base });
            return Exit::PLAIN;
        }
        if !self.push_normal(frame, e.ret_addr()) {
            return Exit::PLAIN;
        }
        count!(self.platform.cpu(), shadow_gap_calls);
        frame.rip = e.target;
        Exit::with(Action::CallShadowGap, e as *const SealedEntry as u64)
    }

    /// Second trap: both stacks must hold exactly the trampoline's two return
    /// addresses, and a first trap on these stacks must be pending; only then
    /// are they replaced by (target, return address).
    fn second_trap(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>) -> Exit {
        let cpu = self.platform.cpu();
        #[cfg(feature = "test-hooks")]
        self.platform.test_point(TestPoint::SecondTrap);
        let t = tramp::layout_at(self.platform.tramp_page());
        let verified = (|| -> Result<(PendingCall, bool), GuardError> {
            let rsp = frame.rsp;
            let pending = match f {
                Some(f) => {
                    // The record bound to this shadow stack: P+16 is the SSP
                    // of the first trap (the trampoline pushed two slots).
                    let p = slot(f.prev_ssp_slot());
                    if p != f.above() {
                        return Err(GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: p });
                    }
                    let rec = self.platform.find_record(f.base, p + 16).ok_or(GuardError::NoPendingEmulation)?;
                    let rsp_if = slot(rec + REC_RSP_IF);
                    if rsp_if & !1 != rsp.wrapping_add(16) {
                        return Err(GuardError::NoPendingEmulation);
                    }
                    check_tramp_slots(&t, StackKind::Shadow, [slot(p), slot(p + 8)])?;
                    let site = slot(rec + REC_SITE);
                    PendingCall {
                        site,
                        ret: site + SITE_LEN as u64,
                        target: slot(rec + REC_TARGET),
                        interrupts: rsp_if & 1 != 0,
                        rsp: rsp_if & !1,
                    }
                }
                // SAFETY: this CPU's LIFO, from its #BP handler.
                None => unsafe { cpu.lifo() }.top().ok_or(GuardError::NoPendingEmulation)?,
            };
            if !self.own_normal_slots(rsp, 2) {
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
                // SAFETY: slots verified above to be the trampoline's, on this
                // context's stack.
                unsafe {
                    (rsp as *mut u64).write_volatile(p.target);
                    ((rsp + 8) as *mut u64).write_volatile(p.ret);
                }
                #[cfg(feature = "test-hooks")]
                {
                    cpu.counters.stack_writes.fetch_add(2, Ordering::Relaxed);
                    if shadow {
                        cpu.counters.shadow_writes.fetch_add(2, Ordering::Relaxed);
                    }
                    cpu.counters.last_second_trap_if.store(frame.rflags & RFLAGS_IF, Ordering::Relaxed);
                }
                if !shadow {
                    // SAFETY: as above.
                    unsafe { cpu.lifo() }.pop();
                }
                if p.interrupts {
                    frame.rflags |= RFLAGS_IF;
                }
                count!(cpu, second_traps);
                self.window_exit();
                if shadow {
                    Exit::with(Action::Tramp2, 0)
                } else {
                    Exit::PLAIN
                }
            }
            Err(e) => {
                self.refuse(frame, e);
                Exit::PLAIN
            }
        }
    }

    /// The handler will not write: count, remember, tell the host.
    #[cold]
    fn refuse(&self, frame: &mut TrapFrame, error: GuardError) {
        let cpu = self.platform.cpu();
        count!(cpu, refusals);
        // SAFETY: per-CPU slot, written only by this CPU's handler.
        unsafe { *cpu.last_refusal.get() = Some(error) };
        self.platform.event(Event::Refused { frame, error });
    }

    /// Are `n` slots at `addr` inside the current context's normal stack?
    #[inline(always)]
    fn own_normal_slots(&self, addr: u64, n: u64) -> bool {
        self.platform.normal_stack(addr).is_some_and(|b| b.holds_slots(addr, n))
    }

    /// Emulate `push ret` on the interrupted stack (the entry stub's gap
    /// makes room). False (after refusing) if the slot is not ours to write.
    #[inline(always)]
    fn push_normal(&self, frame: &mut TrapFrame, ret: u64) -> bool {
        let slot = frame.rsp.wrapping_sub(8);
        let frame_end = frame as *const TrapFrame as u64 + core::mem::size_of::<TrapFrame>() as u64;
        if !self.own_normal_slots(slot, 1) || slot < frame_end {
            self.refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Normal, addr: slot });
            return false;
        }
        // SAFETY: a slot of the interrupted kernel stack above our own frame.
        unsafe { (slot as *mut u64).write_volatile(ret) };
        count!(self.platform.cpu(), stack_writes);
        frame.rsp = slot;
        true
    }

    /// Emulate `ret`: pop both stacks after checking their tops agree.
    fn emulate_ret(&self, frame: &mut TrapFrame, f: Option<ShadowFrame>, entry: u64) -> Exit {
        let rsp = frame.rsp;
        if !self.own_normal_slots(rsp, 1) {
            self.refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Normal, addr: rsp });
            return Exit::PLAIN;
        }
        // SAFETY: a slot of a kernel stack (checked above).
        let ret = unsafe { (rsp as *const u64).read_volatile() };
        if let Some(f) = f {
            let prev = slot(f.prev_ssp_slot());
            if prev != f.above() {
                self.refuse(frame, GuardError::SlotOutsideStack { stack: StackKind::Shadow, addr: prev });
                return Exit::PLAIN;
            }
            let shadow_ret = slot(prev);
            if shadow_ret != ret {
                self.refuse(
                    frame,
                    GuardError::SlotMismatch { stack: StackKind::Shadow, slot: 0, found: shadow_ret, expected: ret },
                );
                return Exit::PLAIN;
            }
        }
        frame.rip = ret;
        frame.rsp = rsp + 8;
        action_if_shadow(f, Action::Ret, entry)
    }
}

fn resume_at(frame: &mut TrapFrame, f: Option<ShadowFrame>, addr: u64) -> Exit {
    frame.rip = addr;
    if f.is_some() {
        Exit::with(Action::ResumeSite, 0)
    } else {
        Exit::PLAIN
    }
}

fn action_if_shadow(f: Option<ShadowFrame>, action: Action, entry: u64) -> Exit {
    if f.is_some() {
        Exit::with(action, entry)
    } else {
        Exit::PLAIN
    }
}

/// The engine driven by a second host: a mock platform over host memory
/// (one CPU, shadow stacks off), so the protocol and the classic and
/// trampoline paths run in `cargo test`.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::{CodeRegion, OPC_CALL_REL32, SEALED_MAGIC};
    use std::sync::Mutex;

    const TEXT_LEN: usize = 0x100;
    const SITE_OFF: usize = 0x10;
    const TARGET_A: usize = 0x40;
    const TARGET_B: usize = 0x80;
    const UNDECLARED: usize = 0xc0;
    const STACK_LEN: usize = 0x1000;

    fn leak(len: usize, fill: u8) -> u64 {
        // A page-aligned block: the trampoline's layout is page-relative.
        let v = vec![fill; len + 4096].leak();
        let p = v.as_mut_ptr() as u64;
        (p + 4095) & !4095
    }

    struct Mock {
        text: u64,
        tramp: u64,
        sealed: u64,
        stack: u64,
        sites: &'static [u64],
        targets: &'static [u64],
        forbidden: [CodeRange; 1],
        cpu: CpuState,
        syncs: AtomicU64,
        events: Mutex<Vec<String>>,
    }

    impl Mock {
        fn new() -> Self {
            let text = leak(TEXT_LEN, 0xcc);
            let bytes = |off: usize| (text + off as u64) as *mut u8;
            // SAFETY: inside the leaked text block.
            unsafe {
                // site: call TARGET_A; the targets: `ret`.
                let rel = (TARGET_A as i32) - (SITE_OFF as i32 + 5);
                *bytes(SITE_OFF) = OPC_CALL_REL32;
                core::ptr::copy_nonoverlapping(rel.to_le_bytes().as_ptr(), bytes(SITE_OFF + 1), 4);
                for t in [TARGET_A, TARGET_B, UNDECLARED] {
                    *bytes(t) = 0xc3;
                }
            }
            let tramp = leak(4096, 0xcc);
            let a = |off: usize| text + off as u64;
            Mock {
                text,
                tramp,
                sealed: leak(4096, 0),
                stack: leak(STACK_LEN, 0),
                sites: vec![a(SITE_OFF)].leak(),
                targets: vec![a(TARGET_A), a(TARGET_B)].leak(),
                forbidden: [CodeRange { start: tramp, end: tramp + 4096, region: CodeRegion::Trampoline }],
                cpu: CpuState::new(),
                syncs: AtomicU64::new(0),
                events: Mutex::new(Vec::new()),
            }
        }
        fn at(&self, off: usize) -> u64 {
            self.text + off as u64
        }
        fn text_bytes(&self) -> Vec<u8> {
            self.text().bytes.to_vec()
        }
        /// A trap frame at the bottom of the mock stack, with RSP near its top.
        fn frame(&self, rip: u64) -> &'static mut TrapFrame {
            // SAFETY: the leaked, zeroed, 16-aligned stack block, unused otherwise.
            let f = unsafe { &mut *(self.stack as *mut TrapFrame) };
            *f = TrapFrame::default();
            f.rip = rip;
            f.rsp = self.stack + STACK_LEN as u64 - 64;
            f
        }
    }

    fn write(at: u64, bytes: &[u8]) {
        // SAFETY: the mock's own leaked blocks.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
    }

    // SAFETY: the mock's blocks are leaked (never freed), and one test thread
    // drives one mock.
    unsafe impl Platform for Mock {
        fn text(&self) -> Text<'static> {
            // SAFETY: the leaked text block.
            Text { base: self.text, bytes: unsafe { core::slice::from_raw_parts(self.text as *const u8, TEXT_LEN) } }
        }
        fn sites(&self) -> &'static [u64] {
            self.sites
        }
        fn targets(&self) -> &'static [u64] {
            self.targets
        }
        fn forbidden_code(&self) -> &[CodeRange] {
            &self.forbidden
        }
        fn tramp_page(&self) -> u64 {
            self.tramp
        }
        fn sealed_area(&self) -> (u64, u64) {
            (self.sealed, self.sealed + 4096)
        }
        fn poke(&self, pokes: Pokes<'_>) -> bool {
            for p in pokes.iter() {
                match p {
                    Poke::Int3(e) => write(e.site, &[INT3]),
                    Poke::Tails(e) => write(e.site + 1, &e.site_bytes()[1..]),
                    Poke::Head(e) => write(e.site, &e.site_bytes()[..1]),
                    Poke::Sealed { offset, bytes } => write(self.sealed + offset, bytes),
                    Poke::Publish => write(self.sealed, &SEALED_MAGIC.to_le_bytes()),
                    Poke::Unseal => write(self.sealed, &[0; 8]),
                    Poke::Tramp => write(self.tramp, &tramp::TRAMP_BYTES),
                }
            }
            true
        }
        fn sync(&self) {
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        fn normal_stack(&self, addr: u64) -> Option<StackBounds> {
            let b = StackBounds { lo: self.stack, hi: self.stack + STACK_LEN as u64 };
            (addr >= b.lo && addr < b.hi).then_some(b)
        }
        fn shadow_stack(&self, _addr: u64) -> Option<StackBounds> {
            None
        }
        fn find_record(&self, _f_base: u64, _bound_ssp: u64) -> Option<u64> {
            None
        }
        fn cpu(&self) -> &CpuState {
            &self.cpu
        }
        fn for_each_cpu(&self, f: &mut dyn FnMut(&CpuState)) {
            f(&self.cpu)
        }
        fn event(&self, e: Event<'_>) {
            self.events.lock().unwrap().push(format!("{e:?}"));
        }
    }

    fn patcher(s: Strategy) -> &'static Patcher<Mock> {
        let p = Box::leak(Box::new(Patcher::new(Mock::new())));
        p.init(s).expect("init");
        p
    }

    #[test]
    fn classic_call_emulated_inside_the_window_and_text_patched() {
        let p = patcher(Strategy::Classic);
        let m = p.platform();
        let (site, b) = (m.at(SITE_OFF), m.at(TARGET_B));
        let mut seen = Vec::new();
        let stats = p
            .patch(&[(site, NewInsn::Call(b))], |step| {
                // The CPU runs the site: its int3 traps.
                // SAFETY: the mock's text.
                assert_eq!(unsafe { *(site as *const u8) }, INT3);
                let f = m.frame(site + 1);
                let rsp = f.rsp;
                assert_eq!(p.handle_int3(f), Int3::Handled(Exit::PLAIN));
                assert_eq!(f.rip, b, "resumes at the new target");
                assert_eq!(f.rsp, rsp - 8, "one slot pushed");
                // SAFETY: the mock stack.
                assert_eq!(unsafe { *(f.rsp as *const u64) }, site + SITE_LEN as u64, "the return address");
                seen.push(step);
            })
            .expect("a valid batch");
        assert_eq!(seen, [Step::Int3Written, Step::TailsWritten]);
        // Three steps, and without shadow stacks the retirement's round.
        assert_eq!(stats.sync_rounds, 4);
        assert_eq!(&m.text_bytes()[SITE_OFF..SITE_OFF + 5], &NewInsn::Call(b).encode(site).unwrap());
        assert!(!p.batch_live(), "the batch retired");
        #[cfg(feature = "test-hooks")]
        assert_eq!(m.cpu.counters.classic_calls.load(Ordering::Relaxed), 2);
        assert_eq!(m.cpu.batch_refs.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn trampoline_first_trap_records_the_call_and_enters_the_trampoline() {
        let p = patcher(Strategy::Trampoline);
        let m = p.platform();
        let (site, b) = (m.at(SITE_OFF), m.at(TARGET_B));
        p.patch(&[(site, NewInsn::Call(b))], |step| {
            if step != Step::Int3Written {
                return;
            }
            let f = m.frame(site + 1);
            f.rflags = crate::frame::RFLAGS_IF;
            assert_eq!(p.handle_int3(f), Int3::Handled(Exit::PLAIN));
            assert_eq!(f.rip, m.tramp, "into the trampoline");
            assert_eq!(f.rflags & crate::frame::RFLAGS_IF, 0, "interrupts off until the second trap");
            assert_eq!(m.cpu.lifo_depth(), 1);
            // SAFETY: the test owns this CPU's LIFO.
            unsafe { m.cpu.lifo() }.truncate(0);
        })
        .unwrap();
        #[cfg(feature = "test-hooks")]
        assert_eq!(m.cpu.counters.tramp_calls.load(Ordering::Relaxed), 1);
    }

    /// Counts this thread's heap allocations (the tests run in threads).
    struct Counting;
    std::thread_local!(static ALLOCS: core::cell::Cell<u64> = const { core::cell::Cell::new(0) });
    // SAFETY: forwards to the system allocator; the count is thread-local.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
            ALLOCS.with(|a| a.set(a.get() + 1));
            // SAFETY: the caller's contract, passed on.
            unsafe { std::alloc::System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
            // SAFETY: as above.
            unsafe { std::alloc::System.dealloc(p, l) }
        }
    }
    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn allocations(f: impl FnOnce()) -> u64 {
        let a0 = ALLOCS.with(|a| a.get());
        f();
        ALLOCS.with(|a| a.get()) - a0
    }

    #[test]
    fn a_single_site_patch_does_not_allocate() {
        let p = patcher(Strategy::Classic);
        let m = p.platform();
        let (site, a, b) = (m.at(SITE_OFF), m.at(TARGET_A), m.at(TARGET_B));
        let mut rips = [0u64; 2];
        let n = allocations(|| {
            let mut i = 0;
            p.patch_one(site, NewInsn::Call(b), |_| {
                let f = m.frame(site + 1);
                assert_eq!(p.handle_int3(f), Int3::Handled(Exit::PLAIN));
                rips[i] = f.rip;
                i += 1;
            })
            .unwrap();
        });
        assert_eq!(n, 0, "patch_one allocated");
        assert_eq!(rips, [b, b], "emulated inside the window");
        assert_eq!(&m.text_bytes()[SITE_OFF..SITE_OFF + 5], &NewInsn::Call(b).encode(site).unwrap());
        assert!(!p.batch_live());
        // The control: a batch of the same site allocates (the counter counts).
        assert!(allocations(|| assert!(p.patch(&[(site, NewInsn::Call(a))], |_| {}).is_ok())) > 0);
        // Refusals are the batch's: an undeclared target, text unchanged.
        let before = m.text_bytes();
        let r = p.patch_one(site, NewInsn::Call(m.at(UNDECLARED)), |_| unreachable!());
        assert!(matches!(r, Err(PatchError::UnknownTarget { .. })), "{r:?}");
        assert_eq!(m.text_bytes(), before);
    }

    #[test]
    fn not_ours_and_refusals_go_to_the_host() {
        let p = patcher(Strategy::Classic);
        let m = p.platform();
        // An int3 the engine has no site for: the host's.
        let f = m.frame(m.at(UNDECLARED) + 1);
        assert_eq!(p.handle_int3(f), Int3::NotOurs);
        assert!(m.events.lock().unwrap().iter().any(|e| e.starts_with("Breakpoint")));
        // An undeclared target: refused, text unchanged, nothing synced.
        let (before, syncs) = (m.text_bytes(), m.syncs.load(Ordering::Relaxed));
        let r = p.patch(&[(m.at(SITE_OFF), NewInsn::Call(m.at(UNDECLARED)))], |_| unreachable!());
        assert!(matches!(r, Err(PatchError::UnknownTarget { .. })), "{r:?}");
        assert_eq!(m.text_bytes(), before);
        assert_eq!(m.syncs.load(Ordering::Relaxed), syncs);
        // A trap whose stack slot is not the context's: refused, nothing written.
        let site = m.at(SITE_OFF);
        p.patch(&[(site, NewInsn::Call(m.at(TARGET_B)))], |step| {
            if step == Step::Int3Written {
                let f = m.frame(site + 1);
                f.rsp = 0x1000;
                assert_eq!(p.handle_int3(f), Int3::Handled(Exit::PLAIN));
                assert_eq!((f.rip, f.rsp), (site + 1, 0x1000), "frame unchanged");
            }
        })
        .unwrap();
        #[cfg(feature = "test-hooks")]
        assert_eq!(m.cpu.counters.refusals.load(Ordering::Relaxed), 1);
        assert!(matches!(m.cpu.last_refusal(), Some(GuardError::SlotOutsideStack { stack: StackKind::Normal, .. })));
        assert!(m.events.lock().unwrap().iter().any(|e| e.starts_with("Refused")));
    }

    #[test]
    fn an_int3_at_a_site_with_no_live_batch_resumes_at_the_site() {
        let p = patcher(Strategy::Classic);
        let m = p.platform();
        let site = m.at(SITE_OFF);
        write(site, &[INT3]);
        let f = m.frame(site + 1);
        assert_eq!(p.handle_int3(f), Int3::Handled(Exit::PLAIN));
        assert_eq!(f.rip, site, "executes the site again");
        assert!(m.events.lock().unwrap().iter().any(|e| e.starts_with("Int3Race")));
    }
}
