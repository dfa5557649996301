//! `cargo xtask bench`: boots the kernel with `bench=1` on each machine,
//! collects its `# bench {json}` lines, merges repeated runs and checks the
//! design targets. It writes nothing in the repository unless asked:
//! `--json FILE` writes the results anywhere; `--publish` writes
//! bench/results/ (JSON, Markdown, SVG) and the README section between
//! `<!-- bench:begin -->` and `<!-- bench:end -->`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::emulator::fmt_elapsed;
use crate::error::{Context, Error, Result};
use crate::install::Policy;
use crate::machines::{Machine, MachineName};
use crate::runner::{Echo, RunOptions};
use shadowcall_cmdline::{CetMode, EmulStrategy};

/// The diagnostic prefix of one figure.
pub const PREFIX: &str = "# bench ";

/// One `# bench {json}` line as the kernel prints it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BenchLine {
    pub name: String,
    pub shstk: bool,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub sites: Option<u64>,
    #[serde(default)]
    pub sync_rounds: Option<u64>,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub tsc_kmain: Option<u64>,
    #[serde(default)]
    pub tsc_tests_end: Option<u64>,
    /// On the `boot` line: 1 when the kernel has the self-test hooks compiled in.
    #[serde(default)]
    pub test_hooks: Option<u64>,
    pub per_op: Vec<u64>,
}

impl BenchLine {
    /// The row this line belongs to: `emul_call/shadowgap`, `lookup[4096]`,
    /// `patch_batch[256]`, `direct_call`... `boot` becomes `boot_selftests`
    /// (ticks from kmain to the end of the self-tests).
    pub fn key(&self) -> String {
        match (self.name.as_str(), &self.strategy, self.sites) {
            ("boot", _, _) => "boot_selftests".to_string(),
            (name, _, Some(sites)) => format!("{name}[{sites}]"),
            (name, Some(s), None) => format!("{name}/{s}"),
            (name, None, None) => name.to_string(),
        }
    }

    /// The per-operation figures (for `boot`: the self-test span).
    pub fn values(&self) -> Vec<u64> {
        match (self.name.as_str(), self.tsc_kmain, self.tsc_tests_end) {
            ("boot", Some(a), Some(b)) => vec![b.saturating_sub(a)],
            _ => self.per_op.clone(),
        }
    }
}

/// The prefix of the kernel's report of a benchmark that could not run
/// (a patch refused): the whole run fails on it.
pub const ERROR_PREFIX: &str = "# bench: error";

/// Parses one diagnostic line: `None` if it is not a bench figure.
pub fn parse_line(diag: &str) -> Option<std::result::Result<BenchLine, String>> {
    if diag.starts_with(ERROR_PREFIX) {
        return Some(Err(format!("the kernel could not run a benchmark: `{diag}`")));
    }
    let json = diag.strip_prefix(PREFIX)?.trim();
    if !json.starts_with('{') {
        return None; // `# bench: start ...`
    }
    Some(serde_json::from_str(json).map_err(|e| format!("bad bench line `{diag}`: {e}")))
}

/// All figures of one boot's diagnostics.
pub fn parse_diagnostics(diags: &[String]) -> std::result::Result<Vec<BenchLine>, String> {
    diags.iter().filter_map(|d| parse_line(d)).collect()
}

/// Median (mean of the middle two for an even count).
pub fn median(values: &[u64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2] as f64),
        _ => Some((v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0),
    }
}

/// One row of one machine: every repetition of every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub key: String,
    pub name: String,
    pub strategy: Option<String>,
    pub sites: Option<u64>,
    pub shstk: bool,
    pub median: f64,
    pub min: u64,
    pub max: u64,
    /// All repetitions of all runs, in order.
    pub raw: Vec<u64>,
    /// Other integer fields (n, sync_rounds, total, tsc_*), one value per run.
    pub fields: BTreeMap<String, Vec<u64>>,
}

