//! Small, exact, table-driven x86-64 decoding for the engine's run time.
//!
//! The engine only ever writes or accepts a handful of fixed forms: the
//! 5-byte `call rel32` (`E8`) and `jmp rel32` (`E9`), the 5-byte NOPs
//! (`0F 1F /0` with prefixes and addressing making up 5 bytes), `ret` padded
//! with int3 (`C3 CC CC CC CC`) and the trampoline's `int3`/`call`/`ret`.
//! Recognising them needs no general decoder: [`rel32_branch`], [`is_nop5`]
//! and [`is_padded_ret`] say exactly which byte sequences are those forms.
//!
//! Two questions about *other* code remain, only to pick the right error for
//! bad input: how long is the instruction at a registered target (a target
//! inside it is `TargetMidInstruction`), and does a rejected site hold an
//! instruction at all (`UnsupportedInstruction` or `Undecodable`).
//! [`insn_len`] answers them with a length decoder for the legacy opcode
//! maps (one byte, `0F`, `0F 38`, `0F 3A`), driven by one table per map.
//! It does not decode VEX/EVEX/XOP-encoded instructions (it says `None`).
//!
//! iced-x86 is a dev-dependency only: the host tests cross-check every form
//! and the length decoder against it (`cargo test`).

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;
/// Length of a `call`/`jmp` with a 32-bit displacement.
pub const REL32_LEN: usize = 5;
/// Length of the NOP forms [`is_nop5`] accepts.
pub const NOP5_LEN: usize = 5;
/// `int3`.
pub const OPC_INT3: u8 = 0xcc;
/// `call rel32`.
pub const OPC_CALL_REL32: u8 = 0xe8;
/// `jmp rel32`.
pub const OPC_JMP_REL32: u8 = 0xe9;
/// `ret` (near, 64-bit).
pub const OPC_RET: u8 = 0xc3;
/// The escape byte of the two-byte opcode map.
pub const OPC_ESCAPE_0F: u8 = 0x0f;
/// `0F 1F`: the multi-byte NOP (with ModRM.reg = 0).
pub const OPC2_NOP_RM: u8 = 0x1f;
/// Second byte of the three-byte map `0F 38`.
pub const OPC2_ESCAPE_38: u8 = 0x38;
/// Second byte of the three-byte map `0F 3A`.
pub const OPC2_ESCAPE_3A: u8 = 0x3a;

// Legacy prefixes (64-bit mode; SDM vol. 2 §2.1.1).
/// Operand-size override (`66`); also a mandatory prefix of some SSE forms.
pub const PFX_OPSIZE: u8 = 0x66;
/// Address-size override (`67`).
pub const PFX_ADDRSIZE: u8 = 0x67;
/// `LOCK` (`F0`).
pub const PFX_LOCK: u8 = 0xf0;
/// `REPNE`/`REPNZ` (`F2`); also a mandatory prefix.
pub const PFX_REPNE: u8 = 0xf2;
/// `REP`/`REPE`/`REPZ` (`F3`); also a mandatory prefix.
pub const PFX_REP: u8 = 0xf3;
/// Segment overrides ES, CS, SS, DS, FS, GS.
pub const PFX_SEGMENTS: [u8; 6] = [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65];
/// REX is `0100WRXB`: a byte is a REX prefix when `b & REX_MASK == REX_BASE`.
pub const REX_MASK: u8 = 0xf0;
/// The fixed high nibble of REX (`0100`).
pub const REX_BASE: u8 = 0x40;
/// REX.W: 64-bit operand size; it takes precedence over `66` and gives
/// `mov r64, imm64` (`B8+r`) its 8-byte immediate.
pub const REX_W: u8 = 0x08;

// Escapes this decoder does not follow (64-bit mode).
/// The 3-byte VEX prefix (`C4`; `les` outside 64-bit mode).
pub const OPC_VEX3: u8 = 0xc4;
/// The 2-byte VEX prefix (`C5`; `lds` outside 64-bit mode).
pub const OPC_VEX2: u8 = 0xc5;
/// The EVEX prefix (`62`; `bound` outside 64-bit mode).
pub const OPC_EVEX: u8 = 0x62;
/// The XOP prefix (`8F`) when the next byte's map field is 8 or more; else
/// `8F` is `pop r/m`.
pub const OPC_XOP: u8 = 0x8f;
const XOP_MAP_MASK: u8 = 0x1f;
const XOP_MIN_MAP: u8 = 8;

