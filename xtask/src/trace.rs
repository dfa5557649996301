//! `cargo xtask trace`: an instruction trace, on Bochs, of one iteration of
//! each #BP hot-path benchmark of the production build (`int3_iret`,
//! `emul_call/trampoline`, `emul_call/shadowgap`, and the shadow gap's
//! `emul_jmp`, `emul_nop` and `emul_call_1site` with CET on;
//! `emul_call/classic` with `--cet off`), every retired instruction
//! attributed to a phase (DESIGN §7.4): entry, lookup, checks, writes, exit.
//! Both paths of the crate's #BP stub (asm/bp.S) are attributed: the
//! production fast path (`sc_bp_fast*`, emulating in the stub and returning
//! through `sc_bp_fast_return`) and the slow path (`sc_bp_slow`, the Rust
//! handler, the `sc_bpx_*` exits, `sc_bp_return`).
//!
//! How: the kernel boots with `bench=1` under Bochs's built-in debugger; an rc
//! file sets a breakpoint at the benchmark's int3, lets it pass until a call
//! in the middle of the figure's measured repetitions, then `trace on` and
//! steps through that one call; the kernel then runs its benchmark to the
//! end, so the traced count is checked against the figure it printed.
//! Each traced RIP is named with the kernel ELF's symbols; instructions of
//! Rust code are attributed through their DWARF inline chains and source
//! lines (binutils `addr2line -i`), the asm by its labels (see [`Phase`]
//! for the rules).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use object::elf::{FileHeader64, SHT_SYMTAB, STT_FILE, STT_SECTION};
use object::read::elf::{FileHeader, Sym};
use object::LittleEndian;

use crate::error::{Context, Error, Result};
use crate::install::Policy;
use crate::iso::Loader;
use crate::kernel::Build;
use crate::machines::{kernel_words, Machine, RunnerWords};
use crate::rundir::RunDir;
use shadowcall_cmdline::CetMode;

const LE: LittleEndian = LittleEndian;

/// Calls of the benchmarked function per figure: `WARMUP_REPS + REPS`
/// repetitions of `ITERS` calls (kernel/src/bench.rs).
pub const CALLS_PER_FIGURE: u32 = 6 * 200;
/// Which call of a figure is traced (0-based): one in a measured repetition.
pub const TRACED_CALL: u32 = CALLS_PER_FIGURE / 2;
/// How long one traced boot may take.
const TIMEOUT: Duration = Duration::from_secs(1500);

/// The phases of DESIGN §7.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// The int3 itself and the stub's saves: `sc_isr_3` (the frame copy,
    /// `PUSH_GPRS_LOW`) and, on the slow path, `sc_bp_slow` up to and
    /// including its `call sc_bp_handler`.
    Entry,
    /// The search: the fast path's inlined search and the entry's fields
    /// ([`FAST_LOOKUP`] labels); on the slow path, Rust code whose DWARF
    /// inline chain passes through `SealedBatch` or `live_batch`.
    Lookup,
    /// Everything else the #BP path runs: the fast path's checks
    /// ([`FAST_CHECKS`] labels, and each [`FAST_TAILS`] label up to its last
    /// conditional branch), the rest of the Rust handler, the exit dispatch,
    /// and each asm exit up to its last branch to `sc_bpx_refuse*`
    /// (BPX_FRAME, BPX_ENTRY, ...).
    Checks,
    /// The stores of the emulation's results (frame RIP/RSP/RFLAGS, the
    /// normal-stack slots, WRSS of the shadow frame and records) and the
    /// values they store: in each fast-path tail ([`FAST_TAILS`]) the
    /// instructions after its last conditional branch (each leaves for
    /// `sc_bp_slow` or picks the tail's own path); Rust lines that write the
    /// trap frame or the interrupted stack (`frame.rip/rsp/rflags = ...`,
    /// `write_volatile`); each asm exit after its last branch to
    /// `sc_bpx_refuse*`. The jump into the return is not a write (exit).
    Writes,
    /// `sc_bp_fast_return` (the register pops and IRET) and the fast path's
    /// jump to it; on the slow path `sc_bpx_plain`, the exit's `jmp
    /// sc_bp_return`, and `sc_bp_return` onwards.
    Exit,
    /// Not the #BP path: the benchmark's own code (the site's function, the
    /// call target, the trampoline page's instructions).
    Other,
}

impl Phase {
    pub const ALL: [Phase; 6] = [Phase::Entry, Phase::Lookup, Phase::Checks, Phase::Writes, Phase::Exit, Phase::Other];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Entry => "entry",
            Phase::Lookup => "lookup",
            Phase::Checks => "checks",
            Phase::Writes => "writes",
            Phase::Exit => "exit",
            Phase::Other => "other",
        }
    }
}

/// One traced figure.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The figure's key in `cargo xtask bench` (`emul_call/shadowgap`).
    pub key: &'static str,
    /// Booted with `cet=off` (the `bochs-cetoff` machine).
    pub cet_off: bool,
    /// The int3 the breakpoint is set on.
    pub int3: &'static str,
    /// Calls of that int3 before the traced one, in the boot.
    pub skip: u32,
    /// Calls of that int3 made before its breakpoint is armed (right after
    /// the previous case's traced call, when that case's int3 is another).
    pub before_armed: u32,
    /// Labels the traced iteration must pass through (the path it takes).
    pub must_pass: &'static [&'static str],
    /// Labels it must not pass (the fast path's figures: not the handler).
    pub must_avoid: &'static [&'static str],
    /// Its row in the tables (the cases are in the boots' time order).
    pub row: u8,
}

/// The fast path's figures take neither the handler nor its exits.
const NOT_SLOW: &[&str] = &["sc_bp_slow"];

/// The traced figures, in the order each boot reaches them: `int3_iret`
/// first; then, per strategy of `strategies_here()` (CET on: trampoline,
/// shadow gap; off: classic, trampoline), `emul_call`, `emul_jmp`,
/// `emul_nop`, `emul_ret` and `emul_call_nmi` (on `emul_call`'s site);
/// then `emul_call_1site` per strategy (kernel/src/bench.rs `run_all`).
pub const CASES: [Case; 7] = [
    Case {
        key: "int3_iret",
        cet_off: false,
        int3: "sc_b_int3",
        skip: TRACED_CALL,
        before_armed: 0,
        must_pass: &["sc_bp_fast_idle", "sc_bp_fast_return"],
        must_avoid: NOT_SLOW,
        row: 0,
    },
    Case {
        key: "emul_call/trampoline",
        cet_off: false,
        int3: "sc_b_site_call",
        skip: TRACED_CALL,
        before_armed: 0,
        must_pass: &["sc_bp_fast_tramp1", "sc_bp_fast_tramp2", "sc_bp_fast_return"],
        must_avoid: NOT_SLOW,
        row: 1,
    },
    Case {
        key: "emul_call/shadowgap",
        cet_off: false,
        int3: "sc_b_site_call",
        // After the trampoline's emul_call and emul_call_nmi.
        skip: 2 * CALLS_PER_FIGURE + TRACED_CALL,
        before_armed: 0,
        must_pass: &["sc_bp_fast_call", "sc_bp_fast_return"],
        must_avoid: NOT_SLOW,
        row: 2,
    },
    Case {
        key: "emul_jmp/shadowgap",
        cet_off: false,
        int3: "sc_b_site_jmp",
        skip: CALLS_PER_FIGURE + TRACED_CALL,
        // The trampoline's emul_jmp ran before the shadow gap's emul_call.
        before_armed: CALLS_PER_FIGURE,
        must_pass: &["sc_bp_fast_jmp", "sc_bp_fast_return"],
        must_avoid: NOT_SLOW,
        row: 4,
    },
    Case {
        key: "emul_nop/shadowgap",
        cet_off: false,
        int3: "sc_b_site_nop",
        skip: CALLS_PER_FIGURE + TRACED_CALL,
        before_armed: CALLS_PER_FIGURE,
        must_pass: &["sc_bp_fast_nop", "sc_bp_fast_return"],
        must_avoid: NOT_SLOW,
        row: 5,
    },
    Case {
        key: "emul_call_1site/shadowgap",
        cet_off: false,
        int3: "sc_b_site_call1",
        skip: CALLS_PER_FIGURE + TRACED_CALL,
        before_armed: 0,
        must_pass: &["sc_bp_fast_call", "sc_bp_fast_return"],
        must_avoid: NOT_SLOW,
        row: 6,
    },
    Case {
        key: "emul_call/classic",
        cet_off: true,
        int3: "sc_b_site_call",
        skip: TRACED_CALL,
        before_armed: 0,
        must_pass: &["sc_bp_fast_nocet", "sc_bp_fast_nocet_kind", "sc_bp_fast_return"],
        must_avoid: NOT_SLOW,
        row: 3,
    },
];