/// Merges the lines of several runs of one machine, keeping first-seen order.
pub fn merge_runs(runs: &[Vec<BenchLine>]) -> Vec<Figure> {
    let mut order: Vec<String> = Vec::new();
    type Acc = (BenchLine, Vec<u64>, BTreeMap<String, Vec<u64>>);
    let mut by_key: BTreeMap<String, Acc> = BTreeMap::new();
    for line in runs.iter().flatten() {
        let key = line.key();
        if !by_key.contains_key(&key) {
            order.push(key.clone());
        }
        let entry = by_key.entry(key).or_insert_with(|| (line.clone(), Vec::new(), BTreeMap::new()));
        entry.1.extend(line.values());
        for (k, v) in [
            ("n", line.n),
            ("sync_rounds", line.sync_rounds),
            ("total", line.total),
            ("tsc_kmain", line.tsc_kmain),
            ("tsc_tests_end", line.tsc_tests_end),
        ] {
            if let Some(v) = v {
                entry.2.entry(k.to_string()).or_default().push(v);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|key| {
            let (line, raw, fields) = by_key.remove(&key)?;
            Some(Figure {
                median: median(&raw)?,
                min: *raw.iter().min()?,
                max: *raw.iter().max()?,
                key,
                name: line.name,
                strategy: line.strategy,
                sites: line.sites,
                shstk: line.shstk,
                raw,
                fields,
            })
        })
        .collect()
}

/// A machine configuration of the benchmark: a machine and its `--cet`,
/// labelled with the machine name (`bochs-cetoff` for bochs with cet off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchMachine {
    pub label: String,
    pub machine: Machine,
    pub cet: Option<CetMode>,
}

/// The default set (qemu-kvm is dropped, loudly, when it cannot run).
pub const DEFAULT_MACHINES: [MachineName; 4] =
    [MachineName::Bochs, MachineName::BochsCetoff, MachineName::Qemu, MachineName::QemuKvm];

impl BenchMachine {
    pub fn new(machine: Machine, cet: Option<CetMode>) -> BenchMachine {
        BenchMachine { label: MachineName::label(machine, cet), machine, cet }
    }

    /// `name` with `--cet` (see [`MachineName::resolve`]).
    pub fn from_name(name: MachineName, cet: Option<CetMode>) -> std::result::Result<BenchMachine, String> {
        let (machine, cet) = name.resolve(cet)?;
        Ok(BenchMachine::new(machine, cet))
    }

    /// The machines of `names` (default: [`DEFAULT_MACHINES`]) with `cet`, each once.
    pub fn list(names: &[MachineName], cet: Option<CetMode>) -> std::result::Result<Vec<BenchMachine>, String> {
        let names = if names.is_empty() { &DEFAULT_MACHINES[..] } else { names };
        let mut out: Vec<BenchMachine> = Vec::new();
        for &n in names {
            let m = BenchMachine::from_name(n, cet)?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Bochs with `clock: sync=none` counts retired instructions.
    pub fn unit(&self) -> &'static str {
        if self.machine.is_bochs() {
            "instructions"
        } else {
            "cycles"
        }
    }

    /// Bochs is deterministic: one run is enough.
    pub fn runs(&self, requested: u32) -> u32 {
        if self.machine.is_bochs() {
            1
        } else {
            requested
        }
    }
}

/// The results of one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineResult {
    pub machine: String,
    pub unit: String,
    /// Shadow stacks were on in the kernel.
    pub shstk: bool,
    /// The kernel had the self-test hooks compiled in (its `boot` line says).
    #[serde(default)]
    pub test_hooks: bool,
    pub runs: u32,
    /// Wall-clock seconds from emulator start to end of report, one per run.
    pub wall_boot_to_end_s: Vec<f64>,
    pub figures: Vec<Figure>,
}

impl MachineResult {
    pub fn figure(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }
}

/// A design target and whether it is met.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// The rule, in words.
    pub rule: String,
    /// The measured ratio or difference (None: data missing).
    pub actual: Option<f64>,
    pub limit: f64,
    /// None when the data is missing.
    pub met: Option<bool>,
    /// How `actual` was computed.
    pub detail: String,
}

/// Everything one `cargo xtask bench` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
    pub host: String,
    pub cpu_model: String,
    /// The kernel's source: git commit, and whether kernel/, asm/, src/ had
    /// uncommitted changes when it was built.
    #[serde(default)]
    pub kernel_source: String,
    /// Whether the measured kernel had the self-test hooks compiled in
    /// (false: the production build, `--no-default-features`).
    #[serde(default)]
    pub test_hooks: bool,
    pub machines: Vec<MachineResult>,
    /// Machines that were asked for but could not be measured, and why.
    pub not_covered: Vec<String>,
    pub targets: Vec<Target>,
}

impl BenchResults {
    pub fn machine(&self, label: &str) -> Option<&MachineResult> {
        self.machines.iter().find(|m| m.machine == label)
    }

    fn median_of(&self, label: &str, key: &str) -> std::result::Result<f64, String> {
        self.machine(label).and_then(|m| m.figure(key)).map(|f| f.median).ok_or_else(|| format!("no {label} {key}"))
    }
}

fn finish(name: &str, rule: &str, limit: f64, computed: std::result::Result<(f64, String), String>) -> Target {
    let (actual, detail) = match computed {
        Ok((v, d)) => (Some(v), d),
        Err(e) => (None, format!("missing data: {e}")),
    };
    Target { name: name.into(), rule: rule.into(), actual, limit, met: actual.map(|v| v <= limit + 1e-9), detail }
}

/// The machine of the targets with shadow stacks on (Bochs `tigerlake`).
pub const CET_ON: &str = "bochs";
/// The same CPU booted with `cet=off` (the classic strategy's target).
pub const CET_OFF: &str = "bochs-cetoff";

/// The absolute per-operation targets (the hot-path issue, Bochs
/// instruction counts of the production build): (machine, figure key,
/// at most this many instructions).
pub const ABSOLUTE_TARGETS: [(&str, &str, f64); 7] = [
    (CET_ON, "int3_iret", 70.0),
    (CET_ON, "emul_call/shadowgap", 150.0),
    (CET_ON, "emul_call_1site/shadowgap", 140.0),
    (CET_OFF, "emul_call/classic", 120.0),
    (CET_ON, "emul_call/trampoline", 250.0),
    (CET_ON, "emul_jmp/shadowgap", 120.0),
    (CET_ON, "emul_nop/shadowgap", 120.0),
];

/// The lookup target: `lookup[LOOKUP_BIG] - lookup[LOOKUP_SMALL]`, in instructions.
pub const LOOKUP_SMALL: u64 = 16;
pub const LOOKUP_BIG: u64 = 65_536;
pub const LOOKUP_GROWTH_LIMIT: f64 = 30.0;

/// The batch sizes whose per-site patching cost must be flat, and how flat (max/min).
pub const FLAT_SIZES: [u64; 3] = [256, 4096, 65_536];
pub const FLAT_LIMIT: f64 = 1.5;
/// Sync rounds every batch takes, whatever its size (DESIGN §5).
pub const SYNC_ROUNDS: u64 = 3;

