//! GDT/TSS/IDT, the Rust side of the exception entry (asm/entry.S), and
//! fault recovery for self-tests that expect a fault.

use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall::frame::TrapFrame;
use shadowcall::frame::RFLAGS_IF;
use shadowcall::shstk::{CpError, ShadowFrame, StackBounds, SLOT};
use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::mm::ShadowStackId;
use crate::percpu::this_cpu;
use crate::{apic, cet, mm, patching, selftest, smp};

pub const VEC_NMI: u64 = 2;
pub const VEC_MC: u64 = 18;
pub const VEC_UD: u64 = 6;
pub const VEC_GP: u64 = 13;
pub const VEC_PF: u64 = 14;
pub const VEC_CP: u64 = CpError::VECTOR as u64;
/// The legacy PICs are remapped here and masked.
pub const PIC_BASE: u8 = 0x20;
/// Self-test vector delivered through its own IST stack.
pub const IST_TEST_VECTOR: u8 = 0x40;
/// Not a CPU vector: a fault record made when the #BP handler refused to write.
pub const GUARD_REFUSAL: u64 = 0x100;

/// IST numbers (1-based, as in the IDT and the SSP table).
pub const IST_DF: usize = 1;
pub const IST_NMI: usize = 2;
pub const IST_MC: usize = 3;
pub const IST_DB: usize = 4;
pub const IST_TEST: usize = 5;

