//! Sites declared from Rust with the engine's `patch_site!`, patched live
//! through the same protocol as the asm sites, under every strategy.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall::patch::{NewInsn, SITE_LEN};
use shadowcall::site::{SiteError, SiteFn};
use shadowcall_support::ktap::Outcome;

use crate::percpu::this_cpu;
use crate::{cet, patching, BootState};

const VALUE_A: u64 = 0xa1;
const VALUE_B: u64 = 0xb2;
const VALUE_C: u64 = 0xc3;

extern "C" fn value_a(x: u64) -> u64 {
    x + VALUE_A
}
extern "C" fn value_b(x: u64) -> u64 {
    x + VALUE_B
}
/// Never declared as a target of any site.
extern "C" fn value_c(x: u64) -> u64 {
    x + VALUE_C
}

static HOOK_HITS: AtomicU64 = AtomicU64::new(0);
extern "C" fn hook_count() {
    HOOK_HITS.fetch_add(1, Ordering::Relaxed);
}

shadowcall::patch_site! {
    /// A static call: `value_a` at boot, `value_b` once patched.
    static VALUE: extern "C" fn(u64) -> u64 = value_a, [value_b];
}
shadowcall::patch_site! {
    /// The same two targets the other way round: each is registered twice in
    /// `.shadowcall_targets` (allowed; the searches find an equal word).
    static VALUE2: extern "C" fn(u64) -> u64 = value_b, [value_a];
}
shadowcall::patch_site! {
    /// A jump label: on (calls `hook_count`) or off (a NOP).
    static HOOK: extern "C" fn() = hook_count;
}

fn emulations() -> Option<u64> {
    super::engine_count!(this_cpu(), emulations)
}

fn bytes(site: u64) -> [u8; SITE_LEN] {
    // SAFETY: sites lie in readable kernel text.
    unsafe { *(site as *const [u8; SITE_LEN]) }
}

/// Which entry point of the patcher a test uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Patch {
    /// `patch`, a batch of one.
    Batch,
    /// `patch_one`, the single-site patch that does not allocate.
    One,
}

/// Patch `site` to `insn` through `how`, calling it inside the window after
/// steps 1 and 2 (the call traps and is emulated) and once after;
/// `check(value)` each.
fn patch_calling_with(
    how: Patch,
    errors: &mut Vec<String>,
    what: &str,
    site: u64,
    insn: NewInsn,
    call: impl Fn() -> u64,
    check: impl Fn(u64) -> bool,
) {
    let em0 = emulations();
    let ssp0 = cet::rdssp();
    let mut seen = Vec::new();
    let r = match how {
        Patch::Batch => patching::patch(&[(site, insn)], |_| seen.push(call())),
        Patch::One => patching::patch_one(site, insn, |_| seen.push(call())),
    };
    match r {
        Err(e) => {
            errors.push(format!("{what}: patch refused: {e}"));
            return;
        }
        Ok(stats) => {
            if let Some(f) = stats.hook_fault {
                errors.push(format!("{what}: fault calling the site inside the window: {f}"));
            }
        }
    }
    if seen.len() != 2 {
        errors.push(format!("{what}: {} of 2 calls inside the window returned", seen.len()));
    }
    if insn.encode(site).ok() != Some(bytes(site)) {
        errors.push(format!("{what}: the site does not hold the new instruction"));
    }
    for (i, v) in seen.iter().enumerate() {
        if !check(*v) {
            errors.push(format!("{what}: call {i} inside the window returned {v:#x}"));
        }
    }
    let after = call();
    if !check(after) {
        errors.push(format!("{what}: the call after the patch returned {after:#x}"));
    }
    if let Some(n) = super::since(emulations(), em0).filter(|&n| n < 2) {
        errors.push(format!("{what}: {n} emulations for 2 calls inside the window"));
    }
    if cet::rdssp() != ssp0 {
        errors.push(format!("{what}: SSP {:#x} -> {:#x}", ssp0, cet::rdssp()));
    }
}

/// VALUE called with 1.
fn call_value() -> u64 {
    VALUE.get()(1)
}

/// HOOK called: how many times its target ran (1 on, 0 as a NOP).
fn call_hook() -> u64 {
    let h0 = HOOK_HITS.load(Ordering::Relaxed);
    HOOK.get()();
    HOOK_HITS.load(Ordering::Relaxed) - h0
}