/// A `call rel32` or `jmp rel32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchKind {
    /// `call rel32` (`E8`).
    Call,
    /// `jmp rel32` (`E9`).
    Jmp,
}

/// A decoded 5-byte `call`/`jmp rel32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rel32Branch {
    /// Call or jmp.
    pub kind: BranchKind,
    /// The signed displacement, from the end of the instruction.
    pub disp: i32,
    /// The address after the instruction (the return address of a call).
    pub next_ip: u64,
    /// `next_ip + disp` (wrapping, as the CPU computes it).
    pub target: u64,
}

/// `bytes` starts with a `call rel32` or `jmp rel32` (no prefix: then the
/// instruction is exactly 5 bytes) placed at `ip`.
pub fn rel32_branch(bytes: &[u8], ip: u64) -> Option<Rel32Branch> {
    let b = bytes.get(..REL32_LEN)?;
    let kind = match b[0] {
        OPC_CALL_REL32 => BranchKind::Call,
        OPC_JMP_REL32 => BranchKind::Jmp,
        _ => return None,
    };
    let disp = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
    let next_ip = ip.wrapping_add(REL32_LEN as u64);
    Some(Rel32Branch { kind, disp, next_ip, target: next_ip.wrapping_add(disp as i64 as u64) })
}

/// `bytes` starts with `ret` followed by int3 up to 5 bytes.
pub fn is_padded_ret(bytes: &[u8]) -> bool {
    matches!(bytes.get(..NOP5_LEN), Some([OPC_RET, rest @ ..]) if rest.iter().all(|&b| b == OPC_INT3))
}

/// `bytes` starts with a 5-byte `nop r/m32` (`0F 1F /0`): 0 to 2 prefixes,
/// none of them `66` (that is `nop r/m16`) or `F0` (lock: invalid), the last
/// not a REX with W set (`nop r/m64`); then `0F 1F`, a ModRM with reg = 0, and
/// exactly the SIB/displacement bytes that make up 5 bytes. These are the
/// sequences iced-x86 decodes as `Code::Nop_rm32` of length 5 (checked
/// exhaustively by the tests); the kernel's `nopl 0x0(%rax,%rax,1)` is one.
pub fn is_nop5(bytes: &[u8]) -> bool {
    let Some(b) = bytes.get(..NOP5_LEN) else { return false };
    let Some(k) = (0..=NOP5_LEN - 3).find(|&k| b[k] == OPC_ESCAPE_0F && b[k + 1] == OPC2_NOP_RM) else {
        return false;
    };
    let prefixes = &b[..k];
    if !prefixes.iter().all(|&p| is_legacy_prefix(p) || is_rex(p)) {
        return false;
    }
    if prefixes.iter().any(|&p| p == PFX_OPSIZE || p == PFX_LOCK) {
        return false;
    }
    if matches!(prefixes.last(), Some(&p) if is_rex(p) && p & REX_W != 0) {
        return false;
    }
    let modrm = b[k + 2];
    if modrm_reg(modrm) != 0 {
        return false;
    }
    k + 3 + modrm_tail_len(modrm, b.get(k + 3).copied()) == NOP5_LEN
}

fn is_legacy_prefix(b: u8) -> bool {
    matches!(b, PFX_OPSIZE | PFX_ADDRSIZE | PFX_LOCK | PFX_REPNE | PFX_REP) || PFX_SEGMENTS.contains(&b)
}

fn is_rex(b: u8) -> bool {
    b & REX_MASK == REX_BASE
}

const MODRM_MOD_SHIFT: u32 = 6;
const MODRM_REG_SHIFT: u32 = 3;
const MODRM_FIELD_MASK: u8 = 7;
/// ModRM.mod: register operand, 8-bit and 32-bit displacement.
const MOD_REG: u8 = 3;
const MOD_DISP8: u8 = 1;
const MOD_DISP32: u8 = 2;
/// ModRM.rm / SIB.base encodings with special meaning.
const RM_SIB: u8 = 4;
const RM_DISP32: u8 = 5;

