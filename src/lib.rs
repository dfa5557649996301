//! shadowcall: the pure, host-testable logic behind shadow-stack-aware int3
//! call emulation for live kernel text patching.
//!
//! Everything here is `no_std` (with `alloc`) and free of privileged
//! instructions, so it is unit-tested on the host with `cargo test`; the
//! bare-metal kernel in `kernel/` is a thin layer that applies it to real
//! stacks, page tables and text.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(target_arch = "x86_64")]
pub mod cet;
pub mod emul;
pub mod frame;
pub mod insn;
pub mod patch;
pub mod shstk;
pub mod site;
pub mod tramp;
