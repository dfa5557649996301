//! Text patching and int3 emulation self-tests. Each emulation test hits
//! its site inside the window (after protocol steps 1 and 2) and again after
//! the patch, and checks that the new instruction took effect, that the
//! target saw the right return address on both stacks, and that RSP and SSP
//! are balanced afterwards.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use shadowcall::emul::{GuardError, PendingCall, StackKind};
use shadowcall::frame::RFLAGS_IF;
use shadowcall::insn::{self, BranchKind};
use shadowcall::patch::{build_batch, CodeRegion, NewInsn, PatchError, Registry, SITE_LEN};
use shadowcall::shstk::CpError;
use shadowcall::tramp;
use shadowcall_cmdline::EmulStrategy;
use shadowcall_support::ktap::Outcome;

use super::cet_tests::skip_without_shstk;
use super::{block_site, since, tlog, tlog_reset, LARGE_SITES};
use crate::patching::{self, PatchStats, Step};
use crate::percpu::this_cpu;
use crate::recover::{try_run, GUARD_REFUSAL, VEC_CP};
use crate::{cet, check, mm, BootState};

pub(crate) type SiteFn = unsafe extern "C" fn(u64) -> u64;

extern "C" {
    fn sc_call_checked(f: SiteFn, out: *mut [u64; 4], arg: u64) -> u64;
    static sc_call_checked_ret: u8;
    fn sc_t_target_a();
    fn sc_t_target_b();
    fn sc_t_fn_call(_: u64) -> u64;
    fn sc_t_fn_jmp(_: u64) -> u64;
    fn sc_t_fn_nop(_: u64) -> u64;
    fn sc_t_fn_ret(_: u64) -> u64;
    fn sc_t_fn_irq(_: u64) -> u64;
    fn sc_t_fn_roundtrip(_: u64) -> u64;
    fn sc_t_fn_outer(_: u64) -> u64;
    fn sc_t_fn_naive(_: u64) -> u64;
    fn sc_t_nest_target();
    fn sc_t_rec(depth: u64) -> u64;
    fn sc_t_rec_leaf();
    static sc_t_site_call: u8;
    static sc_t_site_jmp: u8;
    static sc_t_site_nop: u8;
    static sc_t_site_ret: u8;
    static sc_t_site_irq: u8;
    static sc_t_site_roundtrip: u8;
    static sc_t_site_outer: u8;
    static sc_t_site_inner: u8;
    static sc_t_site_rec: u8;
    static sc_t_site_naive: u8;
    static sc_t_site_bad: u8;
    static sc_t_site_unsupported: u8;
    static sc_t_site_undecodable: u8;
    static sc_t_unregistered: u8;
    fn sc_t_zero_disp_call() -> u64;
    static sc_t_zero_disp_call_insn: u8;
    fn sc_t_one_disp_call() -> u64;
    fn sc_t_stray_probe() -> u64;
    fn sc_t_forge_plain(trap: u64, ret2: u64, ret1: u64);
    fn sc_t_forge_normal(trap: u64, ret2: u64, ret1: u64);
    static SC_TLOG: u8;
    static SC_ISR_TABLE: [u64; 32];
    fn sc_try_recover();
    fn sc_cet_enter(s_cet: u64, cont: extern "C" fn() -> !, rsp: u64) -> !;
}

/// Distinct errors patch_bad_input must see: 12 for sites and batches, 6
/// for handler code and targets.
const BAD_INPUT_ERRORS: usize = 18;
/// The #BP vector's stub in SC_ISR_TABLE.
const VEC_BP: usize = 3;

macro_rules! addr {
    ($s:ident) => {
        core::ptr::addr_of!($s) as *const u8 as u64
    };
}
macro_rules! fnaddr {
    ($f:ident) => {
        $f as *const () as u64
    };
}

/// RSP and SSP around one call.
pub(crate) struct Call {
    rsp: [u64; 2],
    ssp: [u64; 2],
}

impl Call {
    pub(crate) fn balanced(&self) -> bool {
        self.rsp[0] == self.rsp[1] && self.ssp[0] == self.ssp[1]
    }
}

pub(crate) fn call_checked(f: SiteFn, arg: u64) -> Call {
    let mut out = [0u64; 4];
    // SAFETY: the asm wrapper calls `f(arg)` and records the stack pointers.
    unsafe { sc_call_checked(f, &mut out, arg) };
    Call { rsp: [out[0], out[2]], ssp: [out[1], out[3]] }
}

/// This CPU's emulations (first traps at a site); `None` in production.
fn emulations() -> Option<u64> {
    super::engine_count!(this_cpu(), emulations)
}
fn second_traps() -> Option<u64> {
    super::engine_count!(this_cpu(), second_traps)
}

