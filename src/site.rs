//! Patchable call sites declared from Rust: [`patch_site!`](crate::patch_site).
//!
//! A site is a tiny function of its own, written in asm so its bytes are
//! exactly known:
//!
//! ```text
//! entry:      sub  $8, %rsp        ; the callee sees a 16-byte aligned call
//! entry+4:    call <target>        ; the 5-byte site, in .shadowcall_sites
//!             add  $8, %rsp
//!             ret
//! ```
//!
//! Arguments and the return value pass through untouched (the SysV
//! argument registers and RAX are not used by the wrapper), so a site has
//! any `extern "C"` signature. The site's address goes into the read-only
//! `.shadowcall_sites` table and every target the declaration names into
//! `.shadowcall_targets`: a patch may point the site only at those
//! (DESIGN.md §11). Calling the site is calling its entry
//! ([`Site::get`]); updating it live is a patch of [`Site::addr`] to
//! [`Site::call_to`] (static-call style) or to [`Site::nop`] and back
//! (jump-label style, only for sites without a return value).
//!
//! A host kernel's linker script keeps both tables and brackets them:
//!
//! ```text
//! .rodata : {
//!     __sites_start = .;   KEEP(*(.shadowcall_sites))   __sites_end = .;
//!     __targets_start = .; KEEP(*(.shadowcall_targets)) __targets_end = .;
//! }
//! ```

use crate::patch::NewInsn;

/// Bytes from a site's entry to its 5-byte call (`sub $8, %rsp`).
pub const SITE_OFFSET: u64 = 4;

/// Function-pointer types a site can have: `extern "C" fn(..) -> R` with up
/// to six arguments.
pub trait SiteFn: Copy + 'static {
    /// The function's address.
    fn addr(self) -> u64;
}

macro_rules! site_fn_impls {
    ($( ($($a:ident),*) )*) => {$(
        impl<R: 'static, $($a: 'static),*> SiteFn for extern "C" fn($($a),*) -> R {
            #[inline]
            fn addr(self) -> u64 {
                self as usize as u64
            }
        }
    )*};
}
site_fn_impls! { () (A) (A, B) (A, B, C) (A, B, C, D) (A, B, C, D, E) (A, B, C, D, E, G) }

/// A patchable call site made by [`patch_site!`](crate::patch_site).
pub struct Site<F: SiteFn> {
    entry: F,
    default: F,
    targets: &'static [F],
    returns_value: bool,
}

/// Why a [`Site`] refused to make an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteError {
    /// The target is neither the site's default nor one of its declared
    /// targets, so it is not in `.shadowcall_targets` on its behalf.
    UndeclaredTarget(u64),
    /// A site whose function returns a value cannot become a NOP: the
    /// caller would read a stale RAX.
    ReturnsValue,
}

impl core::fmt::Display for SiteError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SiteError::UndeclaredTarget(t) => write!(f, "target {t:#x} is not declared for this patch site"),
            SiteError::ReturnsValue => f.write_str("a patch site that returns a value cannot be patched to a NOP"),
        }
    }
}

impl<F: SiteFn> Site<F> {
    #[doc(hidden)]
    pub const fn __new(entry: F, default: F, targets: &'static [F], returns_value: bool) -> Self {
        Site { entry, default, targets, returns_value }
    }

    /// The function to call: `SITE.get()(args)`.
    #[inline(always)]
    pub fn get(&self) -> F {
        self.entry
    }

    /// The address of the 5-byte call, as registered in `.shadowcall_sites`.
    pub fn addr(&self) -> u64 {
        self.entry.addr() + SITE_OFFSET
    }

    /// The target the site was declared with (and holds at boot).
    pub fn default_target(&self) -> F {
        self.default
    }

    /// The instruction that points the site at `target` (the default or a
    /// declared target).
    pub fn call_to(&self, target: F) -> Result<NewInsn, SiteError> {
        let t = target.addr();
        if t == self.default.addr() || self.targets.iter().any(|x| x.addr() == t) {
            Ok(NewInsn::Call(t))
        } else {
            Err(SiteError::UndeclaredTarget(t))
        }
    }

    /// The instruction that turns the site off (a 5-byte NOP).
    pub fn nop(&self) -> Result<NewInsn, SiteError> {
        if self.returns_value {
            Err(SiteError::ReturnsValue)
        } else {
            Ok(NewInsn::Nop)
        }
    }

    /// `(site, instruction)` pointing the site back at its default.
    pub fn restore(&self) -> (u64, NewInsn) {
        (self.addr(), NewInsn::Call(self.default.addr()))
    }
}

/// Sort a registration table (`.shadowcall_sites` or `.shadowcall_targets`)
/// in place. The engine searches both tables where they lie, read-only, so
/// they must be sorted by address; entries of Rust sites land in link
/// order. A host calls this once per table early at boot, while the image
/// is still writable, before it maps `.rodata` read-only, unless it sorts
/// the sections after linking (the reference kernel's build does). A target
/// may appear twice (several sites may declare it); a site may not.
///
/// # Safety
/// `[start, end)` is the whole table, writable now, and nothing else reads
/// or writes it meanwhile (one CPU, early boot).
pub unsafe fn sort_table(start: *mut u64, end: *mut u64) {
    // SAFETY: the caller's obligation: `[start, end)` is one writable table.
    let table = unsafe { core::slice::from_raw_parts_mut(start, end.offset_from(start) as usize) };
    table.sort_unstable();
}

