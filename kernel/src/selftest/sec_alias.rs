//! Threat-model self-test (issue 8, point 6): the writable alias through
//! which text is patched exists only in the patching CPU's private address
//! space, and the sealed area is read-only to ordinary stores.
//!
//! Another CPU (every other online CPU) probes, in a loop: a load and a write
//! access at the alias address, a load and a write access in the sealed area.
//! The alias accesses must raise a not-present #PF, the sealed write a
//! write-protect #PF, the sealed load must succeed. Meanwhile this CPU holds
//! the alias mapped (on a text page, then on a sealed page) and runs a real
//! patch, waiting for probe rounds while the alias is live, inside the window
//! (after steps 1 and 2) and after each patch. Text outside the site must stay
//! byte-identical.
//!
//! The write probes are a locked compare-exchange of a byte with itself: a
//! write access (it faults exactly as a store does) that leaves memory as it
//! was even when it succeeds, so a broken kernel shows up in the counts
//! without text being corrupted under the running code.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use shadowcall::patch::{NewInsn, SITE_LEN};
use shadowcall_support::ktap::Outcome;
use shadowcall_support::paging::{Pte, PAGE_SIZE};

use crate::patching::{self, Step};
use crate::percpu::{self, this_cpu};
use crate::recover::{try_run, FaultInfo, VEC_PF};
use crate::{mm, smp, BootState};

extern "C" {
    fn sc_t_target_a();
    fn sc_t_target_b();
    static sc_t_site_call: u8;
}

/// #PF error-code bits.
const PF_PRESENT: u64 = 1 << 0;
const PF_WRITE: u64 = 1 << 1;
/// Probe rounds (by all probing CPUs together) to wait for at each point.
const ROUNDS_PER_POINT: u64 = 4;
/// Spins before a wait for probe rounds gives up (a stalled prober).
const WAIT_SPINS: u64 = 400_000_000;
/// Where in the sealed area the probes (and this CPU's alias write) go.
const SEALED_PROBE_OFFSET: u64 = 3 * PAGE_SIZE + 0x88;

static STOP: AtomicBool = AtomicBool::new(false);
/// Completed probe rounds (each: 2 alias probes, 2 sealed probes).
static ROUNDS: AtomicU64 = AtomicU64::new(0);
/// Alias accesses that raised the expected not-present #PF.
static ALIAS_FAULTS: AtomicU64 = AtomicU64::new(0);
/// Sealed-area write accesses that raised the expected write-protect #PF.
static SEALED_FAULTS: AtomicU64 = AtomicU64::new(0);
/// Accesses that did anything else (succeeded, or another fault).
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The first violation: what, vector (u64::MAX: no fault), error code, CR2.
static FIRST_VIOLATION: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Load = 0,
    Write = 1,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    NotPresent,
    WriteProtect,
    Success,
}

/// Kinds of probe, for the violation report.
const PROBE_NAMES: [&str; 4] = ["alias load", "alias write", "sealed load", "sealed write"];

fn access(addr: u64, a: Access) -> Result<u64, FaultInfo> {
    try_run(|| match a {
        // SAFETY: a deliberate load that must fault (or read mapped memory); the #PF is caught.
        Access::Load => unsafe { (addr as *const u8).read_volatile() as u64 },
        Access::Write => {
            // SAFETY: a deliberate locked write access that must fault; if it
            // does not, it writes back the byte that is there (no change).
            let b = unsafe { &*(addr as *const AtomicU8) };
            let _ = b.compare_exchange(0, 0, Ordering::SeqCst, Ordering::SeqCst);
            0
        }
    })
}

