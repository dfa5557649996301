//! The per-CPU bookkeeping of the trampoline emulation and the checks the
//! second trap makes before it writes anything.
//!
//! The first trap records (return address, target, IF) here and sends the CPU
//! through the trampoline; the second trap takes the record back. Records nest
//! strictly (an NMI, or a site hit from a nested handler, completes its own
//! emulation before the interrupted one resumes), so a LIFO suffices.
//!
//! That LIFO ([`EmulLifo`]) holds the records when shadow stacks are off;
//! with them on, a record lives on the CPU's record page ([`record`]), where
//! only WRSS writes.

use core::fmt;

use crate::tramp::TrampLayout;

// The words after the records stay on the page, past the last record.
const _: () = assert!(record::RECORDS_PER_PAGE * record::RECORD_SIZE <= record::SYNC_WORD);
const _: () = assert!(record::WRITER_WORD + 8 <= record::RECORD_PAGE_SIZE);

/// One emulated call between its first and second trap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCall {
    /// The patch site (the int3's address).
    pub site: u64,
    /// Where the emulated call returns to (site + 5).
    pub ret: u64,
    /// The emulated call's destination.
    pub target: u64,
    /// RFLAGS.IF of the interrupted code, restored by the second trap.
    pub interrupts: bool,
    /// The interrupted RSP: the second trap must be on this stack (its RSP,
    /// with the trampoline's two slots pushed, is this minus 16).
    pub rsp: u64,
}

/// Depth of nesting the LIFO allows (one per interrupt level that may hit a
/// site: thread, IRQ, NMI, #MC, plus room).
pub const LIFO_DEPTH: usize = 8;

/// A fixed-size LIFO of pending emulations.
///
/// Nesting safety: `push` reserves its slot (bumps `depth`) before it fills
/// it, and `pop` reads its slot before it releases it; a nested user that
/// runs between the two steps only touches slots above `depth`.
#[derive(Debug)]
pub struct EmulLifo {
    slots: [PendingCall; LIFO_DEPTH],
    depth: usize,
}

/// [`EmulLifo::push`] found all [`LIFO_DEPTH`] slots taken; nothing was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifoFull;

impl Default for EmulLifo {
    fn default() -> Self {
        Self::new()
    }
}

impl EmulLifo {
    /// An empty LIFO (usable in a `static`).
    pub const fn new() -> Self {
        EmulLifo {
            slots: [PendingCall { site: 0, ret: 0, target: 0, interrupts: false, rsp: 0 }; LIFO_DEPTH],
            depth: 0,
        }
    }
    /// Number of pending records.
    pub fn depth(&self) -> usize {
        self.depth
    }
    /// Reserve the next slot (raise the depth), then fill it with `p`;
    /// [`LifoFull`] when [`LIFO_DEPTH`] records are pending.
    pub fn push(&mut self, p: PendingCall) -> Result<(), LifoFull> {
        let d = self.depth;
        if d == LIFO_DEPTH {
            return Err(LifoFull);
        }
        self.depth = d + 1;
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        self.slots[d] = p;
        Ok(())
    }
    /// The most recent pending record, left in place.
    pub fn top(&self) -> Option<PendingCall> {
        self.depth.checked_sub(1).map(|d| self.slots[d])
    }
    /// Read the most recent pending record, then release its slot.
    pub fn pop(&mut self) -> Option<PendingCall> {
        let p = self.top()?;
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        self.depth -= 1;
        Some(p)
    }
    /// Drop records above `depth` (used when a fault unwinds to a recovery point).
    pub fn truncate(&mut self, depth: usize) {
        self.depth = self.depth.min(depth);
    }
}

/// Why the second trap refused to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardError {
    /// The trampoline's int3 was reached without a first trap on this CPU.
    NoPendingEmulation,
    /// A slot the handler would write is not inside the expected stack.
    SlotOutsideStack {
        /// Which stack the slot should be on.
        stack: StackKind,
        /// The slot's address.
        addr: u64,
    },
    /// A slot does not hold the trampoline's own return address.
    SlotMismatch {
        /// Which stack the slot is on.
        stack: StackKind,
        /// 0 for `[top]` (the second return address), 1 for `[top + 8]` (the first).
        slot: u8,
        /// The word the slot holds.
        found: u64,
        /// The trampoline return address it must hold.
        expected: u64,
    },
    /// The #BP exit found the trap frame, the shadow frame or the sealed
    /// batch different from what the handler checked (changed in between).
    FrameChanged,
}

