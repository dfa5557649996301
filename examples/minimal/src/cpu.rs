//! The example's own descriptor tables: a GDT with a TSS, an IDT whose
//! exception vectors all report and end the run (asm/boot.S stubs), but
//! #BP, which goes to the engine (the crate's `sc_isr_3`).

use alloc::boxed::Box;

use x86_64::instructions::segmentation::{Segment, CS, SS};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::{PrivilegeLevel, VirtAddr};

/// Exception vectors with a stub (asm/boot.S).
pub const FAULT_VECTORS: usize = 32;
/// Bytes between two stubs.
pub const FAULT_STUB_SIZE: usize = 16;
/// Vectors whose frame starts with an error code.
const ERROR_CODE_VECTORS: [u64; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
const PAGE_FAULT: u64 = 14;
/// Gate type and attributes: present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u64 = 0x8e;
/// #BP: the engine's entry stub (an interrupt gate without IST).
const BREAKPOINT: usize = 3;

/// An IDT gate (Intel SDM vol. 3, 6.14.1): the handler's address split in three.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate(u64, u64);

impl Gate {
    fn new(handler: u64, cs: SegmentSelector) -> Gate {
        let low16 = handler & 0xffff;
        let mid16 = (handler >> 16) & 0xffff;
        Gate(low16 | u64::from(cs.0) << 16 | INTERRUPT_GATE << 40 | mid16 << 48, handler >> 32)
    }
}

extern "C" {
    static example_fault_stubs: [u8; FAULT_VECTORS * FAULT_STUB_SIZE];
    /// The crate's #BP entry stub (feature `entry`).
    fn sc_isr_3();
}

/// Load a GDT (kernel code, TSS) and an IDT; the tables live for good on the heap.
pub fn init() {
    let tss: &'static TaskStateSegment = Box::leak(Box::new(TaskStateSegment::new()));
    let gdt = Box::leak(Box::new(GlobalDescriptorTable::<4>::empty()));
    let code = gdt.append(Descriptor::kernel_code_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    gdt.load();
    // SAFETY: `code` is a valid 64-bit code segment of the GDT just loaded; the
    // null SS is valid at CPL 0 in 64-bit mode; the TSS descriptor is unused so far.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(SegmentSelector::new(0, PrivilegeLevel::Ring0));
        load_tss(tss_sel);
    }
    let stubs = core::ptr::addr_of!(example_fault_stubs) as u64;
    let handler = |v| {
        if v == BREAKPOINT {
            sc_isr_3 as unsafe extern "C" fn() as usize as u64
        } else {
            stubs + (v * FAULT_STUB_SIZE) as u64
        }
    };
    let idt: &'static [Gate; FAULT_VECTORS] =
        Box::leak(Box::new(core::array::from_fn(|v| Gate::new(handler(v), code))));
    let limit = (size_of_val(idt) - 1) as u16;
    // SAFETY: the table lives for good and each gate points at a stub that never returns.
    unsafe { lidt(&DescriptorTablePointer { limit, base: VirtAddr::new(idt.as_ptr() as u64) }) };
}

/// Called by every stub with the vector and the stack pointer at the stub (the CPU's frame).
#[no_mangle]
extern "C" fn example_fault(vector: u64, frame: *const u64) -> ! {
    let (code, rip_slot) = if ERROR_CODE_VECTORS.contains(&vector) {
        // SAFETY: the CPU pushed an error code and then the frame at `frame`.
        (unsafe { *frame }, 1)
    } else {
        (0, 0)
    };
    // SAFETY: `frame` points at the CPU's exception frame; RIP is its first word.
    let rip = unsafe { *frame.add(rip_slot) };
    let cr2 = if vector == PAGE_FAULT { Cr2::read_raw() } else { 0 };
    println!("# PANIC: exception {vector} at rip {rip:#x}, error code {code:#x}, cr2 {cr2:#x}");
    crate::exit(false)
}