/// What running a site function must show.
#[derive(Clone, Copy)]
struct Expect {
    /// Which target (0 = a, 1 = b) must run once, if any.
    target: Option<usize>,
    /// The return address the target must see on both stacks.
    ret: u64,
    /// Whether the instruction after the site runs.
    after: u64,
    /// Emulations (first traps) this call must cause.
    emulations: u64,
}

/// Run `f(arg)` and compare with `e`.
fn observe(what: &str, f: SiteFn, arg: u64, e: Expect) -> Result<Call, String> {
    tlog_reset();
    let (em0, st0) = (emulations(), second_traps());
    let c = call_checked(f, arg);
    let log = tlog();
    for i in 0..2 {
        let want = (e.target == Some(i)) as u64;
        if log.count[i] != want {
            return Err(format!("{what}: target {i} ran {} times, expected {want}", log.count[i]));
        }
    }
    if e.target.is_some() {
        if log.last_ret != e.ret {
            return Err(format!("{what}: normal-stack return address {:#x}, expected {:#x}", log.last_ret, e.ret));
        }
        if cet::active() && log.last_shret != e.ret {
            return Err(format!("{what}: shadow-stack return address {:#x}, expected {:#x}", log.last_shret, e.ret));
        }
    }
    if log.after != e.after {
        return Err(format!("{what}: instruction after the site ran {} times, expected {}", log.after, e.after));
    }
    if !c.balanced() {
        return Err(format!(
            "{what}: unbalanced: rsp {:#x}->{:#x} ssp {:#x}->{:#x}",
            c.rsp[0], c.rsp[1], c.ssp[0], c.ssp[1]
        ));
    }
    // The engine's counts (test-hooks builds).
    if let Some(em) = since(emulations(), em0) {
        if em != e.emulations {
            return Err(format!("{what}: {em} emulations, expected {}", e.emulations));
        }
    }
    let calls_via_tramp = patching::strategy() == EmulStrategy::Trampoline && e.target.is_some() && e.emulations > 0;
    if let Some(st) = since(second_traps(), st0) {
        if calls_via_tramp && e.ret != addr!(sc_call_checked_ret) && st != e.emulations {
            return Err(format!("{what}: {st} second traps for {} emulated calls", e.emulations));
        }
    }
    Ok(c)
}

fn step_name(s: Step) -> &'static str {
    match s {
        Step::Int3Written => "after step 1",
        Step::TailsWritten => "after step 2",
    }
}

fn site_bytes(site: u64) -> [u8; SITE_LEN] {
    let mut b = [0; SITE_LEN];
    // SAFETY: sites lie in readable kernel text.
    b.copy_from_slice(unsafe { core::slice::from_raw_parts(site as *const u8, SITE_LEN) });
    b
}

/// Patch `sites`, checking `check` inside the window after steps 1 and 2;
/// collect every failure.
fn patch_checked(
    sites: &[(u64, NewInsn)],
    mut check: impl FnMut(Step) -> Result<(), String>,
) -> Result<patching::PatchStats, Vec<String>> {
    let mut errors = Vec::new();
    let r = patching::patch(sites, |step| {
        if let Err(e) = check(step) {
            errors.push(format!("{} ({})", e, step_name(step)));
        }
    });
    match &r {
        Err(e) => errors.push(format!("patch rejected: {e}")),
        Ok(PatchStats { hook_fault: Some(f), .. }) => errors.push(format!("unexpected fault inside the window: {f}")),
        Ok(_) => {}
    }
    for &(site, insn) in sites {
        if insn.encode(site).ok() != Some(site_bytes(site)) {
            errors.push(format!("site {site:#x} does not hold the new instruction"));
        }
    }
    match r {
        Ok(stats) if errors.is_empty() => Ok(stats),
        _ => Err(errors),
    }
}

fn report<T>(r: Result<T, Vec<String>>) -> Outcome<'static> {
    super::outcome_of(r.err().as_deref().unwrap_or(&[]))
}

/// One site, one new instruction: in the window and after, then restore `call target_a`.
fn single(f: SiteFn, site: u64, new: NewInsn, e: Expect) -> Outcome<'static> {
    let original = site_bytes(site);
    let mut r = patch_checked(&[(site, new)], |_| observe("in window", f, 0, e).map(|_| ())).map(|_| ());
    if r.is_ok() {
        let e_after = Expect { emulations: 0, ..e };
        r = observe("after patch", f, 0, e_after).map(|_| ()).map_err(|s| alloc::vec![s]);
    }
    let restore = patching::patch(&[(site, NewInsn::Call(fnaddr!(sc_t_target_a)))], |_| {});
    check!(restore.is_ok() && site_bytes(site) == original, "could not restore the site: {restore:?}");
    report(r)
}

