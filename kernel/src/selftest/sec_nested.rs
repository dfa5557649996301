//! `sec_nested_save` (issue 8, the fourth review's nested NMI/#MC finding):
//! an NMI (or #MC) taken inside a critical region saves the interrupted
//! registers in its area of this CPU's save page; a #MC nested inside that
//! NMI's path (or an NMI inside the #MC's path) — while it saves them, or
//! while its exit gives them back — has a trap frame whose saved registers an
//! attacker forges. The nested handler must give the outer path its own
//! registers back from the nested vector's own save area (asm/entry.S,
//! DESIGN §11), so the interrupted code gets exactly its registers.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use shadowcall_support::ktap::Outcome;

use super::cet_tests::skip_without_shstk;
use crate::percpu::this_cpu;
use crate::recover::{VEC_MC, VEC_NMI};
use crate::{cet, mm, BootState};

#[cfg(feature = "test-hooks")]
use crate::interrupts::NESTED_MC_OUTER;
use crate::interrupts::{NESTED_AT_ENTRY, NESTED_IN_RESTORE, NESTED_IN_SAVE, NESTED_PATTERN};

/// The nested handler forges GPR i of its trap frame to `FORGED + i`.
const FORGED: u64 = 0x0bad_f00d_0000_0000;

const HOOKS: bool = cfg!(feature = "test-hooks");
/// The probe's register order (its `out` array).
const GPRS: [&str; 15] =
    ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];

/// Read by the NMI/#MC paths' test hook: the point to raise the nested
/// event at, once.
#[no_mangle]
pub static SC_T_NESTED: AtomicU8 = AtomicU8::new(0);
/// The vector whose handler forges its frame, once (0: none).
#[cfg(feature = "test-hooks")]
static NESTED_VEC: AtomicU64 = AtomicU64::new(0);
/// The probe's software #MC is the outer event: its handler just returns, once.
#[cfg(feature = "test-hooks")]
static OUTER_MC: AtomicU64 = AtomicU64::new(0);
static NESTED_TAKEN: AtomicU64 = AtomicU64::new(0);
/// `sec_region_flags`: the next NMI flips ZF in its frame.
#[cfg(feature = "test-hooks")]
static FORGE_ZF: AtomicU64 = AtomicU64::new(0);
/// Where that NMI interrupted.
#[cfg(feature = "test-hooks")]
static FORGED_ZF_RIP: AtomicU64 = AtomicU64::new(0);
/// RFLAGS.ZF
#[cfg(feature = "test-hooks")]
const RFLAGS_ZF: u64 = 1 << 6;
/// `sec_region_df` (review 11 F1): the vector (NMI or #MC) whose next
/// event sets DF in its frame (0: none).
#[cfg(feature = "test-hooks")]
static FORGE_DF: AtomicU64 = AtomicU64::new(0);
/// Where that event interrupted.
#[cfg(feature = "test-hooks")]
static FORGED_DF_RIP: AtomicU64 = AtomicU64::new(0);
/// RFLAGS.DF
#[cfg(feature = "test-hooks")]
const RFLAGS_DF: u64 = 1 << 10;
/// `sec_nested_iret_rsp` (review 11 F2): the vector whose next event,
/// nested at the other vector's final IRETQ, points its frame's RSP at
/// [`FAKE_IRET`] (0: none).
#[cfg(feature = "test-hooks")]
static FORGE_IRET_RSP: AtomicU64 = AtomicU64::new(0);
/// The forged IRET frame: the outer exit's own, with ZF flipped.
#[cfg(feature = "test-hooks")]
static FAKE_IRET: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static NESTED_RIP: AtomicU64 = AtomicU64::new(0);
static OUTER_MC_TAKEN: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static sc_isr_region_start: u8;
    static sc_isr_region_end: u8;
}

#[cfg(feature = "test-hooks")]
extern "C" {
    fn sc_t_nested_probe(out: *mut [u64; 15], mc: u64);
    fn sc_t_flags_probe() -> u64;
    fn sc_t_df_probe(mc: u64) -> u64;
    fn sc_t_flags_probe_mc() -> u64;
}

#[cfg(feature = "test-hooks")]
/// The frame's GPRs in the probe's order.
fn gprs(f: &mut shadowcall::frame::TrapFrame) -> [&mut u64; 15] {
    [
        &mut f.rax, &mut f.rbx, &mut f.rcx, &mut f.rdx, &mut f.rsi, &mut f.rdi, &mut f.rbp, &mut f.r8, &mut f.r9,
        &mut f.r10, &mut f.r11, &mut f.r12, &mut f.r13, &mut f.r14, &mut f.r15,
    ]
}

