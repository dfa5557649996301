//! shadowcall-support: the reference kernel's own support code, host-tested.
//!
//! A host kernel embedding the `shadowcall` engine already has these pieces
//! (firmware tables, a test-output format, page-table encoders), so they live
//! here rather than in the engine: just enough ACPI to find the CPUs, KTAP
//! output, and the page-table entry encodings of the kernel's mappings.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod ktap;
pub mod paging;
