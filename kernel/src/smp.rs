//! Finding and starting the other CPUs (ACPI MADT, INIT-SIPI-SIPI), and
//! running work on them.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall_support::acpi;

use crate::apic::{self, Delivery};
use crate::percpu::{self, this_cpu};
use crate::{cet, mm};

/// Where the real-mode start-up code is copied (page 8: below 1 MiB, free).
pub const AP_TRAMPOLINE: u64 = 0x8000;
/// How long the boot CPU waits for an AP to come online (spin iterations).
const AP_START_SPINS: u64 = 200_000_000;
use crate::apic::{VEC_SYNC, VEC_WAKE};

extern "C" {
    static sc_ap_tramp_start: u8;
    static sc_ap_tramp_end: u8;
    static mut sc_ap_cr3: u64;
    static mut sc_ap_stack: u64;
    static mut sc_ap_index: u64;
}

/// What start-up found.
#[derive(Default, Debug)]
pub struct Topology {
    /// APIC ids the firmware reports, boot CPU included.
    pub reported: Vec<u32>,
    pub source: &'static str,
    pub errors: Vec<String>,
}

fn phys(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: the first GiB is identity-mapped readable; callers pass
    // firmware-table addresses below it.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

const LOW_GIB: u64 = 1 << 30;

fn table(addr: u64) -> Option<&'static [u8]> {
    if addr == 0 || addr + acpi::SDT_HEADER_LEN as u64 >= LOW_GIB {
        return None;
    }
    let len = u32::from_le_bytes(phys(addr + 4, 4).try_into().ok()?) as usize;
    (len >= acpi::SDT_HEADER_LEN && addr + (len as u64) < LOW_GIB).then(|| phys(addr, len))
}

/// The MADT, found through the RSDP (EBDA first KiB, then the BIOS area).
fn find_madt(ebda: u64) -> Option<acpi::Madt> {
    let regions = [(ebda, 1024usize), (0xe0000, 0x20000)];
    let (_, root) =
        regions.iter().filter(|r| r.0 >= 0x1000).find_map(|&(base, len)| acpi::find_rsdp(phys(base, len), base))?;
    let root_addr = match root {
        acpi::Root::Rsdt(a) | acpi::Root::Xsdt(a) => a,
    };
    let entries = acpi::root_entries(table(root_addr)?, root)?;
    entries.into_iter().filter_map(table).find_map(acpi::parse_madt)
}

/// Start every CPU the firmware reports (up to mm::MAX_CPUS).
pub fn start_aps(ebda: u64) -> Topology {
    let mut topo = Topology::default();
    let bsp = apic::id();
    this_cpu().apic_id.store(bsp, Ordering::Relaxed);
    this_cpu().online.store(true, Ordering::Release);
    let Some(madt) = find_madt(ebda) else {
        topo.source = "none (no ACPI MADT): boot CPU only";
        topo.reported.push(bsp);
        return topo;
    };
    topo.source = "ACPI MADT";
    topo.reported = madt.cpus.iter().filter(|c| c.enabled).map(|c| c.apic_id).collect();
    if !topo.reported.contains(&bsp) {
        topo.errors.push(alloc::format!("the boot CPU's APIC id {bsp} is not in the MADT"));
    }
    let aps: Vec<u32> = topo.reported.iter().copied().filter(|&id| id != bsp).collect();
    if aps.len() + 1 > mm::MAX_CPUS {
        topo.errors.push(alloc::format!("{} CPUs reported; this kernel runs at most {}", aps.len() + 1, mm::MAX_CPUS));
    }
    if aps.is_empty() {
        return topo;
    }
    // The real-mode code, below 1 MiB (an ordinary data page: it runs with paging off).
    // SAFETY: symbol addresses; the page at AP_TRAMPOLINE is free RAM mapped RW.
    unsafe {
        let s = core::ptr::addr_of!(sc_ap_tramp_start);
        let len = core::ptr::addr_of!(sc_ap_tramp_end).offset_from(s) as usize;
        core::ptr::copy_nonoverlapping(s, AP_TRAMPOLINE as *mut u8, len);
        *core::ptr::addr_of_mut!(sc_ap_cr3) = x86_64::registers::control::Cr3::read().0.start_address().as_u64();
    }
    for (i, &id) in aps.iter().take(mm::MAX_CPUS - 1).enumerate() {
        let index = i + 1;
        let c = percpu::cpu(index);
        c.apic_id.store(id, Ordering::Relaxed);
        // SAFETY: read by the AP we are about to start, which waits for nothing else.
        unsafe {
            *core::ptr::addr_of_mut!(sc_ap_stack) = mm::kernel_stack(index).hi;
            *core::ptr::addr_of_mut!(sc_ap_index) = index as u64;
        }
        apic::send(id, Delivery::Init, 0);
        delay(10_000);
        for _ in 0..2 {
            apic::send(id, Delivery::Startup, (AP_TRAMPOLINE >> 12) as u8);
            delay(200);
        }
        let mut spins = 0u64;
        while !c.online.load(Ordering::Acquire) && spins < AP_START_SPINS {
            core::hint::spin_loop();
            spins += 1;
        }
        if !c.online.load(Ordering::Acquire) {
            // The start variables (sc_ap_stack, sc_ap_index) are shared by
            // every AP, and a slow AP may still be about to read them: handing
            // them to the next AP could put two CPUs on one stack. Start no
            // more APs; the slow one, if it ever arrives, runs as CPU `index`.
            topo.errors.push(alloc::format!(
                "CPU {index} (APIC id {id}) did not come online; not starting the {} remaining CPU(s)",
                aps.len().min(mm::MAX_CPUS - 1) - index
            ));
            break;
        }
    }
    topo
}

