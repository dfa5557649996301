//! The `call 1f; call 1f` trampoline, emitted with iced-x86's code assembler.
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

use alloc::vec::Vec;
use core::fmt;

use iced_x86::code_asm::CodeAssembler;
use iced_x86::{BlockEncoderOptions, Decoder, DecoderOptions, Mnemonic};

/// Offsets in the trampoline that `emit` produces (fixed by its shape, and
/// proved by `verify` for every emitted copy): the entry, the two return
/// addresses its calls push, and the trap int3. The #BP exit compares
/// against `page + offset` constants, never against a layout kept in
/// writable memory.
pub const TRAMP_ENTRY_OFF: u64 = 0;
pub const TRAMP_RET1_OFF: u64 = 5;
pub const TRAMP_RET2_OFF: u64 = 11;
pub const TRAMP_TRAP_OFF: u64 = 12;
/// Bytes of the trampoline.
pub const TRAMP_LEN: usize = 14;

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
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.base + self.len as u64
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrampError {
    Assemble,
    /// A call whose target is the next instruction: it would not push the shadow stack.
    ZeroDisplacementCall {
        at: u64,
    },
    /// The bytes do not have the trampoline's shape.
    Shape(&'static str),
}

impl fmt::Display for TrampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrampError::Assemble => f.write_str("iced-x86 failed to assemble the trampoline"),
            TrampError::ZeroDisplacementCall { at } => {
                write!(f, "call at {at:#x} has displacement 0 (no shadow-stack push)")
            }
            TrampError::Shape(s) => write!(f, "trampoline shape: {s}"),
        }
    }
}

/// Assemble the trampoline to run at `base`.
pub fn emit(base: u64) -> Result<(Vec<u8>, TrampLayout), TrampError> {
    let e = |_| TrampError::Assemble;
    let mut a = CodeAssembler::new(64).map_err(e)?;
    let mut l1 = a.create_label();
    let mut l2 = a.create_label();
    a.call(l1).map_err(e)?;
    a.int3().map_err(e)?;
    a.set_label(&mut l1).map_err(e)?;
    a.call(l2).map_err(e)?;
    a.int3().map_err(e)?;
    a.set_label(&mut l2).map_err(e)?;
    a.int3().map_err(e)?;
    a.ret().map_err(e)?;
    let r = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).map_err(e)?;
    let l1_ip = r.label_ip(&l1).map_err(e)?;
    let l2_ip = r.label_ip(&l2).map_err(e)?;
    let bytes = r.inner.code_buffer;
    let layout = TrampLayout { base, entry: base, ret1: l1_ip - 1, ret2: l2_ip - 1, trap: l2_ip, len: bytes.len() };
    verify(&bytes, &layout)?;
    if layout != layout_at(base) {
        return Err(TrampError::Shape("layout differs from the fixed offsets"));
    }
    Ok((bytes, layout))
}

/// Decode `bytes` (running at `layout.base`) and prove they are the trampoline
/// described by `layout`: two near calls with non-zero displacement, whose
/// return addresses are `ret1` and `ret2`, then the trap int3 and a `ret`.
/// Returns the two calls' displacements.
pub fn verify(bytes: &[u8], layout: &TrampLayout) -> Result<[i64; 2], TrampError> {
    let mut d = Decoder::with_ip(64, bytes, layout.base, DecoderOptions::NONE);
    let mut disps = Vec::new();
    let mut ip = layout.entry;
    // Follow the control flow from the entry, as the CPU does.
    for _ in 0..4 {
        d.set_position((ip - layout.base) as usize).map_err(|_| TrampError::Shape("flow leaves the trampoline"))?;
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
                return Ok([disps[0], disps[1]]);
            }
            _ => return Err(TrampError::Shape("unexpected instruction")),
        }
    }
    Err(TrampError::Shape("too many instructions"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emitted_calls_have_nonzero_displacement() {
        for base in [0x10_0000u64, 0x1234_5678, 0xffff_ffff_8000_0000] {
            let (bytes, l) = emit(base).unwrap();
            assert_eq!(bytes, [0xe8, 1, 0, 0, 0, 0xcc, 0xe8, 1, 0, 0, 0, 0xcc, 0xcc, 0xc3]);
            assert_eq!((l.entry, l.ret1, l.ret2, l.trap), (base, base + 5, base + 11, base + 12));
            assert_eq!(verify(&bytes, &l), Ok([1, 1]));
            assert_eq!(l.ret_insn(), base + 13);
            assert_eq!(l, layout_at(base));
        }
    }

    #[test]
    fn zero_displacement_is_rejected() {
        // call +0 (to the next instruction) instead of call +1.
        let bytes = [0xe8, 0, 0, 0, 0, 0xe8, 1, 0, 0, 0, 0xcc, 0xcc, 0xc3];
        let l = TrampLayout { base: 0x1000, entry: 0x1000, ret1: 0x1005, ret2: 0x100a, trap: 0x100b, len: 13 };
        assert_eq!(verify(&bytes, &l), Err(TrampError::ZeroDisplacementCall { at: 0x1000 }));
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
