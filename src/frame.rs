//! The register frame the exception entry stubs (asm/entry.S) build, and the
//! stack arithmetic of the #BP entry gap.

/// What `asm/entry.S` leaves on the stack for the Rust dispatcher, lowest
/// address first: the recorded SSP, the shadow-gap request, the general registers, the
/// vector and error code, then the hardware interrupt frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapFrame {
    /// SSP at stub entry (RDSSP; 0 when shadow stacks are off): the base of
    /// the 3-slot shadow frame the CPU pushed.
    pub ssp: u64,
    /// Unused by the exits (zeroed by the stubs). Kept so the layout and the
    /// `sec_exit_forged_frame` test (which forges it) stay stable: no exit
    /// path reads the trap frame to decide a shadow-stack write.
    pub shadow_push: u64,
    /// The interrupted R15 (restored by the exit).
    pub r15: u64,
    /// The interrupted R14 (restored by the exit).
    pub r14: u64,
    /// The interrupted R13 (restored by the exit).
    pub r13: u64,
    /// The interrupted R12 (restored by the exit).
    pub r12: u64,
    /// The interrupted R11 (restored by the exit).
    pub r11: u64,
    /// The interrupted R10 (restored by the exit).
    pub r10: u64,
    /// The interrupted R9 (restored by the exit).
    pub r9: u64,
    /// The interrupted R8 (restored by the exit).
    pub r8: u64,
    /// The interrupted RBP (restored by the exit).
    pub rbp: u64,
    /// The interrupted RDI (restored by the exit).
    pub rdi: u64,
    /// The interrupted RSI (restored by the exit).
    pub rsi: u64,
    /// The interrupted RDX (restored by the exit).
    pub rdx: u64,
    /// The interrupted RCX (restored by the exit).
    pub rcx: u64,
    /// The interrupted RBX (restored by the exit).
    pub rbx: u64,
    /// The interrupted RAX (restored by the exit).
    pub rax: u64,
    /// The vector the stub was entered for.
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    /// Hardware frame: the RIP IRET returns to.
    pub rip: u64,
    /// Hardware frame: the CS IRET returns to.
    pub cs: u64,
    /// Hardware frame: the RFLAGS IRET restores.
    pub rflags: u64,
    /// Hardware frame: the RSP IRET restores.
    pub rsp: u64,
    /// Hardware frame: the SS IRET restores.
    pub ss: u64,
}

/// RFLAGS.IF
pub const RFLAGS_IF: u64 = 1 << 9;

/// Bytes the #BP stub leaves between the CPU's hardware frame and the
/// TrapFrame it builds below it (with a copy of the hardware frame). The
/// handler and the exits then store only at or above the CPU's original
/// frame, which is dead once copied: the emulated `push` at RSP-8, and the
/// NMI-context return's three words below its return RSP (see
/// [`BP_RETURN_RSP_MIN`]); the frame they return through is the copy.
///
/// The gap exists for alignment: the CPU aligns RSP down to 16 and pushes
/// 40 bytes; the stub subtracts the gap and builds a whole [`TrapFrame`]
/// (192 bytes), so the Rust handler is called with RSP = aligned - 40 -
/// gap - 192, a multiple of 16 (the ABI's alignment at a call) only when
/// `40 + gap` is: the gap is 8 (mod 16), see [`handler_rsp_aligned`].
pub const BP_STACK_GAP: u64 = 8;

/// From the #BP handler's frame (RSP at the stub's call, S) to the CPU's
/// 16-byte-aligned interrupted RSP A: the TrapFrame, the gap, the CPU's
/// own frame. The interrupted RSP is A or A+8.
pub const BP_FRAME_TO_ALIGNED_RSP: u64 = core::mem::size_of::<TrapFrame>() as u64 + BP_STACK_GAP + HW_FRAME_BYTES;

/// The RSP a #BP exit may return to, from S: the interrupted RSP, one slot
/// lower (an emulated call) or one slot higher (an emulated ret). The
/// NMI-context return stores below it and loads RSP from it, so it must not
/// come from the (writable) trap frame unchecked.
pub const BP_RETURN_RSP_MIN: u64 = BP_FRAME_TO_ALIGNED_RSP - 8;
/// The highest RSP a #BP exit may return to, from S (see [`BP_RETURN_RSP_MIN`]).
pub const BP_RETURN_RSP_MAX: u64 = BP_FRAME_TO_ALIGNED_RSP + 16;

/// Words the NMI-context return stores below its return RSP (RCX, RFLAGS,
/// the return address).
pub const NMI_RETURN_WORDS: u64 = 3;

/// Bytes of the hardware interrupt frame (no error code).
pub const HW_FRAME_BYTES: u64 = HW_FRAME_WORDS * 8;