core::arch::global_asm!(
    concat!(include_str!("../../asm/sealed.S"), include_str!("../../asm/entry.S")),
    BP_GAP = const shadowcall::frame::BP_STACK_GAP,
    IST_TEST_VECTOR = const IST_TEST_VECTOR,
    VEC_WAKE = const smp::VEC_WAKE,
    VEC_SYNC = const smp::VEC_SYNC,
    VEC_TIMER = const smp::VEC_TIMER,
    VEC_SPURIOUS = const apic::SPURIOUS_VECTOR,
    FRAME_RIP = const offset_of!(TrapFrame, rip),
    FRAME_RSP = const offset_of!(TrapFrame, rsp),
    FRAME_RCX = const offset_of!(TrapFrame, rcx),
    BP_RSP_MIN = const shadowcall::frame::BP_RETURN_RSP_MIN,
    BP_RSP_MAX = const shadowcall::frame::BP_RETURN_RSP_MAX,
    FRAME_RFLAGS = const offset_of!(TrapFrame, rflags),
    RFLAGS_IF_BIT = const shadowcall::frame::RFLAGS_IF.trailing_zeros(),
    BPX_COUNT = const patching::BPX_COUNT,
    SEALED_LIVE = const shadowcall::patch::SEALED_MAGIC,
    SEALED_STATE = const offset_of!(shadowcall::patch::SealedHeader, magic),
    ENTRY_SIZE = const core::mem::size_of::<shadowcall::patch::SealedEntry>(),
    ENTRY_SHIFT = const core::mem::size_of::<shadowcall::patch::SealedEntry>().trailing_zeros(),
    SEALED_ENTRIES_OFF = const offset_of!(shadowcall::patch::SealedHeader, entries_off),
    SEALED_LEN = const offset_of!(shadowcall::patch::SealedHeader, len),
    SEALED_HEADER_SIZE = const core::mem::size_of::<shadowcall::patch::SealedHeader>(),
    ENTRY_SITE = const offset_of!(shadowcall::patch::SealedEntry, site),
    ENTRY_TARGET = const offset_of!(shadowcall::patch::SealedEntry, target),
    ENTRY_KIND = const offset_of!(shadowcall::patch::SealedEntry, kind),
    ENTRY_BYTES = const offset_of!(shadowcall::patch::SealedEntry, bytes),
    SITE_LEN = const shadowcall::patch::SITE_LEN,
    OPC_CALL_REL32 = const shadowcall::patch::OPC_CALL_REL32,
    OPC_JMP_REL32 = const shadowcall::patch::OPC_JMP_REL32,
    NOP5_WORD = const shadowcall::patch::NOP5_WORD,
    RET_WORD = const shadowcall::patch::RET_WORD,
    IN_EXIT = const shadowcall::emul::record::IN_EXIT_WORD,
    RECORD_PAGE_SHIFT = const shadowcall::emul::record::RECORD_PAGE_SIZE.trailing_zeros(),
    KIND_CALL = const shadowcall::patch::KIND_CALL,
    KIND_JMP = const shadowcall::patch::KIND_JMP,
    KIND_NOP = const shadowcall::patch::KIND_NOP,
    KIND_RET = const shadowcall::patch::KIND_RET,
    CPU_STACKS_SIZE = const mm::CPU_STACKS_SIZE,
    NMI_STACK_OFF = const mm::ist_stack_offset(IST_NMI),
    IST_STACK_SIZE = const mm::IST_STACK_SIZE,
    MAX_CPUS = const mm::MAX_CPUS,
    RECORD_SIZE = const shadowcall::emul::record::RECORD_SIZE,
    RECORDS_PER_PAGE = const shadowcall::emul::record::RECORDS_PER_PAGE,
    REC_SSP = const shadowcall::emul::record::REC_SSP,
    REC_RSP_IF = const shadowcall::emul::record::REC_RSP_IF,
    REC_SITE = const shadowcall::emul::record::REC_SITE,
    REC_TARGET = const shadowcall::emul::record::REC_TARGET,
    SAVE_SCRATCH = const shadowcall::emul::save::SCRATCH,
    SAVE_RAX = const shadowcall::emul::save::RAX,
    SAVE_RBX = const shadowcall::emul::save::RBX,
    SAVE_RCX = const shadowcall::emul::save::RCX,
    SAVE_RDX = const shadowcall::emul::save::RDX,
    SAVE_RSI = const shadowcall::emul::save::RSI,
    SAVE_RDI = const shadowcall::emul::save::RDI,
    SAVE_RBP = const shadowcall::emul::save::RBP,
    SAVE_R8 = const shadowcall::emul::save::R8,
    SAVE_R9 = const shadowcall::emul::save::R9,
    SAVE_R10 = const shadowcall::emul::save::R10,
    SAVE_R11 = const shadowcall::emul::save::R11,
    SAVE_R12 = const shadowcall::emul::save::R12,
    SAVE_R13 = const shadowcall::emul::save::R13,
    SAVE_R14 = const shadowcall::emul::save::R14,
    SAVE_R15 = const shadowcall::emul::save::R15,
    SAVE_BOUND = const shadowcall::emul::save::BOUND,
    SAVE_AREA_NMI = const mm::SAVE_AREA_NMI,
    SAVE_AREA_MC = const mm::SAVE_AREA_MC,
    VEC_NMI = const VEC_NMI,
    VEC_MC = const VEC_MC,
    NESTED_AT_ENTRY = const selftest::sec_nested::NESTED_AT_ENTRY,
    NESTED_IN_SAVE = const selftest::sec_nested::NESTED_IN_SAVE,
    NESTED_IN_RESTORE = const selftest::sec_nested::NESTED_IN_RESTORE,
    NESTED_PATTERN = const selftest::sec_nested::NESTED_PATTERN,
    NESTED_MC_OUTER = const selftest::sec_nested::NESTED_MC_OUTER,
    CR4_CET_BIT = const 23,
    TEST_HOOKS = const cfg!(feature = "test-hooks") as u8,
    TRAMP_RET1 = const shadowcall::tramp::TRAMP_RET1_OFF,
    TRAMP_RET2 = const shadowcall::tramp::TRAMP_RET2_OFF,
    TRAMP_TRAP = const shadowcall::tramp::TRAMP_TRAP_OFF,
    options(att_syntax)
);