/// Busy-wait about `us` microseconds (coarse; only the INIT/SIPI spacing needs it).
fn delay(us: u64) {
    for _ in 0..us * 20 {
        core::hint::spin_loop();
    }
}

/// Hand `f(arg)` to CPU `index`; returns the ticket to wait on.
pub fn run_on(index: usize, f: fn(u64), arg: u64) -> u64 {
    let c = percpu::cpu(index);
    let ticket = c.work_done.load(Ordering::Acquire) + 1;
    c.work_arg.store(arg, Ordering::Relaxed);
    c.work.store(f as usize as u64, Ordering::Release);
    apic::send(c.apic_id.load(Ordering::Relaxed), Delivery::Fixed, VEC_WAKE);
    ticket
}

/// Wait until CPU `index` has finished the work of `ticket`.
pub fn wait(index: usize, ticket: u64) {
    while percpu::cpu(index).work_done.load(Ordering::Acquire) < ticket {
        core::hint::spin_loop();
    }
}

/// Sync IPIs sent (for diagnostics).
pub static SYNC_IPIS: AtomicU64 = AtomicU64::new(0);

/// Make every other online CPU execute a serializing instruction and wait
/// until each has: an IPI whose handler ends in IRET (serializing) after
/// counting. The caller serializes itself.
pub fn sync_others() {
    if cet::enforced() {
        return sync_others_acked_on_shadow_pages();
    }
    let me = this_cpu().index;
    let mut targets: [(usize, u64); mm::MAX_CPUS] = [(usize::MAX, 0); mm::MAX_CPUS];
    for c in percpu::online().filter(|c| c.index != me) {
        targets[c.index] = (c.index, c.syncs.load(Ordering::Acquire));
        apic::send(c.apic_id.load(Ordering::Relaxed), Delivery::Fixed, VEC_SYNC);
        SYNC_IPIS.fetch_add(1, Ordering::Relaxed);
    }
    for &(index, before) in targets.iter().filter(|t| t.0 != usize::MAX) {
        while percpu::cpu(index).syncs.load(Ordering::Acquire) == before {
            core::hint::spin_loop();
        }
    }
}

/// `sync_others` with shadow stacks on: which CPUs take part, and their
/// acknowledgements, come from their sync words (shadow-stack memory written
/// only by WRSS on their own CPU) and the sync generation, compared in asm
/// (`records::sync_wait_all`), never from a snapshot in ordinary memory: an
/// ordinary store can neither leave a CPU out nor fake its serialization.
/// The APIC ID an IPI goes to is per-CPU data: forging it can only make the
/// patcher wait. Runs with IF=0 (the asm lies in a critical region).
fn sync_others_acked_on_shadow_pages() {
    let me = crate::records::sync_word_addr(cet::rdssp());
    x86_64::instructions::interrupts::without_interrupts(|| {
        crate::records::sync_bump();
        for cpu in 0..mm::MAX_CPUS {
            let word = crate::records::sync_word_of(cpu);
            // Who gets an IPI is decided from ordinary data (the APIC IDs,
            // this loop): forging it can only make the wait below last.
            if word != me && cet::read_slot(word) != 0 {
                apic::send(percpu::cpu(cpu).apic_id.load(Ordering::Relaxed), Delivery::Fixed, VEC_SYNC);
                SYNC_IPIS.fetch_add(1, Ordering::Relaxed);
            }
        }
        crate::records::sync_word_ack();
        crate::records::sync_wait_all();
    });
}