/// The function symbols of the ELF, sorted by address (name, start, size).
#[derive(Debug, Default)]
pub struct Symbols {
    syms: Vec<(u64, u64, String)>,
}

impl Symbols {
    pub fn read(elf: &[u8]) -> std::result::Result<Symbols, String> {
        let h = FileHeader64::<LittleEndian>::parse(elf).map_err(|e| format!("not an ELF64: {e}"))?;
        let sections = h.sections(LE, elf).map_err(|e| format!("bad section headers: {e}"))?;
        let table = sections.symbols(LE, elf, SHT_SYMTAB).map_err(|e| format!("bad symbol table: {e}"))?;
        let mut syms = Vec::new();
        for sym in table.iter() {
            let kind = sym.st_type();
            if sym.st_name(LE) == 0 || kind == STT_FILE || kind == STT_SECTION || sym.is_undefined(LE) {
                continue;
            }
            let Ok(name) = sym.name(LE, table.strings()) else { continue };
            let name = String::from_utf8_lossy(name).into_owned();
            if name.starts_with(".L") || name.starts_with("$") {
                continue;
            }
            syms.push((sym.st_value(LE), sym.st_size(LE), name));
        }
        syms.sort();
        Ok(Symbols { syms })
    }

    pub fn addr(&self, name: &str) -> Option<u64> {
        self.syms.iter().find(|s| s.2 == name).map(|s| s.0)
    }

    /// The nearest symbol at or below `addr` (an asm label counts); of
    /// several at one address, one that is not a [`MARKERS`] name
    /// (`sc_bpx_region_start` is also `sc_bp_fast` or `sc_bp_slow`).
    pub fn at(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.syms.partition_point(|s| s.0 <= addr);
        let (start, _, name) = self.syms.get(i.checked_sub(1)?)?;
        let same = self.syms[..i].iter().rev().take_while(|s| s.0 == *start);
        let name = same.map(|s| s.2.as_str()).find(|n| !MARKERS.contains(n)).unwrap_or(name);
        Some((name, addr - start))
    }
}

/// Symbols that mark a region, not code of their own.
pub const MARKERS: [&str; 2] = ["sc_bpx_region_start", "sc_bpx_region_end"];

/// Instructions of each benchmark call outside the traced window (which
/// runs from the int3 to the return into `sc_b_loop`): the loop's
/// `call *%r12`, `decq` and `jnz` (kernel/asm/bench.S).
pub const LOOP_INSNS: u64 = 3;

/// One line of Bochs's `trace on` output: tick (= retired instructions
/// with `clock: sync=none`), RIP and the disassembly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceLine {
    pub tick: u64,
    pub rip: u64,
    pub insn: String,
}

/// Parses `(0).[408650035] [0x0000001023f0] 0008:00000000001023f0 (unk. ctxt): sub rsp, 0x8 ; 4883ec08`.
/// The guest's serial output shares Bochs's stdout and may precede a line
/// without a newline (`#(0).[...`): anything before `(0).[` is skipped.
pub fn parse_trace_line(line: &str) -> Option<TraceLine> {
    let rest = &line[line.find("(0).[")? + "(0).[".len()..];
    let (tick, rest) = rest.split_once("] [0x")?;
    let (_, rest) = rest.split_once("] ")?;
    let (_, rest) = rest.split_once(':')?;
    let (rip, rest) = rest.split_once(' ')?;
    let (_, rest) = rest.split_once("): ")?;
    let insn = rest.rsplit_once(" ; ").map_or(rest, |(i, _)| i).trim().to_string();
    Some(TraceLine { tick: tick.parse().ok()?, rip: u64::from_str_radix(rip, 16).ok()?, insn })
}

/// One traced section of Bochs's stdout: the lines between a "Tracing
/// enabled" and the next "Tracing disabled", and where the debugger stopped
/// in between (the breakpoint's address: that instruction is not traced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub lines: Vec<TraceLine>,
    pub stop: Option<u64>,
}

/// `(0) Breakpoint 2, 0x00000000001638fd in ?? ()`: the address.
fn breakpoint_stop(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("(0) Breakpoint ")?;
    let (_, rest) = rest.split_once(", 0x")?;
    let hex = rest.split_whitespace().next()?;
    u64::from_str_radix(hex, 16).ok()
}

/// Every traced section of Bochs's stdout.
pub fn captures(stdout: &str) -> Vec<Capture> {
    let mut out = Vec::new();
    let mut cur: Option<Capture> = None;
    for line in stdout.lines() {
        if line.starts_with("Tracing enabled") {
            cur = Some(Capture { lines: Vec::new(), stop: None });
        } else if line.starts_with("Tracing disabled") {
            out.extend(cur.take());
        } else if let Some(c) = cur.as_mut() {
            if let Some(t) = parse_trace_line(line) {
                c.lines.push(t);
            } else if let Some(a) = breakpoint_stop(line) {
                c.stop = Some(a);
            }
        }
    }
    out
}

/// One case's breakpoint: the int3's address, the calls of it before the
/// traced one (from the boot's start), and the calls made before its
/// breakpoint is armed (when the previous case's int3 is another).
pub type Int3 = (u64, u32, u32);

/// The debugger commands of one boot: for each case in order, break at its
/// int3 until the traced call, then trace to the loop's return.
/// `int3s` are the cases' breakpoints ([`Int3`]), in time order.
pub fn rc_script(int3s: &[Int3], loop_return: u64) -> std::result::Result<String, String> {
    let mut rc = String::new();
    let mut bp = 0u32; // Bochs numbers breakpoints from 1, never reusing a number.
    let mut armed: Option<(u64, u32, u32)> = None; // (address, breakpoint, calls so far)
    for &(addr, skip, before_armed) in int3s {
        let seen = match armed {
            Some((a, _, seen)) if a == addr => seen,
            other => {
                if let Some((_, n, _)) = other {
                    rc += &format!("d {n}\n");
                }
                bp += 1;
                rc += &format!("lb {addr:#x}\n");
                armed = Some((addr, bp, before_armed));
                before_armed
            }
        };
        // Each `c` stops at the next call; the first stop is call 0.
        let stops = (skip + 1).checked_sub(seen).filter(|&n| n > 0).ok_or("cases out of order")?;
        rc += &"c\n".repeat(stops as usize);
        bp += 1;
        rc += &format!("lb {loop_return:#x}\ntrace on\nc\ntrace off\nd {bp}\n");
        if let Some(a) = armed.as_mut() {
            a.2 = skip + 1;
        }
    }
    if let Some((_, n, _)) = armed {
        rc += &format!("d {n}\n");
    }
    // On to the kernel's magic breakpoint at its end, then quit.
    rc += "c\nq\n";
    Ok(rc)
}