/// Does `r` (an access of kind `a` at `addr`) show what `e` expects? A
/// not-present fault of a write access may report W=0 (a locked RMW reads
/// first: QEMU TCG reports it as a read); a write-protect fault must have W=1
/// (the read part of that access was allowed).
fn as_expected(r: &Result<u64, FaultInfo>, addr: u64, a: Access, e: Expect) -> bool {
    let pf_at = |f: &FaultInfo| f.vector == VEC_PF && f.cr2 == addr;
    match (r, e) {
        (Ok(_), Expect::Success) => true,
        (Err(f), Expect::NotPresent) => {
            pf_at(f) && f.error_code & PF_PRESENT == 0 && (a == Access::Write || f.error_code & PF_WRITE == 0)
        }
        (Err(f), Expect::WriteProtect) => pf_at(f) && f.error_code & (PF_PRESENT | PF_WRITE) == PF_PRESENT | PF_WRITE,
        _ => false,
    }
}

fn probe(what: usize, addr: u64, a: Access, e: Expect) {
    let r = access(addr, a);
    if !as_expected(&r, addr, a, e) {
        if VIOLATIONS.fetch_add(1, Ordering::SeqCst) == 0 {
            let (v, code, cr2) = match r {
                Ok(_) => (u64::MAX, 0, 0),
                Err(f) => (f.vector, f.error_code, f.cr2),
            };
            for (slot, x) in FIRST_VIOLATION.iter().zip([what as u64, v, code, cr2]) {
                slot.store(x, Ordering::SeqCst);
            }
        }
        return;
    }
    match e {
        Expect::NotPresent => ALIAS_FAULTS.fetch_add(1, Ordering::SeqCst),
        Expect::WriteProtect => SEALED_FAULTS.fetch_add(1, Ordering::SeqCst),
        Expect::Success => 0,
    };
}