/// Evaluates the design targets on the Bochs figures.
pub fn evaluate_targets(r: &BenchResults) -> Vec<Target> {
    let mut t: Vec<Target> = ABSOLUTE_TARGETS
        .iter()
        .map(|&(machine, key, limit)| {
            let computed = r.median_of(machine, key).map(|v| (v, format!("{} instructions", fmt_num(v))));
            finish(&format!("{machine} {key}"), &format!("{machine} {key} <= {limit} instructions"), limit, computed)
        })
        .collect();
    let lookup = r.median_of(CET_ON, &format!("lookup[{LOOKUP_BIG}]")).and_then(|big| {
        let small = r.median_of(CET_ON, &format!("lookup[{LOOKUP_SMALL}]"))?;
        Ok((
            big - small,
            format!("lookup[{LOOKUP_BIG}] {} - lookup[{LOOKUP_SMALL}] {} instructions", fmt_num(big), fmt_num(small)),
        ))
    });
    t.push(finish(
        "lookup growth",
        &format!("{CET_ON} lookup[{LOOKUP_BIG}] - lookup[{LOOKUP_SMALL}] <= {LOOKUP_GROWTH_LIMIT} instructions"),
        LOOKUP_GROWTH_LIMIT,
        lookup,
    ));
    let per_site = (|| {
        let v: Vec<f64> = FLAT_SIZES
            .iter()
            .map(|s| r.median_of(CET_ON, &format!("patch_batch[{s}]")))
            .collect::<std::result::Result<_, _>>()?;
        let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        if lo <= 0.0 {
            return Err("a zero per-site cost".to_string());
        }
        let sizes: Vec<String> = FLAT_SIZES.iter().map(u64::to_string).collect();
        Ok((hi / lo, format!("per-site cost at {} sites: {v:?}; max/min", sizes.join("/"))))
    })();
    t.push(finish(
        "batch patching per site",
        &format!(
            "{CET_ON} patch_batch per-site cost max/min over {}..{} sites <= {FLAT_LIMIT}",
            FLAT_SIZES[0],
            FLAT_SIZES[FLAT_SIZES.len() - 1]
        ),
        FLAT_LIMIT,
        per_site,
    ));
    let rounds = (|| {
        let m = r.machine(CET_ON).ok_or(format!("no {CET_ON} results"))?;
        let all: Vec<(u64, Vec<u64>)> = m
            .figures
            .iter()
            .filter(|f| f.name == "patch_batch")
            .map(|f| (f.sites.unwrap_or(0), f.fields.get("sync_rounds").cloned().unwrap_or_default()))
            .collect();
        if let Some(s) = FLAT_SIZES.iter().find(|s| !all.iter().any(|(x, _)| x == *s)) {
            return Err(format!("no {CET_ON} patch_batch[{s}]"));
        }
        let bad = all.iter().filter(|(_, r)| r.is_empty() || r.iter().any(|&x| x != SYNC_ROUNDS)).count();
        let desc: Vec<String> = all.iter().map(|(s, r)| format!("{s}:{r:?}")).collect();
        // 0 when every size took exactly SYNC_ROUNDS rounds.
        Ok((bad as f64, format!("sync_rounds per size: {}", desc.join(" "))))
    })();
    let mut rounds_target = finish(
        "sync rounds",
        &format!("{CET_ON} patch_batch sync_rounds == {SYNC_ROUNDS} for every size (actual: sizes that differ)"),
        0.0,
        rounds,
    );
    rounds_target.met = rounds_target.actual.map(|v| v == 0.0);
    t.push(rounds_target);
    t
}

// ---------------------------------------------------------------- rendering

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{}", v as i64)
    } else {
        format!("{v:.1}")
    }
}

/// One table cell: the median, and the spread when it is not a single value.
pub fn cell(f: &Figure) -> String {
    if f.min == f.max {
        fmt_num(f.median)
    } else {
        format!("{} ({}–{})", fmt_num(f.median), f.min, f.max)
    }
}

fn column_title(m: &MachineResult) -> String {
    format!("{} (CET {}) [{}]", m.machine, if m.shstk { "on" } else { "off" }, m.unit)
}

/// Table order: boot, bare costs, emulation by kind and strategy, lookup, patching.
fn row_rank(f: &Figure) -> (usize, usize, u64) {
    const NAMES: [&str; 13] = [
        "boot",
        "direct_call",
        "patched_call",
        "int3_iret",
        "int3_nmi_ret",
        "emul_call",
        "emul_call_1site",
        "emul_call_nmi",
        "emul_jmp",
        "emul_nop",
        "emul_ret",
        "lookup",
        "patch_batch",
    ];
    const STRATEGIES: [&str; 3] = ["classic", "trampoline", "shadowgap"];
    let name = NAMES.iter().position(|n| *n == f.name).unwrap_or(NAMES.len());
    let strategy = match (&f.strategy, f.sites) {
        (Some(s), None) => STRATEGIES.iter().position(|x| x == s).unwrap_or(STRATEGIES.len()),
        _ => 0,
    };
    (name, strategy, f.sites.unwrap_or(0))
}

/// The Markdown table: one row per figure, one column per machine.
pub fn markdown_table(r: &BenchResults) -> String {
    let mut rows: Vec<&Figure> = Vec::new();
    for m in &r.machines {
        for f in &m.figures {
            if !rows.iter().any(|x| x.key == f.key) {
                rows.push(f);
            }
        }
    }
    rows.sort_by_key(|f| row_rank(f));
    let keys: Vec<String> = rows.iter().map(|f| f.key.clone()).collect();
    let mut s = String::from("| figure (per op) |");
    for m in &r.machines {
        s.push_str(&format!(" {} |", column_title(m)));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(r.machines.len()));
    s.push('\n');
    for key in &keys {
        s.push_str(&format!("| `{key}` |"));
        for m in &r.machines {
            let c = m.figure(key).map_or("–".to_string(), cell);
            s.push_str(&format!(" {c} |"));
        }
        s.push('\n');
    }
    s.push_str("| wall-clock boot to end of report (s) |");
    for m in &r.machines {
        let v: Vec<String> = m.wall_boot_to_end_s.iter().map(|t| format!("{t:.1}")).collect();
        s.push_str(&format!(" {} |", v.join(", ")));
    }
    s.push('\n');
    s
}

/// The "Targets" section body (a list).
pub fn markdown_targets(r: &BenchResults) -> String {
    let mut s = String::new();
    for t in &r.targets {
        let verdict = match t.met {
            Some(true) => "**met**",
            Some(false) => "**MISSED**",
            None => "**not measured**",
        };
        let ratio = t.name == "batch patching per site";
        let actual = t.actual.map_or("–".to_string(), |v| if ratio { format!("{v:.3}") } else { fmt_num(v) });
        s.push_str(&format!(
            "- {verdict} — {}: {} (actual {actual}, limit {}; {})\n",
            t.name, t.rule, t.limit, t.detail
        ));
    }
    s
}

