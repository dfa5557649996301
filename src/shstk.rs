//! Supervisor shadow-stack data layout: tokens, exception frames, the
//! interrupt SSP table and #CP error codes (Intel SDM vol. 1 ch. 17, vol. 3 ch. 6).

use core::fmt;

/// Size of one shadow-stack slot.
pub const SLOT: u64 = 8;
/// Bit 0 of a supervisor shadow-stack token: the stack is in use.
pub const TOKEN_BUSY: u64 = 1;
/// Entries of IA32_INTERRUPT_SSP_TABLE (entry 0 is unused; entry i serves IST i).
pub const SSP_TABLE_ENTRIES: usize = 8;
/// The token and the 3-slot frame pushed below it must share one naturally
/// aligned region of this size.
pub const IST_REGION_ALIGN: u64 = 32;

/// The free (not busy) supervisor token for a token slot at `addr`: its own address.
pub const fn supervisor_token(addr: u64) -> u64 {
    addr
}

/// Is `value`, read from the token slot at `addr`, a busy supervisor token?
pub const fn token_is_busy(value: u64, addr: u64) -> bool {
    value == addr | TOKEN_BUSY
}

/// Is `value`, read from the token slot at `addr`, a free supervisor token?
pub const fn token_is_free(value: u64, addr: u64) -> bool {
    value == supervisor_token(addr)
}

/// Where the token of a shadow stack whose highest byte is `top - 1` lives:
/// the topmost slot. `top` must be 32-byte aligned so that (for IST stacks) the
/// token and the frame below it share one aligned 32-byte region.
pub const fn token_addr(top: u64) -> u64 {
    top - SLOT
}

/// True when a frame pushed below the token at `token` lies in the same
/// naturally aligned 32-byte region as the token (the SDM's IST requirement).
pub const fn ist_token_well_placed(token: u64) -> bool {
    let frame = token - ShadowFrame::SLOTS * SLOT;
    frame.is_multiple_of(IST_REGION_ALIGN) && frame / IST_REGION_ALIGN == (token + SLOT - 1) / IST_REGION_ALIGN
}

/// The 3-slot frame the CPU pushes on the shadow stack when it delivers an
/// exception or interrupt at CPL0 in 64-bit mode; `base` is the SSP after the
/// push (what RDSSP returns first thing in the handler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowFrame {
    /// The frame's lowest slot (the SSP right after the CPU pushed it).
    pub base: u64,
}

impl ShadowFrame {
    /// Slots in the frame.
    pub const SLOTS: u64 = 3;
    /// Offset of the interrupted SSP.
    pub const PREV_SSP: u64 = 0;
    /// Offset of the linear address of the interrupted instruction (LIP).
    pub const LIP: u64 = 8;
    /// Offset of the interrupted CS.
    pub const CS: u64 = 16;

    /// The frame whose lowest slot is `base`.
    pub const fn at(base: u64) -> Self {
        ShadowFrame { base }
    }
    /// Slot holding the interrupted SSP (IRET restores SSP from it).
    pub const fn prev_ssp_slot(self) -> u64 {
        self.base + Self::PREV_SSP
    }
    /// Slot holding the linear address IRET must return to.
    pub const fn lip_slot(self) -> u64 {
        self.base + Self::LIP
    }
    /// Slot holding the code segment IRET must return to.
    pub const fn cs_slot(self) -> u64 {
        self.base + Self::CS
    }
    /// The SSP just above the frame (the interrupted SSP when no stack switch happened).
    pub const fn above(self) -> u64 {
        self.base + Self::SLOTS * SLOT
    }
}

/// A half-open address range `[lo, hi)` of stack memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackBounds {
    /// Lowest byte.
    pub lo: u64,
    /// One past the highest byte.
    pub hi: u64,
}