fn modrm_mod(m: u8) -> u8 {
    m >> MODRM_MOD_SHIFT
}

fn modrm_reg(m: u8) -> u8 {
    (m >> MODRM_REG_SHIFT) & MODRM_FIELD_MASK
}

/// Bytes after a ModRM byte `m` (SIB and displacement) in 64-bit mode, with
/// 64- or 32-bit addressing (the only two there); `sib` is the byte after it.
fn modrm_tail_len(m: u8, sib: Option<u8>) -> usize {
    let (md, rm) = (modrm_mod(m), m & MODRM_FIELD_MASK);
    if md == MOD_REG {
        return 0;
    }
    let has_sib = rm == RM_SIB;
    let base_is_disp32 = if has_sib { sib.is_some_and(|s| s & MODRM_FIELD_MASK == RM_DISP32) } else { rm == RM_DISP32 };
    let disp = match md {
        MOD_DISP8 => 1,
        MOD_DISP32 => 4,
        _ if base_is_disp32 => 4,
        _ => 0,
    };
    usize::from(has_sib) + disp
}

/// What follows an opcode, per opcode byte (one table per opcode map).
type Shape = u8;
/// A ModRM byte (and its SIB/displacement).
const M: Shape = 1 << 0;
/// An 8-bit immediate.
const I8: Shape = 1 << 1;
/// A 16-bit immediate.
const I16: Shape = 1 << 2;
/// A 16- or 32-bit immediate (16 with `66` unless REX.W).
const IZ: Shape = 1 << 3;
/// A 32-bit branch displacement (the `66` prefix is ignored in 64-bit mode).
const REL32: Shape = 1 << 4;
/// `mov r, imm`: 16, 32 or 64 bits (REX.W).
const IV: Shape = 1 << 5;
/// `mov` to/from an absolute address: 8 bytes, 4 with `67`.
const MOFFS: Shape = 1 << 6;
/// Not an instruction in 64-bit mode, or an escape this decoder does not
/// follow.
const BAD: Shape = 1 << 7;
/// No operand bytes.
const NONE: Shape = 0;

/// Sets `shape` for opcodes `lo..=hi` of `t`.
const fn set(mut t: [Shape; 256], lo: usize, hi: usize, shape: Shape) -> [Shape; 256] {
    let mut i = lo;
    while i <= hi {
        t[i] = shape;
        i += 1;
    }
    t
}

/// The one-byte opcode map (prefixes are consumed before the lookup).
const MAP0: [Shape; 256] = {
    let mut t = [NONE; 256];
    // The eight ALU rows 00-3F: four ModRM forms, AL/eAX with imm8/immz.
    let mut row = 0;
    while row < 0x40 {
        t = set(t, row, row + 3, M);
        t[row + 4] = I8;
        t[row + 5] = IZ;
        row += 8;
    }
    // push/pop seg, daa/das/aaa/aas: invalid in 64-bit mode.
    let bad = [0x06, 0x07, 0x0e, 0x16, 0x17, 0x1e, 0x1f, 0x27, 0x2f, 0x37, 0x3f];
    let mut i = 0;
    while i < bad.len() {
        t[bad[i]] = BAD;
        i += 1;
    }
    t[0x0f] = BAD; // the two-byte escape, handled before the lookup
    t = set(t, 0x60, 0x61, BAD); // pusha/popa
    t[OPC_EVEX as usize] = BAD;
    t[0x63] = M; // movsxd
    t[0x68] = IZ;
    t[0x69] = M | IZ;
    t[0x6a] = I8;
    t[0x6b] = M | I8;
    t = set(t, 0x70, 0x7f, I8); // jcc rel8
    t[0x80] = M | I8;
    t[0x81] = M | IZ;
    t[0x82] = BAD;
    t[0x83] = M | I8;
    t = set(t, 0x84, 0x8f, M);
    t[0x9a] = BAD; // call far
    t = set(t, 0xa0, 0xa3, MOFFS);
    t[0xa8] = I8;
    t[0xa9] = IZ;
    t = set(t, 0xb0, 0xb7, I8);
    t = set(t, 0xb8, 0xbf, IV);
    t = set(t, 0xc0, 0xc1, M | I8);
    t[0xc2] = I16;
    t[OPC_VEX3 as usize] = BAD;
    t[OPC_VEX2 as usize] = BAD;
    t[0xc6] = M | I8;
    t[0xc7] = M | IZ;
    t[0xc8] = I16 | I8; // enter
    t[0xca] = I16;
    t[0xcd] = I8;
    t[0xce] = BAD; // into
    t = set(t, 0xd0, 0xd3, M);
    t = set(t, 0xd4, 0xd6, BAD); // aam, aad, salc
    t = set(t, 0xd8, 0xdf, M); // x87
    t = set(t, 0xe0, 0xe7, I8); // loop/jcxz, in/out imm8
    t[OPC_CALL_REL32 as usize] = REL32;
    t[OPC_JMP_REL32 as usize] = REL32;
    t[0xea] = BAD; // jmp far
    t[0xeb] = I8;
    t = set(t, 0xf6, 0xf7, M); // group 3: the immediate depends on ModRM.reg
    t = set(t, 0xfe, 0xff, M);
    t
};