/// An NMI or #MC (test-hooks builds, before the dispatcher's own handling).
/// The nested event the test armed: forge every GPR of its trap frame, as an
/// attacker who writes the IST stack would, and let it return. The probe's
/// own software #MC (the outer event of the second direction): let it
/// return. True: handled here; false: not the test's (a real NMI or #MC is
/// handled as before).
#[cfg(feature = "test-hooks")]
pub fn nested_hook(frame: &mut shadowcall::frame::TrapFrame) -> bool {
    let v = frame.vector;
    if v != VEC_NMI && v != VEC_MC {
        return false;
    }
    if FORGE_IRET_RSP.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        // Nested at the outer exit's IRETQ: its RSP (this frame's) points at
        // the outer IRET frame in the outer save area. The attacker, who
        // writes this frame, points it at a copy with ZF flipped instead.
        let outer = frame.rsp as *const u64;
        for (i, w) in FAKE_IRET.iter().enumerate() {
            // SAFETY: the outer save area's 5-word IRET frame (mapped, readable).
            w.store(unsafe { outer.add(i).read_volatile() }, Ordering::SeqCst);
        }
        FAKE_IRET[2].fetch_xor(RFLAGS_ZF, Ordering::SeqCst);
        FORGED_ZF_RIP.store(frame.rip, Ordering::SeqCst);
        frame.rsp = FAKE_IRET.as_ptr() as u64;
        NESTED_TAKEN.fetch_add(1, Ordering::SeqCst);
        return true;
    }
    if v == VEC_NMI && FORGE_ZF.swap(0, Ordering::SeqCst) != 0 {
        // The attacker flips ZF in the NMI's saved RFLAGS (review 10 F1).
        FORGED_ZF_RIP.store(frame.rip, Ordering::SeqCst);
        frame.rflags ^= RFLAGS_ZF;
        return true;
    }
    if FORGE_DF.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        // The attacker sets DF in the event's saved RFLAGS (review 11 F1).
        FORGED_DF_RIP.store(frame.rip, Ordering::SeqCst);
        frame.rflags |= RFLAGS_DF;
        return true;
    }
    if NESTED_VEC.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        NESTED_RIP.store(frame.rip, Ordering::SeqCst);
        for (i, r) in gprs(frame).into_iter().enumerate() {
            *r = FORGED + i as u64;
        }
        NESTED_TAKEN.fetch_add(1, Ordering::SeqCst);
        return true;
    }
    if v == VEC_MC && OUTER_MC.swap(0, Ordering::SeqCst) != 0 {
        OUTER_MC_TAKEN.fetch_add(1, Ordering::SeqCst);
        return true;
    }
    false
}

/// Run the probe once: the outer event `outer` (NMI or #MC) inside the
/// region, the other vector nested in its path at `at`; the registers the
/// probe got back.
#[cfg(feature = "test-hooks")]
fn probe(outer: u64, at: u8) -> [u64; 15] {
    let mut out = [0u64; 15];
    let (nested, point) = if outer == VEC_NMI { (VEC_MC, at) } else { (VEC_NMI, at + NESTED_MC_OUTER) };
    NESTED_VEC.store(nested, Ordering::SeqCst);
    OUTER_MC.store((outer == VEC_MC) as u64, Ordering::SeqCst);
    SC_T_NESTED.store(point, Ordering::SeqCst);
    // IF=0: no maskable interrupt may land in the critical region (its exit
    // would stop the kernel: no save for it).
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: asm probe (asm/entry.S): restores the callee-saved
        // registers, writes only `out`.
        unsafe { sc_t_nested_probe(&mut out, (outer == VEC_MC) as u64) };
    });
    SC_T_NESTED.store(0, Ordering::SeqCst);
    OUTER_MC.store(0, Ordering::SeqCst);
    NESTED_VEC.store(0, Ordering::SeqCst);
    out
}

#[cfg(not(feature = "test-hooks"))]
fn probe(_outer: u64, _at: u8) -> [u64; 15] {
    [0; 15]
}