/// One instruction of `objdump -d`: address and text (`jne 1024c0 <sc_bpx_refuse>`).
#[derive(Debug, Clone)]
pub struct Insn {
    pub addr: u64,
    pub text: String,
}

/// `objdump -d` of `elf` from `start` to `stop`.
fn disassemble(elf: &Path, start: u64, stop: u64) -> Result<Vec<Insn>> {
    let out = Command::new("objdump")
        .args([
            "-d",
            "--no-show-raw-insn",
            &format!("--start-address={start:#x}"),
            &format!("--stop-address={stop:#x}"),
        ])
        .arg(elf)
        .output()
        .context(|| "cannot run objdump (binutils)")?;
    if !out.status.success() {
        return Err(Error::new(format!("objdump failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(parse_objdump(&String::from_utf8_lossy(&out.stdout)))
}

/// The instruction lines of `objdump -d --no-show-raw-insn` output.
pub fn parse_objdump(text: &str) -> Vec<Insn> {
    text.lines()
        .filter_map(|l| {
            let (addr, insn) = l.trim_start().split_once(":\t")?;
            Some(Insn { addr: u64::from_str_radix(addr, 16).ok()?, text: insn.trim().to_string() })
        })
        .collect()
}

/// The address right after `sc_b_loop`'s indirect call (where each traced call returns).
fn loop_return(elf: &Path, syms: &Symbols) -> Result<u64> {
    let start = syms.addr("sc_b_loop").ok_or_else(|| Error::new("no symbol sc_b_loop in the kernel"))?;
    let insns = disassemble(elf, start, start + 64)?;
    let i = insns
        .iter()
        .position(|i| i.text.starts_with("call") && i.text.contains("*%r12"))
        .ok_or_else(|| Error::new("sc_b_loop has no `call *%r12` (kernel/asm/bench.S changed?)"))?;
    insns.get(i + 1).map(|i| i.addr).ok_or_else(|| Error::new("sc_b_loop ends at its call"))
}

/// The fast path's search (asm/bp.S FAST_LOOKUP, inlined twice): lookup.
pub const FAST_LOOKUP: [&str; 2] = ["sc_bp_fast_lookup", "sc_bp_fast_nocet_lookup"];
/// The fast path's checks: the pre-filter, CR4.CET and RDSSP, the CPU and
/// NMI tests, the record page, S, the trampoline-trap test, the in-exit
/// count's raise and lower, the kind dispatch, the classic path's NMI test,
/// the probe's tests, and the lowering on a miss.
pub const FAST_CHECKS: [&str; 5] =
    ["sc_bp_fast", "sc_bp_fast_kind", "sc_bp_fast_nocet", "sc_bp_fast_idle", "sc_bp_fast_out"];
/// The fast path's tails: checks up to the last conditional branch taken
/// or not in the visit, then the stores of the emulation (writes).
pub const FAST_TAILS: [&str; 7] = [
    "sc_bp_fast_nop",
    "sc_bp_fast_jmp",
    "sc_bp_fast_ret",
    "sc_bp_fast_call",
    "sc_bp_fast_tramp1",
    "sc_bp_fast_tramp2",
    "sc_bp_fast_nocet_kind",
];
/// The fast path's return: the register pops and IRET.
pub const FAST_RETURN: &str = "sc_bp_fast_return";
/// Its return inside an NMI handler: the rest of the registers saved, then
/// the slow path's return without IRET (`sc_bp_return_in_nmi`).
pub const FAST_RETURN_NMI: &str = "sc_bp_fast_return_nmi";

/// A conditional branch in Bochs's disassembly (`jnz .+12 (0x...)`).
fn is_conditional_branch(insn: &str) -> bool {
    insn.starts_with('j') && !insn.starts_with("jmp")
}

/// The phases of the fast path's instructions of a traced call, `None` for
/// the others. `labels[i]` names the symbol of instruction `i` (`insns[i]`);
/// `to_return[i]` is true when it is a `jmp` that lands on
/// [`FAST_RETURN`]. A visit is a run of instructions under one label: in a
/// [`FAST_TAILS`] visit, the instructions up to its last conditional branch
/// are checks, the rest writes (the jump into the return: exit).
pub fn fast_phases(labels: &[&str], insns: &[&str], to_return: &[bool]) -> Result<Vec<Option<Phase>>> {
    let mut out = vec![None; labels.len()];
    let mut start = 0;
    while start < labels.len() {
        let label = labels[start];
        let end = start + labels[start..].iter().take_while(|&&l| l == label).count();
        let last_branch = (start..end).rev().find(|&i| is_conditional_branch(insns[i]));
        for i in start..end {
            out[i] = if FAST_LOOKUP.contains(&label) {
                Some(Phase::Lookup)
            } else if label == FAST_RETURN
                || label == FAST_RETURN_NMI
                || (to_return[i] && label.starts_with("sc_bp_fast"))
            {
                Some(Phase::Exit)
            } else if FAST_CHECKS.contains(&label) {
                Some(Phase::Checks)
            } else if FAST_TAILS.contains(&label) {
                Some(if last_branch.is_some_and(|b| i <= b) { Phase::Checks } else { Phase::Writes })
            } else if label.starts_with("sc_bp_fast") {
                return Err(Error::new(format!("no rule for the fast path's label {label}")));
            } else {
                None
            };
        }
        start = end;
    }
    Ok(out)
}

/// A branch to the exits' refusal (`sc_bpx_refuse`, `sc_bpx_refuse_entry`).
fn branches_to_refuse(text: &str) -> bool {
    text.starts_with('j') && (text.ends_with("<sc_bpx_refuse>") || text.ends_with("<sc_bpx_refuse_entry>"))
}

/// The labels of the asm exits whose code is split into checks and writes
/// at their last branch to the refusal.
fn is_checked_exit(label: &str) -> bool {
    label.starts_with("sc_bpx_")
        && !matches!(label, "sc_bpx_dispatch" | "sc_bpx_plain" | "sc_bpx_refuse" | "sc_bpx_refuse_entry")
}

/// Where the asm's checks end: for each checked exit label, the address of
/// its last branch to the refusal (static, over the label's code up to the
/// next symbol).
fn exit_boundaries(elf: &Path, syms: &Symbols) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for (i, (start, _, name)) in syms.syms.iter().enumerate() {
        if !is_checked_exit(name) {
            continue;
        }
        let stop = syms.syms[i + 1..].iter().map(|s| s.0).find(|&a| a > *start).unwrap_or(start + 4096);
        let insns = disassemble(elf, *start, stop)?;
        if let Some(last) = insns.iter().rev().find(|i| branches_to_refuse(&i.text)) {
            out.insert(name.clone(), last.addr);
        }
    }
    Ok(out)
}

/// One inline frame of `addr2line -i`: function, file, line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: u32,
}

/// `addr2line -f -i -C -a` for every address: the inline chain, innermost first.
fn inline_chains(elf: &Path, addrs: &[u64]) -> Result<HashMap<u64, Vec<Frame>>> {
    let mut child = Command::new("addr2line")
        .args(["-f", "-i", "-C", "-a", "-e"])
        .arg(elf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context(|| "cannot run addr2line (binutils)")?;
    let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut stdin = child.stdin.take().ok_or_else(|| Error::new("addr2line has no stdin"))?;
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().context(|| "addr2line failed")?;
    writer.join().map_err(|_| Error::new("addr2line writer panicked"))?.context(|| "cannot write to addr2line")?;
    Ok(parse_addr2line(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `addr2line -f -i -a` output: an `0x...` line, then function and
/// `file:line` pairs.
pub fn parse_addr2line(text: &str) -> HashMap<u64, Vec<Frame>> {
    let mut out: HashMap<u64, Vec<Frame>> = HashMap::new();
    let mut cur: Option<u64> = None;
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if let Some(hex) = l.strip_prefix("0x") {
            cur = u64::from_str_radix(hex.trim(), 16).ok();
            continue;
        }
        let (Some(addr), Some(loc)) = (cur, lines.next()) else { continue };
        let loc = loc.split(" (discriminator").next().unwrap_or(loc);
        let (file, line) = loc.rsplit_once(':').unwrap_or((loc, "0"));
        out.entry(addr).or_default().push(Frame {
            function: l.to_string(),
            file: file.to_string(),
            line: line.trim().parse().unwrap_or(0),
        });
    }
    out
}

/// A Rust source line that writes the trap frame's RIP/RSP/RFLAGS or the
/// interrupted stack: the emulation's own stores.
pub fn is_write_line(src: &str) -> bool {
    if src.contains("write_volatile(") {
        return true;
    }
    ["frame.rip", "frame.rsp", "frame.rflags"].iter().any(|field| {
        src.match_indices(field).any(|(i, _)| {
            let after = src[i + field.len()..].trim_start();
            ["&=", "|=", "+=", "-="].iter().any(|op| after.starts_with(op))
                || (after.starts_with('=') && !after.starts_with("=="))
        })
    })
}

/// The phase of an instruction of the Rust handler, from its inline chain.
pub fn rust_phase(chain: &[Frame], line_text: &mut dyn FnMut(&Frame) -> Option<String>) -> Phase {
    if chain.iter().any(|f| f.function.contains("SealedBatch") || f.function.contains("live_batch")) {
        return Phase::Lookup;
    }
    if chain.iter().any(|f| f.function.contains("write_volatile")) {
        return Phase::Writes;
    }
    // The innermost frame with readable source (this repository's code).
    if chain.iter().find_map(line_text).is_some_and(|t| is_write_line(&t)) {
        return Phase::Writes;
    }
    Phase::Checks
}

/// One attributed instruction.
#[derive(Debug, Clone)]
pub struct Attributed {
    pub line: TraceLine,
    pub phase: Phase,
    /// `symbol+off`, and for Rust code the inline chain (outermost last).
    pub place: String,
    /// Which part of its phase: [`Part`].
    pub part: Part,
}

/// Where inside its phase an instruction is (the detail table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Asm code (the stub, the exits, the return) or the benchmark's code.
    Asm,
    /// The Rust handler.
    Rust,
    /// The Rust lookup's finding and validating of the sealed batch
    /// (`live_batch`, `SealedBatch::from_raw`), before the search.
    Header,
}

/// A traced call, attributed.
#[derive(Debug, Clone)]
pub struct CaseTrace {
    pub case: Case,
    pub insns: Vec<Attributed>,
    /// The figure the same boot printed (its median per_op), if it did.
    pub figure: Option<f64>,
}

impl CaseTrace {
    pub fn count(&self, p: Phase) -> usize {
        self.insns.iter().filter(|a| a.phase == p).count()
    }

    pub fn count_part(&self, p: Phase, parts: &[Part]) -> usize {
        self.insns.iter().filter(|a| a.phase == p && parts.contains(&a.part)).count()
    }

    /// #BP-path instructions (every phase but `other`).
    pub fn path(&self) -> usize {
        self.insns.iter().filter(|a| a.phase != Phase::Other).count()
    }
}

/// What the attribution needs of the kernel ELF.
pub struct Kernel {
    pub elf: PathBuf,
    pub syms: Symbols,
    boundaries: HashMap<String, u64>,
    pub loop_return: u64,
}

impl Kernel {
    pub fn load(elf: &Path) -> Result<Kernel> {
        let bytes = std::fs::read(elf).context(|| format!("cannot read {}", elf.display()))?;
        let syms = Symbols::read(&bytes).map_err(|e| Error::new(format!("{}: {e}", elf.display())))?;
        let boundaries = exit_boundaries(elf, &syms)?;
        let loop_return = loop_return(elf, &syms)?;
        Ok(Kernel { elf: elf.to_path_buf(), syms, boundaries, loop_return })
    }

    fn sym(&self, name: &str) -> Result<u64> {
        self.syms.addr(name).ok_or_else(|| Error::new(format!("no symbol {name} in {}", self.elf.display())))
    }
}

/// The traced call of `case` out of one capture: from its first line (the
/// int3) up to the return into `sc_b_loop` (where the debugger stopped),
/// checked to be contiguous.
fn window(k: &Kernel, case: &Case, capture: &Capture) -> Result<Vec<TraceLine>> {
    let int3 = k.sym(case.int3)?;
    if capture.stop != Some(k.loop_return) {
        return Err(Error::new(format!(
            "{}: the trace did not stop at the return into sc_b_loop ({:#x}) but at {:?}",
            case.key, k.loop_return, capture.stop
        )));
    }
    let w = capture.lines.clone();
    match w.first() {
        Some(first) if first.rip == int3 => {}
        _ => return Err(Error::new(format!("{}: the trace does not start at {} ({int3:#x})", case.key, case.int3))),
    }
    if let Some(pair) = w.windows(2).find(|p| p[1].tick != p[0].tick + 1) {
        return Err(Error::new(format!(
            "{}: the trace skips ticks {}..{} (an instruction not traced)",
            case.key, pair[0].tick, pair[1].tick
        )));
    }
    Ok(w)
}

/// Attributes every instruction of a traced call to a phase.
fn attribute(k: &Kernel, case: &Case, w: &[TraceLine]) -> Result<Vec<Attributed>> {
    let mut sources: HashMap<String, Option<Vec<String>>> = HashMap::new();
    let mut addrs: Vec<u64> = w.iter().map(|l| l.rip).collect();
    addrs.sort_unstable();
    addrs.dedup();
    let chains = inline_chains(&k.elf, &addrs)?;
    let root = crate::kernel::repo_root();
    let mut line_text = |f: &Frame| -> Option<String> {
        if !Path::new(&f.file).starts_with(&root) {
            return None;
        }
        let lines = sources
            .entry(f.file.clone())
            .or_insert_with(|| std::fs::read_to_string(&f.file).ok().map(|s| s.lines().map(String::from).collect()));
        lines.as_ref()?.get((f.line as usize).checked_sub(1)?).cloned()
    };
    let labels: Vec<(&str, u64)> = w.iter().map(|l| k.syms.at(l.rip).unwrap_or(("?", 0))).collect();
    let fast_return = k.sym(FAST_RETURN)?;
    let to_return: Vec<bool> = w
        .iter()
        .enumerate()
        .map(|(i, l)| l.insn.starts_with("jmp") && w.get(i + 1).is_some_and(|n| n.rip == fast_return))
        .collect();
    let names: Vec<&str> = labels.iter().map(|l| l.0).collect();
    let texts: Vec<&str> = w.iter().map(|l| l.insn.as_str()).collect();
    let fast = fast_phases(&names, &texts, &to_return).map_err(|e| Error::new(format!("{}: {e}", case.key)))?;
    let mut out = Vec::new();
    // Inside the handler call: from `call sc_bp_handler` to the return into
    // sc_bpx_dispatch (and sc_bp_exit_refused's, should an exit refuse).
    let mut in_rust = false;
    for (i, l) in w.iter().enumerate() {
        let (label, off) = labels[i];
        let mut place = format!("{}+{off:#x}", demangle(label));
        let mut part = Part::Asm;
        let phase = if in_rust {
            let chain = chains.get(&l.rip).cloned().unwrap_or_default();
            let phase = rust_phase(&chain, &mut line_text);
            part = match phase {
                Phase::Lookup
                    if chain
                        .iter()
                        .any(|f| f.function.contains("SealedBatch::from_raw") || f.function.contains("live_batch")) =>
                {
                    Part::Header
                }
                _ => Part::Rust,
            };
            if let Some(f) = chain.first() {
                let names: Vec<String> = chain.iter().map(|f| short_fn(&f.function)).collect();
                place = format!("{place} [{}] {}:{}", names.join(" < "), short_file(&f.file), f.line);
            }
            if l.insn.starts_with("ret") && (label == "sc_bp_handler" || label == "sc_bp_exit_refused") {
                in_rust = false;
            }
            phase
        } else if l.insn.starts_with("int3") {
            Phase::Entry
        } else if matches!(label, "sc_isr_3" | "sc_bpx_region_start" | "sc_bp_slow") {
            // The stub: the frame, the saves, the call of the handler.
            if l.insn.starts_with("call") {
                in_rust = true;
            }
            Phase::Entry
        } else if let Some(p) = fast[i] {
            // The stub's fast path (production builds).
            p
        } else if label == "sc_bpx_dispatch" || label == "sc_bpx_refuse" || label == "sc_bpx_refuse_entry" {
            if label != "sc_bpx_dispatch" && l.insn.starts_with("call") {
                in_rust = true;
            }
            Phase::Checks
        } else if label == "sc_bpx_plain" || label.starts_with("sc_bp_return") {
            Phase::Exit
        } else if let Some(&last_check) = k.boundaries.get(label) {
            if l.rip <= last_check {
                Phase::Checks
            } else if l.insn.starts_with("jmp") {
                Phase::Exit // the exit's `jmp sc_bp_return`
            } else {
                Phase::Writes
            }
        } else if label.starts_with("sc_bpx_") || label.starts_with("sc_isr") {
            return Err(Error::new(format!("{}: no rule for #BP-path label {label} at {:#x}", case.key, l.rip)));
        } else {
            Phase::Other
        };
        out.push(Attributed { line: l.clone(), phase, place, part });
    }
    Ok(out)
}

/// A Rust legacy-mangled name without its hash (`_ZN10shadowcall5patch11SealedBatch8from_raw17h...E`
/// -> `shadowcall::patch::SealedBatch::from_raw`); other names as they are.
pub fn demangle(name: &str) -> String {
    let Some(mut rest) = name.strip_prefix("_ZN") else { return name.to_string() };
    let mut parts = Vec::new();
    while !rest.starts_with('E') {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let Ok(len) = rest[..digits].parse::<usize>() else { return name.to_string() };
        let Some(part) = rest.get(digits..digits + len) else { return name.to_string() };
        parts.push(part);
        rest = &rest[digits + len..];
    }
    if parts.last().is_some_and(|h| h.len() == 17 && h.starts_with('h')) {
        parts.pop();
    }
    parts.join("::").replace("$LT$", "<").replace("$GT$", ">").replace("$u20$", " ").replace("..", "::")
}

fn short_fn(f: &str) -> String {
    // `shadowcall::engine::Patcher<P>::handle_int3` -> `Patcher<P>::handle_int3`
    let f = f.split(" (").next().unwrap_or(f);
    let parts: Vec<&str> = f.split("::").collect();
    if parts.len() > 2 {
        parts[parts.len() - 2..].join("::")
    } else {
        f.to_string()
    }
}

fn short_file(f: &str) -> String {
    let root = crate::kernel::repo_root();
    Path::new(f)
        .strip_prefix(&root)
        .map_or_else(|_| f.rsplit('/').next().unwrap_or(f).to_string(), |p| p.display().to_string())
}

/// One traced boot: Bochs (tigerlake) with `bench=1`, `cet=off` if
/// `cet_off`; returns Bochs's stdout and the kernel's serial output.
fn boot(k: &Kernel, cases: &[Case], cet_off: bool, keep: Option<&Path>) -> Result<(String, String)> {
    let mut int3s = Vec::new();
    for c in cases {
        int3s.push((k.sym(c.int3)?, c.skip, c.before_armed));
    }
    let rc = rc_script(&int3s, k.loop_return).map_err(Error::new)?;
    let words = kernel_words(
        &RunnerWords {
            machine: Some(Machine::Bochs),
            cet: cet_off.then_some(CetMode::Off),
            bench: true,
            ..Default::default()
        },
        &[],
    )
    .map_err(Error::new)?;
    let dir = RunDir::create("shadowcall-trace")?;
    let launch = crate::bochs::prepare(&dir, Machine::Bochs, 1, &words, &k.elf, Loader::Multiboot)?;
    std::fs::write(dir.join(crate::bochs::RC_FILE), &rc).context(|| "cannot write the Bochs rc file")?;
    let stdout_path = dir.join("trace-stdout.log");
    let stdout = std::fs::File::create(&stdout_path).context(|| "cannot create the trace log")?;
    let stderr = std::fs::File::create(&launch.stderr_log).context(|| "cannot create the Bochs stderr log")?;
    println!(
        "==> tracing on Bochs (words: {}): {}",
        words.join(" "),
        cases.iter().map(|c| c.key).collect::<Vec<_>>().join(", ")
    );
    let started = Instant::now();
    let mut child = Command::new(&launch.program)
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .context(|| "cannot start bochs")?;
    let status = loop {
        if let Some(s) = child.try_wait().context(|| "cannot wait for bochs")? {
            break s;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::new(format!("bochs did not finish within {} s", TIMEOUT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("    bochs exited ({status}) after {:.0} s", started.elapsed().as_secs_f64());
    let out = std::fs::read_to_string(&stdout_path).context(|| "cannot read the trace log")?;
    let serial = std::fs::read_to_string(dir.join(crate::bochs::SERIAL_LOG)).unwrap_or_default();
    let log = std::fs::read_to_string(dir.join(crate::bochs::LOG)).unwrap_or_default();
    if let Some(dest) = keep {
        std::fs::create_dir_all(dest).context(|| format!("cannot create {}", dest.display()))?;
        let tag = if cet_off { "cetoff" } else { "cet" };
        std::fs::write(dest.join(format!("bochs-{tag}.rc")), &rc).context(|| "cannot keep the rc file")?;
        std::fs::write(dest.join(format!("serial-{tag}.log")), &serial).context(|| "cannot keep the serial log")?;
        std::fs::write(dest.join(format!("bochs-{tag}.log")), &out).context(|| "cannot keep the Bochs output")?;
    }
    let problems = crate::bochs::log_problems(&log);
    if !problems.is_empty() {
        return Err(Error::new(problems.join("\n")));
    }
    Ok((out, serial))
}

/// The median figure of `key` among the `# bench` lines of `text`.
fn figure_of(text: &str, key: &str) -> Option<f64> {
    let lines: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    let parsed = crate::bench::parse_diagnostics(&lines).ok()?;
    parsed.iter().find(|l| l.key() == key).and_then(|l| crate::bench::median(&l.values()))
}

/// Traces every case of [`CASES`] (two boots) and attributes them.
pub fn trace_all(elf: &Path, keep: Option<&Path>) -> Result<Vec<CaseTrace>> {
    let k = Kernel::load(elf)?;
    let mut out = Vec::new();
    for cet_off in [false, true] {
        let cases: Vec<Case> = CASES.iter().copied().filter(|c| c.cet_off == cet_off).collect();
        // In the boot's time order (skip counts per int3 ascending; int3_iret first).
        let (stdout, serial) = boot(&k, &cases, cet_off, keep)?;
        let caps = captures(&stdout);
        if caps.len() != cases.len() {
            return Err(Error::new(format!(
                "expected {} traced calls, Bochs printed {} (the breakpoints were not all reached?)",
                cases.len(),
                caps.len()
            )));
        }
        for (case, cap) in cases.iter().zip(&caps) {
            let w = window(&k, case, cap)?;
            let insns = attribute(&k, case, &w)?;
            let figure = figure_of(&serial, case.key).or_else(|| figure_of(&stdout, case.key));
            let t = CaseTrace { case: *case, insns, figure };
            if let Some(dir) = keep {
                // Written before the checks: a failed one is looked at here.
                let path = dir.join(format!("{}.txt", case.key.replace('/', "-")));
                std::fs::write(&path, annotated(&t)).context(|| format!("cannot write {}", path.display()))?;
            }
            let CaseTrace { insns, figure, .. } = t;
            let passes = |label: &str| -> Result<bool> {
                let at = k.sym(label)?;
                Ok(insns.iter().any(|a| a.place.starts_with(&format!("{label}+")) || a.line.rip == at))
            };
            for avoid in case.must_avoid {
                if passes(avoid)? {
                    return Err(Error::new(format!(
                        "{}: the traced call passes {avoid}: not the fast path (annotated trace: {})",
                        case.key,
                        keep.map_or("not kept".to_string(), |d| d.display().to_string())
                    )));
                }
            }
            for must in case.must_pass {
                if !passes(must)? {
                    return Err(Error::new(format!(
                        "{}: the traced call does not pass {must}: not this figure",
                        case.key
                    )));
                }
            }
            if insns.iter().any(|a| a.place.starts_with("sc_bp_return_in_nmi")) {
                return Err(Error::new(format!("{}: the traced call ran inside an NMI handler", case.key)));
            }
            if let Some(f) = figure.filter(|&f| f != (insns.len() as u64 + LOOP_INSNS) as f64) {
                return Err(Error::new(format!(
                    "{}: the trace has {} instructions + {LOOP_INSNS} of the loop, but the boot printed {f}",
                    case.key,
                    insns.len()
                )));
            }
            out.push(CaseTrace { case: *case, insns, figure });
        }
    }
    out.sort_by_key(|t| t.case.row);
    Ok(out)
}

/// The Markdown table of DESIGN §7.4.
pub fn markdown(traces: &[CaseTrace]) -> String {
    let mut s = String::from(
        "| figure | entry | lookup | checks | writes | exit | #BP path | other | traced | + loop | = figure |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for t in traces {
        let cells: Vec<String> = [Phase::Entry, Phase::Lookup, Phase::Checks, Phase::Writes, Phase::Exit]
            .iter()
            .map(|&p| t.count(p).to_string())
            .collect();
        let figure = t.figure.map_or("not printed".to_string(), |f| format!("{f}"));
        s += &format!(
            "| `{}` | {} | **{}** | {} | {} | {LOOP_INSNS} | {figure} |\n",
            t.case.key,
            cells.join(" | "),
            t.path(),
            t.count(Phase::Other),
            t.insns.len()
        );
    }
    s
}

/// The detail table: lookup, checks and writes split by where they run.
pub fn markdown_detail(traces: &[CaseTrace]) -> String {
    let mut s = String::from(
        "| figure | lookup: the batch (`live_batch`, `from_raw`) | lookup: the search (asm, Rust) | checks: Rust | checks: asm (fast path, dispatch, exit) | writes: Rust | writes: asm (fast path, exit) |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for t in traces {
        s += &format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            t.case.key,
            t.count_part(Phase::Lookup, &[Part::Header]),
            t.count_part(Phase::Lookup, &[Part::Asm, Part::Rust]),
            t.count_part(Phase::Checks, &[Part::Rust]),
            t.count_part(Phase::Checks, &[Part::Asm]),
            t.count_part(Phase::Writes, &[Part::Rust]),
            t.count_part(Phase::Writes, &[Part::Asm]),
        );
    }
    s
}

/// Per-function counts of one trace, for the annotated dump.
pub fn annotated(t: &CaseTrace) -> String {
    let mut s = format!("# {}: {} instructions traced\n", t.case.key, t.insns.len());
    let mut by: BTreeMap<(Phase, String), usize> = BTreeMap::new();
    for a in &t.insns {
        let f = a.place.split('+').next().unwrap_or("?").to_string();
        *by.entry((a.phase, f)).or_default() += 1;
    }
    for ((p, f), n) in by {
        s += &format!("#   {:7} {n:4}  {f}\n", p.name());
    }
    for a in &t.insns {
        s += &format!("{:7} {:#x}  {:40}  {}\n", a.phase.name(), a.line.rip, a.line.insn, a.place);
    }
    s
}

/// `cargo xtask trace`: builds the production kernel (or takes `kernel`),
/// traces, writes the annotated traces into `out`, returns the table.
pub fn run_trace(kernel: Option<&Path>, out: &Path) -> Result<(String, Vec<CaseTrace>)> {
    let elf = match kernel {
        Some(k) => k.to_path_buf(),
        None => crate::kernel::build_kernel_of(Policy::Install, Build::Production)?,
    };
    crate::install::ensure_machines(&[Machine::Bochs], Policy::Install)?;
    let traces = trace_all(&elf, Some(out))?;
    Ok((markdown(&traces) + "\n" + &markdown_detail(&traces), traces))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "\
(0) Breakpoint 1, 0x0000000000163918 in ?? ()
Next at t=322528558
(0) [0x000000163918] 0008:0000000000163918 (unk. ctxt): int3                      ; cc
Tracing enabled for CPU0
(0).[322528558] [0x000000163918] 0008:0000000000163918 (unk. ctxt): int3                      ; cc
CPU 0: Interrupt 0x03 occurred (error_code=0x0000)
(0).[322528559] [0x0000001023f0] 0008:00000000001023f0 (unk. ctxt): sub rsp, 0x0000000000000008 ; 4883ec08
(0).[322528560] [0x0000001023f4] 0008:00000000001023f4 (unk. ctxt): push qword ptr ss:[rsp+40] ; ff742428
(0) Breakpoint 2, 0x00000000001638fd in ?? ()
Next at t=322528561
(0) [0x0000001638fd] 0008:00000000001638fd (unk. ctxt): dec r13                   ; 49ffcd
Tracing disabled for CPU0
# bench {\"name\":\"int3_iret\",\"shstk\":true,\"n\":200,\"per_op\":[6,6,6,6,6]}
";

    #[test]
    fn trace_lines_parsed() {
        let l = parse_trace_line(
            "(0).[408650035] [0x0000001023f0] 0008:00000000001023f0 (unk. ctxt): sub rsp, 0x0000000000000008 ; 4883ec08",
        )
        .unwrap();
        assert_eq!(l, TraceLine { tick: 408650035, rip: 0x1023f0, insn: "sub rsp, 0x0000000000000008".into() });
        // The debugger's "next instruction" line is not a traced one.
        assert_eq!(parse_trace_line("(0) [0x000000163918] 0008:0000000000163918 (unk. ctxt): int3 ; cc"), None);
        assert_eq!(parse_trace_line("CPU 0: Interrupt 0x03 occurred (error_code=0x0000)"), None);
        // The guest's serial output glued before a line.
        let l = parse_trace_line(
            "#(0).[617571856] [0x00000018d10d] 0008:000000000018d10d (unk. ctxt): mov al, 0x01 ; b001",
        );
        assert_eq!(l.map(|l| (l.tick, l.rip)), Some((617571856, 0x18d10d)));
    }

    #[test]
    fn captures_and_stop() {
        let caps = captures(TRACE);
        assert_eq!(caps.len(), 1);
        assert_eq!(caps[0].lines.len(), 3);
        assert_eq!(caps[0].lines[0].insn, "int3");
        assert_eq!(caps[0].stop, Some(0x1638fd));
        assert_eq!(figure_of(TRACE, "int3_iret"), Some(6.0));
        assert_eq!(figure_of(TRACE, "emul_call/shadowgap"), None);
        // An unterminated section (Bochs died mid-trace) is not a capture.
        assert!(captures("Tracing enabled for CPU0\n(0).[1] [0x1] 0008:0000000000000001 (x): nop ; 90\n").is_empty());
    }

    #[test]
    fn rc_counts_calls_per_breakpoint() {
        let rc = rc_script(&[(0x100, 2, 0), (0x200, 1, 0), (0x200, 4, 0)], 0x50).unwrap();
        let expect = "lb 0x100\nc\nc\nc\nlb 0x50\ntrace on\nc\ntrace off\nd 2\n\
                      d 1\nlb 0x200\nc\nc\nlb 0x50\ntrace on\nc\ntrace off\nd 4\n\
                      c\nc\nc\nlb 0x50\ntrace on\nc\ntrace off\nd 5\n\
                      d 3\nc\nq\n";
        assert_eq!(rc, expect);
        assert!(rc_script(&[(0x200, 4, 0), (0x200, 1, 0)], 0x50).is_err());
        assert!(rc_script(&[(0x200, 4, 0), (0x200, 4, 0)], 0x50).is_err());
        // An int3 hit 3 times before its breakpoint is armed: call 4 is the 2nd stop.
        let rc = rc_script(&[(0x100, 0, 0), (0x300, 4, 3)], 0x50).unwrap();
        assert!(rc.contains("d 1\nlb 0x300\nc\nc\nlb 0x50\ntrace on\n"), "{rc}");
        // ... and one armed after the traced call has passed.
        assert!(rc_script(&[(0x100, 0, 0), (0x300, 2, 3)], 0x50).is_err());
    }

    #[test]
    fn cases_in_boot_order() {
        for cet_off in [false, true] {
            let mut last: HashMap<&str, u32> = HashMap::new();
            let mut addrs: Vec<&str> = Vec::new();
            let cases: Vec<Int3> = CASES
                .iter()
                .filter(|c| c.cet_off == cet_off)
                .map(|c| {
                    assert!(last.get(c.int3).is_none_or(|&s| s < c.skip), "{}", c.key);
                    assert!(c.before_armed <= c.skip, "{}", c.key);
                    last.insert(c.int3, c.skip);
                    if !addrs.contains(&c.int3) {
                        addrs.push(c.int3);
                    }
                    let addr = addrs.iter().position(|&a| a == c.int3).unwrap() as u64;
                    (addr, c.skip, c.before_armed)
                })
                .collect();
            rc_script(&cases, 0x50).unwrap();
        }
        // One row each, the four of DESIGN §7.4 first.
        let mut rows: Vec<u8> = CASES.iter().map(|c| c.row).collect();
        rows.sort_unstable();
        assert_eq!(rows, (0..CASES.len() as u8).collect::<Vec<_>>());
        let first: Vec<&str> = (0..4).map(|r| CASES.iter().find(|c| c.row == r).unwrap().key).collect();
        assert_eq!(first, ["int3_iret", "emul_call/trampoline", "emul_call/shadowgap", "emul_call/classic"]);
    }

    #[test]
    fn fast_path_phases() {
        // The shadow gap's call: kind dispatch, the tail's checks up to its
        // last conditional branch, the stores, the jump into the return.
        let trace = [
            ("sc_bp_fast", "mov rax, cr4"),
            ("sc_bp_fast", "jnb .+12 (0x1)"),
            ("sc_bp_fast_lookup", "cmp qword ptr ds:[rdx+rbx*8], rbp"),
            ("sc_bp_fast_lookup", "jnz .+3 (0x2)"),
            ("sc_bp_fast_kind", "cmp cl, 0x01"),
            ("sc_bp_fast_kind", "jz .+4 (0x3)"),
            ("sc_bp_fast_call", "lea rax, ds:[rsi+24]"),
            ("sc_bp_fast_call", "jnz .+5 (0x4)"),
            ("sc_bp_fast_call", "mov qword ptr ss:[rsp+104], rcx"),
            ("sc_bp_fast_call", "call .+1 (0x5)"),
            ("sc_bp_fast_call", "wrssq qword ptr ds:[rsi], r8"),
            ("sc_bp_fast_call", "jmp .-100 (0x6)"),
            ("sc_bp_fast_return", "pop r8"),
            ("sc_bp_fast_return", "iret"),
            ("sc_b_target", "ret"),
        ];
        let labels: Vec<&str> = trace.iter().map(|t| t.0).collect();
        let insns: Vec<&str> = trace.iter().map(|t| t.1).collect();
        let mut to_return = vec![false; trace.len()];
        to_return[11] = true;
        let p = fast_phases(&labels, &insns, &to_return).unwrap();
        use Phase::*;
        let expect = [
            Some(Checks),
            Some(Checks),
            Some(Lookup),
            Some(Lookup),
            Some(Checks),
            Some(Checks),
            Some(Checks),
            Some(Checks),
            Some(Writes),
            Some(Writes),
            Some(Writes),
            Some(Exit),
            Some(Exit),
            Some(Exit),
            None,
        ];
        assert_eq!(p, expect);
        // A tail without a conditional branch (jmp, nop) is all writes; a
        // visit per run of one label (a tail left by a branch is all checks).
        let labels = ["sc_bp_fast_jmp", "sc_bp_fast_jmp", "sc_bp_fast_call", "sc_bp_fast_tramp1"];
        let insns = ["mov qword ptr ss:[rsp+80], r8", "wrssq qword ptr ds:[rsi+8], r8", "jz .+9 (0x1)", "wrssq"];
        let p = fast_phases(&labels, &insns, &[false; 4]).unwrap();
        assert_eq!(p, [Some(Writes), Some(Writes), Some(Checks), Some(Writes)]);
        // The probe's jump into the return is exit, its tests checks.
        let p = fast_phases(&["sc_bp_fast_idle"; 2], &["jb .+3 (0x1)", "jmp .+9 (0x2)"], &[false, true]).unwrap();
        assert_eq!(p, [Some(Checks), Some(Exit)]);
        // A label of the fast path without a rule is an error, not "other".
        assert!(fast_phases(&["sc_bp_fast_new"], &["nop"], &[false]).is_err());
    }

    #[test]
    fn objdump_and_refuse_branches() {
        let text = "\
0000000000102f00 <sc_bpx_call_sg>:
  102f00:\trdsspq %r8
  102f05:\tjne    103300 <sc_bpx_refuse_entry>
  102f0b:\tjne    103310 <sc_bpx_refuse>
  102f11:\tjmp    103000 <sc_bp_return>
  102f16:\tjne    103310 <sc_bpx_refuse+0x4>
";
        let insns = parse_objdump(text);
        assert_eq!(insns.len(), 5);
        assert_eq!(insns[0].addr, 0x102f00);
        let refusing: Vec<u64> = insns.iter().filter(|i| branches_to_refuse(&i.text)).map(|i| i.addr).collect();
        assert_eq!(refusing, [0x102f05, 0x102f0b]);
        assert!(is_checked_exit("sc_bpx_call_sg") && is_checked_exit("sc_bpx_tramp2"));
        assert!(
            !is_checked_exit("sc_bpx_plain") && !is_checked_exit("sc_bp_return") && !is_checked_exit("sc_bpx_refuse")
        );
    }

    #[test]
    fn addr2line_chains() {
        let text = "\
0x0000000000101a28
shadowcall::engine::Patcher<P>::live_batch
/w/src/engine.rs:827
shadowcall::engine::Patcher<P>::emulate_live
/w/src/engine.rs:883 (discriminator 2)
0x00000000001023f0
sc_isr_3
??:?
";
        let c = parse_addr2line(text);
        assert_eq!(c[&0x101a28].len(), 2);
        assert_eq!(
            c[&0x101a28][1],
            Frame {
                function: "shadowcall::engine::Patcher<P>::emulate_live".into(),
                file: "/w/src/engine.rs".into(),
                line: 883
            }
        );
        assert_eq!(c[&0x1023f0][0].line, 0);
    }

    #[test]
    fn write_lines() {
        for w in [
            "        frame.rip = e.target;",
            "        frame.rsp = slot;",
            "            frame.rflags &= !RFLAGS_IF;",
            "                    frame.rflags |= RFLAGS_IF;",
            "        unsafe { (slot as *mut u64).write_volatile(ret) };",
        ] {
            assert!(is_write_line(w), "{w}");
        }
        for c in [
            "        frame.ssp = ssp;",
            "            None => frame.rip.wrapping_sub(1),",
            "        if frame.rip == x {",
            "        let rsp = frame.rsp;",
            "    let x = (rsp as *const u64).read_volatile();",
        ] {
            assert!(!is_write_line(c), "{c}");
        }
    }

    #[test]
    fn rust_phases() {
        let f = |function: &str, line: u32| Frame { function: function.into(), file: "/w/src/engine.rs".into(), line };
        let mut text =
            |fr: &Frame| Some(if fr.line == 1 { "frame.rip = t;".to_string() } else { "let a = b;".to_string() });
        assert_eq!(
            rust_phase(&[f("SealedBatch::lookup", 2), f("Patcher<P>::emulate_live", 1)], &mut text),
            Phase::Lookup
        );
        assert_eq!(rust_phase(&[f("Patcher<P>::live_batch", 2)], &mut text), Phase::Lookup);
        assert_eq!(rust_phase(&[f("core::ptr::write_volatile", 0), f("push_normal", 2)], &mut text), Phase::Writes);
        assert_eq!(rust_phase(&[f("emulate_insn", 1)], &mut text), Phase::Writes);
        assert_eq!(rust_phase(&[f("emulate_insn", 2)], &mut text), Phase::Checks);
        assert_eq!(rust_phase(&[], &mut text), Phase::Checks);
    }

    #[test]
    fn symbols_and_names() {
        let s = Symbols {
            syms: vec![
                (0x100, 0, "a".into()),
                (0x110, 0, "b".into()),
                (0x120, 0, "sc_bp_fast".into()),
                (0x120, 0, "sc_bpx_region_start".into()),
            ],
        };
        // A region's marker does not hide the code's own label at its address.
        assert_eq!(s.at(0x124), Some(("sc_bp_fast", 4)));
        assert_eq!(s.at(0x10f), Some(("a", 0xf)));
        assert_eq!(s.at(0x110), Some(("b", 0)));
        assert_eq!(s.at(0xff), None);
        assert_eq!(s.addr("b"), Some(0x110));
        assert_eq!(
            demangle("_ZN10shadowcall5patch11SealedBatch8from_raw17h9349e1401c08c316E"),
            "shadowcall::patch::SealedBatch::from_raw"
        );
        assert_eq!(
            demangle("_ZN10shadowcall6engine16Patcher$LT$P$GT$23emulate_call_trampoline17hf9ad68cb39352395E"),
            "shadowcall::engine::Patcher<P>::emulate_call_trampoline"
        );
        assert_eq!(demangle("sc_isr_3"), "sc_isr_3");
        assert_eq!(demangle("_ZN3bad"), "_ZN3bad");
    }

    #[test]
    fn the_real_kernel_symbols_if_built() {
        // The production ELF, when a previous build left one: its exits have boundaries.
        let elf = crate::kernel::kernel_elf_of(Build::Production);
        let Ok(k) = Kernel::load(&elf) else { return };
        for c in CASES {
            assert!(k.syms.addr(c.int3).is_some(), "{}", c.int3);
        }
        for exit in ["sc_bpx_call_sg", "sc_bpx_tramp1", "sc_bpx_tramp2", "sc_bpx_classic"] {
            assert!(k.boundaries.contains_key(exit), "{exit}");
        }
        // Every label of the fast path has a rule, and every rule a label.
        for c in CASES {
            for l in c.must_pass.iter().chain(c.must_avoid) {
                assert!(k.syms.addr(l).is_some(), "{l}");
            }
        }
        let rules: Vec<&str> = FAST_LOOKUP.iter().chain(&FAST_CHECKS).chain(&FAST_TAILS).copied().collect();
        for l in rules.iter().chain(&[FAST_RETURN, FAST_RETURN_NMI]) {
            assert!(k.syms.addr(l).is_some(), "{l}");
        }
        for (_, _, name) in &k.syms.syms {
            if name.starts_with("sc_bp_fast") {
                assert!(
                    rules.contains(&name.as_str()) || name == FAST_RETURN || name == FAST_RETURN_NMI,
                    "{name} has no rule"
                );
            }
        }
        // The fast path's first label, not the region's marker at its address.
        let fast = k.syms.addr("sc_bp_fast").unwrap();
        assert_eq!(k.syms.at(fast), Some(("sc_bp_fast", 0)));
    }
}
