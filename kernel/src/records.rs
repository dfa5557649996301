//! This kernel's per-CPU record pages (shadow-stack pages: only WRSS
//! writes them; layout `shadowcall::emul::record`): the trampoline records
//! kept between a call's two traps, the sync word, and the in-exit count.
//! Used by the patcher and by the sync (acknowledgements), which do not
//! depend on each other for it. Fault recovery frees the records it unwinds
//! past in asm (asm/recover.S `sc_unwind_shadow`, the same layout).

use shadowcall::emul::record::{IN_EXIT_WORD, RECORDS_PER_PAGE, RECORD_SIZE, REC_SSP, SYNC_WORD, WRITER_WORD};
#[cfg(feature = "test-hooks")]
use shadowcall::emul::record::{REC_RSP_IF, REC_SITE, REC_TARGET};

use crate::percpu::this_cpu;
use crate::{cet, mm};

/// This CPU's trampoline records that are in use (between two traps).
pub fn pending_tramp_records() -> usize {
    if !cet::active() {
        return this_cpu().lifo().depth();
    }
    let Some(page) = mm::tramp_record_page(cet::rdssp()) else { return 0 };
    (0..RECORDS_PER_PAGE).filter(|i| cet::read_slot(page + i * RECORD_SIZE + REC_SSP) != 0).count()
}

/// This CPU's sync word (see `shadowcall::emul::record::SYNC_WORD`), found
/// from its shadow stack `ssp` (static layout).
pub fn sync_word_addr(ssp: u64) -> u64 {
    match mm::tramp_record_page(ssp) {
        Some(page) => page + SYNC_WORD,
        // RDSSP of a running CPU is always inside the stack area: fail closed.
        None => {
            crate::diag!("PANIC: SSP {ssp:#x} is on no CPU's shadow stack");
            crate::exit(false)
        }
    }
}

/// CPU `cpu`'s sync word.
pub fn sync_word_of(cpu: usize) -> u64 {
    mm::tramp_record_page_of_cpu(cpu) + SYNC_WORD
}

extern "C" {
    fn sc_sync_bump();
    fn sc_sync_ack();
    fn sc_sync_wait_all();
}

/// This CPU is online with shadow stacks: its sync word becomes the sync
/// generation + 1 (asm/entry.S `sc_sync_ack`: the word found from RDSSP,
/// the value from CPU 0's generation word, in registers only).
pub fn sync_word_online() {
    if cet::enforced() {
        x86_64::instructions::interrupts::without_interrupts(|| {
            // SAFETY: shadow stacks are enforced and IF=0 (the routine lies in
            // a critical region); it writes only this CPU's sync word.
            unsafe { sc_sync_ack() }
        });
    }
}

/// The sync IPI: acknowledge (as `sync_word_online`). Called with IF=0
/// (an interrupt gate).
pub fn sync_word_ack() {
    if cet::enforced() {
        // SAFETY: as in sync_word_online; the dispatcher runs with IF=0.
        unsafe { sc_sync_ack() }
    }
}

/// A new sync round: raise the generation (after the step's writes).
/// IF must be 0.
pub fn sync_bump() {
    // SAFETY: shadow stacks are enforced (the caller's check) and IF=0; the
    // routine writes only the generation word, with its own value + 1.
    unsafe { sc_sync_bump() }
}

/// Wait until every online CPU has acknowledged since the last
/// `sync_bump` (decided in asm from shadow-stack pages). IF must be 0.
pub fn sync_wait_all() {
    // SAFETY: shadow stacks are enforced (the caller's check) and IF=0; the
    // routine only reads.
    unsafe { sc_sync_wait_all() }
}

/// The record on this CPU's record page bound to `bound_ssp`.
pub fn find_record(f_base: u64, bound_ssp: u64) -> Option<u64> {
    let page = mm::tramp_record_page(f_base)?;
    (0..RECORDS_PER_PAGE).map(|i| page + i * RECORD_SIZE).find(|&r| cet::read_slot(r + REC_SSP) == bound_ssp)
}