/// The whole latest.md (also the README section, with the chart).
pub fn markdown(r: &BenchResults, with_chart: bool) -> String {
    let mut s = format!(
        "Measured {} on `{}` ({}); kernel {}. Per-operation figures: median of all repetitions \
         (5 per run; QEMU: all runs), with min–max when they differ. Bochs counts retired \
         instructions (deterministic); QEMU counts TSC cycles.\n\n",
        r.date, r.host, r.cpu_model, r.kernel_source
    );
    for n in &r.not_covered {
        s.push_str(&format!("**NOT COVERED:** {n}\n\n"));
    }
    s.push_str(&markdown_table(r));
    s.push_str("\n### Targets\n\n");
    s.push_str(&markdown_targets(r));
    if with_chart {
        s.push_str("\n![benchmark chart](bench/results/latest.svg)\n");
    }
    s
}

pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";

/// Replaces the text between the markers; adds a `## Benchmarks` section
/// with the markers when they are missing (or the file is empty).
pub fn update_readme(readme: Option<&str>, body: &str) -> String {
    let block = format!("{BEGIN}\n{}\n{END}", body.trim_end());
    if let Some(text) = readme {
        if let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) {
            if b < e {
                return format!("{}{block}{}", &text[..b], &text[e + END.len()..]);
            }
        }
        if !text.trim().is_empty() {
            let sep = if text.ends_with('\n') { "\n" } else { "\n\n" };
            return format!("{text}{sep}## Benchmarks\n\n{block}\n");
        }
    }
    format!("## Benchmarks\n\n{block}\n")
}

// ------------------------------------------------------------------ running

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (the `time` crate).
pub fn utc_timestamp(secs: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "unknown-date".to_string())
}

/// Now, as [`utc_timestamp`].
pub fn utc_now() -> String {
    utc_timestamp(time::OffsetDateTime::now_utc().unix_timestamp())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// The `model name` of /proc/cpuinfo.
pub fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// `git <commit>`, noting uncommitted changes under kernel/, asm/, src/.
fn kernel_source() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(crate::kernel::repo_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown source (no git)".into();
    };
    match git(&["status", "--porcelain", "--", "kernel", "asm", "src"]) {
        Some(s) if s.is_empty() => format!("git {head}"),
        Some(_) => format!("git {head} + uncommitted changes in kernel/, asm/ or src/"),
        None => format!("git {head}"),
    }
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    pub machines: Vec<BenchMachine>,
    pub runs: u32,
    pub kernel: Option<PathBuf>,
    /// `--emul` for every boot.
    pub emul: Option<EmulStrategy>,
    /// `--append` words for every boot.
    pub append: Vec<String>,
    /// Write the results as JSON here.
    pub json: Option<PathBuf>,
    /// Write bench/results/ and the README section.
    pub publish: bool,
    /// Show the KTAP reports while they run.
    pub verbose: bool,
}

/// How often a silent boot prints that it is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

fn loud(msg: &str) {
    let bar = "!".repeat(78);
    eprintln!("\n{bar}\n!!! {msg}\n{bar}\n");
}

/// Boots `m` `runs` times; `Ok(Err(why))` when qemu-kvm cannot be measured here.
fn measure(
    m: &BenchMachine,
    runs: u32,
    kernel: &Path,
    opts: &BenchOptions,
) -> Result<std::result::Result<MachineResult, String>> {
    let mut lines = Vec::new();
    let mut walls = Vec::new();
    let mut shstk = None;
    let mut test_hooks = false;
    for i in 1..=runs {
        println!("==> bench {} run {i}/{runs}", m.label);
        let started = Instant::now();
        let mut run = RunOptions::new(m.machine);
        run.cet = m.cet;
        run.emul = opts.emul;
        run.bench = true;
        run.append = opts.append.clone();
        run.kernel = Some(kernel.to_path_buf());
        run.install = Policy::Install;
        run.echo = if opts.verbose { Echo::Report } else { Echo::Silent };
        run.progress_every = Some(PROGRESS_EVERY);
        let outcome = match crate::run(&run) {
            Ok(o) => o,
            Err(e) if m.machine == Machine::QemuKvm => {
                loud(&format!("qemu-kvm NOT BENCHMARKED: {e}"));
                return Ok(Err(e.to_string()));
            }
            Err(e) => return Err(e),
        };
        println!("    {} run {i}/{runs} took {}", m.label, fmt_elapsed(started.elapsed()));
        if !outcome.passed {
            if m.machine == Machine::QemuKvm {
                let why = outcome.kvm_internal_error.as_ref().map_or(outcome.failures.join("; "), |k| k.to_string());
                loud(&format!("qemu-kvm NOT BENCHMARKED on this host: {why}"));
                return Ok(Err(why));
            }
            return Err(Error::new(format!(
                "bench run on {} failed; not using figures of a failing kernel:\n{}",
                m.label,
                outcome.describe()
            )));
        }
        let parsed = parse_diagnostics(&outcome.report.diagnostics).map_err(Error::new)?;
        if parsed.is_empty() {
            return Err(Error::new(format!(
                "{}: the kernel printed no `# bench {{...}}` lines (does it know bench=1?)",
                m.label
            )));
        }
        shstk = shstk.or(parsed.first().map(|l| l.shstk));
        test_hooks |= hooks_of(&parsed).map_err(|e| Error::new(format!("{}: {e}", m.label)))?;
        walls.push(outcome.boot_to_end.unwrap_or(Duration::ZERO).as_secs_f64());
        lines.push(parsed);
    }
    Ok(Ok(MachineResult {
        machine: m.label.clone(),
        unit: m.unit().to_string(),
        shstk: shstk.unwrap_or(false),
        test_hooks,
        runs,
        wall_boot_to_end_s: walls,
        figures: merge_runs(&lines),
    }))
}

