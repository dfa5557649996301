//! The #BP entry stub and its exits (asm/bp.S), assembled into the crate
//! with the feature `entry`.
//!
//! `sc_isr_3` is the host's IDT entry for vector 3 (an interrupt gate, no
//! IST). It copies the hardware frame 8 bytes lower (the gap an emulated
//! push needs), saves the registers as a [`TrapFrame`](crate::frame::TrapFrame),
//! reads SSP, and calls the host's `sc_bp_handler(&mut TrapFrame, ssp) ->
//! Exit`, which calls [`Patcher::handle_int3`](crate::engine::Patcher::handle_int3).
//! The exit named by the [`Exit`](crate::engine::Exit) then writes the shadow
//! stack, from the shadow stack and read-only data only (DESIGN §11), or
//! calls the host's `sc_bp_exit_refused(&mut TrapFrame, ssp)` if a check
//! fails. Everything from `sc_bpx_region_start` to `sc_bpx_region_end` is a
//! critical region: the host's NMI and #MC entries must give an interrupted
//! exit its registers back from a page only WRSS writes (DESIGN §8.3).
//!
//! The host defines its layout as link-time symbols (README "Use it in your
//! kernel"): `sc_stacks`, `SC_CPU_STACKS_SIZE`, `SC_MAX_CPUS`,
//! `SC_NMI_STACK_OFF`, `SC_IST_STACK_SIZE`, `sc_tramp_records`,
//! `sc_tramp_page`, `__sealed_start`/`__sealed_end`, `__sites_start`/
//! `__sites_end`, `__targets_start`/`__targets_end`. With `test-hooks`
//! also the self-test probe symbols `sc_t_iret_int3`, `sc_t_iret_landing`
//! and the byte `SC_T_EXIT_NMI`.

use core::mem::{offset_of, size_of};

use crate::emul::record;
use crate::frame::TrapFrame;
use crate::patch::{SealedEntry, SealedHeader};

// The exits index sealed entries with a shift, and find a CPU's record page
// by shifting its index.
const _: () = assert!(size_of::<SealedEntry>().is_power_of_two());
const _: () = assert!(record::RECORD_PAGE_SIZE.is_power_of_two());
const _: () = assert!(record::IN_EXIT_WORD + 8 <= record::RECORD_PAGE_SIZE);

core::arch::global_asm!(
    concat!(
        include_str!("../asm/regs.S"),
        include_str!("../asm/stack_cpu.S"),
        include_str!("../asm/sealed.S"),
        include_str!("../asm/bp.S")
    ),
    BP_GAP = const crate::frame::BP_STACK_GAP,
    FRAME_RIP = const offset_of!(TrapFrame, rip),
    FRAME_RSP = const offset_of!(TrapFrame, rsp),
    FRAME_RCX = const offset_of!(TrapFrame, rcx),
    FRAME_RFLAGS = const offset_of!(TrapFrame, rflags),
    BP_RSP_MIN = const crate::frame::BP_RETURN_RSP_MIN,
    BP_RSP_MAX = const crate::frame::BP_RETURN_RSP_MAX,
    RFLAGS_IF_BIT = const crate::frame::RFLAGS_IF.trailing_zeros(),
    BPX_COUNT = const crate::engine::ACTION_COUNT,
    SEALED_LIVE = const crate::patch::SEALED_MAGIC,
    SEALED_STATE = const offset_of!(SealedHeader, magic),
    SEALED_ENTRIES_OFF = const offset_of!(SealedHeader, entries_off),
    SEALED_LEN = const offset_of!(SealedHeader, len),
    SEALED_HEADER_SIZE = const size_of::<SealedHeader>(),
    ENTRY_SIZE = const size_of::<SealedEntry>(),
    ENTRY_SHIFT = const size_of::<SealedEntry>().trailing_zeros(),
    ENTRY_SITE = const offset_of!(SealedEntry, site),
    ENTRY_TARGET = const offset_of!(SealedEntry, target),
    ENTRY_KIND = const offset_of!(SealedEntry, kind),
    ENTRY_BYTES = const offset_of!(SealedEntry, bytes),
    SITE_LEN = const crate::patch::SITE_LEN,
    OPC_CALL_REL32 = const crate::patch::OPC_CALL_REL32,
    OPC_JMP_REL32 = const crate::patch::OPC_JMP_REL32,
    NOP5_WORD = const crate::patch::NOP5_WORD,
    RET_WORD = const crate::patch::RET_WORD,
    KIND_CALL = const crate::patch::KIND_CALL,
    KIND_JMP = const crate::patch::KIND_JMP,
    KIND_NOP = const crate::patch::KIND_NOP,
    KIND_RET = const crate::patch::KIND_RET,
    KIND_MASK = const crate::patch::KIND_MASK,
    SITE_INDEX_SHIFT = const crate::patch::SITE_INDEX_SHIFT,
    TARGET_INDEX_SHIFT = const crate::patch::TARGET_INDEX_SHIFT,
    INDEX_MASK = const crate::patch::INDEX_MASK,
    IN_EXIT = const record::IN_EXIT_WORD,
    SYNC_WORD = const record::SYNC_WORD,
    SYNC_GEN = const record::SYNC_GEN_WORD,
    MY_GEN = const record::MY_GEN_WORD,
    GEN_CPU_BITS = const record::GEN_CPU_BITS,
    RECORD_PAGE_BYTES = const record::RECORD_PAGE_SIZE,
    RECORD_PAGE_SHIFT = const record::RECORD_PAGE_SIZE.trailing_zeros(),
    RECORD_SIZE = const record::RECORD_SIZE,
    RECORDS_PER_PAGE = const record::RECORDS_PER_PAGE,
    REC_SSP = const record::REC_SSP,
    REC_RSP_IF = const record::REC_RSP_IF,
    REC_SITE = const record::REC_SITE,
    REC_TARGET = const record::REC_TARGET,
    TRAMP_RET1 = const crate::tramp::TRAMP_RET1_OFF,
    TRAMP_RET2 = const crate::tramp::TRAMP_RET2_OFF,
    TRAMP_TRAP = const crate::tramp::TRAMP_TRAP_OFF,
    TEST_HOOKS = const cfg!(feature = "test-hooks") as u8,
    CR4_CET_BIT = const x86_64::registers::control::Cr4Flags::CONTROL_FLOW_ENFORCEMENT.bits().trailing_zeros(),
    options(att_syntax)
);