/// The two-byte opcode map `0F xx`.
const MAP0F: [Shape; 256] = {
    let mut t = set([M; 256], 0x04, 0x0c, NONE);
    t[0x04] = BAD;
    t[0x0a] = BAD;
    t[0x0c] = BAD;
    t[0x0e] = NONE; // femms
    t[0x0f] = BAD; // 3DNow!
    t = set(t, 0x24, 0x27, BAD);
    t = set(t, 0x30, 0x37, NONE); // wrmsr .. getsec
    t[0x36] = BAD;
    t = set(t, 0x38, 0x3f, BAD); // 38 and 3A are escapes, handled before the lookup
    t = set(t, 0x70, 0x73, M | I8);
    t[0x77] = NONE; // emms
    t = set(t, 0x7a, 0x7b, BAD);
    t = set(t, 0x80, 0x8f, REL32); // jcc rel32
    t = set(t, 0xa0, 0xa2, NONE); // push/pop fs, cpuid
    t[0xa4] = M | I8;
    // a6/a7: VIA PadLock (a fixed ModRM byte), as iced-x86 decodes them.
    t = set(t, 0xa8, 0xaa, NONE); // push/pop gs, rsm
    t[0xac] = M | I8;
    t[0xba] = M | I8;
    t[0xc2] = M | I8;
    t = set(t, 0xc4, 0xc6, M | I8);
    t = set(t, 0xc8, 0xcf, NONE); // bswap
    t
};

/// Opcodes whose ModRM.reg selects the instruction, and which values of it
/// are not instructions: bit `r` of the mask set = `/r` is invalid.
const GROUP_INVALID: [(u8, u8); 3] = [
    (OPC_XOP, 0b1111_1110), // pop r/m64 is /0 only
    (0xfe, 0b1111_1100),    // inc/dec r/m8
    (0xff, 0b1000_0000),    // ff /7
];
/// `lea` takes a memory operand only.
const OPC_LEA: u8 = 0x8d;
/// Group 3 (`test`/`not`/`neg`/`mul`/`div`): `/0` and `/1` are `test` with an
/// immediate (imm8 for `F6`, immz for `F7`).
const OPC_GROUP3_8: u8 = 0xf6;
const OPC_GROUP3: u8 = 0xf7;
const GROUP3_TEST_MAX_REG: u8 = 1;
/// `0F 78` with `66` (`extrq`) or `F2` (`insertq`): ModRM and two imm8s;
/// without either it is `vmread`.
const MAP0F_EXTRQ_INSERTQ: u8 = 0x78;
const EXTRQ_INSERTQ_IMM_LEN: usize = 2;
/// `mov cr/dr` (`0F 20`-`0F 23`) always take a register operand: the ModRM
/// is not followed by SIB or displacement, whatever its mod field says.
const MAP0F_MOV_CR_DR: core::ops::RangeInclusive<u8> = 0x20..=0x23;

