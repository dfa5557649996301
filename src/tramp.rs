//! The `call 1f; call 1f` trampoline: fixed bytes built from named
//! constants, proved by decoding them back with [`crate::insn`].
//!
//! ```text
//! entry: call L1        ; pushes ret1 on both stacks (displacement 1, not 0)
//! ret1:  int3           ; padding: never executed
//! L1:    call L2        ; pushes ret2 on both stacks
//! ret2:  int3           ; padding: never executed
//! L2:    int3           ; the second trap: the handler rewrites both slots
//!        ret            ; "returns" into the target, which returns to the site
//! ```
//!
//! A `call` to the very next instruction (displacement 0) does not push the
//! shadow stack, so each call jumps over one byte of padding.
//!
//! The `TRAMP_*_OFF` offsets are fixed by this shape and proved by [`verify`]
//! for every emitted copy: the #BP exit compares against `page + offset`
//! constants, never against a layout kept in writable memory.

use alloc::vec::Vec;
use core::fmt;

use crate::insn::{self, BranchKind, OPC_CALL_REL32, OPC_INT3, OPC_RET, REL32_LEN};

/// Offset of the entry (the first `call`), where the first trap sends the CPU.
pub const TRAMP_ENTRY_OFF: u64 = 0;
/// Offset of the return address the first call pushes (`ret1`).
pub const TRAMP_RET1_OFF: u64 = TRAMP_ENTRY_OFF + REL32_LEN as u64;
/// Offset of the return address the second call pushes (`ret2`).
pub const TRAMP_RET2_OFF: u64 = TRAMP_L1_OFF + REL32_LEN as u64;
/// Offset of the int3 of the second trap.
pub const TRAMP_TRAP_OFF: u64 = TRAMP_RET2_OFF + TRAMP_PAD_LEN as u64;
/// Bytes of the trampoline.
pub const TRAMP_LEN: usize = TRAMP_TRAP_OFF as usize + TRAMP_TAIL_LEN;

/// Padding (one int3, never executed) after each call, which the call jumps
/// over: its displacement.
const TRAMP_PAD_LEN: usize = 1;
/// The trap int3 and the `ret` after it.
const TRAMP_TAIL_LEN: usize = 2;
/// The second call, the target of the first.
const TRAMP_L1_OFF: u64 = TRAMP_RET1_OFF + TRAMP_PAD_LEN as u64;
/// The displacement of both calls: over the padding int3.
const TRAMP_CALL_DISP: i32 = TRAMP_PAD_LEN as i32;
const DISP: [u8; 4] = TRAMP_CALL_DISP.to_le_bytes();

/// The trampoline's bytes (position-independent: both calls are relative).
#[rustfmt::skip]
pub const TRAMP_BYTES: [u8; TRAMP_LEN] = [
    OPC_CALL_REL32, DISP[0], DISP[1], DISP[2], DISP[3], // entry: call L1
    OPC_INT3,                                           // ret1:  padding
    OPC_CALL_REL32, DISP[0], DISP[1], DISP[2], DISP[3], // L1:    call L2
    OPC_INT3,                                           // ret2:  padding
    OPC_INT3,                                           // trap:  the second trap
    OPC_RET,                                            // "returns" into the target
];

/// The layout `emit(base)` produces.
pub const fn layout_at(base: u64) -> TrampLayout {
    TrampLayout {
        base,
        entry: base + TRAMP_ENTRY_OFF,
        ret1: base + TRAMP_RET1_OFF,
        ret2: base + TRAMP_RET2_OFF,
        trap: base + TRAMP_TRAP_OFF,
        len: TRAMP_LEN,
    }
}

/// Addresses inside an emitted trampoline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrampLayout {
    /// Where the trampoline was assembled to run.
    pub base: u64,
    /// Where the first trap sends the CPU.
    pub entry: u64,
    /// Return address pushed by the first call (the deeper of the two slots).
    pub ret1: u64,
    /// Return address pushed by the second call (the top slot at the second trap).
    pub ret2: u64,
    /// The int3 of the second trap.
    pub trap: u64,
    /// Length in bytes.
    pub len: usize,
}