/// Whether the kernel of one boot had the self-test hooks compiled in, as
/// its `boot` line says; an error when it does not say (a kernel older than
/// the field, measured with `--kernel`: its figures cannot be labelled).
pub fn hooks_of(lines: &[BenchLine]) -> std::result::Result<bool, String> {
    let boot = lines.iter().find(|l| l.name == "boot").ok_or("the kernel printed no `boot` bench line")?;
    match boot.test_hooks {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(v) => Err(format!("the `boot` bench line has test_hooks {v} (expected 0 or 1)")),
        None => Err("the `boot` bench line does not say whether the test hooks are compiled in (no test_hooks)".into()),
    }
}

/// Why `r` may not be published (`--publish`): a kernel with the self-test
/// hooks (the targets are the production build's), or a target without data
/// (a subset of the machines, or one that could not run).
pub fn publish_refusal(r: &BenchResults) -> Option<String> {
    if r.test_hooks {
        return Some(
            "not publishing: the measured kernel has the self-test hooks compiled in; the published figures \
             are the production build's (`cargo xtask bench --publish` without --kernel builds it)"
                .into(),
        );
    }
    let missing: Vec<&str> = r.targets.iter().filter(|t| t.met.is_none()).map(|t| t.name.as_str()).collect();
    (!missing.is_empty()).then(|| {
        format!(
            "not publishing: no data for the target(s) {}; publish a full run (`cargo xtask bench --publish` \
             measures bochs, bochs-cetoff and qemu)",
            missing.join(", ")
        )
    })
}

/// The targets that were measured and missed.
pub fn missed_targets(r: &BenchResults) -> Vec<&Target> {
    r.targets.iter().filter(|t| t.met == Some(false)).collect()
}

/// Runs the whole benchmark; writes only what `--json`/`--publish` ask for.
pub fn run_bench(opts: &BenchOptions) -> Result<BenchResults> {
    let started = Instant::now();
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => crate::kernel::build_kernel_of(Policy::Install, crate::kernel::Build::Production)?,
    };
    let mut results = BenchResults {
        test_hooks: false,
        date: utc_now(),
        host: hostname(),
        cpu_model: cpu_model(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
        kernel_source: match &opts.kernel {
            Some(k) => format!("prebuilt {}", k.display()),
            None => kernel_source(),
        },
        machines: Vec::new(),
        not_covered: Vec::new(),
        targets: Vec::new(),
    };
    for (i, m) in opts.machines.iter().enumerate() {
        println!(
            "\n==> bench machine {}/{}: {} ({} elapsed)",
            i + 1,
            opts.machines.len(),
            m.label,
            fmt_elapsed(started.elapsed())
        );
        match measure(m, m.runs(opts.runs), &kernel, opts)? {
            Ok(r) if r.test_hooks && opts.kernel.is_none() => {
                return Err(Error::new(format!(
                    "{}: the production build (--no-default-features) says it has the self-test hooks compiled in",
                    m.label
                )));
            }
            Ok(r) => {
                results.test_hooks |= r.test_hooks;
                results.machines.push(r)
            }
            Err(why) if why.starts_with(&m.label) => results.not_covered.push(why),
            Err(why) => results.not_covered.push(format!("{}: {why}", m.label)),
        }
    }
    results.targets = evaluate_targets(&results);
    println!("==> bench done in {}", fmt_elapsed(started.elapsed()));
    write_outputs(&results, opts.json.as_deref(), opts.publish, &crate::kernel::repo_root())?;
    Ok(results)
}

/// Writes what was asked for and nothing else: `json` (anywhere), and
/// with `publish` bench/results/ and README.md under `root` (refused,
/// nothing of it written, per [`publish_refusal`]).
pub fn write_outputs(r: &BenchResults, json: Option<&Path>, publish: bool, root: &Path) -> Result<()> {
    if let Some(path) = json {
        write_json(r, path)?;
    }
    if publish {
        if let Some(why) = publish_refusal(r) {
            return Err(Error::new(why));
        }
        write_results(r, root)?;
    }
    Ok(())
}