impl StackBounds {
    /// Do `n` aligned slots starting at `addr` lie inside?
    #[inline]
    pub fn holds_slots(&self, addr: u64, n: u64) -> bool {
        // `hi - addr` cannot underflow once addr < hi; no sum can overflow.
        addr.is_multiple_of(SLOT) && addr >= self.lo && addr < self.hi && n <= (self.hi - addr) / SLOT
    }
}

/// #CP (control protection, vector 21) error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpError {
    /// 1: a near RET found a different return address on the shadow stack.
    NearRet,
    /// 2: a far RET or IRET found a different CS/LIP/SSP frame.
    FarRetIret,
    /// 3: an indirect branch target without ENDBR (IBT).
    Endbranch,
    /// 4: RSTORSSP found a bad restore token.
    Rstorssp,
    /// 5: SETSSBSY found a bad or busy supervisor token.
    Setssbsy,
    /// Any other code (the raw error code).
    Unknown(u64),
}

impl CpError {
    /// The #CP vector.
    pub const VECTOR: u8 = 21;

    /// Decode a #CP error code (bits 14:0; bit 15 flags an ENCLU context).
    pub fn decode(code: u64) -> Self {
        match code & 0x7fff {
            1 => CpError::NearRet,
            2 => CpError::FarRetIret,
            3 => CpError::Endbranch,
            4 => CpError::Rstorssp,
            5 => CpError::Setssbsy,
            _ => CpError::Unknown(code),
        }
    }
}

impl fmt::Display for CpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpError::NearRet => f.write_str("NEAR-RET (return address mismatch)"),
            CpError::FarRetIret => f.write_str("FAR-RET/IRET (frame mismatch)"),
            CpError::Endbranch => f.write_str("ENDBRANCH (missing ENDBR)"),
            CpError::Rstorssp => f.write_str("RSTORSSP (bad restore token)"),
            CpError::Setssbsy => f.write_str("SETSSBSY (bad supervisor token)"),
            CpError::Unknown(c) => write!(f, "unknown error code {c:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let a = 0x20_3ff8;
        assert!(token_is_free(supervisor_token(a), a));
        assert!(token_is_busy(supervisor_token(a) | TOKEN_BUSY, a));
        assert!(!token_is_busy(supervisor_token(a), a));
        assert!(!token_is_busy((a + 8) | 1, a));
    }

    #[test]
    fn ist_token_at_page_top_shares_region_with_frame() {
        let top = 0x40_5000;
        let t = token_addr(top);
        assert_eq!(t, 0x40_4ff8);
        assert!(ist_token_well_placed(t));
        // One slot lower and the frame straddles two 32-byte regions.
        assert!(!ist_token_well_placed(t - 8));
        assert!(!ist_token_well_placed(t - 16));
    }

    #[test]
    fn frame_slots() {
        let f = ShadowFrame::at(0x1000);
        assert_eq!((f.prev_ssp_slot(), f.lip_slot(), f.cs_slot(), f.above()), (0x1000, 0x1008, 0x1010, 0x1018));
    }

    #[test]
    fn bounds() {
        let b = StackBounds { lo: 0x1000, hi: 0x2000 };
        assert!(b.holds_slots(0x1000, 1));
        assert!(b.holds_slots(0x1ff0, 2));
        assert!(!b.holds_slots(0x1ff8, 2));
        assert!(!b.holds_slots(0xff8, 1));
        assert!(!b.holds_slots(0x1004, 1));
        assert!(!b.holds_slots(u64::MAX - 7, 1));
    }

    #[test]
    fn cp_codes() {
        assert_eq!(CpError::decode(1), CpError::NearRet);
        assert_eq!(CpError::decode(2), CpError::FarRetIret);
        assert_eq!(CpError::decode(3), CpError::Endbranch);
        assert_eq!(CpError::decode(4), CpError::Rstorssp);
        assert_eq!(CpError::decode(5), CpError::Setssbsy);
        assert_eq!(CpError::decode(9), CpError::Unknown(9));
    }
}
