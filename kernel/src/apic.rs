//! The local APIC: x2APIC (MSRs) where CPUID has it, xAPIC (MMIO) otherwise.
//! IPIs (fixed, NMI, INIT, SIPI), EOI, the timer, and the IRR.

use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::registers::model_specific::Msr;

use crate::mm::LAPIC_BASE;

/// IA32_APIC_BASE
const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// x2APIC register MSR = X2APIC_MSR_BASE + (xAPIC MMIO offset >> 4).
const X2APIC_MSR_BASE: u32 = 0x800;

// Register offsets (xAPIC MMIO).
const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
#[cfg(feature = "test-hooks")]
const REG_IRR: u32 = 0x200;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_DIV: u32 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
/// Vector of spurious APIC interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Vector of the IPI that wakes a CPU to look for work.
pub const VEC_WAKE: u8 = 0xf0;
/// Vector of the patcher's sync IPI.
pub const VEC_SYNC: u8 = 0xf1;
/// Vector of the local APIC timer.
pub const VEC_TIMER: u8 = 0xf2;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// xAPIC: the destination APIC id sits in bits 31:24 of ICR high (and of the ID register).
const XAPIC_DEST_SHIFT: u32 = 24;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// Divide configuration: divide by 1.
const TIMER_DIVIDE_1: u32 = 0b1011;

/// ICR delivery modes and flags.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Delivery {
    Fixed = 0b000 << 8,
    Nmi = 0b100 << 8,
    Init = 0b101 << 8,
    Startup = 0b110 << 8,
}
const ICR_LEVEL_ASSERT: u32 = 1 << 14;

static X2APIC: AtomicBool = AtomicBool::new(false);

pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

fn read(reg: u32) -> u32 {
    if is_x2apic() {
        // SAFETY: an x2APIC register MSR; reads have no side effects.
        unsafe { Msr::new(X2APIC_MSR_BASE + (reg >> 4)).read() as u32 }
    } else {
        // SAFETY: the xAPIC page is mapped uncached at LAPIC_BASE.
        unsafe { ((LAPIC_BASE + reg as u64) as *const u32).read_volatile() }
    }
}

fn write(reg: u32, val: u32) {
    if is_x2apic() {
        // SAFETY: an x2APIC register MSR of this CPU's local APIC.
        unsafe { Msr::new(X2APIC_MSR_BASE + (reg >> 4)).write(val as u64) }
    } else {
        // SAFETY: the xAPIC page is mapped uncached at LAPIC_BASE.
        unsafe { ((LAPIC_BASE + reg as u64) as *mut u32).write_volatile(val) }
    }
}

/// Choose the mode (the boot CPU decides for all) and enable this CPU's APIC.
pub fn init(x2apic: bool) {
    X2APIC.store(x2apic, Ordering::Relaxed);
    enable_local();
}

/// Enable this CPU's local APIC (software-enabled, all priorities accepted).
pub fn enable_local() {
    let mut base = Msr::new(MSR_APIC_BASE);
    // SAFETY: enabling the local APIC (and x2APIC mode when the CPU has it).
    unsafe {
        let v = base.read() | APIC_BASE_ENABLE | if is_x2apic() { APIC_BASE_X2APIC } else { 0 };
        base.write(v);
    }
    write(REG_SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    write(REG_TPR, 0);
    write(REG_LVT_TIMER, LVT_MASKED);
}

pub fn id() -> u32 {
    if is_x2apic() {
        read(REG_ID)
    } else {
        read(REG_ID) >> XAPIC_DEST_SHIFT
    }
}

pub fn eoi() {
    write(REG_EOI, 0);
}

/// Is `vector` pending in this CPU's IRR (requested, not yet delivered)?
#[cfg(feature = "test-hooks")]
pub fn irr_pending(vector: u8) -> bool {
    read(REG_IRR + 0x10 * (vector as u32 / 32)) & (1 << (vector % 32)) != 0
}

/// Wait until the xAPIC has accepted the last IPI written to its ICR.
fn xapic_icr_idle() {
    while read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// Send an IPI. In x2APIC mode the ICR is one 64-bit MSR write. In xAPIC mode
/// it is two writes (destination, then command, which sends), and an NMI
/// handler that sends its own IPI between them would retarget the
/// interrupted one (a lost sync IPI hangs the patcher). So every sender
/// saves the destination register it finds and puts it back after its own
/// IPI has gone: a sender interrupted between its two writes then sends to
/// the destination it wrote, at any nesting depth.
fn icr(dest: u32, low: u32) {
    if is_x2apic() {
        // SAFETY: writing the x2APIC ICR sends an IPI; no memory effects.
        unsafe { Msr::new(X2APIC_MSR_BASE + (REG_ICR_LOW >> 4)).write(((dest as u64) << 32) | low as u64) };
    } else {
        let saved_high = read(REG_ICR_HIGH);
        xapic_icr_idle();
        write(REG_ICR_HIGH, dest << XAPIC_DEST_SHIFT);
        write(REG_ICR_LOW, low);
        xapic_icr_idle();
        write(REG_ICR_HIGH, saved_high);
    }
}

/// Send an IPI to the CPU with APIC id `dest`.
pub fn send(dest: u32, delivery: Delivery, vector: u8) {
    icr(dest, delivery as u32 | ICR_LEVEL_ASSERT | vector as u32);
}

/// Start the periodic timer on `vector` (0 count: stop it).
pub fn timer(vector: u8, count: u32) {
    if count == 0 {
        write(REG_LVT_TIMER, LVT_MASKED);
        write(REG_TIMER_INIT, 0);
        return;
    }
    write(REG_TIMER_DIV, TIMER_DIVIDE_1);
    write(REG_LVT_TIMER, LVT_TIMER_PERIODIC | vector as u32);
    write(REG_TIMER_INIT, count);
}