/// The length of the instruction at the start of `bytes` (64-bit mode), or
/// `None` if it is not a legacy-map instruction in 64-bit mode (an opcode
/// invalid there, a VEX/EVEX/XOP encoding, the 3DNow! escape), is longer than
/// 15 bytes, or runs past the end of `bytes`. Exact wherever iced-x86 decodes
/// a legacy-map instruction (cross-checked by the tests); it is more lenient
/// than iced-x86 about ModRM forms and prefixes an opcode does not allow.
pub fn insn_len(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    let (mut opsize16, mut addr32, mut rex_w) = (false, false, false);
    // The last of F2/F3: it takes precedence over 66 as a mandatory prefix.
    let mut last_rep = None;
    // Prefixes: a REX counts only right before the opcode.
    loop {
        let b = *bytes.get(i)?;
        if is_rex(b) {
            rex_w = b & REX_W != 0;
        } else if is_legacy_prefix(b) {
            rex_w = false;
            opsize16 |= b == PFX_OPSIZE;
            addr32 |= b == PFX_ADDRSIZE;
            if b == PFX_REP || b == PFX_REPNE {
                last_rep = Some(b);
            }
        } else {
            break;
        }
        i += 1;
    }
    let opc = bytes[i];
    i += 1;
    let mut shape = MAP0[usize::from(opc)];
    let mut reg_only = false;
    let mut extra_imm = 0;
    if opc == OPC_ESCAPE_0F {
        let opc2 = *bytes.get(i)?;
        i += 1;
        shape = match opc2 {
            OPC2_ESCAPE_38 => M,
            OPC2_ESCAPE_3A => M | I8,
            _ => MAP0F[usize::from(opc2)],
        };
        if matches!(opc2, OPC2_ESCAPE_38 | OPC2_ESCAPE_3A) {
            bytes.get(i)?;
            i += 1;
        }
        reg_only = MAP0F_MOV_CR_DR.contains(&opc2);
        if opc2 == MAP0F_EXTRQ_INSERTQ && (last_rep == Some(PFX_REPNE) || (last_rep.is_none() && opsize16)) {
            extra_imm = EXTRQ_INSERTQ_IMM_LEN;
        }
    } else if opc == OPC_XOP && bytes.get(i).is_some_and(|&n| n & XOP_MAP_MASK >= XOP_MIN_MAP) {
        return None;
    }
    if shape & BAD != 0 {
        return None;
    }
    if shape & M != 0 {
        let m = *bytes.get(i)?;
        i += 1;
        if opc == OPC_LEA && modrm_mod(m) == MOD_REG {
            return None;
        }
        if let Some(&(_, invalid)) = GROUP_INVALID.iter().find(|g| g.0 == opc) {
            if invalid & (1 << modrm_reg(m)) != 0 {
                return None;
            }
        }
        if (opc == OPC_GROUP3_8 || opc == OPC_GROUP3) && modrm_reg(m) <= GROUP3_TEST_MAX_REG {
            shape |= if opc == OPC_GROUP3 { IZ } else { I8 };
        }
        if !reg_only {
            i += modrm_tail_len(m, bytes.get(i).copied());
        }
    }
    let immz = if opsize16 && !rex_w { 2 } else { 4 };
    let imm = [
        (I8, 1),
        (I16, 2),
        (IZ, immz),
        (REL32, 4),
        (IV, if rex_w { 8 } else { immz }),
        (MOFFS, if addr32 { 4 } else { 8 }),
    ];
    for (flag, n) in imm {
        if shape & flag != 0 {
            i += n;
        }
    }
    i += extra_imm;
    (i <= MAX_INSN_LEN && i <= bytes.len()).then_some(i)
}

#[cfg(test)]
mod tests {
    //! Cross-checks against iced-x86 (a dev-dependency: host only).
    use super::*;
    use crate::patch::{classify, PatchError, SiteKind};
    use alloc::vec::Vec;
    use iced_x86::{Code, Decoder, DecoderOptions, Instruction};

    /// After the prefixes, an escape `insn_len` does not follow: VEX, EVEX,
    /// XOP (`8F` is also `pop r/m`) or 3DNow! (`0F 0F`).
    fn escape(bytes: &[u8]) -> bool {
        let i = bytes.iter().position(|&b| !is_legacy_prefix(b) && !is_rex(b)).unwrap_or(bytes.len());
        matches!(bytes[i..], [OPC_VEX3 | OPC_VEX2 | OPC_EVEX | OPC_XOP, ..] | [OPC_ESCAPE_0F, OPC_ESCAPE_0F, ..])
    }