/// The probing loop another CPU runs until STOP (`alias` is the probed alias address).
fn prober(alias: u64) {
    let sealed = mm::sealed_area().0 + SEALED_PROBE_OFFSET;
    while !STOP.load(Ordering::SeqCst) {
        probe(0, alias, Access::Load, Expect::NotPresent);
        probe(1, alias, Access::Write, Expect::NotPresent);
        probe(2, sealed, Access::Load, Expect::Success);
        probe(3, sealed, Access::Write, Expect::WriteProtect);
        ROUNDS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Wait until the probing CPUs have completed `n` more rounds; the rounds seen.
fn wait_rounds(n: u64) -> Result<u64, String> {
    let r0 = ROUNDS.load(Ordering::SeqCst);
    for _ in 0..WAIT_SPINS {
        let r = ROUNDS.load(Ordering::SeqCst);
        if r >= r0 + n {
            return Ok(r - r0);
        }
        core::hint::spin_loop();
    }
    Err(format!("the probing CPUs did not complete {n} rounds"))
}

fn site_bytes(site: u64) -> [u8; SITE_LEN] {
    // SAFETY: sites lie in readable kernel text.
    unsafe { (site as *const [u8; SITE_LEN]).read_volatile() }
}

fn text_checksum_except(skip: u64) -> u64 {
    super::text_checksum_except(Some(skip))
}

/// Checks on this CPU alone, after a real patch of `site`: the shared tables
/// do not map the alias, this CPU cannot reach it, the sealed area is mapped
/// read-only + clean + NX and a write to it faults.
fn local_checks(site: u64, errors: &mut Vec<String>) {
    let b = sc_t_target_b as *const () as u64;
    let a = sc_t_target_a as *const () as u64;
    for insn in [NewInsn::Call(b), NewInsn::Call(a)] {
        if let Err(e) = patching::patch(&[(site, insn)], |_| {}) {
            errors.push(format!("local patch rejected: {e}"));
        }
    }
    if let Some(e) = mm::shared_leaf(mm::POKE_ALIAS_VA) {
        errors.push(format!("the shared page tables map the alias {:#x} ({e:#x})", mm::POKE_ALIAS_VA));
    }
    if !mm::text_alias_unmapped() {
        errors.push(String::from("a writable view of text/rodata/sealed exists outside a TextAlias"));
    }
    let alias = mm::POKE_ALIAS_VA + (site & (PAGE_SIZE - 1));
    for a in [Access::Load, Access::Write] {
        let r = access(alias, a);
        if !as_expected(&r, alias, a, Expect::NotPresent) {
            errors.push(format!(
                "this CPU: access at the alias {alias:#x} after a patch: {r:?}, expected a not-present #PF"
            ));
        }
    }
    let (s, e) = mm::sealed_area();
    if !(mm::is_sealed(s, e - s) && !mm::is_sealed(s, e - s + 1) && !mm::is_sealed(s - 1, 1) && !mm::is_sealed(e, 1)) {
        errors.push(format!("is_sealed does not describe [{s:#x}, {e:#x})"));
    }
    let mut page = s;
    while page < e {
        match mm::shared_leaf(page).map(Pte::from_bits_retain) {
            Some(f) if f.contains(Pte::NO_EXECUTE) && !f.contains(Pte::WRITABLE) && !f.contains(Pte::DIRTY) => {}
            other => {
                errors.push(format!("sealed page {page:#x} is not mapped read-only, clean and NX: {other:?}"));
                break;
            }
        }
        page += PAGE_SIZE;
    }
    let sealed = s + SEALED_PROBE_OFFSET;
    let r = access(sealed, Access::Write);
    if !as_expected(&r, sealed, Access::Write, Expect::WriteProtect) {
        errors.push(format!("this CPU: write to the sealed area {sealed:#x}: {r:?}, expected a write-protect #PF"));
    }
}

fn start_probers(workers: &[usize], alias: u64) -> Vec<(usize, u64)> {
    STOP.store(false, Ordering::SeqCst);
    for c in [&ROUNDS, &ALIAS_FAULTS, &SEALED_FAULTS, &VIOLATIONS] {
        c.store(0, Ordering::SeqCst);
    }
    workers.iter().map(|&w| (w, smp::run_on(w, prober, alias))).collect()
}

/// Hold the alias on `addr`'s page (rewriting the byte there unchanged) while
/// the probers run `ROUNDS_PER_POINT` rounds; the alias faults seen meanwhile.
/// The test writer (`mm::TextAlias`) exists in test-hooks builds only: the
/// production build has no Rust text writer (its patcher's writers are asm).
#[cfg(not(feature = "test-hooks"))]
fn hold_alias(_addr: u64, what: &str, _errors: &mut Vec<String>) -> u64 {
    diag!("alias not held on a {what} page: the test writer is compiled out of this build");
    0
}

#[cfg(feature = "test-hooks")]
fn hold_alias(addr: u64, what: &str, errors: &mut Vec<String>) -> u64 {
    let faults0 = ALIAS_FAULTS.load(Ordering::SeqCst);
    // SAFETY: `addr` is a readable byte of text or of the sealed area.
    let byte = unsafe { (addr as *const u8).read_volatile() };
    let (held, faults) = {
        let mut alias = mm::TextAlias::new();
        alias.write(addr, &[byte]);
        let r = wait_rounds(ROUNDS_PER_POINT);
        if mm::current_pml4() == mm::shared_pml4() {
            errors.push(format!("{what}: the patching CPU is on the shared page tables while it holds the alias"));
        }
        (r, ALIAS_FAULTS.load(Ordering::SeqCst) - faults0)
    };
    match held {
        Ok(n) => diag!("alias held on a {what} page: {n} probe rounds, {faults} alias #PFs meanwhile"),
        Err(e) => errors.push(format!("{what}: {e}")),
    }
    faults
}

pub fn sec_poke_alias_private(_st: &BootState) -> Outcome<'static> {
    let site = core::ptr::addr_of!(sc_t_site_call) as u64;
    let original = site_bytes(site);
    let mut errors: Vec<String> = Vec::new();
    local_checks(site, &mut errors);
    let me = this_cpu().index;
    let workers: Vec<usize> = percpu::online().map(|c| c.index).filter(|&i| i != me).collect();
    if workers.is_empty() {
        if errors.is_empty() {
            diag!("one CPU: the alias is absent from the shared tables and a sealed write faults");
            return Outcome::Skip("one CPU: the cross-CPU probes need two");
        }
        return super::outcome_of(&errors);
    }

    let sum0 = text_checksum_except(site);
    let new = NewInsn::Call(sc_t_target_b as *const () as u64);
    let alias = mm::POKE_ALIAS_VA + (site & (PAGE_SIZE - 1));
    let tickets = start_probers(&workers, alias);
    let mut in_window = 0u64;
    let mut after_steps = 0u64;
    if let Err(e) = wait_rounds(1) {
        errors.push(format!("start: {e}"));
    }
    let held_faults = hold_alias(site, "text", &mut errors)
        + hold_alias(mm::sealed_area().0 + SEALED_PROBE_OFFSET, "sealed", &mut errors);
    let restore = NewInsn::Call(sc_t_target_a as *const () as u64);
    for (insn, name) in [(new, "patch"), (restore, "restore")] {
        let r = patching::patch(&[(site, insn)], |step| match wait_rounds(ROUNDS_PER_POINT) {
            Ok(n) => in_window += n,
            Err(e) => {
                errors.push(format!("{name}, {}: {e}", if step == Step::Int3Written { "step 1" } else { "step 2" }))
            }
        });
        match r {
            Ok(s) if s.hook_fault.is_none() => {}
            other => errors.push(format!("{name}: {other:?}")),
        }
        if insn.encode(site).ok() != Some(site_bytes(site)) {
            errors.push(format!("{name}: the site does not hold the new instruction"));
        }
        match wait_rounds(ROUNDS_PER_POINT) {
            Ok(n) => after_steps += n,
            Err(e) => errors.push(format!("{name}, after step 3: {e}")),
        }
    }
    STOP.store(true, Ordering::SeqCst);
    for &(w, t) in &tickets {
        smp::wait(w, t);
    }
    let sum1 = text_checksum_except(site);

    let rounds = ROUNDS.load(Ordering::SeqCst);
    let (alias_faults, sealed_faults) = (ALIAS_FAULTS.load(Ordering::SeqCst), SEALED_FAULTS.load(Ordering::SeqCst));
    let violations = VIOLATIONS.load(Ordering::SeqCst);
    diag!(
        "{} probing CPU(s): {rounds} rounds; alias #PF(not present) {alias_faults} ({held_faults} while the alias was \
         mapped on this CPU), sealed-write #PF(write-protect) {sealed_faults}; rounds inside the window {in_window}, \
         after step 3 {after_steps}; violations {violations}",
        workers.len()
    );
    if violations != 0 {
        let v: [u64; 4] = core::array::from_fn(|i| FIRST_VIOLATION[i].load(Ordering::SeqCst));
        let what = PROBE_NAMES.get(v[0] as usize).unwrap_or(&"?");
        let how = if v[1] == u64::MAX {
            String::from("it succeeded")
        } else {
            format!("vector {} error {:#x} cr2 {:#x}", v[1], v[2], v[3])
        };
        errors.push(format!("{violations} probes did not fault as required; first: {what}: {how}"));
    }
    // Every round (counted after its probes) faulted twice at the alias and once in the sealed area.
    if violations == 0 && (alias_faults != 2 * rounds || sealed_faults != rounds) {
        errors.push(format!(
            "faults do not match the rounds: {alias_faults} alias, {sealed_faults} sealed, {rounds} rounds"
        ));
    }
    let held_min = if cfg!(feature = "test-hooks") { 2 * ROUNDS_PER_POINT } else { 0 };
    if held_faults < held_min || in_window < ROUNDS_PER_POINT {
        errors.push(String::from("too few probes while the alias was live or inside the window"));
    }
    if sum0 != sum1 {
        errors.push(format!("kernel text outside the site changed: {sum0:#018x} -> {sum1:#018x}"));
    }
    if site_bytes(site) != original {
        errors.push(String::from("the site was not restored"));
    }
    if !mm::text_alias_unmapped() {
        errors.push(String::from("a writable view of text/rodata/sealed remains after the test"));
    }
    super::outcome_of(&errors)
}