/// Under every strategy this CPU runs (and one the command line forced:
/// classic with shadow stacks on, the negative control, which must end in
/// #CP), through `how`: VALUE retargeted to value_b and back, HOOK turned
/// off and on, each called inside the window; then `more(strategy)`.
fn round_trips(how: Patch, errors: &mut Vec<String>, mut more: impl FnMut(&str, &mut Vec<String>)) {
    let (value, hook) = (VALUE.addr(), HOOK.addr());
    let saved = patching::strategy();
    let mut strategies = patching::strategies_here();
    if !strategies.contains(&saved) {
        strategies.push(saved);
    }
    for strategy in strategies {
        patching::set_strategy(strategy);
        let s = strategy.name();
        match VALUE.call_to(value_b) {
            // Inside the window the emulation runs the new instruction.
            Ok(insn) => {
                patch_calling_with(how, errors, &format!("{s}: value_a -> value_b"), value, insn, call_value, |v| {
                    v == 1 + VALUE_B
                })
            }
            Err(e) => errors.push(format!("{s}: call_to(value_b): {e}")),
        }
        let (site, insn) = VALUE.restore();
        patch_calling_with(how, errors, &format!("{s}: value_b -> value_a"), site, insn, call_value, |v| {
            v == 1 + VALUE_A
        });
        match HOOK.nop() {
            Ok(insn) => patch_calling_with(how, errors, &format!("{s}: hook off"), hook, insn, call_hook, |n| n == 0),
            Err(e) => errors.push(format!("{s}: HOOK.nop(): {e}")),
        }
        let (site, insn) = HOOK.restore();
        patch_calling_with(how, errors, &format!("{s}: hook on"), site, insn, call_hook, |n| n == 1);
        more(s, errors);
    }
    patching::set_strategy(saved);
}

/// `patch_site!` sites: a value-returning static call retargeted and back,
/// a jump label turned off and on, each called inside the window under
/// every strategy this CPU runs; undeclared targets and a NOP for a
/// value-returning site are refused, text unchanged.
pub fn patch_site_macro(_st: &BootState) -> Outcome<'static> {
    let mut errors = Vec::new();
    let (value, hook) = (VALUE.addr(), HOOK.addr());
    round_trips(Patch::Batch, &mut errors, |s, errors| {
        let call_value2 = || VALUE2.get()(1);
        match VALUE2.call_to(value_a) {
            Ok(insn) => patch_calling_with(
                Patch::Batch,
                errors,
                &format!("{s}: value2 -> value_a"),
                VALUE2.addr(),
                insn,
                call_value2,
                |v| v == 1 + VALUE_A,
            ),
            Err(e) => errors.push(format!("{s}: VALUE2.call_to(value_a): {e}")),
        }
        let (site, insn) = VALUE2.restore();
        patch_calling_with(Patch::Batch, errors, &format!("{s}: value2 back"), site, insn, call_value2, |v| {
            v == 1 + VALUE_B
        });
    });

    // Refusals: nothing declared, nothing written.
    let before = (bytes(value), bytes(hook));
    let undeclared: extern "C" fn(u64) -> u64 = value_c;
    if VALUE.call_to(value_c) != Err(SiteError::UndeclaredTarget(undeclared.addr())) {
        errors.push(format!("call_to(value_c) not refused: {:?}", VALUE.call_to(value_c)));
    }
    if VALUE.nop() != Err(SiteError::ReturnsValue) {
        errors.push("a value-returning site offered a NOP".into());
    }
    if patching::patch(&[(value, NewInsn::Call(undeclared.addr()))], |_| {}).is_ok() {
        errors.push("the patcher accepted a target outside .shadowcall_targets".into());
    }
    if (bytes(value), bytes(hook)) != before {
        errors.push("a refused patch changed a site".into());
    }
    if call_value() != 1 + VALUE_A || call_hook() != 1 {
        errors.push("the sites do not call their defaults at the end".into());
    }
    super::outcome_of(&errors)
}

/// `patch_one`, the single-site patch that does not allocate: the static
/// call retargeted and back and the jump label off and on, each called
/// inside the window under every strategy this CPU runs (with classic
/// emulation forced under shadow stacks it must fail with #CP); an
/// undeclared target refused, text unchanged.
pub fn patch_one_site(_st: &BootState) -> Outcome<'static> {
    let mut errors = Vec::new();
    let value = VALUE.addr();
    round_trips(Patch::One, &mut errors, |_, _| {});
    let before = bytes(value);
    let undeclared: extern "C" fn(u64) -> u64 = value_c;
    if patching::patch_one(value, NewInsn::Call(undeclared.addr()), |_| {}).is_ok() {
        errors.push("patch_one accepted a target outside .shadowcall_targets".into());
    }
    if bytes(value) != before || patching::batch_live() {
        errors.push("a refused patch_one changed the site or left a batch live".into());
    }
    super::outcome_of(&errors)
}