impl TrampLayout {
    /// The `ret` right after the trap int3 (where the second trap resumes).
    pub fn ret_insn(&self) -> u64 {
        self.trap + 1
    }
    /// Is `addr` one of the trampoline's bytes?
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.base + self.len as u64
    }
}

/// Why [`verify`] (and so [`emit`]) refused trampoline bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrampError {
    /// A call whose target is the next instruction: it would not push the shadow stack.
    ZeroDisplacementCall {
        /// The call's address.
        at: u64,
    },
    /// The bytes do not have the trampoline's shape.
    Shape(&'static str),
}

impl fmt::Display for TrampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrampError::ZeroDisplacementCall { at } => {
                write!(f, "call at {at:#x} has displacement 0 (no shadow-stack push)")
            }
            TrampError::Shape(s) => write!(f, "trampoline shape: {s}"),
        }
    }
}

/// The trampoline to run at `base` ([`TRAMP_BYTES`]), proved by [`verify`]
/// against [`layout_at`]`(base)`.
pub fn emit(base: u64) -> Result<(Vec<u8>, TrampLayout), TrampError> {
    let layout = layout_at(base);
    verify(&TRAMP_BYTES, &layout)?;
    Ok((TRAMP_BYTES.to_vec(), layout))
}

/// The instructions `verify` follows.
enum Step {
    Call(insn::Rel32Branch),
    Int3,
    Ret,
}

/// Decode the instruction at `ip`: only `call rel32`, `int3` and `ret`
/// (without prefixes) are trampoline instructions.
fn step(bytes: &[u8], layout: &TrampLayout, ip: u64) -> Result<(Step, u64), TrampError> {
    let off = ip.checked_sub(layout.base).filter(|&o| o < bytes.len() as u64);
    let rest = &bytes[off.ok_or(TrampError::Shape("flow leaves the trampoline"))? as usize..];
    match rest[0] {
        OPC_INT3 => Ok((Step::Int3, ip + 1)),
        OPC_RET => Ok((Step::Ret, ip + 1)),
        _ => match insn::rel32_branch(rest, ip) {
            Some(b) if b.kind == BranchKind::Call => Ok((Step::Call(b), b.next_ip)),
            _ => Err(TrampError::Shape("unexpected instruction")),
        },
    }
}

