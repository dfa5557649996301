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
    /// Set by the #BP handler (shadow-gap strategy): a return address the
    /// exit path must push on the interrupted shadow stack; 0 = nothing.
    pub shadow_push: u64,
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// RFLAGS.IF
pub const RFLAGS_IF: u64 = 1 << 9;

/// Bytes the #BP stub moves the hardware frame down by, so that the handler
/// can emulate a `push` onto the interrupted stack (classic and shadow-gap
/// emulation) without overwriting the frame it will IRET through. A multiple
/// of 16 keeps the stack aligned for the Rust handler.
pub const BP_STACK_GAP: u64 = 16;

/// Words of the hardware interrupt frame (RIP, CS, RFLAGS, RSP, SS).
pub const HW_FRAME_WORDS: u64 = 5;

/// Where the copied hardware frame ends (exclusive) when the CPU interrupted
/// code running with `rsp` and the stub moved the frame down by `gap`.
/// In 64-bit mode the CPU aligns RSP down to 16 before pushing the frame.
pub const fn copied_frame_end(rsp: u64, gap: u64) -> u64 {
    (rsp & !15) - gap
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
        // Keeps the stack 16-byte aligned: hw frame + error + vector + GPRs + 2 = 24 words.
        assert_eq!(size_of::<TrapFrame>() % 16, 0);
    }

    #[test]
    fn gap_allows_one_push_at_every_alignment() {
        for low in 0..16u64 {
            for base in [0x10_0000u64, 0x7f_fff0] {
                let rsp = (base + low) & !7; // RSP is 8-byte aligned in kernel code
                assert!(gap_fits_one_push(rsp, BP_STACK_GAP), "rsp={rsp:#x}");
            }
        }
        assert_eq!(BP_STACK_GAP % 16, 0);
        // Without a gap the push would land on the frame's SS slot.
        assert!(!gap_fits_one_push(0x10_0000, 0));
    }
}
