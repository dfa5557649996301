//! GDT/TSS/IDT, the Rust side of the exception entry (asm/entry.S), and
//! fault recovery for self-tests that expect a fault.

use core::sync::atomic::Ordering;

use shadowcall::frame::TrapFrame;
use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::percpu::this_cpu;
use crate::recover::{fault, try_run, FaultInfo, NMI_FAULTS, NMI_LAST_FAULT, VEC_MC, VEC_NMI};
use crate::{apic, hooks, mm, patching};

/// The legacy PICs are remapped here and masked.
pub const PIC_BASE: u8 = 0x20;
/// Self-test vector delivered through its own IST stack.
pub const IST_TEST_VECTOR: u8 = 0x40;
// The self-test nesting points of the NMI/#MC paths (asm/entry.S, test-hooks
// builds; selftest::sec_nested drives them).
/// Where the NMI path raises its software #MC (asm/entry.S
/// `NESTED_TEST_HOOK`); 0: nowhere. At the stub's entry:
pub const NESTED_AT_ENTRY: u8 = 1;
/// In the middle of the NMI's save (RBX..R8 stored, R9..R15 not yet).
pub const NESTED_IN_SAVE: u8 = 2;
/// In the middle of the NMI exit's restore (R15..R8 loaded, the rest not yet).
pub const NESTED_IN_RESTORE: u8 = 3;
/// Right before the exit's IRETQ, RSP already at the save area's IRET frame
/// (review 11 F2).
pub const NESTED_AT_IRET: u8 = 7;
/// Added to a point: the #MC path raises a software NMI there instead.
pub const NESTED_MC_OUTER: u8 = 3;
/// `sc_t_nested_probe` loads `NESTED_PATTERN + i` into GPR i.
pub const NESTED_PATTERN: u64 = 0x5ca1_ab1e_0000_0000;

/// IST numbers (1-based, as in the IDT and the SSP table).
pub const IST_DF: usize = 1;
pub const IST_NMI: usize = 2;
pub const IST_MC: usize = 3;
pub const IST_DB: usize = 4;
pub const IST_TEST: usize = 5;

core::arch::global_asm!(
    concat!(
        include_str!("../../asm/regs.S"),
        include_str!("../asm/entry.S")
    ),
    IST_TEST_VECTOR = const IST_TEST_VECTOR,
    VEC_WAKE = const crate::apic::VEC_WAKE,
    VEC_SYNC = const crate::apic::VEC_SYNC,
    VEC_TIMER = const crate::apic::VEC_TIMER,
    VEC_SPURIOUS = const apic::SPURIOUS_VECTOR,
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
    SAVE_FLAGS = const shadowcall::emul::save::FLAGS,
    SAVE_IRET = const shadowcall::emul::save::IRET,
    SAVE_IRET_PTR = const shadowcall::emul::save::IRET_PTR,
    FRAME_RFLAGS = const core::mem::offset_of!(TrapFrame, rflags),
    FRAME_RSP = const core::mem::offset_of!(TrapFrame, rsp),
    FRAME_SS = const core::mem::offset_of!(TrapFrame, ss),
    ARITH_FLAGS = const ARITH_FLAGS,
    LAHF_FLAGS = const LAHF_FLAGS,
    OF_BIT = const OF_BIT,
    REGION_CLEAR_FLAGS = const REGION_CLEAR_FLAGS,
    MSR_FS_BASE = const 0xc000_0100u32,
    SAVE_AREA_NMI = const mm::SAVE_AREA_NMI,
    SAVE_AREA_MC = const mm::SAVE_AREA_MC,
    VEC_NMI = const VEC_NMI,
    VEC_MC = const VEC_MC,
    NESTED_AT_ENTRY = const NESTED_AT_ENTRY,
    NESTED_IN_SAVE = const NESTED_IN_SAVE,
    NESTED_IN_RESTORE = const NESTED_IN_RESTORE,
    NESTED_AT_IRET = const NESTED_AT_IRET,
    NESTED_PATTERN = const NESTED_PATTERN,
    NESTED_MC_OUTER = const NESTED_MC_OUTER,
    CR4_CET_BIT = const 23,
    TEST_HOOKS = const cfg!(feature = "test-hooks") as u8,
    options(att_syntax)
);

/// RFLAGS.CF, PF, AF, ZF, SF (the bits LAHF copies into AH) ...
const LAHF_FLAGS: u64 = 0xd5;
/// ... and OF: the arithmetic flags a critical region's `cmp`/`jcc` carries
/// across an NMI or #MC, given back from the save area (review 10 F1).
const OF_BIT: u64 = 11;
const ARITH_FLAGS: u64 = LAHF_FLAGS | 1 << OF_BIT;
/// RFLAGS.TF, DF, NT and AC: clear in every critical region, so its
/// NMI/#MC exit clears them rather than take them from the frame (review 11
/// F1).
const REGION_CLEAR_FLAGS: u64 = 1 << 8 | 1 << 10 | 1 << 14 | 1 << 18;