core::arch::global_asm!(
    include_str!("../../asm/recover.S"),
    TRY_RSP = const offset_of!(TryCtx, rsp),
    TRY_SSP = const offset_of!(TryCtx, ssp),
    TRY_RFLAGS = const offset_of!(TryCtx, rflags),
    options(att_syntax)
);

// The #BP exit indexes sealed entries with a shift.
const _: () = assert!(core::mem::size_of::<shadowcall::patch::SealedEntry>().is_power_of_two());

// TryCtx is only passed by pointer; asm touches its leading u64 fields.
#[allow(improper_ctypes)]
extern "C" {
    static SC_ISR_TABLE: [u64; 32];
    static SC_ISR_PIC_SPURIOUS: [u64; 3];
    static SC_ISR_IST_TEST: u64;
    static SC_ISR_APIC: [u64; 4];
    static SC_ISR_CET_IST: [u64; 2];
    fn sc_try_call(f: extern "C" fn(u64) -> u64, arg: u64, ctx: *mut TryCtx) -> u64;
    fn sc_try_recover();
    /// The return address `sc_try_call`'s call pushes: the recovery point's marker.
    static sc_try_marker: u8;
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

struct Tables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: [Once<TaskStateSegment>; mm::MAX_CPUS] = [const { Once::new() }; mm::MAX_CPUS];
static GDT: [Once<Tables>; mm::MAX_CPUS] = [const { Once::new() }; mm::MAX_CPUS];
static IDT: Once<InterruptDescriptorTable> = Once::new();
/// The IDT with shadow stacks on (NMI and #MC through ISR_CET_IST).
static IDT_CET: Once<InterruptDescriptorTable> = Once::new();

/// Load this CPU's GDT with its TSS (carrying its IST stacks), and the shared IDT.
pub fn init(cpu: usize) {
    let tss = TSS[cpu].call_once(|| {
        let mut tss = TaskStateSegment::new();
        for ist in 1..=mm::IST_COUNT {
            tss.interrupt_stack_table[ist - 1] = VirtAddr::new(mm::ist_stack(cpu, ist).hi);
        }
        tss
    });
    let t = GDT[cpu].call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        Tables { gdt, code, data, tss }
    });
    t.gdt.load();
    // SAFETY: the selectors come from the GDT just loaded.
    unsafe {
        CS::set_reg(t.code);
        SS::set_reg(t.data);
        DS::set_reg(t.data);
        ES::set_reg(t.data);
        load_tss(t.tss);
    }
    // FS base: this CPU's save page (asm/entry.S ISR_CET_IST).
    x86_64::registers::model_specific::FsBase::write(VirtAddr::new(mm::irq_save_page(cpu)));
    // The CET IDT is loaded once shadow stacks are on (load_cet_idt).
    IDT.call_once(|| build_idt(false)).load();
    if cpu == 0 {
        mask_legacy_pic();
    }
}

/// Switch this CPU to the IDT whose NMI and #MC entries keep the registers
/// of an interrupted #BP exit on the save page (before shadow stacks go on).
pub fn load_cet_idt() {
    IDT_CET.call_once(|| build_idt(true)).load();
}

/// An exit found a critical region (asm/entry.S) interrupted without a
/// register save bound to it.
#[no_mangle]
extern "C" fn sc_isr_save_lost_report(frame: &TrapFrame) -> ! {
    crate::diag!(
        "PANIC: SECURITY: vector {} interrupted a critical region (rip={:#x}) and no register save is bound to it; not returning",
        frame.vector,
        frame.rip
    );
    crate::exit(false)
}

