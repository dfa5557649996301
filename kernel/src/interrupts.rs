//! GDT/TSS/IDT, the Rust side of the exception entry (asm/entry.S), and
//! fault recovery for self-tests that expect a fault.

use core::mem::offset_of;

use shadowcall::frame::TrapFrame;
use shadowcall::shstk::{CpError, ShadowFrame};
use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::percpu::this_cpu;
use crate::{apic, cet, mm, patching, selftest, smp};

pub const VEC_NMI: u64 = 2;
pub const VEC_BP: u64 = 3;
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
    include_str!("../../asm/entry.S"),
    BP_GAP = const shadowcall::frame::BP_STACK_GAP,
    IST_TEST_VECTOR = const IST_TEST_VECTOR,
    TRY_RSP = const offset_of!(TryCtx, rsp),
    TRY_SSP = const offset_of!(TryCtx, ssp),
    TRY_RFLAGS = const offset_of!(TryCtx, rflags),
    MSR_S_CET = const 0x6a2u32,
    VEC_WAKE = const smp::VEC_WAKE,
    VEC_SYNC = const smp::VEC_SYNC,
    VEC_TIMER = const smp::VEC_TIMER,
    VEC_SPURIOUS = const apic::SPURIOUS_VECTOR,
    FRAME_RIP = const offset_of!(TrapFrame, rip),
    FRAME_RSP = const offset_of!(TrapFrame, rsp),
    FRAME_RFLAGS = const offset_of!(TrapFrame, rflags),
    RFLAGS_IF_BIT = const shadowcall::frame::RFLAGS_IF.trailing_zeros(),
    BPX_COUNT = const patching::BPX_COUNT,
    SEALED_LIVE = const shadowcall::patch::SEALED_MAGIC,
    SEALED_STATE = const offset_of!(shadowcall::patch::SealedHeader, magic),
    ENTRY_SIZE = const core::mem::size_of::<shadowcall::patch::SealedEntry>(),
    ENTRY_SITE = const offset_of!(shadowcall::patch::SealedEntry, site),
    ENTRY_TARGET = const offset_of!(shadowcall::patch::SealedEntry, target),
    ENTRY_KIND = const offset_of!(shadowcall::patch::SealedEntry, kind),
    KIND_CALL = const shadowcall::patch::KIND_CALL,
    KIND_JMP = const shadowcall::patch::KIND_JMP,
    KIND_NOP = const shadowcall::patch::KIND_NOP,
    KIND_RET = const shadowcall::patch::KIND_RET,
    CPU_STACKS_SIZE = const mm::CPU_STACKS_SIZE,
    MAX_CPUS = const mm::MAX_CPUS,
    RECORD_SIZE = const shadowcall::emul::record::RECORD_SIZE,
    RECORDS_PER_PAGE = const shadowcall::emul::record::RECORDS_PER_PAGE,
    REC_SSP = const shadowcall::emul::record::REC_SSP,
    REC_RSP_IF = const shadowcall::emul::record::REC_RSP_IF,
    REC_SITE = const shadowcall::emul::record::REC_SITE,
    REC_TARGET = const shadowcall::emul::record::REC_TARGET,
    TRAMP_RET1 = const shadowcall::tramp::TRAMP_RET1_OFF,
    TRAMP_RET2 = const shadowcall::tramp::TRAMP_RET2_OFF,
    TRAMP_TRAP = const shadowcall::tramp::TRAMP_TRAP_OFF,
    options(att_syntax)
);

// TryCtx is only passed by pointer; asm touches its leading u64 fields.
#[allow(improper_ctypes)]
extern "C" {
    static SC_ISR_TABLE: [u64; 32];
    static SC_ISR_PIC_SPURIOUS: [u64; 3];
    static SC_ISR_IST_TEST: u64;
    static SC_ISR_APIC: [u64; 4];
    fn sc_try_call(f: extern "C" fn(u64) -> u64, arg: u64, ctx: *mut TryCtx) -> u64;
    fn sc_try_recover();
}