pub fn emul_call(_st: &BootState) -> Outcome<'static> {
    let site = addr!(sc_t_site_call);
    let e = Expect { target: Some(1), ret: site + 5, after: 1, emulations: 1 };
    let o = single(sc_t_fn_call, site, NewInsn::Call(fnaddr!(sc_t_target_b)), e);
    diag!("emulated calls took the {} path", patching::strategy().name());
    o
}

pub fn emul_jmp(_st: &BootState) -> Outcome<'static> {
    let site = addr!(sc_t_site_jmp);
    // A jump is a tail call: the target returns straight to our caller.
    let e = Expect { target: Some(1), ret: addr!(sc_call_checked_ret), after: 0, emulations: 1 };
    single(sc_t_fn_jmp, site, NewInsn::Jmp(fnaddr!(sc_t_target_b)), e)
}

pub fn emul_nop(_st: &BootState) -> Outcome<'static> {
    let site = addr!(sc_t_site_nop);
    let e = Expect { target: None, ret: 0, after: 1, emulations: 1 };
    single(sc_t_fn_nop, site, NewInsn::Nop, e)
}

pub fn emul_ret(_st: &BootState) -> Outcome<'static> {
    let site = addr!(sc_t_site_ret);
    let e = Expect { target: None, ret: 0, after: 0, emulations: 1 };
    single(sc_t_fn_ret, site, NewInsn::Ret, e)
}

pub fn emul_call_nested(_st: &BootState) -> Outcome<'static> {
    let (outer, inner) = (addr!(sc_t_site_outer), addr!(sc_t_site_inner));
    let batch = [(outer, NewInsn::Call(fnaddr!(sc_t_nest_target))), (inner, NewInsn::Call(fnaddr!(sc_t_target_b)))];
    let run = |what: &str, emulations: u64| -> Result<(), String> {
        let e = Expect { target: Some(1), ret: inner + 5, after: 1, emulations };
        observe(what, sc_t_fn_outer, 0, e)?;
        if tlog().nest != 1 {
            return Err(format!("{what}: the outer target did not return through its site"));
        }
        Ok(())
    };
    let mut r = patch_checked(&batch, |_| run("in window", 2)).map(|_| ());
    if r.is_ok() {
        r = run("after patch", 0).map_err(|s| alloc::vec![s]);
    }
    let a = fnaddr!(sc_t_target_a);
    check!(patching::patch(&[(outer, NewInsn::Call(a)), (inner, NewInsn::Call(a))], |_| {}).is_ok(), "restore failed");
    report(r)
}

pub fn emul_call_recursive(_st: &BootState) -> Outcome<'static> {
    const DEPTH: u64 = 5;
    let site = addr!(sc_t_site_rec);
    let run = |what: &str, expected: u64| -> Result<(), String> {
        tlog_reset();
        let em0 = emulations();
        let c = call_checked(sc_t_rec, DEPTH);
        let log = tlog();
        if log.rec != DEPTH {
            return Err(format!("{what}: {} levels returned through the site, expected {DEPTH}", log.rec));
        }
        if !c.balanced() {
            return Err(format!("{what}: unbalanced stacks"));
        }
        if let Some(n) = since(emulations(), em0).filter(|&n| n != expected) {
            return Err(format!("{what}: {n} emulations, expected {expected}"));
        }
        Ok(())
    };
    let mut r = patch_checked(&[(site, NewInsn::Call(fnaddr!(sc_t_rec)))], |_| run("in window", DEPTH)).map(|_| ());
    if r.is_ok() {
        r = run("after patch", 0).map_err(|s| alloc::vec![s]);
    }
    check!(patching::patch(&[(site, NewInsn::Call(fnaddr!(sc_t_rec_leaf)))], |_| {}).is_ok(), "restore failed");
    diag!("recursion depth {DEPTH}, every level an emulated call inside the window");
    report(r)
}

pub fn emul_call_irq_on(_st: &BootState) -> Outcome<'static> {
    let site = addr!(sc_t_site_irq);
    let e = Expect { target: Some(1), ret: site + 5, after: 1, emulations: 1 };
    let r = patch_checked(&[(site, NewInsn::Call(fnaddr!(sc_t_target_b)))], |_| {
        x86_64::instructions::interrupts::enable();
        let r = observe("in window, IF=1", sc_t_fn_irq, 0, e);
        let if_after = x86_64::instructions::interrupts::are_enabled();
        x86_64::instructions::interrupts::disable();
        r?;
        if tlog().last_rflags & RFLAGS_IF == 0 {
            return Err(String::from("the target ran with interrupts off"));
        }
        if !if_after {
            return Err(String::from("interrupts were off after the emulated call"));
        }
        if patching::strategy() == EmulStrategy::Trampoline
            && super::engine_count!(this_cpu(), last_second_trap_if).is_some_and(|v| v != 0)
        {
            return Err(String::from("interrupts were on between the two traps"));
        }
        Ok(())
    });
    check!(patching::patch(&[(site, NewInsn::Call(fnaddr!(sc_t_target_a)))], |_| {}).is_ok(), "restore failed");
    report(r)
}