fn build_idt(cet: bool) -> InterruptDescriptorTable {
    let mut idt = InterruptDescriptorTable::new();
    // SAFETY: symbol addresses of the asm stubs.
    let stub = |v: usize| VirtAddr::new(unsafe { SC_ISR_TABLE[v] });
    macro_rules! set {
        ($field:ident, $vec:expr) => {
            idt.$field.set_handler_addr(stub($vec))
        };
    }
    // SAFETY: every stub saves all registers and ends in IRETQ with the stack
    // as the CPU left it; the TSS has a stack for each IST index used.
    unsafe {
        set!(divide_error, 0);
        set!(debug, 1).set_stack_index((IST_DB - 1) as u16);
        // (set_handler_addr resets the entry's options: the IST index after it.)
        let nmi = if cet { VirtAddr::new(SC_ISR_CET_IST[0]) } else { stub(2) };
        idt.non_maskable_interrupt.set_handler_addr(nmi).set_stack_index((IST_NMI - 1) as u16);
        set!(breakpoint, 3);
        set!(overflow, 4);
        set!(bound_range_exceeded, 5);
        set!(invalid_opcode, 6);
        set!(device_not_available, 7);
        set!(double_fault, 8).set_stack_index((IST_DF - 1) as u16);
        set!(invalid_tss, 10);
        set!(segment_not_present, 11);
        set!(stack_segment_fault, 12);
        set!(general_protection_fault, 13);
        set!(page_fault, 14);
        set!(x87_floating_point, 16);
        set!(alignment_check, 17);
        let mc = if cet { VirtAddr::new(SC_ISR_CET_IST[1]) } else { stub(18) };
        idt.machine_check.set_handler_addr(mc).set_stack_index((IST_MC - 1) as u16);
        set!(simd_floating_point, 19);
        set!(virtualization, 20);
        set!(cp_protection_exception, 21);
        set!(hv_injection_exception, 28);
        set!(vmm_communication_exception, 29);
        set!(security_exception, 30);
        for (i, irq) in [0usize, 7, 15].into_iter().enumerate() {
            idt[PIC_BASE + irq as u8].set_handler_addr(VirtAddr::new(SC_ISR_PIC_SPURIOUS[i]));
        }
        idt[IST_TEST_VECTOR].set_handler_addr(VirtAddr::new(SC_ISR_IST_TEST)).set_stack_index((IST_TEST - 1) as u16);
        for (i, v) in [smp::VEC_WAKE, smp::VEC_SYNC, smp::VEC_TIMER, apic::SPURIOUS_VECTOR].into_iter().enumerate() {
            idt[v].set_handler_addr(VirtAddr::new(SC_ISR_APIC[i]));
        }
    }
    idt
}

/// Remap the legacy PICs away from the exception vectors and mask them.
fn mask_legacy_pic() {
    use x86_64::instructions::port::Port;
    let seq: [(u16, u8); 10] = [
        (0x20, 0x11),
        (0xa0, 0x11),
        (0x21, PIC_BASE),
        (0xa1, PIC_BASE + 8),
        (0x21, 4),
        (0xa1, 2),
        (0x21, 1),
        (0xa1, 1),
        (0x21, 0xff),
        (0xa1, 0xff),
    ];
    for (port, val) in seq {
        // SAFETY: standard 8259A initialization; no memory effects.
        unsafe { Port::<u8>::new(port).write(val) };
    }
}

/// Called by asm/entry.S for every vector.
#[no_mangle]
extern "C" fn sc_exception_dispatch(frame: &mut TrapFrame) {
    patching::note_frame_alignment(frame);
    #[cfg(feature = "test-hooks")]
    if selftest::sec_nested::nested_hook(frame) {
        return;
    }
    match frame.vector {
        VEC_NMI => nmi(frame),
        v if v == smp::VEC_WAKE as u64 => apic::eoi(),
        v if v == smp::VEC_SYNC as u64 => {
            // The IRET that ends this handler serializes this CPU.
            patching::sync_word_ack();
            this_cpu().syncs.fetch_add(1, Ordering::Release);
            apic::eoi();
        }
        v if v == smp::VEC_TIMER as u64 => {
            selftest::smp_tests::timer_tick();
            apic::eoi();
        }
        v if v == apic::SPURIOUS_VECTOR as u64 => {}
        v if v == IST_TEST_VECTOR as u64 => selftest::cet_tests::ist_probe(frame),
        v if (PIC_BASE as u64..PIC_BASE as u64 + 16).contains(&v) => {}
        _ => fault(
            frame,
            FaultInfo { vector: frame.vector, error_code: frame.error_code, rip: frame.rip, cr2: Cr2::read_raw() },
        ),
    }
    #[cfg(feature = "test-hooks")]
    selftest::sec_tests::after_dispatch(frame);
}