/// Which of the two stacks a [`GuardError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackKind {
    /// The ordinary stack (RSP).
    Normal,
    /// The shadow stack (SSP).
    Shadow,
}

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuardError::NoPendingEmulation => f.write_str("trampoline int3 reached with no pending emulation"),
            GuardError::SlotOutsideStack { stack, addr } => {
                write!(f, "{stack:?} stack slot {addr:#x} lies outside this CPU's stack")
            }
            GuardError::SlotMismatch { stack, slot, found, expected } => write!(
                f,
                "{stack:?} stack slot {slot} holds {found:#x}, expected the trampoline's return address {expected:#x}"
            ),
            GuardError::FrameChanged => {
                f.write_str("the #BP exit found the frame or the batch changed after the handler's checks")
            }
        }
    }
}

/// A trampoline record with shadow stacks on: four words on the CPU's
/// record page, a page mapped as shadow stack (R/W=0, Dirty) that no CPU
/// uses as its stack, so only WRSS writes it and ordinary stores fault. The
/// first trap's exit fills one, the second trap's exit consumes it.
pub mod record {
    /// Bytes of one record.
    pub const RECORD_SIZE: u64 = 32;
    /// Bytes of a CPU's record page (one 4 KiB page, page aligned).
    pub const RECORD_PAGE_SIZE: u64 = 4096;
    /// Records on one page (its last two records' room holds the sync,
    /// in-exit, (CPU 0) sync-generation, own-generation and writer words).
    pub const RECORDS_PER_PAGE: u64 = RECORD_PAGE_SIZE / RECORD_SIZE - 2;
    /// The CPU's sync word on its record page: 0 while the CPU is not
    /// online with shadow stacks; then the sync generation it last
    /// acknowledged, plus one ([`SYNC_GEN_WORD`]). Written only with WRSS by
    /// its own CPU, so an ordinary store can neither fake an acknowledgement
    /// nor take a CPU out of the sync.
    pub const SYNC_WORD: u64 = RECORDS_PER_PAGE * RECORD_SIZE;
    /// The CPU's in-exit count: how many #BP exits of this CPU (nested ones
    /// included: an NMI inside an exit can take its own) are between their
    /// look at the sealed batch and their last read of its entry. Raised and
    /// lowered only with WRSS by the exits of its own CPU (asm/entry.S
    /// `BPX_ENTRY`/`BPX_LEAVE`); the sealed-area writer (asm/poke.S
    /// `sc_poke_sealed`) rewrites nothing while any CPU's count is non-zero.
    pub const IN_EXIT_WORD: u64 = SYNC_WORD + 8;
    /// On CPU 0's record page only: the sync generation, the round count
    /// above [`GEN_CPU_BITS`] and the bumping CPU's index below. A patcher
    /// raises it (WRSS: the next round, its own index) before it sends the
    /// sync IPIs; each CPU acknowledges by writing generation + 1 into its
    /// sync word (WRSS, on its own CPU); the patcher waits until every
    /// online CPU's sync word is exactly its own generation + 1. Every value
    /// comes from shadow-stack pages.
    pub const SYNC_GEN_WORD: u64 = IN_EXIT_WORD + 8;
    /// The generation this CPU's own last bump wrote (WRSS, by this CPU
    /// only): its wait compares the acknowledgements with this, and stops
    /// the kernel if the shared generation no longer equals it (a second
    /// patcher racing the bump; see DESIGN §11).
    pub const MY_GEN_WORD: u64 = SYNC_GEN_WORD + 8;
    /// The CPU's sealed-writer word: 1 while the kernel's sealed-area
    /// writer (asm/poke.S `sc_poke_sealed`) runs on this CPU, from before
    /// it looks at the magic word to after its last store, else 0. Written
    /// only with WRSS by that writer on its own CPU (the CPU whose stack
    /// area holds SSP); the publisher (`sc_poke_publish`) claims the magic
    /// word (pending), then waits for every CPU's writer word to be 0
    /// before it validates the area: Dekker, so no writer stores between
    /// the validation and the end of the batch's life (DESIGN §8.2).
    pub const WRITER_WORD: u64 = MY_GEN_WORD + 8;
    /// Low bits of a sync generation that hold the bumping CPU's index
    /// (the rest count rounds): two patchers never write the same value.
    pub const GEN_CPU_BITS: u32 = 8;
    /// The SSP interrupted by the first trap (0: the record is free). The
    /// second trap's interrupted SSP + 16 must equal it (bound to the stack).
    pub const REC_SSP: u64 = 0;
    /// The RSP interrupted by the first trap, with RFLAGS.IF in bit 0.
    pub const REC_RSP_IF: u64 = 8;
    /// The site (the emulated call returns to site + 5).
    pub const REC_SITE: u64 = 16;
    /// The call's target.
    pub const REC_TARGET: u64 = 24;
}