    /// xorshift64: reproducible pseudo-random tails.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill(&mut self, out: &mut [u8]) {
            for b in out {
                *b = self.next() as u8;
            }
        }
    }

    fn iced(bytes: &[u8], ip: u64) -> Instruction {
        Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode()
    }

    /// What iced-x86 says of a site: the run-time `classify` before the hand
    /// decoder. `Err(None)`: undecodable; `Err(Some(len))`: another
    /// instruction of `len` bytes.
    fn iced_classify(bytes: &[u8], ip: u64) -> Result<SiteKind, Option<usize>> {
        let insn = iced(bytes, ip);
        if insn.is_invalid() {
            return Err(None);
        }
        match insn.code() {
            Code::Call_rel32_64 if insn.len() == 5 => Ok(SiteKind::Call(insn.near_branch_target())),
            Code::Jmp_rel32_64 if insn.len() == 5 => Ok(SiteKind::Jmp(insn.near_branch_target())),
            Code::Nop_rm32 if insn.len() == 5 => Ok(SiteKind::Nop),
            Code::Retnq if bytes.len() >= 5 && bytes[1..5].iter().all(|&b| b == OPC_INT3) => Ok(SiteKind::Ret),
            _ => Err(Some(insn.len())),
        }
    }

    /// How the two classifications differ on `bytes`; panics where they
    /// must not (accept/reject, the kind, the target, a length both know).
    #[derive(Default, Debug)]
    struct Diff {
        checked: u64,
        accepted: u64,
        /// Undecodable for iced-x86, an instruction for the length decoder
        /// (lenient about ModRM forms and prefixes).
        lenient: u64,
    }

    impl Diff {
        fn check(&mut self, bytes: &[u8], ip: u64) {
            self.checked += 1;
            let (hand, want) = (classify(bytes, ip), iced_classify(bytes, ip));
            match (hand, want) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{bytes:02x?}");
                    self.accepted += 1;
                }
                (Err(PatchError::Undecodable { site }), Err(None)) => assert_eq!(site, ip),
                (Err(PatchError::UnsupportedInstruction { site, len, bytes: first }), Err(Some(n))) => {
                    assert_eq!((site, len), (ip, n), "{bytes:02x?}");
                    let n = bytes.len().min(first.len());
                    assert_eq!(first[..n], bytes[..n], "{bytes:02x?}");
                    assert!(first[n..].iter().all(|&b| b == 0), "{bytes:02x?}");
                }
                (Err(PatchError::UnsupportedInstruction { .. }), Err(None)) => self.lenient += 1,
                (Err(PatchError::Undecodable { .. }), Err(Some(_))) => {
                    // Only encodings the length decoder does not follow.
                    assert!(escape(bytes), "{bytes:02x?}: undecodable, iced-x86 has {:?}", iced(bytes, ip).code());
                }
                (a, b) => panic!("{bytes:02x?}: hand {a:?}, iced-x86 {b:?}"),
            }
        }
    }

    const IP: u64 = 0xffff_ffff_8010_0000;
    /// Single prefix bytes, and every byte, in the NOP loops.
    const ALL: core::ops::RangeInclusive<u8> = 0..=255;

    /// Every `0F 1F` with 0, 1 or 2 bytes before it and ModRM/SIB/disp8
    /// after it: `is_nop5` is exactly iced-x86's `Nop_rm32` of length 5.
    /// Exhaustive over every byte value where it matters: before `0F 1F`
    /// (any value, any pair), the ModRM (every value) and the SIB (every
    /// value without a prefix; with one, values of both base kinds). With two
    /// bytes before it, every ModRM with reg 0 or 1 for all pairs, and every
    /// ModRM for pairs of prefixes.
    #[test]
    fn nop5_is_exactly_iced_nop_rm32_of_length_5() {
        let mut nops = 0;
        let mut check = |b: [u8; 5]| {
            let i = iced(&b, IP);
            let want = i.code() == Code::Nop_rm32 && i.len() == 5;
            assert_eq!(is_nop5(&b), want, "{b:02x?}");
            nops += u32::from(want);
        };
        let prefixes: Vec<u8> = ALL.filter(|&b| is_legacy_prefix(b) || is_rex(b)).collect();
        assert_eq!(prefixes.len(), 11 + 16);
        // SIB bytes with base 5 (disp32 when mod is 0) and not.
        let sibs = [0x00, 0x05, 0x24, 0x25, 0xfd, 0xff];
        for m in ALL {
            for s in ALL {
                for d in [0, 0x80, 0xff] {
                    check([OPC_ESCAPE_0F, OPC2_NOP_RM, m, s, d]);
                }
            }
            for p in ALL {
                for s in sibs {
                    check([p, OPC_ESCAPE_0F, OPC2_NOP_RM, m, s]);
                }
            }
            for &p in &prefixes {
                for &q in &prefixes {
                    check([p, q, OPC_ESCAPE_0F, OPC2_NOP_RM, m]);
                }
            }
            if modrm_reg(m) <= 1 {
                for p in ALL {
                    for q in ALL {
                        check([p, q, OPC_ESCAPE_0F, OPC2_NOP_RM, m]);
                    }
                }
            }
        }
        // One prefix-less form (modrm 44, any SIB, disp8) and many prefixed ones.
        assert!(nops > 256 * 3, "{nops} NOP forms");
        assert!(is_nop5(&crate::patch::NOP5));
    }

    /// Every 5-byte sequence of the opcode bytes of interest (call, jmp, ret,
    /// int3, the 0F escape, the NOP prefixes) with 100 000 random tails each,
    /// every one-byte change of each accepted form, and every first two
    /// bytes with random tails: `classify` accepts
    /// exactly what iced-x86 does, with the same kind and target; the
    /// lengths of rejected instructions agree.
    #[test]
    fn classify_agrees_with_iced() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut d = Diff::default();
        let mut b = [0u8; MAX_INSN_LEN];
        for first in [OPC_CALL_REL32, OPC_JMP_REL32, OPC_RET, OPC_INT3, OPC_ESCAPE_0F, 0x2e, 0x3e, 0x40, 0x66, 0x67] {
            for n in 0..100_000u32 {
                b[0] = first;
                rng.fill(&mut b[1..]);
                if n % 4 == 0 {
                    // Padded-ret and NOP-like tails.
                    b[1..5].fill(if n % 8 == 0 { OPC_INT3 } else { 0 });
                }
                d.check(&b[..5], IP);
                d.check(&b, rng.next());
            }
        }
        // Every one-byte change of each accepted form (every position, every
        // value), and of the forms with one more byte in front.
        let forms: [[u8; 5]; 4] = [
            [OPC_RET, OPC_INT3, OPC_INT3, OPC_INT3, OPC_INT3],
            crate::patch::NOP5,
            [OPC_CALL_REL32, 0x78, 0x56, 0x34, 0x12],
            [OPC_JMP_REL32, 0x88, 0xa9, 0xcb, 0xed],
        ];
        for form in forms {
            for pos in 0..form.len() {
                for v in ALL {
                    let mut m = form;
                    m[pos] = v;
                    d.check(&m, IP);
                    let mut front = [v, 0, 0, 0, 0];
                    front[1..].copy_from_slice(&form[..4]);
                    d.check(&front, IP);
                }
            }
        }
        // Extreme displacements: the target wraps as the CPU computes it.
        for disp in [0, 1, -1, -5, i32::MAX, i32::MIN] {
            let r = disp.to_le_bytes();
            for opc in [OPC_CALL_REL32, OPC_JMP_REL32] {
                for ip in [0, IP, u64::MAX - 4, u64::MAX] {
                    d.check(&[opc, r[0], r[1], r[2], r[3]], ip);
                }
            }
        }
        for b0 in ALL {
            for b1 in ALL {
                for _ in 0..8 {
                    b[0] = b0;
                    b[1] = b1;
                    rng.fill(&mut b[2..]);
                    d.check(&b, IP);
                    d.check(&b[..5], IP);
                }
            }
        }
        // Short inputs.
        for len in 0..5 {
            d.check(&[OPC_CALL_REL32, 0, 0, 0, 0][..len], IP);
            d.check(&[OPC_RET, OPC_INT3, OPC_INT3, OPC_INT3, OPC_INT3][..len], IP);
        }
        std::eprintln!("classify vs iced-x86: {d:?}");
        assert!(d.accepted > 400_000, "{d:?}");
        assert!(d.lenient < d.checked / 10, "{d:?}");
    }

    /// The length decoder against iced-x86 over the legacy opcode maps:
    /// under each prefix combination, every opcode of each map with every
    /// ModRM byte and random following bytes. Where iced-x86 decodes a
    /// legacy-map instruction, `insn_len` gives its length; `insn_len`
    /// says `None` only for VEX/EVEX/XOP/3DNow! encodings or what iced-x86
    /// also refuses.
    #[test]
    fn insn_len_agrees_with_iced() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let prefixes: [&[u8]; 9] =
            [&[], &[0x66], &[0x67], &[0xf3], &[0xf2], &[0x48], &[0x41], &[0x66, 0x48], &[0x48, 0x66]];
        let maps: [&[u8]; 4] =
            [&[], &[OPC_ESCAPE_0F], &[OPC_ESCAPE_0F, OPC2_ESCAPE_38], &[OPC_ESCAPE_0F, OPC2_ESCAPE_3A]];
        let (mut checked, mut lenient, mut not_followed) = (0u64, 0u64, 0u64);
        // Leniency on the one-byte map without LOCK (a prefix this decoder
        // does not check): what a site or target mostly holds.
        let (mut map0_checked, mut map0_lenient) = (0u64, 0u64);
        let mut buf = Vec::new();
        for p in prefixes {
            for map in maps {
                for opc in ALL {
                    for m in ALL {
                        buf.clear();
                        buf.extend_from_slice(p);
                        buf.extend_from_slice(map);
                        buf.push(opc);
                        buf.push(m);
                        let mut tail = [0u8; MAX_INSN_LEN];
                        rng.fill(&mut tail);
                        buf.extend_from_slice(&tail);
                        let i = iced(&buf, IP);
                        let hand = insn_len(&buf);
                        checked += 1;
                        map0_checked += u64::from(map.is_empty());
                        match (i.is_invalid(), hand) {
                            (false, Some(n)) => assert_eq!(n, i.len(), "{buf:02x?}: {:?}", i.code()),
                            (false, None) => {
                                assert!(escape(&buf), "{buf:02x?}: {:?}", i.code());
                                not_followed += 1;
                            }
                            (true, Some(_)) => {
                                lenient += 1;
                                map0_lenient += u64::from(map.is_empty());
                            }
                            (true, None) => {}
                        }
                        // A truncated copy is never decoded.
                        if let Some(n) = hand {
                            assert_eq!(insn_len(&buf[..n - 1]), None, "{buf:02x?}");
                        }
                    }
                }
            }
        }
        std::eprintln!(
            "insn_len vs iced-x86: {checked} checked, {lenient} lenient ({map0_lenient} of {map0_checked} in the \
             one-byte map), {not_followed} VEX/EVEX/XOP/3DNow!"
        );
        assert!(map0_lenient < map0_checked / 30);
        // Too long: 15 bytes is the limit.
        let mut long = [0x2e; 20];
        long[13] = 0x90;
        assert_eq!(insn_len(&long[..14]), Some(14));
        long[13] = 0x2e;
        long[14] = 0x90;
        assert_eq!(insn_len(&long[..15]), Some(15));
        long[14] = 0x2e;
        long[15] = 0x90;
        assert_eq!(insn_len(&long), None);
        assert!(iced(&long, IP).is_invalid());
    }

    #[test]
    fn fixed_forms() {
        let call = rel32_branch(&[OPC_CALL_REL32, 0xfb, 0xff, 0xff, 0xff], 0x1000).unwrap();
        assert_eq!(call, Rel32Branch { kind: BranchKind::Call, disp: -5, next_ip: 0x1005, target: 0x1000 });
        assert_eq!(rel32_branch(&[OPC_JMP_REL32, 0, 0, 0], 0), None);
        assert!(is_padded_ret(&[OPC_RET, OPC_INT3, OPC_INT3, OPC_INT3, OPC_INT3]));
        assert!(!is_padded_ret(&[OPC_RET, OPC_INT3, OPC_INT3, OPC_INT3]));
        assert!(!is_padded_ret(&[OPC_RET, 0x90, OPC_INT3, OPC_INT3, OPC_INT3]));
        assert_eq!(insn_len(&[0x48, 0x8b, 0x04, 0x24]), Some(4));
        assert_eq!(insn_len(&[0x06]), None);
    }
}