/// Decode `bytes` (running at `layout.base`) and prove they are the trampoline
/// described by `layout`: two near calls with non-zero displacement, whose
/// return addresses are `ret1` and `ret2`, then the trap int3 and the `ret`
/// after it, in this order. Returns the two calls' displacements.
pub fn verify(bytes: &[u8], layout: &TrampLayout) -> Result<[i64; 2], TrampError> {
    let mut disps = [0i64; 2];
    let mut calls = 0;
    let mut trapped = false;
    let mut ip = layout.entry;
    // Follow the control flow from the entry, as the CPU does.
    for _ in 0..4 {
        let at = ip;
        let (insn, next_ip) = step(bytes, layout, ip)?;
        match insn {
            Step::Call(b) => {
                if b.disp == 0 {
                    return Err(TrampError::ZeroDisplacementCall { at });
                }
                let expected_ret = if calls == 0 { layout.ret1 } else { layout.ret2 };
                if next_ip != expected_ret || calls == disps.len() {
                    return Err(TrampError::Shape("call return address differs from the layout"));
                }
                disps[calls] = i64::from(b.disp);
                calls += 1;
                ip = b.target;
            }
            Step::Int3 => {
                if calls != disps.len() || at != layout.trap {
                    return Err(TrampError::Shape("trap int3 not reached after two calls"));
                }
                trapped = true;
                ip = next_ip;
            }
            Step::Ret => {
                if at != layout.trap + 1 || !trapped {
                    return Err(TrampError::Shape("ret is not reached through the trap int3"));
                }
                return Ok(disps);
            }
        }
    }
    Err(TrampError::Shape("too many instructions"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::CodeAssembler;
    use iced_x86::{BlockEncoderOptions, Decoder, DecoderOptions, Mnemonic};

    /// The trampoline as iced-x86's code assembler emits it (the run-time
    /// emitter before the fixed bytes), with its layout.
    fn iced_emit(base: u64) -> (Vec<u8>, TrampLayout) {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut l1 = a.create_label();
        let mut l2 = a.create_label();
        a.call(l1).unwrap();
        a.int3().unwrap();
        a.set_label(&mut l1).unwrap();
        a.call(l2).unwrap();
        a.int3().unwrap();
        a.set_label(&mut l2).unwrap();
        a.int3().unwrap();
        a.ret().unwrap();
        let r = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).unwrap();
        let (l1_ip, l2_ip) = (r.label_ip(&l1).unwrap(), r.label_ip(&l2).unwrap());
        let bytes = r.inner.code_buffer;
        let len = bytes.len();
        (bytes, TrampLayout { base, entry: base, ret1: l1_ip - 1, ret2: l2_ip - 1, trap: l2_ip, len })
    }

    /// The run-time `verify` before the hand decoder, with iced-x86.
    fn iced_verify(bytes: &[u8], layout: &TrampLayout) -> Result<[i64; 2], TrampError> {
        let mut d = Decoder::with_ip(64, bytes, layout.base, DecoderOptions::NONE);
        let mut disps = Vec::new();
        let mut ip = layout.entry;
        for _ in 0..4 {
            let pos = ip.checked_sub(layout.base).ok_or(TrampError::Shape("flow leaves the trampoline"))?;
            d.set_position(pos as usize).map_err(|_| TrampError::Shape("flow leaves the trampoline"))?;
            d.set_ip(ip);
            let insn = d.decode();
            match insn.mnemonic() {
                Mnemonic::Call => {
                    if insn.near_branch_target() == insn.next_ip() {
                        return Err(TrampError::ZeroDisplacementCall { at: insn.ip() });
                    }
                    disps.push(insn.near_branch_target().wrapping_sub(insn.next_ip()) as i64);
                    let expected_ret = if disps.len() == 1 { layout.ret1 } else { layout.ret2 };
                    if insn.next_ip() != expected_ret || disps.len() > 2 {
                        return Err(TrampError::Shape("call return address differs from the layout"));
                    }
                    ip = insn.near_branch_target();
                }
                Mnemonic::Int3 => {
                    if disps.len() != 2 || insn.ip() != layout.trap {
                        return Err(TrampError::Shape("trap int3 not reached after two calls"));
                    }
                    ip = insn.next_ip();
                }
                Mnemonic::Ret => {
                    if ip != layout.trap + 1 {
                        return Err(TrampError::Shape("ret is not right after the trap int3"));
                    }
                    // The run-time version indexed disps here and panicked
                    // when a call jumped straight to the ret.
                    return match disps[..] {
                        [a, b] => Ok([a, b]),
                        _ => Err(TrampError::Shape("ret reached before two calls")),
                    };
                }
                _ => return Err(TrampError::Shape("unexpected instruction")),
            }
        }
        Err(TrampError::Shape("too many instructions"))
    }

    const BASES: [u64; 3] = [0x10_0000u64, 0x1234_5678, 0xffff_ffff_8000_0000];

    #[test]
    fn emitted_calls_have_nonzero_displacement() {
        for base in BASES {
            let (bytes, l) = emit(base).unwrap();
            assert_eq!(bytes, [0xe8, 1, 0, 0, 0, 0xcc, 0xe8, 1, 0, 0, 0, 0xcc, 0xcc, 0xc3]);
            assert_eq!((l.entry, l.ret1, l.ret2, l.trap), (base, base + 5, base + 11, base + 12));
            assert_eq!(verify(&bytes, &l), Ok([1, 1]));
            assert_eq!(l.ret_insn(), base + 13);
            assert_eq!(l, layout_at(base));
        }
    }

    /// The fixed bytes and offsets are what iced-x86's assembler emits for
    /// the trampoline, and iced-x86 decodes them as the trampoline.
    #[test]
    fn fixed_bytes_match_iced_assembler() {
        for base in BASES {
            let (bytes, l) = emit(base).unwrap();
            assert_eq!(iced_emit(base), (bytes.clone(), l), "base {base:#x}");
            assert_eq!(iced_verify(&bytes, &l), Ok([1, 1]));
            let mnemonics: Vec<Mnemonic> =
                Decoder::with_ip(64, &bytes, base, DecoderOptions::NONE).into_iter().map(|i| i.mnemonic()).collect();
            use Mnemonic::{Call, Int3, Ret};
            assert_eq!(mnemonics, [Call, Int3, Call, Int3, Int3, Ret]);
        }
    }

    /// Over every one-byte change and random two-byte changes of the
    /// trampoline, `verify` agrees with the iced-x86 version, except that it
    /// is stricter (never the other way round): it refuses prefixed or other
    /// encodings of call and ret that iced-x86 would follow, and a flow that
    /// jumps over the trap int3 to the ret (the iced-x86 version accepted
    /// that, or panicked if it skipped a call too).
    #[test]
    fn verify_agrees_with_iced_on_mutations() {
        let l = layout_at(0x1000);
        let (mut strict, mut checked) = (0, 0);
        let mut check = |bytes: &[u8]| {
            checked += 1;
            let (hand, iced) = (verify(bytes, &l), iced_verify(bytes, &l));
            match (&hand, &iced) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{bytes:02x?}"),
                (Ok(_), Err(_)) => panic!("hand verify accepts what iced-x86 refuses: {bytes:02x?}"),
                (Err(_), Ok(_)) => strict += 1,
                (Err(a), Err(b)) => {
                    // The same kind of refusal where both decode the same instruction.
                    if let (TrampError::ZeroDisplacementCall { .. }, _) | (_, TrampError::ZeroDisplacementCall { .. }) =
                        (a, b)
                    {
                        assert_eq!(a, b, "{bytes:02x?}");
                    }
                }
            }
        };
        for pos in 0..TRAMP_LEN {
            for v in 0..=255u8 {
                let mut b = TRAMP_BYTES;
                b[pos] = v;
                check(&b);
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = TRAMP_BYTES;
            b[(x % TRAMP_LEN as u64) as usize] = (x >> 8) as u8;
            b[((x >> 16) % TRAMP_LEN as u64) as usize] = (x >> 24) as u8;
            check(&b);
            check(&b[..(x >> 32) as usize % (TRAMP_LEN + 1)]);
        }
        std::eprintln!("{strict} of {checked} refused by the hand verify only");
        assert!(strict < checked / 100, "{strict} of {checked} refused by the hand verify only");
        // The flow that skips the trap int3: call L1; L1: call ret_insn.
        let mut skip = TRAMP_BYTES;
        skip[TRAMP_L1_OFF as usize + 1] = 2;
        assert!(iced_verify(&skip, &l).is_ok());
        assert_eq!(verify(&skip, &l), Err(TrampError::Shape("ret is not reached through the trap int3")));
    }

    #[test]
    fn zero_displacement_is_rejected() {
        // call +0 (to the next instruction) instead of call +1.
        let bytes = [0xe8, 0, 0, 0, 0, 0xe8, 1, 0, 0, 0, 0xcc, 0xcc, 0xc3];
        let l = TrampLayout { base: 0x1000, entry: 0x1000, ret1: 0x1005, ret2: 0x100a, trap: 0x100b, len: 13 };
        assert_eq!(verify(&bytes, &l), Err(TrampError::ZeroDisplacementCall { at: 0x1000 }));
        assert_eq!(iced_verify(&bytes, &l), Err(TrampError::ZeroDisplacementCall { at: 0x1000 }));
    }

    #[test]
    fn wrong_shapes_are_rejected() {
        let (mut bytes, l) = emit(0x1000).unwrap();
        bytes[12] = 0x90; // trap int3 replaced by nop
        assert!(matches!(verify(&bytes, &l), Err(TrampError::Shape(_))));
        let (bytes, mut l) = emit(0x1000).unwrap();
        l.ret1 += 1;
        assert!(verify(&bytes, &l).is_err());
    }
}