/// The per-CPU save page of an NMI or #MC that interrupted a #BP exit: the
/// interrupted general registers, written with WRSS straight from the
/// registers (a page mapped as shadow stack: only WRSS writes it), bound to
/// the SSP it interrupted, and restored from there by the exception exit.
pub mod save {
    /// Scratch word of the entry stub (RAX while it decides).
    pub const SCRATCH: u64 = 0;
    /// Offset of the interrupted RAX.
    pub const RAX: u64 = 8;
    /// Offset of the interrupted RBX.
    pub const RBX: u64 = 16;
    /// Offset of the interrupted RCX.
    pub const RCX: u64 = 24;
    /// Offset of the interrupted RDX.
    pub const RDX: u64 = 32;
    /// Offset of the interrupted RSI.
    pub const RSI: u64 = 40;
    /// Offset of the interrupted RDI.
    pub const RDI: u64 = 48;
    /// Offset of the interrupted RBP.
    pub const RBP: u64 = 56;
    /// Offset of the interrupted R8.
    pub const R8: u64 = 64;
    /// Offset of the interrupted R9.
    pub const R9: u64 = 72;
    /// Offset of the interrupted R10.
    pub const R10: u64 = 80;
    /// Offset of the interrupted R11.
    pub const R11: u64 = 88;
    /// Offset of the interrupted R12.
    pub const R12: u64 = 96;
    /// Offset of the interrupted R13.
    pub const R13: u64 = 104;
    /// Offset of the interrupted R14.
    pub const R14: u64 = 112;
    /// Offset of the interrupted R15.
    pub const R15: u64 = 120;
    /// The interrupted SSP (0: no save is live).
    pub const BOUND: u64 = 128;
    /// The interrupted arithmetic flags, taken in registers at the stub's
    /// entry (delivery leaves them as they were): LAHF's AH in bits 8..15,
    /// SETO's OF in bit 0.
    pub const FLAGS: u64 = 136;
    /// The 5-word IRET frame (RIP, CS, RFLAGS, RSP, SS) the exit builds here,
    /// so that IRET reads nothing an attacker can write.
    pub const IRET: u64 = 144;
    /// The linear address of `IRET` (the exit's last RSP).
    pub const IRET_PTR: u64 = IRET + 5 * 8;
}

/// The two slots the second trap inspects on one stack: `[top]` must be the
/// trampoline's second return address, `[top + 8]` its first.
pub fn check_tramp_slots(layout: &TrampLayout, stack: StackKind, slots: [u64; 2]) -> Result<(), GuardError> {
    let expected = [layout.ret2, layout.ret1];
    for (i, (&found, &expected)) in slots.iter().zip(expected.iter()).enumerate() {
        if found != expected {
            return Err(GuardError::SlotMismatch { stack, slot: i as u8, found, expected });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(site: u64) -> PendingCall {
        PendingCall { site, ret: site + 5, target: 0x9000, interrupts: site.is_multiple_of(2), rsp: 0x8000 }
    }

    #[test]
    fn lifo_nesting() {
        let mut l = EmulLifo::new();
        assert_eq!(l.pop(), None);
        l.push(pc(0x100)).unwrap();
        // A nested emulation (NMI) runs to completion in between.
        l.push(pc(0x200)).unwrap();
        assert_eq!(l.pop(), Some(pc(0x200)));
        assert_eq!(l.top(), Some(pc(0x100)));
        assert_eq!(l.pop(), Some(pc(0x100)));
        assert_eq!(l.depth(), 0);
    }

    #[test]
    fn lifo_bounded_and_truncate() {
        let mut l = EmulLifo::new();
        for i in 0..LIFO_DEPTH as u64 {
            l.push(pc(i)).unwrap();
        }
        assert_eq!(l.push(pc(99)), Err(LifoFull));
        l.truncate(2);
        assert_eq!(l.depth(), 2);
        assert_eq!(l.top(), Some(pc(1)));
        l.truncate(5);
        assert_eq!(l.depth(), 2);
    }

    #[test]
    fn slot_checks() {
        let t = TrampLayout { base: 0x1000, entry: 0x1000, ret1: 0x1005, ret2: 0x100b, trap: 0x100c, len: 14 };
        assert_eq!(check_tramp_slots(&t, StackKind::Shadow, [0x100b, 0x1005]), Ok(()));
        assert_eq!(
            check_tramp_slots(&t, StackKind::Normal, [0x100b, 0x1006]),
            Err(GuardError::SlotMismatch { stack: StackKind::Normal, slot: 1, found: 0x1006, expected: 0x1005 })
        );
        assert!(check_tramp_slots(&t, StackKind::Shadow, [0x1005, 0x100b]).is_err());
    }
}