#[doc(hidden)]
#[macro_export]
macro_rules! __site_discard {
    ($($t:tt)*) => {
        ""
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __site_returns {
    () => {
        false
    };
    ($ret:ty) => {
        true
    };
}

/// Declare a patchable call site: a `static` [`Site`](crate::site::Site)
/// whose function calls `default` through a registered 5-byte `call`, and
/// may later be pointed at any of the listed targets (or, without a return
/// value, turned into a NOP).
///
/// ```
/// extern "C" fn slow(x: u64) -> u64 { x + 1 }
/// extern "C" fn fast(x: u64) -> u64 { x + 2 }
///
/// shadowcall::patch_site! {
///     /// Incremented by the fastest implementation available.
///     pub static BUMP: extern "C" fn(u64) -> u64 = slow, [fast];
/// }
///
/// assert_eq!(BUMP.get()(1), 2);
/// use shadowcall::site::SiteFn;
/// let fast_fn: extern "C" fn(u64) -> u64 = fast;
/// assert_eq!(BUMP.call_to(fast), Ok(shadowcall::patch::NewInsn::Call(fast_fn.addr())));
/// assert!(BUMP.nop().is_err()); // it returns a value
/// ```
#[macro_export]
macro_rules! patch_site {
    ($(#[$m:meta])* $vis:vis static $name:ident : extern "C" fn($($arg:ty),* $(,)?) $(-> $ret:ty)?
        = $default:path $(, [$($t:path),* $(,)?])? $(;)?) => {
        $(#[$m])*
        $vis static $name: $crate::site::Site<extern "C" fn($($arg),*) $(-> $ret)?> = {
            #[unsafe(naked)]
            extern "C" fn entry($(_: $arg),*) $(-> $ret)? {
                // The wrapper touches only RSP and the flags; the call is the
                // site (entry + SITE_OFFSET), registered with its targets.
                core::arch::naked_asm!(
                    "sub rsp, 8",
                    "2:",
                    "call {default}",
                    "add rsp, 8",
                    "ret",
                    ".pushsection .shadowcall_sites, \"a\"",
                    ".balign 8",
                    ".quad 2b",
                    ".popsection",
                    ".pushsection .shadowcall_targets, \"a\"",
                    ".balign 8",
                    ".quad {default}",
                    $($(concat!(".quad {}", $crate::__site_discard!($t)),)*)?
                    ".popsection",
                    $($(sym $t,)*)?
                    default = sym $default,
                )
            }
            const TARGETS: &[extern "C" fn($($arg),*) $(-> $ret)?] = &[$($($t),*)?];
            $crate::site::Site::__new(entry, $default, TARGETS, $crate::__site_returns!($($ret)?))
        };
    };
}

#[cfg(test)]
mod tests {
    use super::SiteFn;
    use crate::patch::{NewInsn, SITE_LEN};

    extern "C" fn one() -> u64 {
        1
    }
    extern "C" fn two() -> u64 {
        2
    }
    extern "C" fn three() -> u64 {
        3
    }
    extern "C" fn add(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
        a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f
    }
    static mut HITS: u64 = 0;
    extern "C" fn hit() {
        // SAFETY: single-threaded test.
        unsafe { HITS += 1 };
    }

    crate::patch_site! { static NUM: extern "C" fn() -> u64 = one, [two]; }
    crate::patch_site! { static SUM: extern "C" fn(u64, u64, u64, u64, u64, u64) -> u64 = add; }
    crate::patch_site! { static HOOK: extern "C" fn() = hit; }

    fn f(func: extern "C" fn() -> u64) -> u64 {
        func.addr()
    }

    fn text(addr: u64) -> [u8; SITE_LEN] {
        // SAFETY: reading our own mapped text.
        unsafe { *(addr as *const [u8; SITE_LEN]) }
    }

    #[test]
    fn sites_call_their_default_with_arguments_intact() {
        assert_eq!(NUM.get()(), 1);
        assert_eq!(SUM.get()(1, 2, 3, 4, 5, 6), add(1, 2, 3, 4, 5, 6));
        HOOK.get()();
        // SAFETY: single-threaded test.
        assert_eq!(unsafe { HITS }, 1);
    }

    #[test]
    fn the_site_is_a_call_to_the_default() {
        let sum: extern "C" fn(u64, u64, u64, u64, u64, u64) -> u64 = add;
        for (site, target) in [(NUM.addr(), f(one)), (SUM.addr(), sum.addr())] {
            assert_eq!(NewInsn::Call(target).encode(site), Ok(text(site)), "site {site:#x}");
        }
    }

    #[test]
    fn only_declared_targets() {
        assert_eq!(NUM.call_to(two), Ok(NewInsn::Call(f(two))));
        assert_eq!(NUM.call_to(one), Ok(NewInsn::Call(f(one))));
        assert!(matches!(NUM.call_to(three), Err(super::SiteError::UndeclaredTarget(_))));
        assert_eq!(NUM.nop(), Err(super::SiteError::ReturnsValue));
        assert_eq!(HOOK.nop(), Ok(NewInsn::Nop));
    }
}