/// CPU `cpu`'s in-exit count (see `shadowcall::emul::record::IN_EXIT_WORD`).
pub fn in_exit_count(cpu: usize) -> u64 {
    cet::read_slot(mm::tramp_record_page_of_cpu(cpu) + IN_EXIT_WORD)
}

// A publisher's claim of the magic word names its CPU in the low bits.
const _: () = assert!(mm::MAX_CPUS <= 1 << shadowcall::patch::PENDING_CPU_BITS);

/// CPU `cpu`'s sealed-writer word (see `shadowcall::emul::record::WRITER_WORD`).
pub fn writer_word(cpu: usize) -> u64 {
    cet::read_slot(mm::tramp_record_page_of_cpu(cpu) + WRITER_WORD)
}

/// Self-test support: set CPU `cpu`'s sealed-writer word with WRSS, as a
/// sealed-area writer in flight on that CPU would have. Test builds only,
/// shadow stacks on.
#[cfg(feature = "test-hooks")]
pub fn test_set_writer(cpu: usize, value: u64) {
    assert!(cpu < mm::MAX_CPUS && cet::active(), "test_set_writer: CPU {cpu} or no shadow stacks");
    // SAFETY: the writer word of a record page (shadow-stack memory no CPU
    // uses as its stack); test builds only.
    unsafe { cet::wrss(mm::tramp_record_page_of_cpu(cpu) + WRITER_WORD, value) };
}

/// Self-test support: set CPU `cpu`'s in-exit count with WRSS, as an exit
/// in flight on that CPU would have. Test builds only, shadow stacks on.
#[cfg(feature = "test-hooks")]
pub fn test_set_in_exit(cpu: usize, count: u64) {
    assert!(cpu < mm::MAX_CPUS && cet::active(), "test_set_in_exit: CPU {cpu} or no shadow stacks");
    // SAFETY: the in-exit word of a record page (shadow-stack memory no CPU
    // uses as its stack); test builds only.
    unsafe { cet::wrss(mm::tramp_record_page_of_cpu(cpu) + IN_EXIT_WORD, count) };
}

/// Self-test support: claim a trampoline record on this CPU's record page
/// with WRSS, as a first trap on the stack at `ssp` would. Test builds only.
#[cfg(feature = "test-hooks")]
pub fn test_claim_record(ssp: u64, rsp_if: u64, site: u64, target: u64) -> u64 {
    test_claim_record_in(0..RECORDS_PER_PAGE, ssp, rsp_if, site, target)
}

/// Self-test support: as `test_claim_record`, the highest free record of
/// the page (the most slots of the page below it).
#[cfg(feature = "test-hooks")]
pub fn test_claim_top_record(ssp: u64, rsp_if: u64, site: u64, target: u64) -> u64 {
    test_claim_record_in((0..RECORDS_PER_PAGE).rev(), ssp, rsp_if, site, target)
}

#[cfg(feature = "test-hooks")]
fn test_claim_record_in(order: impl Iterator<Item = u64>, ssp: u64, rsp_if: u64, site: u64, target: u64) -> u64 {
    let page = mm::tramp_record_page(cet::rdssp()).expect("SSP on this CPU's shadow stack");
    let rec = order
        .map(|i| page + i * RECORD_SIZE)
        .find(|&r| cet::read_slot(r + REC_SSP) == 0)
        .expect("a free trampoline record");
    // SAFETY: a free record of this CPU's record page (a shadow-stack page no
    // CPU uses as its stack); test builds only.
    unsafe {
        cet::wrss(rec + REC_SSP, ssp);
        cet::wrss(rec + REC_RSP_IF, rsp_if);
        cet::wrss(rec + REC_SITE, site);
        cet::wrss(rec + REC_TARGET, target);
    }
    rec
}

/// Self-test support: free a record `test_claim_record` claimed.
#[cfg(feature = "test-hooks")]
pub fn test_free_record(rec: u64) {
    // SAFETY: as in test_claim_record.
    unsafe { cet::wrss(rec + REC_SSP, 0) };
}