pub fn patch_roundtrip(_st: &BootState) -> Outcome<'static> {
    let site = addr!(sc_t_site_roundtrip);
    let original = site_bytes(site);
    let (a, b) = (fnaddr!(sc_t_target_a), fnaddr!(sc_t_target_b));
    let steps: [(&str, NewInsn, Expect); 3] = [
        ("A->B", NewInsn::Call(b), Expect { target: Some(1), ret: site + 5, after: 1, emulations: 1 }),
        ("B->NOP", NewInsn::Nop, Expect { target: None, ret: 0, after: 1, emulations: 1 }),
        ("NOP->A", NewInsn::Call(a), Expect { target: Some(0), ret: site + 5, after: 1, emulations: 1 }),
    ];
    for (name, insn, e) in steps {
        let r = patch_checked(&[(site, insn)], |_| observe(name, sc_t_fn_roundtrip, 0, e).map(|_| ()));
        if r.is_err() {
            return report(r);
        }
        if let Err(s) = observe(name, sc_t_fn_roundtrip, 0, Expect { emulations: 0, ..e }) {
            return report::<()>(Err(alloc::vec![s]));
        }
    }
    check!(site_bytes(site) == original, "A -> B -> NOP -> A did not give back the original bytes");
    Outcome::Pass
}

pub fn patch_batch_large(_st: &BootState) -> Outcome<'static> {
    let sites: Vec<u64> = (0..LARGE_SITES).map(block_site).collect();
    let (a, b) = (fnaddr!(sc_t_target_a), fnaddr!(sc_t_target_b));
    let run_all = |what: &str, emulated: bool| -> Result<(), String> {
        tlog_reset();
        let em0 = emulations();
        for &s in &sites {
            // SAFETY: each block entry is `call rel32; ret`, a function.
            let f: SiteFn = unsafe { core::mem::transmute(s as usize) };
            let c = call_checked(f, 0);
            if !c.balanced() || tlog().last_ret != s + 5 || (cet::active() && tlog().last_shret != s + 5) {
                return Err(format!("{what}: site {s:#x} misrouted or unbalanced"));
            }
        }
        let log = tlog();
        let want_sum: u64 = sites.iter().map(|s| s + 5).fold(0u64, |x, y| x.wrapping_add(y));
        if log.count[1] != sites.len() as u64 || log.count[0] != 0 || log.ret_sum != want_sum {
            return Err(format!("{what}: target b ran {} times for {} sites", log.count[1], sites.len()));
        }
        let want = if emulated { sites.len() as u64 } else { 0 };
        if let Some(em) = since(emulations(), em0).filter(|&em| em != want) {
            return Err(format!("{what}: {em} emulations for {} sites", sites.len()));
        }
        Ok(())
    };
    let batch: Vec<(u64, NewInsn)> = sites.iter().map(|&s| (s, NewInsn::Call(b))).collect();
    let stats = match patch_checked(&batch, |_| run_all("in window", true)) {
        Ok(s) => s,
        Err(e) => return report::<()>(Err(e)),
    };
    let r = run_all("after patch", false).map_err(|s| alloc::vec![s]);
    let (table_bytes, rounds) = (stats.table_bytes, stats.sync_rounds);
    check!(stats.sites == sites.len(), "batch holds {} sites", stats.sites);
    diag!(
        "{} sites in one batch, lookup table {} bytes ({} pages), {} sync rounds",
        sites.len(),
        table_bytes,
        table_bytes.div_ceil(4096),
        rounds
    );
    check!(table_bytes > 4096, "the batch fits in one page; the test needs more");
    // Three steps, and without shadow stacks the retirement's round (the
    // #BP fast path's readers of the batch, shadowcall::engine::finish).
    let expected = if cet::active() { 3 } else { 4 };
    check!(rounds == expected, "{rounds} sync rounds for one batch, expected {expected}");
    let restore: Vec<(u64, NewInsn)> = sites.iter().map(|&s| (s, NewInsn::Call(a))).collect();
    check!(patching::patch(&restore, |_| {}).is_ok(), "restore failed");
    report(r)
}