// The layout the engine's #BP exits read (shadowcall `entry`, README "Use
// it in your kernel"): link-time constants, next to `sc_stacks` and
// `sc_tramp_records` (mm.rs).
core::arch::global_asm!(
    ".globl SC_CPU_STACKS_SIZE, SC_MAX_CPUS, SC_NMI_STACK_OFF, SC_IST_STACK_SIZE, SC_NMI_SHSTK_OFF, SC_NMI_SHSTK_SIZE",
    ".set SC_CPU_STACKS_SIZE, {CPU_STACKS_SIZE}",
    ".set SC_MAX_CPUS, {MAX_CPUS}",
    ".set SC_NMI_STACK_OFF, {NMI_STACK_OFF}",
    ".set SC_IST_STACK_SIZE, {IST_STACK_SIZE}",
    ".set SC_NMI_SHSTK_OFF, {NMI_SHSTK_OFF}",
    ".set SC_NMI_SHSTK_SIZE, {PAGE_SIZE}",
    CPU_STACKS_SIZE = const mm::CPU_STACKS_SIZE,
    MAX_CPUS = const mm::MAX_CPUS,
    NMI_STACK_OFF = const mm::ist_stack_offset(IST_NMI),
    IST_STACK_SIZE = const mm::IST_STACK_SIZE,
    NMI_SHSTK_OFF = const mm::ist_shadow_offset(IST_NMI),
    PAGE_SIZE = const shadowcall_support::paging::PAGE_SIZE,
);

// A sync generation keeps the bumping CPU's index in its low bits.
const _: () = assert!(mm::MAX_CPUS <= 1 << shadowcall::emul::record::GEN_CPU_BITS);

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
        for (i, v) in [crate::apic::VEC_WAKE, crate::apic::VEC_SYNC, crate::apic::VEC_TIMER, apic::SPURIOUS_VECTOR]
            .into_iter()
            .enumerate()
        {
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
    if let Some(h) = hooks::test_hooks() {
        (h.before_dispatch)(frame);
    }
    #[cfg(feature = "test-hooks")]
    if hooks::test_hooks().is_some_and(|h| (h.nested)(frame)) {
        return;
    }
    match frame.vector {
        VEC_NMI => nmi(frame),
        v if v == crate::apic::VEC_WAKE as u64 => apic::eoi(),
        v if v == crate::apic::VEC_SYNC as u64 => {
            // The IRET that ends this handler serializes this CPU.
            crate::records::sync_word_ack();
            this_cpu().syncs.fetch_add(1, Ordering::Release);
            apic::eoi();
        }
        v if v == crate::apic::VEC_TIMER as u64 => {
            if let Some(h) = hooks::handlers() {
                (h.timer_tick)();
            }
            apic::eoi();
        }
        v if v == apic::SPURIOUS_VECTOR as u64 => {}
        v if v == IST_TEST_VECTOR as u64 => {
            if let Some(h) = hooks::handlers() {
                (h.ist_probe)(frame);
            }
        }
        v if (PIC_BASE as u64..PIC_BASE as u64 + 16).contains(&v) => {}
        _ => fault(
            frame,
            FaultInfo { vector: frame.vector, error_code: frame.error_code, rip: frame.rip, cr2: Cr2::read_raw() },
        ),
    }
    #[cfg(feature = "test-hooks")]
    if let Some(h) = hooks::test_hooks() {
        (h.after_dispatch)(frame);
    }
}

/// NMI: the handler body runs under its own recovery point, so a fault in it
/// unwinds inside the NMI (whose IRET then frees the IST shadow-stack token
/// and lets further NMIs in), never into the code the NMI interrupted.
/// Nothing is printed here (it would interleave with the interrupted output);
/// the test reads NMI_FAULTS and NMI_LAST_FAULT.
fn nmi(frame: &mut TrapFrame) {
    let cpu = this_cpu();
    cpu.in_nmi.store(true, Ordering::Relaxed);
    let h = hooks::handlers();
    if let Some(h) = h {
        (h.nmi_enter)();
    }
    let r = try_run(|| {
        if let Some(h) = h {
            (h.nmi_body)(frame);
        }
        0
    });
    if let Some(h) = h {
        (h.nmi_exit)();
    }
    cpu.in_nmi.store(false, Ordering::Relaxed);
    if let Err(f) = r {
        NMI_LAST_FAULT[0].store(f.vector, Ordering::Relaxed);
        NMI_LAST_FAULT[1].store(f.cr2, Ordering::Relaxed);
        NMI_FAULTS.fetch_add(1, Ordering::Release);
    }
}
