//! §8.2/§11: with shadow stacks on, a sync waits for every online CPU's
//! acknowledgement, decided in asm from shadow-stack pages; nothing in
//! ordinary memory (per-CPU counters, the patcher's locals) can end the wait
//! early.

use core::sync::atomic::{AtomicU64, Ordering};

use shadowcall_support::ktap::Outcome;

use super::cet_tests::skip_without_shstk;
use crate::percpu::{self, this_cpu};
use crate::{check, smp, BootState};

/// The busy CPU's spin with IF=0 (Bochs runs ~90 M instructions/s).
const BUSY_SPINS: u64 = 2_000_000;
/// Set by the busy CPU when it re-enables interrupts.
static BUSY_DONE: AtomicU64 = AtomicU64::new(0);
/// Set by the busy CPU once it is spinning.
static BUSY_STARTED: AtomicU64 = AtomicU64::new(0);

fn busy(_: u64) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        BUSY_STARTED.store(1, Ordering::SeqCst);
        for _ in 0..BUSY_SPINS {
            core::hint::spin_loop();
        }
        BUSY_DONE.store(1, Ordering::SeqCst);
    });
}

/// Another CPU spins with IF=0 (so it cannot take the sync IPI) while this
/// CPU syncs and forges what ordinary memory says about it: its per-CPU
/// acknowledgement counter far ahead, its `online` flag cleared. The sync
/// must return only after that CPU re-enabled interrupts (took the IPI).
pub fn sec_sync_forged_ack(st: &BootState) -> Outcome<'static> {
    if let Some(skip) = skip_without_shstk(st) {
        return skip;
    }
    let me = this_cpu().index;
    let Some(other) = percpu::online().map(|c| c.index).find(|&i| i != me) else {
        return Outcome::Skip("needs 2+ CPUs");
    };
    BUSY_DONE.store(0, Ordering::SeqCst);
    BUSY_STARTED.store(0, Ordering::SeqCst);
    let ticket = smp::run_on(other, busy, 0);
    while BUSY_STARTED.load(Ordering::SeqCst) == 0 {
        core::hint::spin_loop();
    }
    let victim = percpu::cpu(other);
    let syncs0 = victim.syncs.load(Ordering::SeqCst);
    // The forgeries: ordinary stores an attacker can make.
    victim.syncs.fetch_add(1000, Ordering::SeqCst);
    victim.online.store(false, Ordering::SeqCst);
    smp::sync_others();
    let done_at_return = BUSY_DONE.load(Ordering::SeqCst);
    victim.online.store(true, Ordering::SeqCst);
    victim.syncs.fetch_sub(1000, Ordering::SeqCst);
    smp::wait(other, ticket);
    crate::diag!(
        "CPU {other} busy with IF=0, its ack counter forged +1000 and its online flag cleared: sync returned {} it took the IPI",
        if done_at_return == 1 { "after" } else { "BEFORE" }
    );
    check!(done_at_return == 1, "the sync returned while CPU {other} had not taken its IPI");
    check!(
        victim.syncs.load(Ordering::SeqCst) == syncs0 + 1,
        "CPU {other} took {} sync IPIs, not 1",
        victim.syncs.load(Ordering::SeqCst) - syncs0
    );
    Outcome::Pass
}