pub fn trampoline_disp_nonzero(_st: &BootState) -> Outcome<'static> {
    let Some(l) = patching::trampoline() else {
        diag!("FAIL: no trampoline was emitted");
        return Outcome::Fail;
    };
    let bytes = patching::tramp_bytes(&l);
    diag!("trampoline at {:#x}: {:02x?}", l.base, bytes);
    // Decode what is in text linearly, independently of the emitter's own
    // check (which follows the control flow).
    let mut calls = 0;
    let mut off = 0;
    while off < bytes.len() {
        let ip = l.base + off as u64;
        let Some(len) = insn::insn_len(&bytes[off..]) else {
            diag!("FAIL: no instruction at {ip:#x}");
            return Outcome::Fail;
        };
        if let Some(call) = insn::rel32_branch(&bytes[off..], ip).filter(|b| b.kind == BranchKind::Call) {
            calls += 1;
            diag!("call at {ip:#x} -> {:#x}: displacement {}", call.target, call.disp);
            check!(call.disp != 0, "call at {ip:#x} has displacement 0");
        }
        off += len;
    }
    check!(calls == 2, "found {calls} calls, expected 2");
    check!(tramp::verify(bytes, &l).is_ok(), "trampoline shape check failed");
    // The check can fail: a copy with a zero displacement is rejected.
    let mut bad: Vec<u8> = bytes.to_vec();
    bad[1] = 0;
    check!(
        matches!(tramp::verify(&bad, &l), Err(tramp::TrampError::ZeroDisplacementCall { .. })),
        "a zero-displacement copy was not rejected"
    );
    Outcome::Pass
}

pub fn zero_disp_call_shadow(st: &BootState) -> Outcome<'static> {
    if let Some(s) = skip_without_shstk(st) {
        return s;
    }
    let at = addr!(sc_t_zero_disp_call_insn);
    // SAFETY: readable text.
    let probe = unsafe { core::slice::from_raw_parts(at as *const u8, insn::REL32_LEN) };
    check!(
        matches!(insn::rel32_branch(probe, at), Some(c) if c.kind == BranchKind::Call && c.target == c.next_ip),
        "the probe is not a call to the next instruction"
    );
    // SAFETY: asm probes that leave both stacks balanced.
    let (zero, one) = unsafe { (sc_t_zero_disp_call() as i64, sc_t_one_disp_call() as i64) };
    diag!("SSP delta: call +0 -> {zero}, call +1 -> {one}");
    check!(zero == 0, "a call to the next instruction moved SSP by {zero}");
    check!(one == -8, "the control (call +1) moved SSP by {one}, expected -8");
    Outcome::Pass
}

pub fn naive_emul_cp(st: &BootState) -> Outcome<'static> {
    if let Some(s) = skip_without_shstk(st) {
        return s;
    }
    // The override of the emulation is a self-test switch of the engine.
    if cfg!(not(feature = "test-hooks")) {
        return Outcome::Skip("needs the test-hooks build");
    }
    let site = addr!(sc_t_site_naive);
    let b = fnaddr!(sc_t_target_b);
    let mut errors: Vec<String> = Vec::new();
    let r = patching::patch(&[(site, NewInsn::Call(b))], |step| {
        if step != Step::Int3Written {
            return;
        }
        let ssp0 = cet::rdssp();
        tlog_reset();
        #[cfg(feature = "test-hooks")]
        this_cpu().engine.set_force_classic(true);
        // SAFETY: asm site function; the expected #CP is caught.
        let r = try_run(|| unsafe { sc_t_fn_naive(0) });
        #[cfg(feature = "test-hooks")]
        this_cpu().engine.set_force_classic(false);
        match r {
            Err(f) if f.vector == VEC_CP && CpError::decode(f.error_code) == CpError::NearRet => {
                diag!("classic emulation with shadow stacks on: {f}");
                if !(b..b + 64).contains(&f.rip) {
                    errors.push(format!("#CP at {:#x}, not at the target's ret", f.rip));
                }
                if tlog().count[1] != 1 {
                    errors.push(String::from("the target did not run before its ret faulted"));
                }
            }
            other => errors.push(format!("classic emulation did not raise #CP(1): {other:?}")),
        }
        if cet::rdssp() != ssp0 {
            errors.push(String::from("SSP not recovered after the #CP"));
        }
        // The shadow-stack-aware path on the same site, same window, works.
        if let Err(e) =
            observe("CET path", sc_t_fn_naive, 0, Expect { target: Some(1), ret: site + 5, after: 1, emulations: 1 })
        {
            errors.push(e);
        }
    });
    if let Err(e) = r {
        errors.push(format!("patch: {e}"));
    }
    check!(patching::patch(&[(site, NewInsn::Call(fnaddr!(sc_t_target_a)))], |_| {}).is_ok(), "restore failed");
    report(if errors.is_empty() { Ok(()) } else { Err(errors) })
}