/// NMI: the handler body runs under its own recovery point, so a fault in it
/// unwinds inside the NMI (whose IRET then frees the IST shadow-stack token
/// and lets further NMIs in), never into the code the NMI interrupted.
/// Nothing is printed here (it would interleave with the interrupted output);
/// the test reads NMI_FAULTS and NMI_LAST_FAULT.
fn nmi(frame: &mut TrapFrame) {
    let cpu = this_cpu();
    cpu.in_nmi.store(true, Ordering::Relaxed);
    selftest::nmi_tests::nmi_depth_enter();
    let r = try_run(|| {
        selftest::smp_tests::nmi(frame);
        0
    });
    selftest::nmi_tests::nmi_depth_exit();
    cpu.in_nmi.store(false, Ordering::Relaxed);
    if let Err(f) = r {
        NMI_LAST_FAULT[0].store(f.vector, Ordering::Relaxed);
        NMI_LAST_FAULT[1].store(f.cr2, Ordering::Relaxed);
        NMI_FAULTS.fetch_add(1, Ordering::Release);
    }
}

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

/// Does the instruction at `lip` (kernel text, read-only) read as IRETQ?
fn is_iretq(lip: u64) -> bool {
    let (start, end) = mm::text_range();
    if lip < start || lip > end - IRETQ.len() as u64 {
        return false;
    }
    // SAFETY: inside the mapped, read-only kernel text (checked above).
    let bytes = unsafe { core::slice::from_raw_parts(lip as *const u8, IRETQ.len()) };
    bytes == IRETQ
}

/// A recovery point's marker found on a shadow stack.
#[derive(Clone, Copy)]
struct Marker {
    /// The slot holding `sc_try_marker`; the recovery SSP is `slot + 8`.
    slot: u64,
    stack: ShadowStackId,
}