/// A fault a self-test caught.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultInfo {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cr2: u64,
}

/// A recovery point (asm/entry.S `sc_try_call` fills the first three fields).
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

struct Tables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: [Once<TaskStateSegment>; mm::MAX_CPUS] = [const { Once::new() }; mm::MAX_CPUS];
static GDT: [Once<Tables>; mm::MAX_CPUS] = [const { Once::new() }; mm::MAX_CPUS];
static IDT: Once<InterruptDescriptorTable> = Once::new();

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
    IDT.call_once(build_idt).load();
    if cpu == 0 {
        mask_legacy_pic();
    }
}

fn build_idt() -> InterruptDescriptorTable {
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
        set!(non_maskable_interrupt, 2).set_stack_index((IST_NMI - 1) as u16);
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
        set!(machine_check, 18).set_stack_index((IST_MC - 1) as u16);
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
    match frame.vector {
        VEC_NMI => selftest::smp_tests::nmi(frame),
        v if v == smp::VEC_WAKE as u64 => apic::eoi(),
        v if v == smp::VEC_SYNC as u64 => {
            // The IRET that ends this handler serializes this CPU.
            this_cpu().syncs.fetch_add(1, core::sync::atomic::Ordering::Release);
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
}

/// A fault: unwind to the innermost recovery point, or report and stop.
pub fn fault(frame: &mut TrapFrame, info: FaultInfo) {
    let cpu = this_cpu();
    let Some(ctx) = cpu.top_try() else {
        report(frame, &info);
        crate::exit(false);
    };
    // SAFETY: recovery points live on the stack of the sc_try_call frame that
    // is still active below this exception.
    let ctx = unsafe { &mut *ctx };
    ctx.fault = Some(info);
    if let Err(why) = redirect(frame, sc_try_recover as *const () as u64, Some(ctx.ssp)) {
        report(frame, &info);
        crate::diag!("PANIC: cannot unwind to the recovery point: {why}");
        crate::exit(false);
    }
    frame.rsp = ctx.rsp;
    frame.rflags = ctx.rflags;
    cpu.lifo().truncate(ctx.lifo_depth);
    cpu.counters.window_depth.store(ctx.window_depth, core::sync::atomic::Ordering::Relaxed);
}

/// Make the IRET of `frame` go to `rip` (and, with shadow stacks, continue on
/// the shadow stack at `new_ssp`): the saved RIP and the shadow frame's LIP
/// slot change together, or IRET would raise #CP(2). Checks the shadow frame
/// is where and what we expect before any WRSS.
pub fn redirect(frame: &mut TrapFrame, rip: u64, new_ssp: Option<u64>) -> Result<(), &'static str> {
    if cet::active() {
        let f = ShadowFrame::at(frame.ssp);
        let Some(stack) = mm::shadow_stack_of(f.base) else {
            return Err("shadow frame not on a registered shadow stack");
        };
        if !stack.holds_slots(f.base, ShadowFrame::SLOTS) {
            return Err("shadow frame crosses its stack's end");
        }
        if cet::read_slot(f.lip_slot()) != frame.rip || cet::read_slot(f.cs_slot()) != frame.cs {
            return Err("shadow frame's LIP/CS slots do not match the IRET frame");
        }
        if let Some(ssp) = new_ssp {
            if mm::shadow_stack_of(ssp).is_none() || ssp % 8 != 0 {
                return Err("target SSP is not on a registered shadow stack");
            }
        }
        // SAFETY: slots verified above; values are ours (a code address of
        // this kernel and a recovery SSP recorded by sc_try_call).
        unsafe {
            cet::wrss(f.lip_slot(), rip);
            if let Some(ssp) = new_ssp {
                cet::wrss(f.prev_ssp_slot(), ssp);
            }
        }
    }
    frame.rip = rip;
    Ok(())
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
        window_depth: cpu.counters.window_depth.load(core::sync::atomic::Ordering::Relaxed),
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
