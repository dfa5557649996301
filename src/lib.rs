//! shadowcall: live patching of kernel text with int3 call emulation that
//! works under Intel CET supervisor shadow stacks.
//!
//! A `no_std` (with `alloc`) engine crate for a host kernel. It builds alone
//! for `x86_64-unknown-none`, and its logic is host-tested with `cargo test`
//! (the privileged wrappers in [`cet`] run only in a kernel). What it offers
//! today:
//!
//! - [`engine`]: the host's contract ([`engine::Platform`]), the patcher
//!   ([`engine::Patcher`]: the int3 protocol for a batch or, without
//!   allocating, one site) and the #BP handler
//!   ([`engine::Patcher::handle_int3`], answering `Handled` or `NotOurs`);
//! - `entry` (feature `entry`): the #BP entry stub `sc_isr_3` and its exits
//!   in asm, every shadow-stack write of the #BP path, with the host's
//!   layout from link-time symbols;
//! - [`cet`]: supervisor shadow-stack bring-up (CPUID detection, the CET
//!   MSRs, the interrupt SSP table, the enable sequence with a `-> !`
//!   continuation) and the RDSSP/WRSS/INCSSP wrappers;
//! - [`patch_site!`] and [`site`]: patchable 5-byte call sites declared from
//!   Rust, registered in the read-only `.shadowcall_sites` and
//!   `.shadowcall_targets` tables;
//! - [`patch`]: validation of a batch against those tables and the code the
//!   #BP handler runs, the new instructions' encodings, and the sealed batch
//!   the handler searches;
//! - [`insn`]: exact recognition of the patchable forms and an instruction
//!   length decoder, for specific errors on bad input;
//! - [`tramp`] and [`emul`]: the `call; call` trampoline's fixed bytes and
//!   layout, the record of a pending emulated call, and the checks the
//!   second trap makes before it writes;
//! - [`shstk`] and [`frame`]: shadow-stack tokens, frames and #CP codes; the
//!   entry stubs' trap frame and the #BP gap arithmetic.
//!
//! README "Use it in your kernel" lists what a host provides; DESIGN.md §12
//! the split between the crate and its two hosts (`kernel/`,
//! `examples/minimal`).
//!
//! Validating a batch (nothing is written; a refused batch says why):
//!
//! ```
//! use shadowcall::patch::{build_batch, NewInsn, PatchError, Registry, Text};
//!
//! // Text at 0x1000: a registered site `call 0x1010` at 0x1000, and two
//! // registered targets, one-byte functions (`ret`) at 0x1010 and 0x1020.
//! let mut bytes = [0xcc_u8; 0x30];
//! bytes[..5].copy_from_slice(&[0xe8, 0x0b, 0, 0, 0]);
//! bytes[0x10] = 0xc3;
//! bytes[0x20] = 0xc3;
//! let text = Text { base: 0x1000, bytes: &bytes };
//! let (sites, targets) = ([0x1000], [0x1010, 0x1020]);
//! let registry = Registry::new(&sites, &targets, &[]);
//!
//! // Point the site at the other function: `call 0x1020`.
//! let batch = build_batch(&text, &registry, &[(0x1000, NewInsn::Call(0x1020))])?;
//! assert_eq!(batch.lookup(0x1000).map(|e| e.bytes), Some([0xe8, 0x1b, 0, 0, 0]));
//!
//! // A target that is not registered is refused.
//! let bad = build_batch(&text, &registry, &[(0x1000, NewInsn::Call(0x1021))]);
//! assert!(matches!(bad, Err(PatchError::UnknownTarget { site: 0x1000, target: 0x1021 })));
//! # Ok::<(), PatchError>(())
//! ```
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(target_arch = "x86_64")]
pub mod cet;
pub mod emul;
#[cfg(target_arch = "x86_64")]
pub mod engine;
#[cfg(all(target_arch = "x86_64", feature = "entry"))]
pub mod entry;
pub mod frame;
pub mod insn;
pub mod patch;
pub mod shstk;
pub mod site;
pub mod tramp;