/// Find the recovery point for the fault whose shadow frame is `f` (on
/// `fstack`): scan the interrupted shadow stack upward from the frame's
/// previous SSP for the first slot holding the marker. Everything used is on
/// the shadow stack, in read-only text, or in the static layout.
/// `Ok(None)`: the stack's end was reached without one.
/// `Err`: the scan would cross another exception frame, or the previous SSP
/// is not on this CPU's shadow stacks.
fn find_marker(f: ShadowFrame, fstack: ShadowStackId) -> Result<Option<Marker>, &'static str> {
    let prev = cet::read_slot(f.prev_ssp_slot());
    let lip = cet::read_slot(f.lip_slot());
    let cs = kernel_cs();
    let marker = core::ptr::addr_of!(sc_try_marker) as u64;
    let Some(stack) = mm::shadow_stack_at(prev).filter(|s| s.cpu == fstack.cpu) else {
        return Err("the frame's previous SSP is not on this CPU's shadow stacks");
    };
    if !prev.is_multiple_of(SLOT) {
        return Err("the frame's previous SSP is not slot-aligned");
    }
    let mut slot = prev;
    // A fault raised by an IRETQ (e.g. #CP when only RIP was changed): the
    // frame it was returning through sits at the previous SSP and is dead.
    // Step over it only if it stays on this stack (no IST switch: an IST
    // frame's token would stay busy).
    if is_iretq(lip)
        && stack.bounds.holds_slots(slot, ShadowFrame::SLOTS)
        && cet::read_slot(slot + ShadowFrame::CS) == cs
    {
        let dead = ShadowFrame::at(slot);
        let up = cet::read_slot(dead.prev_ssp_slot());
        if !up.is_multiple_of(SLOT) || up < dead.above() || !stack.bounds.holds_slots(up, 1) {
            return Err("a fault at the IRET of a handler that switched shadow stacks (IST): its token stays busy");
        }
        slot = up;
    }
    while stack.bounds.holds_slots(slot, 2) {
        let v = cet::read_slot(slot);
        if v == cs {
            return Err("the nearest recovery point lies across another exception frame: \
                        a fault in an exception handler (NMI, #BP, IST) is not unwound into the code it interrupted");
        }
        // An exception frame's LIP slot is followed by its CS slot; a marker by a return address.
        if v == marker && cet::read_slot(slot + SLOT) != cs {
            return Ok(Some(Marker { slot, stack }));
        }
        slot += SLOT;
    }
    Ok(None)
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
/// With shadow stacks the recovery point is found on the shadow stack (see
/// `find_marker`) and the frame's previous SSP is set to just above its
/// marker: only ever a pop towards it on the same stack, never an SSP taken
/// from ordinary memory. The per-CPU try stack only supplies the bookkeeping
/// (`TryCtx`) of that point. A fault whose nearest recovery point lies across
/// another exception frame (a fault inside the #BP handler, or in an NMI/IST
/// handler without its own recovery point) stops the kernel.
pub fn fault(frame: &mut TrapFrame, info: FaultInfo) {
    let cpu = this_cpu();
    let shadow = if cet::active() {
        let (f, fstack) = shadow_frame_of(frame).unwrap_or_else(|why| refuse_unwind(frame, &info, why));
        match find_marker(f, fstack) {
            Ok(m) => Some((f, fstack, m)),
            Err(why) => refuse_unwind(frame, &info, why),
        }
    } else {
        None
    };
    let marker = shadow.and_then(|s| s.2);
    let ctx = match (cpu.top_try(), &shadow) {
        (None, None | Some((_, _, None))) => {
            report(frame, &info);
            crate::exit(false);
        }
        (None, Some((_, _, Some(_)))) => {
            refuse_unwind(frame, &info, "a marker is on the shadow stack but no recovery point is registered")
        }
        (Some(_), Some((_, _, None))) => {
            refuse_unwind(frame, &info, "no recovery point on the interrupted shadow stack")
        }
        (Some(ctx), _) => ctx,
    };
    // SAFETY: the try stack holds pointers to TryCtx of live try_run frames;
    // under the threat model it may be forged, which can redirect only this
    // ordinary-memory write and the checked values read below.
    let ctx = unsafe { &mut *ctx };
    let home = shadow.map_or(cpu.index, |s| s.1.cpu);
    let rsp = recovery_rsp(frame, ctx, marker, home).unwrap_or_else(|why| refuse_unwind(frame, &info, why));
    let recover = sc_try_recover as *const () as u64;
    if let Some((f, _, Some(m))) = shadow {
        let ssp = m.slot + SLOT;
        if ctx.ssp != ssp {
            FORGED_TRY_CTX.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: both slots belong to the frame of the exception being
        // handled, found from RDSSP and checked (shadow_frame_of); the values
        // are a code address of this kernel and an SSP found by scanning the
        // shadow stack (find_marker), on the stack the frame returns to.
        unsafe {
            cet::wrss(f.lip_slot(), recover);
            cet::wrss(f.prev_ssp_slot(), ssp);
        }
        // Emulations started between the fault and the recovery point will
        // never reach their second trap: free their trampoline records.
        patching::free_records_between(f.base, ssp);
    }
    ctx.fault = Some(info);
    frame.rip = recover;
    frame.rsp = rsp;
    frame.rflags = RFLAGS_FIXED | (ctx.rflags & RFLAGS_IF);
    cpu.lifo().truncate(ctx.lifo_depth);
    cpu.counters.window_depth.store(ctx.window_depth, Ordering::Relaxed);
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
        window_depth: cpu.counters.window_depth.load(Ordering::Relaxed),
        ..TryCtx::default()
    };
    cpu.push_try(&mut ctx);
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