/// Is the stack pointer at which a stub calls the Rust handler 16-byte
/// aligned, when the CPU's frame is `hw` bytes (after its own alignment to
/// 16), the stub adds `extra` bytes and then a whole [`TrapFrame`]?
pub const fn handler_rsp_aligned(hw: u64, extra: u64) -> bool {
    (hw + extra + core::mem::size_of::<TrapFrame>() as u64).is_multiple_of(16)
}

/// Words of the hardware interrupt frame (RIP, CS, RFLAGS, RSP, SS).
pub const HW_FRAME_WORDS: u64 = 5;

/// Where the copy of the hardware frame (the top of the TrapFrame) ends,
/// exclusive, when the CPU interrupted code running with `rsp` and the stub
/// left `gap` bytes below the CPU's frame. In 64-bit mode the CPU aligns RSP
/// down to 16 before pushing its frame.
pub const fn copied_frame_end(rsp: u64, gap: u64) -> u64 {
    (rsp & !15) - HW_FRAME_BYTES - gap
}

/// Can the handler store one emulated return address at `rsp - 8` without
/// touching the copied frame?
pub const fn gap_fits_one_push(rsp: u64, gap: u64) -> bool {
    copied_frame_end(rsp, gap) <= rsp - 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_entry_stub() {
        // 2 bookkeeping slots + 15 GPRs + vector + error + 5-word hardware frame.
        assert_eq!(size_of::<TrapFrame>(), (2 + 15 + 2 + 5) * 8);
        assert_eq!(offset_of!(TrapFrame, r15), 16);
        assert_eq!(offset_of!(TrapFrame, rax), 16 + 14 * 8);
        assert_eq!(offset_of!(TrapFrame, vector), 17 * 8);
        assert_eq!(offset_of!(TrapFrame, rip), 19 * 8);
        assert_eq!(offset_of!(TrapFrame, ss), 23 * 8);
        // 24 words: with the 5-word hardware frame and the vector/error
        // words counted in it, the non-#BP stubs reach a 16-byte boundary.
        assert_eq!(size_of::<TrapFrame>() % 16, 0);
    }

    #[test]
    fn every_stub_calls_its_handler_aligned() {
        // Vectors without an error code: the stub pushes a zero in its place;
        // with one: the CPU pushed it. Either way 40 + 8 bytes, then the rest
        // of the TrapFrame minus the hardware frame and those two words.
        let stub_words = (size_of::<TrapFrame>() as u64) - HW_FRAME_BYTES - 16;
        assert_eq!((HW_FRAME_BYTES + 16 + stub_words) % 16, 0);
        // #BP: the hardware frame, the gap, and a full TrapFrame (with a copy
        // of the hardware frame) below it.
        assert!(handler_rsp_aligned(HW_FRAME_BYTES, BP_STACK_GAP));
        // The old 16-byte gap left the handler at 8 (mod 16).
        assert!(!handler_rsp_aligned(HW_FRAME_BYTES, 16));
    }

    #[test]
    fn nmi_return_window_stays_above_the_frame() {
        // S = the frame; A = interrupted RSP & !15. Every return RSP the #BP
        // exits can produce lies in the allowed window, and the NMI-context
        // return's stores below it stay above the copied frame.
        for low in [0u64, 8] {
            let rsp = 0x10_0000 + low;
            let a = rsp & !15;
            let s = copied_frame_end(rsp, BP_STACK_GAP) - size_of::<TrapFrame>() as u64;
            assert_eq!(a - s, BP_FRAME_TO_ALIGNED_RSP);
            assert!(handler_rsp_aligned(HW_FRAME_BYTES, BP_STACK_GAP) && s.is_multiple_of(16));
            for r in [rsp - 8, rsp, rsp + 8] {
                assert!((s + BP_RETURN_RSP_MIN..=s + BP_RETURN_RSP_MAX).contains(&r), "r={r:#x}");
                assert!(r - 8 * NMI_RETURN_WORDS >= copied_frame_end(rsp, BP_STACK_GAP), "r={r:#x}");
            }
        }
        // The window's extremes are 8-aligned and 3 slots apart.
        assert_eq!((BP_RETURN_RSP_MAX - BP_RETURN_RSP_MIN) / 8, 3);
    }

    #[test]
    fn gap_allows_one_push_at_every_alignment() {
        for low in 0..16u64 {
            for base in [0x10_0000u64, 0x7f_fff0] {
                let rsp = (base + low) & !7; // RSP is 8-byte aligned in kernel code
                assert!(gap_fits_one_push(rsp, BP_STACK_GAP), "rsp={rsp:#x}");
            }
        }
        // Even without a gap the push misses the copy (it lands on the CPU's
        // own frame, dead once copied): the gap is there for alignment.
        assert!(gap_fits_one_push(0x10_0000, 0));
    }
}