pub fn wrss_guard(_st: &BootState) -> Outcome<'static> {
    let Some(t) = patching::trampoline() else {
        diag!("FAIL: no trampoline");
        return Outcome::Fail;
    };
    let cpu = this_cpu();
    let evil = addr!(SC_TLOG); // any address the attacker would like as a return target
    let attempt = |name: &str, forge_normal: bool, pending: bool| -> Result<GuardError, String> {
        let writes = || Some(super::engine_count!(cpu, shadow_writes)? + super::engine_count!(cpu, stack_writes)?);
        let w0 = writes();
        let ssp0 = cet::rdssp();
        cpu.expect_refusal.store(true, Ordering::Relaxed);
        let r = try_run(|| {
            if pending {
                patching::test_push_pending(PendingCall {
                    site: 0,
                    ret: evil,
                    target: evil,
                    interrupts: false,
                    rsp: 0,
                });
            }
            // SAFETY: jumps to the trampoline's int3 with forged state; the refusal is caught.
            unsafe {
                if forge_normal {
                    sc_t_forge_normal(t.trap, t.ret2, t.ret1)
                } else {
                    sc_t_forge_plain(t.trap, t.ret2, t.ret1)
                }
            }
            0
        });
        cpu.expect_refusal.store(false, Ordering::Relaxed);
        // Slots the handler wrote (counted in test-hooks builds; 0 otherwise).
        let wrote = since(writes(), w0).unwrap_or(0);
        if !cet::active() && cpu.lifo().depth() != 0 {
            return Err(format!("{name}: emulation LIFO not unwound"));
        }
        if cet::rdssp() != ssp0 {
            return Err(format!("{name}: SSP not recovered"));
        }
        match r {
            Err(f) if f.vector == GUARD_REFUSAL && wrote == 0 => {
                let why = cpu.engine.last_refusal();
                diag!("{name}: refused, nothing written: {}", why.map(|w| format!("{w}")).unwrap_or_default());
                why.ok_or_else(|| format!("{name}: no refusal recorded"))
            }
            Err(f) if f.vector == GUARD_REFUSAL => Err(format!("{name}: refused but {wrote} slots were written")),
            other => Err(format!("{name}: the handler did not refuse ({other:?}, {wrote} writes)")),
        }
    };
    let mut errors = Vec::new();
    match attempt("no pending emulation", false, false) {
        Ok(GuardError::NoPendingEmulation) => {}
        other => errors.push(format!("no pending emulation: {other:?}")),
    }
    // With shadow stacks the first trap's record lives on a shadow-stack page:
    // a pending call forged in ordinary memory (the LIFO) is not one, and the
    // jump finds no record bound to its stack (sec_tramp_record_bound).
    let forged = attempt("forged slots on both stacks", false, true);
    this_cpu().lifo().truncate(0);
    match forged {
        Ok(GuardError::NoPendingEmulation) if cet::active() => {}
        Ok(GuardError::SlotMismatch { stack: StackKind::Normal, .. }) if !cet::active() => {}
        other => errors.push(format!("forged slots: {other:?}")),
    }
    if cet::active() {
        let forged = attempt("normal stack forged to the trampoline's slots", true, true);
        this_cpu().lifo().truncate(0);
        match forged {
            Ok(GuardError::NoPendingEmulation) => {}
            other => errors.push(format!("forged normal stack: {other:?}")),
        }
    } else {
        diag!("without shadow stacks the normal stack is all there is to check; forged-normal case not applicable");
    }
    report(if errors.is_empty() { Ok(()) } else { Err(errors) })
}

pub fn breakpoint_not_emulated(_st: &BootState) -> Outcome<'static> {
    let bps = || this_cpu().counters.breakpoints.load(Ordering::Relaxed);
    let (b0, e0) = (bps(), emulations());
    this_cpu().expect_refusal.store(true, Ordering::Relaxed);
    // SAFETY: asm probe with a stray int3 (reported, execution continues).
    let v = unsafe { sc_t_stray_probe() };
    this_cpu().expect_refusal.store(false, Ordering::Relaxed);
    check!(v == 8, "execution did not continue after the stray int3 ({v})");
    check!(bps() == b0 + 1 && emulations() == e0, "the stray int3 was not reported as a breakpoint, or was emulated");
    // Also while a batch is in flight: only its own sites are emulated.
    let site = addr!(sc_t_site_call);
    let mut inside = (0, 0, 0);
    let r = patching::patch(&[(site, NewInsn::Call(fnaddr!(sc_t_target_b)))], |step| {
        if step == Step::Int3Written {
            let (b1, e1) = (bps(), emulations());
            // SAFETY: as above.
            this_cpu().expect_refusal.store(true, Ordering::Relaxed);
            // SAFETY: as above.
            let v = unsafe { sc_t_stray_probe() };
            this_cpu().expect_refusal.store(false, Ordering::Relaxed);
            inside = (v, bps() - b1, since(emulations(), e1).unwrap_or(0));
        }
    });
    check!(r.is_ok(), "patch failed: {r:?}");
    check!(patching::patch(&[(site, NewInsn::Call(fnaddr!(sc_t_target_a)))], |_| {}).is_ok(), "restore failed");
    check!(inside == (8, 1, 0), "during a patch the stray int3 gave (value, breakpoints, emulations) = {inside:?}");
    Outcome::Pass
}