pub fn sec_nested_save(st: &BootState) -> Outcome<'static> {
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    if !HOOKS {
        return Outcome::Skip("needs the test-hooks build");
    }
    let mut errors: Vec<String> = Vec::new();
    let c = this_cpu();
    let region = core::ptr::addr_of!(sc_isr_region_start) as u64..core::ptr::addr_of!(sc_isr_region_end) as u64;
    let points = [
        (NESTED_AT_ENTRY, "at the stub's entry"),
        (NESTED_IN_SAVE, "in the register save"),
        (NESTED_IN_RESTORE, "in the exit's restore"),
    ];
    for (outer, inner) in [(VEC_NMI, "#MC in the NMI path"), (VEC_MC, "NMI in the #MC path")] {
        for (at, point) in points {
            let name = format!("{inner}, {point}");
            let taken0 = NESTED_TAKEN.load(Ordering::SeqCst);
            let outer0 = c.counters.nmis.load(Ordering::SeqCst) + OUTER_MC_TAKEN.load(Ordering::SeqCst);
            let out = probe(outer, at);
            let outer1 = c.counters.nmis.load(Ordering::SeqCst) + OUTER_MC_TAKEN.load(Ordering::SeqCst);
            if outer1 == outer0 {
                errors.push(format!("{name}: the probe's outer event was not taken"));
            }
            if NESTED_TAKEN.load(Ordering::SeqCst) != taken0 + 1 {
                errors.push(format!("{name}: no nested event was taken: the test tested nothing"));
                continue;
            }
            let rip = NESTED_RIP.load(Ordering::SeqCst);
            if !region.contains(&rip) {
                errors.push(format!("{name}: the nested event interrupted {rip:#x}, outside the outer path"));
            }
            for (i, (&got, reg)) in out.iter().zip(GPRS).enumerate() {
                let want = NESTED_PATTERN + i as u64;
                if got != want {
                    let how = if got == FORGED + i as u64 { " (the forged value)" } else { "" };
                    errors.push(format!("{name}: {reg} came back {got:#x}{how}, expected {want:#x}"));
                }
            }
            for (area, vec) in [(mm::SAVE_AREA_NMI, "NMI"), (mm::SAVE_AREA_MC, "#MC")] {
                if cet::read_slot(mm::irq_save_page(c.index) + area + shadowcall::emul::save::BOUND) != 0 {
                    errors.push(format!("{name}: the {vec} save was left bound"));
                }
            }
        }
    }
    super::outcome_of(&errors)
}

/// The verdict of a region probe whose event (`what`) a hook forged: the
/// event was taken (`taken`, else the test tested nothing), it interrupted
/// the critical region (at `rip`), and the probe got back what it had
/// (`kept`; else `forged` says what came back).
#[cfg(feature = "test-hooks")]
fn region_probe_verdict(
    what: &str,
    taken: bool,
    rip: u64,
    kept: bool,
    errors: &mut Vec<String>,
    forged: impl FnOnce() -> String,
) {
    let region = core::ptr::addr_of!(sc_isr_region_start) as u64..core::ptr::addr_of!(sc_isr_region_end) as u64;
    if !taken {
        errors.push(format!("the {what} was not taken by the hook: the test tested nothing"));
    } else if !region.contains(&rip) {
        errors.push(format!("the {what} interrupted {rip:#x}, outside the region"));
    } else if !kept {
        errors.push(forged());
    }
}

/// `sec_region_flags` (review 10 F1): an NMI inside a critical region gets
/// its GPRs back from the WRSS-only save page, and its arithmetic flags too
/// (taken in registers at its entry): not from its trap frame (ordinary
/// memory), where an attacker could flip the flag a region's `cmp`/`jcc`
/// (or `cmp`/`adc`) pair carries across the NMI. The probe sets ZF, takes a
/// software NMI whose handler flips ZF in its frame, and must get ZF = 1
/// back.
pub fn sec_region_flags(st: &BootState) -> Outcome<'static> {
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    if !HOOKS {
        return Outcome::Skip("needs the test-hooks build");
    }
    #[cfg(feature = "test-hooks")]
    {
        FORGE_ZF.store(1, Ordering::SeqCst);
        // SAFETY: asm probe (kernel/asm/entry.S): clobbers RAX only; IF=0
        // so that only the probe's own NMI lands in the region.
        let zf = x86_64::instructions::interrupts::without_interrupts(|| unsafe { sc_t_flags_probe() });
        let armed = FORGE_ZF.swap(0, Ordering::SeqCst);
        let rip = FORGED_ZF_RIP.load(Ordering::SeqCst);
        let mut errors: Vec<String> = Vec::new();
        region_probe_verdict("probe's NMI", armed == 0, rip, zf == 1, &mut errors, || {
            format!("ZF came back {zf} from an NMI in the critical region at {rip:#x}: the forged RFLAGS")
        });
        return super::outcome_of(&errors);
    }
    #[allow(unreachable_code)]
    Outcome::Pass
}