fn write_json(r: &BenchResults, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(r).context(|| "cannot serialise the results")? + "\n";
    std::fs::write(path, json).context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Writes bench/results/* and the README section under `root` (`--publish`).
pub fn write_results(r: &BenchResults, root: &Path) -> Result<()> {
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let day = r.date.get(..10).unwrap_or("unknown-date");
    write_json(r, &dir.join(format!("{day}-{}.json", r.host)))?;
    write_json(r, &dir.join("latest.json"))?;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).context(|| format!("cannot write {}", p.display()))?;
        println!("wrote {}", p.display());
        Ok::<(), Error>(())
    };
    write("latest.md", &format!("# shadowcall benchmarks\n\n{}", markdown(r, false)))?;
    write("latest.svg", &crate::benchchart::svg(r)?)?;
    let readme = root.join("README.md");
    let old = std::fs::read_to_string(&readme).ok();
    let new = update_readme(old.as_deref(), &markdown(r, true));
    std::fs::write(&readme, new).context(|| format!("cannot write {}", readme.display()))?;
    println!("updated {} (between the bench markers)", readme.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOCHS: &str = r#"# bench: start (unit: TSC ticks; instructions on Bochs with clock sync=none)
# bench {"name":"boot","shstk":true,"tsc_kmain":1000,"tsc_tests_end":5000,"test_hooks":0,"per_op":[]}
# bench {"name":"direct_call","shstk":true,"n":200,"per_op":[4,4,4,4,4]}
# bench {"name":"int3_iret","shstk":true,"n":200,"per_op":[70,70,70,70,70]}
# bench {"name":"emul_call","shstk":true,"strategy":"trampoline","n":200,"per_op":[251,251,251,251,251]}
# bench {"name":"emul_call","shstk":true,"strategy":"shadowgap","n":200,"per_op":[150,150,150,150,150]}
# bench {"name":"emul_jmp","shstk":true,"strategy":"shadowgap","n":200,"per_op":[110,110,110,110,110]}
# bench {"name":"emul_nop","shstk":true,"strategy":"shadowgap","n":200,"per_op":[100,100,100,100,100]}
# bench {"name":"emul_call_1site","shstk":true,"strategy":"shadowgap","n":200,"per_op":[140,140,140,140,140]}
# bench {"name":"lookup","shstk":true,"strategy":"shadowgap","sites":16,"n":50,"per_op":[300,300,300,300,300]}
# bench {"name":"patch_batch","shstk":true,"sites":256,"sync_rounds":3,"total":25600,"per_op":[100]}
# bench {"name":"patch_batch","shstk":true,"sites":4096,"sync_rounds":3,"total":4096000,"per_op":[1000]}
# bench {"name":"lookup","shstk":true,"strategy":"shadowgap","sites":65536,"n":50,"per_op":[331,331,331,331,331]}
# bench {"name":"patch_batch","shstk":true,"sites":65536,"sync_rounds":4,"total":6553600,"per_op":[100]}
# bench: done
"#;
    const CETOFF: &str = r#"# bench {"name":"boot","shstk":false,"tsc_kmain":1000,"tsc_tests_end":4000,"test_hooks":0,"per_op":[]}
# bench {"name":"emul_call","shstk":false,"strategy":"classic","n":200,"per_op":[120,120,120,120,120]}
"#;

    fn lines(text: &str) -> Vec<BenchLine> {
        let diags: Vec<String> = text.lines().map(String::from).collect();
        parse_diagnostics(&diags).unwrap()
    }

    fn results() -> BenchResults {
        let mk = |label: &str, text: &str, shstk| MachineResult {
            test_hooks: false,
            machine: label.into(),
            unit: "instructions".into(),
            shstk,
            runs: 1,
            wall_boot_to_end_s: vec![3.5],
            figures: merge_runs(&[lines(text)]),
        };
        let mut r = BenchResults {
            test_hooks: false,
            date: "2025-01-02T03:04:05Z".into(),
            host: "h".into(),
            cpu_model: "cpu".into(),
            kernel_source: "git abc".into(),
            machines: vec![mk("bochs", BOCHS, true), mk("bochs-cetoff", CETOFF, false)],
            not_covered: vec!["qemu-kvm: no".into()],
            targets: vec![],
        };
        r.targets = evaluate_targets(&r);
        r
    }

    #[test]
    fn parses_lines_and_keys() {
        let l = lines(BOCHS);
        assert_eq!(l.len(), 13, "the start/done lines are not figures");
        assert_eq!(l[0].key(), "boot_selftests");
        assert_eq!(l[0].values(), [4000]);
        assert_eq!(l[3].key(), "emul_call/trampoline");
        assert_eq!(l[3].strategy.as_deref(), Some("trampoline"));
        assert_eq!(l[7].key(), "emul_call_1site/shadowgap");
        assert_eq!(l[8].key(), "lookup[16]");
        assert_eq!(l[9].key(), "patch_batch[256]");
        assert_eq!((l[9].sync_rounds, l[9].total), (Some(3), Some(25600)));
        assert!(parse_line("# something else").is_none());
        assert!(parse_line("# bench: done").is_none());
        assert!(parse_line("# bench {\"name\":1}").unwrap().is_err());
        assert!(parse_line("# bench {\"name\":\"x\",\"shstk\":true,\"per_op\":[1],\"new_field\":2}").unwrap().is_ok());
    }

    #[test]
    fn median_and_spread_over_runs() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5, 1, 3]), Some(3.0));
        assert_eq!(median(&[4, 1, 3, 2]), Some(2.5));
        let run = |v: &str, rounds: u64| {
            lines(&format!(
                "# bench {{\"name\":\"emul_call\",\"shstk\":false,\"strategy\":\"classic\",\"n\":200,\"per_op\":[{v}]}}\n\
                 # bench {{\"name\":\"patch_batch\",\"shstk\":false,\"sites\":16,\"sync_rounds\":{rounds},\"total\":160,\"per_op\":[10]}}"
            ))
        };
        let figs =
            merge_runs(&[run("1347,1171,1162,1169,1242", 3), run("1100,1200,1300,1400,1500", 3), run("9,9,9,9,9", 4)]);
        assert_eq!(figs.len(), 2);
        let f = &figs[0];
        assert_eq!(f.key, "emul_call/classic");
        assert_eq!(f.raw.len(), 15);
        assert_eq!((f.min, f.max), (9, 1500));
        assert_eq!(f.median, 1169.0);
        assert_eq!(cell(f), "1169 (9–1500)");
        assert_eq!(figs[1].fields["sync_rounds"], [3, 3, 4]);
        let single = merge_runs(&[lines(CETOFF)]);
        assert_eq!(cell(single.iter().find(|f| f.key == "emul_call/classic").unwrap()), "120");
    }

    #[test]
    fn targets_are_evaluated() {
        let r = results();
        let names: Vec<&str> = r.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bochs int3_iret",
                "bochs emul_call/shadowgap",
                "bochs emul_call_1site/shadowgap",
                "bochs-cetoff emul_call/classic",
                "bochs emul_call/trampoline",
                "bochs emul_jmp/shadowgap",
                "bochs emul_nop/shadowgap",
                "lookup growth",
                "batch patching per site",
                "sync rounds"
            ]
        );
        let t = |name: &str| r.targets.iter().find(|t| t.name == name).unwrap().clone();
        // Equal to the limit is met; one instruction over is missed.
        for (name, actual, limit, met) in [
            ("bochs int3_iret", 70.0, 70.0, true),
            ("bochs emul_call/shadowgap", 150.0, 150.0, true),
            ("bochs emul_call_1site/shadowgap", 140.0, 140.0, true),
            ("bochs-cetoff emul_call/classic", 120.0, 120.0, true),
            ("bochs emul_call/trampoline", 251.0, 250.0, false),
            ("bochs emul_jmp/shadowgap", 110.0, 120.0, true),
            ("bochs emul_nop/shadowgap", 100.0, 120.0, true),
        ] {
            let x = t(name);
            assert_eq!((x.actual, x.limit, x.met), (Some(actual), limit, Some(met)), "{name}: {x:?}");
            assert!(x.detail.contains(&format!("{} instructions", actual as u64)), "{}", x.detail);
        }
        let d = t("lookup growth");
        assert_eq!((d.actual, d.limit, d.met), (Some(31.0), 30.0, Some(false)));
        assert_eq!(d.detail, "lookup[65536] 331 - lookup[16] 300 instructions");
        let e = t("batch patching per site");
        assert_eq!((e.actual, e.met), (Some(10.0), Some(false)));
        let f = t("sync rounds");
        assert_eq!((f.actual, f.met), (Some(1.0), Some(false)), "{}", f.detail);
        assert!(f.detail.contains("65536:[4]"), "{}", f.detail);
        // Missing machine: not measured, not met.
        let mut r2 = r.clone();
        r2.machines.truncate(1);
        let t2 = evaluate_targets(&r2);
        let classic = t2.iter().find(|t| t.name == "bochs-cetoff emul_call/classic").unwrap();
        assert_eq!(classic.met, None);
        assert!(classic.detail.contains("no bochs-cetoff"), "{}", classic.detail);
        assert_eq!(t2.iter().filter(|t| t.met.is_none()).count(), 1);
        // A missing figure (an old kernel without the 1-site site) is not measured either.
        let mut r3 = r.clone();
        r3.machines[0].figures.retain(|f| f.name != "emul_call_1site");
        let t3 = evaluate_targets(&r3);
        let one = t3.iter().find(|t| t.name == "bochs emul_call_1site/shadowgap").unwrap();
        assert_eq!(one.met, None);
        assert!(one.detail.contains("no bochs emul_call_1site/shadowgap"), "{}", one.detail);
        // Flatness needs the three sizes; sync rounds too.
        let mut r4 = r.clone();
        r4.machines[0].figures.retain(|f| f.key != "patch_batch[4096]");
        let t4 = evaluate_targets(&r4);
        assert_eq!(t4.iter().find(|t| t.name == "batch patching per site").unwrap().met, None);
        let rounds = t4.iter().find(|t| t.name == "sync rounds").unwrap();
        assert_eq!(rounds.met, None);
        assert!(rounds.detail.contains("no bochs patch_batch[4096]"), "{}", rounds.detail);
    }

    #[test]
    fn all_targets_met() {
        let mut r = results();
        let fix = |r: &mut BenchResults, key: &str, v: u64| {
            for m in &mut r.machines {
                for f in m.figures.iter_mut().filter(|f| f.key == key) {
                    f.raw = vec![v];
                    (f.median, f.min, f.max) = (v as f64, v, v);
                }
            }
        };
        fix(&mut r, "emul_call/trampoline", 250);
        fix(&mut r, "lookup[65536]", 330);
        fix(&mut r, "patch_batch[4096]", 150);
        fix(&mut r, "patch_batch[65536]", 101);
        for m in &mut r.machines {
            for f in m.figures.iter_mut().filter(|f| f.name == "patch_batch") {
                f.fields.insert("sync_rounds".into(), vec![3]);
            }
        }
        r.targets = evaluate_targets(&r);
        assert!(missed_targets(&r).is_empty(), "{:#?}", r.targets);
        assert!(r.targets.iter().all(|t| t.met == Some(true)), "{:#?}", r.targets);
    }

    #[test]
    fn test_hooks_come_from_the_boot_line() {
        assert_eq!(hooks_of(&lines(BOCHS)), Ok(false));
        let with = lines(&BOCHS.replace("\"test_hooks\":0", "\"test_hooks\":1"));
        assert_eq!(hooks_of(&with), Ok(true));
        let silent = lines(&BOCHS.replace("\"test_hooks\":0,", ""));
        assert!(hooks_of(&silent).unwrap_err().contains("no test_hooks"));
        let odd = lines(&BOCHS.replace("\"test_hooks\":0", "\"test_hooks\":7"));
        assert!(hooks_of(&odd).unwrap_err().contains("test_hooks 7"));
        let no_boot: Vec<BenchLine> = lines(BOCHS).into_iter().filter(|l| l.name != "boot").collect();
        assert!(hooks_of(&no_boot).unwrap_err().contains("no `boot`"));
        let j = serde_json::to_value(results()).unwrap();
        assert_eq!(j["test_hooks"], serde_json::Value::Bool(false));
        assert_eq!(j["machines"][0]["test_hooks"], serde_json::Value::Bool(false));
    }

    #[test]
    fn a_kernel_error_line_fails_the_parse() {
        let diags = ["# bench: start".to_string(), "# bench: error: the lookup batch: TargetNotRegistered".to_string()];
        let e = parse_diagnostics(&diags).unwrap_err();
        assert!(e.contains("could not run a benchmark") && e.contains("TargetNotRegistered"), "{e}");
    }

    #[test]
    fn markdown_has_table_and_targets() {
        let md = markdown(&results(), true);
        assert!(
            md.contains("| figure (per op) | bochs (CET on) [instructions] | bochs-cetoff (CET off) [instructions] |"),
            "{md}"
        );
        assert!(md.contains("| `emul_call/shadowgap` | 150 | – |"), "{md}");
        assert!(md.contains("| `emul_call/classic` | – | 120 |"), "{md}");
        assert!(md.contains("| `emul_call_1site/shadowgap` | 140 | – |"), "{md}");
        assert!(
            md.contains(
                "- **met** — bochs int3_iret: bochs int3_iret <= 70 instructions (actual 70, limit 70; 70 instructions)"
            ),
            "{md}"
        );
        assert!(md.contains("**MISSED** — bochs emul_call/trampoline"), "{md}");
        assert!(md.contains("**MISSED** — lookup growth"), "{md}");
        assert!(md.contains("(actual 10.000, limit 1.5;"), "{md}");
        // Rows: the 1-site call right after the 4-site one of each strategy.
        let at = |k: &str| md.find(&format!("| `{k}` |")).unwrap();
        assert!(at("int3_iret") < at("emul_call/trampoline"));
        assert!(at("emul_call/shadowgap") < at("emul_call_1site/shadowgap"));
        assert!(at("emul_call_1site/shadowgap") < at("emul_jmp/shadowgap"));
        assert!(md.contains("**NOT COVERED:** qemu-kvm"), "{md}");
        assert!(md.contains("![benchmark chart](bench/results/latest.svg)"));
        assert!(md.contains("| wall-clock boot to end of report (s) | 3.5 | 3.5 |"));
    }

    #[test]
    fn readme_markers() {
        assert_eq!(update_readme(None, "X\n"), format!("## Benchmarks\n\n{BEGIN}\nX\n{END}\n"));
        let old = format!("# shadowcall\n\nintro\n\n## Benchmarks\n\n{BEGIN}\nold\n{END}\n\n## Other\nkeep\n");
        let new = update_readme(Some(&old), "new");
        assert_eq!(new, format!("# shadowcall\n\nintro\n\n## Benchmarks\n\n{BEGIN}\nnew\n{END}\n\n## Other\nkeep\n"));
        let no_markers = update_readme(Some("# shadowcall\ntext\n"), "B");
        assert_eq!(no_markers, format!("# shadowcall\ntext\n\n## Benchmarks\n\n{BEGIN}\nB\n{END}\n"));
    }

    #[test]
    fn timestamps_and_cpu() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_764_210_645), "2025-11-27T02:30:45Z");
        assert_eq!(utc_now().len(), "2025-11-27T02:30:45Z".len());
        assert_eq!(cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags: x\n"), "AMD EPYC 7B13");
        assert_eq!(cpu_model(""), "unknown CPU");
    }

    #[test]
    fn machines_and_cet() {
        let labels = |names: &[MachineName], cet| {
            BenchMachine::list(names, cet).map(|v| v.into_iter().map(|m| m.label).collect::<Vec<_>>())
        };
        assert_eq!(labels(&[], None).unwrap(), ["bochs", "bochs-cetoff", "qemu", "qemu-kvm"]);
        assert_eq!(labels(&[MachineName::Bochs], Some(CetMode::Off)).unwrap(), ["bochs-cetoff"]);
        assert_eq!(
            labels(&[MachineName::BochsCetoff, MachineName::Bochs], Some(CetMode::Off)).unwrap(),
            ["bochs-cetoff"]
        );
        assert_eq!(labels(&[MachineName::Qemu], Some(CetMode::On)).unwrap(), ["qemu-ceton"]);
        assert!(labels(&[MachineName::BochsCetoff], Some(CetMode::On)).is_err());
        let m = BenchMachine::from_name(MachineName::BochsCetoff, None).unwrap();
        assert_eq!((m.machine, m.cet, m.runs(5), m.unit()), (Machine::Bochs, Some(CetMode::Off), 1, "instructions"));
        assert_eq!(BenchMachine::new(Machine::Qemu, None).runs(5), 5);
    }

    #[test]
    fn publish_needs_every_target_and_missed_ones_are_listed() {
        let r = results();
        assert!(publish_refusal(&r).is_none());
        let names: Vec<&str> = missed_targets(&r).iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["bochs emul_call/trampoline", "lookup growth", "batch patching per site", "sync rounds"]);
        let mut partial = r.clone();
        partial.machines.truncate(1);
        partial.targets = evaluate_targets(&partial);
        let why = publish_refusal(&partial).unwrap();
        assert!(why.contains("bochs-cetoff emul_call/classic"), "{why}");
        let mut hooks = r.clone();
        hooks.test_hooks = true;
        let why = publish_refusal(&hooks).unwrap();
        assert!(why.contains("self-test hooks"), "{why}");
    }

    /// Every file under `dir`, relative, sorted.
    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn json_writes_only_its_file_and_publish_writes_results_and_readme() {
        let r = results();
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("README.md"), "# x\n").unwrap();
        let out = tempfile::tempdir().unwrap();
        let file = out.path().join("b.json");
        write_outputs(&r, Some(&file), false, root.path()).unwrap();
        assert_eq!(files_under(root.path()), ["README.md"], "--json touches nothing under the root");
        assert_eq!(std::fs::read_to_string(root.path().join("README.md")).unwrap(), "# x\n");
        let back: BenchResults = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(back, r);
        write_outputs(&r, None, false, root.path()).unwrap();
        assert_eq!(files_under(root.path()), ["README.md"], "no option writes nothing");
        write_outputs(&r, None, true, root.path()).unwrap();
        assert_eq!(
            files_under(root.path()),
            [
                "README.md",
                "bench/results/2025-01-02-h.json",
                "bench/results/latest.json",
                "bench/results/latest.md",
                "bench/results/latest.svg"
            ]
        );
        let readme = std::fs::read_to_string(root.path().join("README.md")).unwrap();
        assert!(readme.starts_with("# x\n") && readme.contains(BEGIN) && readme.contains("bochs int3_iret"));
        // A refused publish writes nothing.
        let empty = tempfile::tempdir().unwrap();
        let mut partial = r.clone();
        partial.machines.truncate(1);
        partial.targets = evaluate_targets(&partial);
        assert!(write_outputs(&partial, None, true, empty.path()).is_err());
        assert!(files_under(empty.path()).is_empty());
    }

    #[test]
    fn json_round_trip() {
        let r = results();
        let text = serde_json::to_string(&r).unwrap();
        let back: BenchResults = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}