fn text_checksum() -> u64 {
    super::text_checksum_except(None)
}

pub fn patch_bad_input(_st: &BootState) -> Outcome<'static> {
    let sum0 = text_checksum();
    let call = addr!(sc_t_site_call);
    let data = addr!(SC_TLOG);
    let (_, text_end) = mm::text_range();
    let a = fnaddr!(sc_t_target_a);
    let far = 0xffff_ffff_8000_0000u64;
    let tramp = patching::trampoline().map(|t| (t.entry, t.trap)).unwrap_or((patching::tramp_page(), 0));
    // SAFETY: a read of the read-only stub table.
    let bp_stub = unsafe { core::ptr::addr_of!(SC_ISR_TABLE).read()[VEC_BP] };
    let cet_rust = crate::cet::enable_and_continue as *const () as u64;
    type Case = (&'static str, Vec<(u64, NewInsn)>, fn(&PatchError) -> bool);
    let cases: [Case; 24] = [
        ("empty batch", Vec::new(), |e| matches!(e, PatchError::EmptyBatch)),
        ("address outside text", alloc::vec![(data, NewInsn::Nop)], |e| {
            matches!(e, PatchError::AddressOutsideText { .. })
        }),
        ("site crossing the end of text", alloc::vec![(text_end - 2, NewInsn::Nop)], |e| {
            matches!(e, PatchError::SiteCrossesTextEnd { .. })
        }),
        ("duplicate site", alloc::vec![(call, NewInsn::Nop), (call, NewInsn::Ret)], |e| {
            matches!(e, PatchError::DuplicateSite { .. })
        }),
        ("overlapping sites", alloc::vec![(call, NewInsn::Nop), (call + 2, NewInsn::Nop)], |e| {
            matches!(e, PatchError::OverlappingSites { .. })
        }),
        ("mid-instruction address", alloc::vec![(call + 1, NewInsn::Nop)], |e| {
            matches!(e, PatchError::MidInstruction { .. })
        }),
        ("unregistered site", alloc::vec![(addr!(sc_t_unregistered), NewInsn::Nop)], |e| {
            matches!(e, PatchError::UnknownSite { .. })
        }),
        ("undecodable bytes", alloc::vec![(addr!(sc_t_site_undecodable), NewInsn::Nop)], |e| {
            matches!(e, PatchError::Undecodable { .. })
        }),
        ("unsupported instruction", alloc::vec![(addr!(sc_t_site_unsupported), NewInsn::Nop)], |e| {
            matches!(e, PatchError::UnsupportedInstruction { .. })
        }),
        ("target out of rel32 range", alloc::vec![(call, NewInsn::Call(far))], |e| {
            matches!(e, PatchError::TargetOutOfRange { .. })
        }),
        ("target outside text", alloc::vec![(call, NewInsn::Jmp(data))], |e| {
            matches!(e, PatchError::TargetOutsideText { .. })
        }),
        (
            "good site with a bad one",
            alloc::vec![(call, NewInsn::Nop), (addr!(sc_t_unregistered), NewInsn::Nop)],
            |e| matches!(e, PatchError::UnknownSite { .. }),
        ),
        // Code the #BP handler runs: neither a site nor a target.
        ("site in exception entry code", alloc::vec![(fnaddr!(sc_try_recover), NewInsn::Nop)], |e| {
            matches!(e, PatchError::SiteInHandlerCode { region: CodeRegion::ExceptionEntry, .. })
        }),
        ("site in the #BP entry stub", alloc::vec![(bp_stub, NewInsn::Nop)], |e| {
            matches!(e, PatchError::SiteInHandlerCode { region: CodeRegion::ExceptionEntry, .. })
        }),
        ("site in CET bring-up code", alloc::vec![(fnaddr!(sc_cet_enter), NewInsn::Nop)], |e| {
            matches!(e, PatchError::SiteInHandlerCode { region: CodeRegion::CetBringUp, .. })
        }),
        ("site in the trampoline page", alloc::vec![(tramp.0, NewInsn::Nop)], |e| {
            matches!(e, PatchError::SiteInHandlerCode { region: CodeRegion::Trampoline, .. })
        }),
        ("target: the trampoline's entry", alloc::vec![(call, NewInsn::Call(tramp.0))], |e| {
            matches!(e, PatchError::TargetInTrampoline { .. })
        }),
        ("target: the trampoline's trap", alloc::vec![(call, NewInsn::Jmp(tramp.1))], |e| {
            matches!(e, PatchError::TargetInTrampoline { .. })
        }),
        ("target in exception entry code", alloc::vec![(call, NewInsn::Call(fnaddr!(sc_try_recover)))], |e| {
            matches!(e, PatchError::TargetInEntryCode { .. })
        }),
        ("target: the #BP entry stub", alloc::vec![(call, NewInsn::Jmp(bp_stub))], |e| {
            matches!(e, PatchError::TargetInEntryCode { .. })
        }),
        ("target in CET bring-up code (asm)", alloc::vec![(call, NewInsn::Call(fnaddr!(sc_cet_enter)))], |e| {
            matches!(e, PatchError::TargetInCetCode { .. })
        }),
        ("target in CET bring-up code (Rust)", alloc::vec![(call, NewInsn::Call(cet_rust))], |e| {
            matches!(e, PatchError::TargetInCetCode { .. })
        }),
        (
            "target inside an instruction",
            alloc::vec![(call, NewInsn::Call(a + 1))],
            |e| matches!(e, PatchError::TargetMidInstruction { insn_start, .. } if *insn_start == fnaddr!(sc_t_target_a)),
        ),
        ("unregistered target", alloc::vec![(call, NewInsn::Call(addr!(sc_t_unregistered)))], |e| {
            matches!(e, PatchError::UnknownTarget { .. })
        }),
    ];
    let mut errors = Vec::new();
    let mut seen: Vec<core::mem::Discriminant<PatchError>> = Vec::new();
    for (name, sites, ok) in cases.iter() {
        match patching::patch(sites, |_| {}) {
            Err(e) if ok(&e) => {
                diag!("{name}: rejected: {e}");
                if !seen.contains(&core::mem::discriminant(&e)) {
                    seen.push(core::mem::discriminant(&e));
                }
            }
            other => errors.push(format!("{name}: got {other:?}")),
        }
    }
    // A batch while another is in flight.
    let bad = addr!(sc_t_site_bad);
    let mut nested = None;
    let r = patching::patch(&[(bad, NewInsn::Call(a))], |step| {
        if step == Step::Int3Written {
            nested = Some(patching::patch(&[(call, NewInsn::Nop)], |_| {}));
        }
    });
    match nested {
        Some(Err(e @ PatchError::BatchInFlight)) => {
            diag!("batch while another is in flight: rejected: {e}");
            seen.push(core::mem::discriminant(&e));
        }
        other => errors.push(format!("batch in flight: got {other:?}")),
    }
    if r.is_err() {
        errors.push(format!("the outer batch failed: {r:?}"));
    }
    // The boot-time check of the tables, with the kernel's own forbidden
    // ranges: a site registered in entry code would stop the boot.
    let reg = patching::patch_registry();
    diag!(
        "registry: {} sites, {} targets, tables used in place: {}",
        reg.sites().len(),
        reg.targets().len(),
        reg.tables_in_place()
    );
    if let Err(e) = reg.check() {
        errors.push(format!("the kernel's own registry fails its check: {e}"));
    }
    let mut bad_sites = reg.sites().to_vec();
    bad_sites.push(fnaddr!(sc_try_recover));
    match Registry::new(&bad_sites, reg.targets(), reg.forbidden()).check() {
        Err(e @ PatchError::SiteInHandlerCode { region: CodeRegion::ExceptionEntry, .. }) => {
            diag!("registry with a site in entry code: refused: {e}")
        }
        other => errors.push(format!("registry with a site in entry code: got {other:?}")),
    }
    // Registered or not, a site in entry code cannot be patched.
    let bad = Registry::new(&bad_sites, reg.targets(), reg.forbidden());
    match build_batch(&mm::text(), &bad, &[(fnaddr!(sc_try_recover), NewInsn::Nop)]) {
        Err(PatchError::SiteInHandlerCode { .. }) => {}
        other => errors.push(format!("registered site in entry code: got {:?}", other.map(|b| b.len()))),
    }
    let sum1 = text_checksum();
    diag!("{} distinct errors; text checksum {sum0:#018x} -> {sum1:#018x}", seen.len());
    if seen.len() < BAD_INPUT_ERRORS {
        errors.push(format!("only {} distinct errors", seen.len()));
    }
    if sum0 != sum1 {
        errors.push(String::from("kernel text changed"));
    }
    report(if errors.is_empty() { Ok(()) } else { Err(errors) })
}