/// `sec_region_df` (review 11 F1): an NMI or #MC inside a critical region
/// must not hand the region a direction flag (or TF, AC, NT) from its trap
/// frame: no region runs with DF=1, and the Rust handlers a region calls
/// (`sc_bp_handler`, `sc_exception_dispatch`, right after their `cld`)
/// assume DF=0. The probe clears DF, takes a software NMI (then #MC) whose
/// handler sets DF in its frame, and must get DF = 0 back.
pub fn sec_region_df(st: &BootState) -> Outcome<'static> {
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    if !HOOKS {
        return Outcome::Skip("needs the test-hooks build");
    }
    #[cfg(feature = "test-hooks")]
    {
        let mut errors: Vec<String> = Vec::new();
        for (name, vec, mc) in [("NMI", VEC_NMI, 0u64), ("#MC", VEC_MC, 1u64)] {
            FORGE_DF.store(vec, Ordering::SeqCst);
            // SAFETY: asm probe (kernel/asm/entry.S): clobbers RAX only and
            // leaves DF clear; IF=0 so that only the probe's own event lands
            // in the region.
            let rflags = x86_64::instructions::interrupts::without_interrupts(|| unsafe { sc_t_df_probe(mc) });
            let armed = FORGE_DF.swap(0, Ordering::SeqCst);
            let rip = FORGED_DF_RIP.load(Ordering::SeqCst);
            region_probe_verdict(
                &format!("probe's {name}"),
                armed == 0,
                rip,
                rflags & RFLAGS_DF == 0,
                &mut errors,
                || format!("DF came back 1 from an {name} in the critical region at {rip:#x}: the forged RFLAGS"),
            );
        }
        return super::outcome_of(&errors);
    }
    #[allow(unreachable_code)]
    Outcome::Pass
}

/// `sec_nested_iret_rsp` (review 11 F2): a #MC (NMI) whose exit has loaded
/// RSP with its save area's IRET frame and is about to IRETQ, interrupted
/// there by an NMI (#MC): the nested exit gives the outer one its registers
/// back from its own area, but RSP from its trap frame (ordinary memory). An
/// attacker who points it at a copy of the outer IRET frame with ZF flipped
/// hands the critical region the outer event interrupted a forged flag (the
/// RIP check of IRET passes: the copy keeps LIP). The probe sets ZF, takes
/// the outer event, and must get ZF = 1 back.
pub fn sec_nested_iret_rsp(st: &BootState) -> Outcome<'static> {
    if let Some(o) = skip_without_shstk(st) {
        return o;
    }
    if !HOOKS {
        return Outcome::Skip("needs the test-hooks build");
    }
    #[cfg(feature = "test-hooks")]
    {
        use crate::interrupts::NESTED_AT_IRET;
        let mut errors: Vec<String> = Vec::new();
        for (outer, nested) in [(VEC_MC, VEC_NMI), (VEC_NMI, VEC_MC)] {
            let name = |v| if v == VEC_NMI { "NMI" } else { "#MC" };
            let taken0 = NESTED_TAKEN.load(Ordering::SeqCst);
            FORGE_IRET_RSP.store(nested, Ordering::SeqCst);
            OUTER_MC.store((outer == VEC_MC) as u64, Ordering::SeqCst);
            let at = if outer == VEC_MC { NESTED_AT_IRET + NESTED_MC_OUTER } else { NESTED_AT_IRET };
            SC_T_NESTED.store(at, Ordering::SeqCst);
            // SAFETY: asm probes (kernel/asm/entry.S): clobber RAX only; IF=0
            // so that only the probe's own events land in the region.
            let zf = x86_64::instructions::interrupts::without_interrupts(|| unsafe {
                if outer == VEC_MC {
                    sc_t_flags_probe_mc()
                } else {
                    sc_t_flags_probe()
                }
            });
            SC_T_NESTED.store(0, Ordering::SeqCst);
            OUTER_MC.store(0, Ordering::SeqCst);
            let armed = FORGE_IRET_RSP.swap(0, Ordering::SeqCst);
            let rip = FORGED_ZF_RIP.load(Ordering::SeqCst);
            let taken = armed == 0 && NESTED_TAKEN.load(Ordering::SeqCst) != taken0;
            region_probe_verdict(&format!("nested {}", name(nested)), taken, rip, zf == 1, &mut errors, || {
                format!(
                    "ZF came back {zf} from a {} whose exit's IRETQ a {} interrupted (at {rip:#x}): RSP from the \
                     nested frame",
                    name(outer),
                    name(nested)
                )
            });
        }
        return super::outcome_of(&errors);
    }
    #[allow(unreachable_code)]
    Outcome::Pass
}
