//! The matrix's own test harness (`harness = false`).
//!
//! libtest knows only ok, FAILED and ignored-before-running; a boot that
//! ran but covered nothing (qemu-kvm on a host whose KVM cannot deliver
//! #BP) would print `ok`. Here each entry ends as one of
//! [`Verdict`]: `ok`, `FAILED` (a panic in its checks), or `NOT COVERED`
//! (with the reason, repeated loudly in the summary).
//!
//! It accepts what `cargo test` passes to a test binary: name filters,
//! `--exact`, `--skip NAME`, `--list`, `--test-threads N`, `--ignored`
//! (there are no ignored entries: runs nothing); other flags are ignored.
//! `cargo xtask test --machine/--cet/--emul` limit it through the
//! environment ([`xtask::MATRIX_MACHINES_ENV`], ...).

use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use xtask::emulator::fmt_elapsed;
use xtask::{CetMode, EmulStrategy, Machine, MachineName};

/// How an entry's check ended without failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// It ran and its checks passed.
    Covered,
    /// It could not show anything on this host; the reason.
    NotCovered(String),
}

/// The end of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    NotCovered(String),
    Failed(String),
}

/// One configuration of the matrix.
#[derive(Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub machine: Machine,
    pub cet: Option<CetMode>,
    pub emul: Option<EmulStrategy>,
    /// The check: boots and asserts; a panic is a failure.
    pub check: fn() -> Coverage,
}

impl Entry {
    /// Whether this entry matches `cargo xtask test --machine/--cet/--emul`:
    /// a machine name matches its machine (and `bochs-cetoff` only `cet=off`).
    pub fn matches(&self, machines: &[MachineName], cet: Option<CetMode>, emul: Option<EmulStrategy>) -> bool {
        let own_cet = self.cet.unwrap_or_default();
        let machine_ok = machines.is_empty()
            || machines.iter().any(|m| m.machine() == self.machine && m.implied_cet().is_none_or(|c| c == own_cet));
        machine_ok && cet.is_none_or(|c| c == own_cet) && emul.is_none_or(|e| Some(e) == self.emul)
    }
}

/// The command-line arguments `cargo test` passes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub filters: Vec<String>,
    pub skip: Vec<String>,
    pub exact: bool,
    pub list: bool,
    pub ignored_only: bool,
    pub threads: Option<usize>,
}

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Args {
        let mut a = Args::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--exact" => a.exact = true,
                "--list" => a.list = true,
                "--ignored" => a.ignored_only = true,
                "--skip" => a.skip.extend(it.next()),
                "--test-threads" => a.threads = it.next().and_then(|n| n.parse().ok()),
                s if s.starts_with("--test-threads=") => a.threads = s["--test-threads=".len()..].parse().ok(),
                s if s.starts_with("--skip=") => a.skip.push(s["--skip=".len()..].to_string()),
                // --nocapture, --format, -q, --include-ignored, ...: nothing to do.
                s if s.starts_with('-') => {}
                s => a.filters.push(s.to_string()),
            }
        }
        a
    }

    pub fn selects(&self, name: &str) -> bool {
        let hit = |f: &String| if self.exact { name == f } else { name.contains(f.as_str()) };
        (self.filters.is_empty() || self.filters.iter().any(hit)) && !self.skip.iter().any(hit)
    }
}

/// `cargo xtask test --machine/--cet/--emul`, from the environment.
#[derive(Debug, Default)]
struct Filter {
    machines: Vec<MachineName>,
    cet: Option<CetMode>,
    emul: Option<EmulStrategy>,
}

fn env_filter() -> Result<Filter, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut machines = Vec::new();
    for m in var(xtask::MATRIX_MACHINES_ENV).iter().flat_map(|v| v.split(',')) {
        machines.push(MachineName::from_name(m).ok_or_else(|| format!("unknown machine `{m}`"))?);
    }
    let cet = var(xtask::MATRIX_CET_ENV)
        .map(|v| CetMode::from_name(&v).ok_or_else(|| format!("bad cet value `{v}`")))
        .transpose()?;
    let emul = var(xtask::MATRIX_EMUL_ENV)
        .map(|v| EmulStrategy::from_name(&v).ok_or_else(|| format!("bad emul value `{v}`")))
        .transpose()?;
    Ok(Filter { machines, cet, emul })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".to_string())
}

/// Runs one entry: its check's panic is the failure.
pub fn run_entry(entry: &Entry) -> Verdict {
    match panic::catch_unwind(AssertUnwindSafe(entry.check)) {
        Ok(Coverage::Covered) => Verdict::Ok,
        Ok(Coverage::NotCovered(why)) => Verdict::NotCovered(why),
        Err(payload) => Verdict::Failed(panic_message(payload.as_ref())),
    }
}

/// How often the harness says what is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// The whole run: select, run `threads` at a time in the given order,
/// report, summarise. Exit status 1 on any failure.
pub fn main(entries: &[Entry]) -> ExitCode {
    let args = Args::parse(std::env::args().skip(1));
    let filter = match env_filter() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let selected: Vec<Entry> = entries
        .iter()
        .filter(|e| !args.ignored_only && args.selects(e.name) && e.matches(&filter.machines, filter.cet, filter.emul))
        .copied()
        .collect();
    if args.list {
        for e in &selected {
            println!("{}: test", e.name);
        }
        return ExitCode::SUCCESS;
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    println!("\nrunning {} emulator configurations, {threads} at a time", selected.len());
    // Checks panic on failure; the harness prints the message itself.
    panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<(usize, Verdict, Duration)>();
    let mut next = 0;
    let mut running: Vec<(usize, Instant)> = Vec::new();
    let mut verdicts: Vec<Option<(Verdict, Duration)>> = vec![None; selected.len()];
    let mut last_note = Instant::now();
    while next < selected.len() || !running.is_empty() {
        while running.len() < threads && next < selected.len() {
            let (i, entry, tx) = (next, selected[next], tx.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                let v = run_entry(&entry);
                let _ = tx.send((i, v, t.elapsed()));
            });
            running.push((i, Instant::now()));
            next += 1;
        }
        match rx.recv_timeout(PROGRESS_EVERY.saturating_sub(last_note.elapsed())) {
            Ok((i, verdict, took)) => {
                running.retain(|(r, _)| *r != i);
                let name = selected[i].name;
                match &verdict {
                    Verdict::Ok => println!("test {name} ... ok ({})", fmt_elapsed(took)),
                    Verdict::NotCovered(why) => {
                        println!("test {name} ... NOT COVERED ({})\n    {why}", fmt_elapsed(took))
                    }
                    Verdict::Failed(_) => println!("test {name} ... FAILED ({})", fmt_elapsed(took)),
                }
                verdicts[i] = Some((verdict, took));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now: Vec<String> = running
                    .iter()
                    .map(|(i, t)| format!("{} ({})", selected[*i].name, fmt_elapsed(t.elapsed())))
                    .collect();
                println!("    ... {} elapsed; running: {}", fmt_elapsed(started.elapsed()), now.join(", "));
                last_note = Instant::now();
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    summarise(&selected, &verdicts, started.elapsed())
}

fn summarise(selected: &[Entry], verdicts: &[Option<(Verdict, Duration)>], took: Duration) -> ExitCode {
    let mut failed = Vec::new();
    let mut not_covered = Vec::new();
    let mut ok = 0;
    for (e, v) in selected.iter().zip(verdicts) {
        match v {
            Some((Verdict::Ok, _)) => ok += 1,
            Some((Verdict::NotCovered(why), _)) => not_covered.push((e.name, why.clone())),
            Some((Verdict::Failed(msg), _)) => failed.push((e.name, msg.clone())),
            None => failed.push((e.name, "did not finish".to_string())),
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:\n");
        for (name, msg) in &failed {
            println!("---- {name} ----\n{msg}\n");
        }
        println!("failures:");
        for (name, _) in &failed {
            println!("    {name}");
        }
    }
    if !not_covered.is_empty() {
        let bar = "!".repeat(78);
        println!("\n{bar}");
        for (name, why) in &not_covered {
            println!("!!! {name} NOT COVERED (ignored, not passed): {why}");
        }
        println!("{bar}");
    }
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {ok} passed; {} failed; {} not covered (ignored); finished in {}\n",
        failed.len(),
        not_covered.len(),
        fmt_elapsed(took)
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &'static str, machine: Machine, cet: Option<CetMode>, emul: Option<EmulStrategy>) -> Entry {
        Entry { name, machine, cet, emul, check: || Coverage::Covered }
    }

    #[test]
    fn arguments_cargo_test_passes() {
        let a = Args::parse(
            ["qemu", "--exact", "--skip", "qemu_kvm", "--test-threads=2", "--nocapture", "-q"].map(String::from),
        );
        assert_eq!(a.filters, ["qemu"]);
        assert_eq!((a.exact, a.threads, a.skip.as_slice()), (true, Some(2), &["qemu_kvm".to_string()][..]));
        assert!(a.selects("qemu") && !a.selects("qemu_kvm") && !a.selects("qemu_trampoline"));
        let a = Args::parse(["qemu", "--test-threads", "3"].map(String::from));
        assert!(a.selects("qemu_trampoline") && !a.selects("bochs"));
        assert_eq!(a.threads, Some(3));
        assert!(Args::parse([]).selects("anything"));
    }

    #[test]
    fn vocabulary_filters() {
        let off = entry("bochs_cet_off", Machine::Bochs, Some(CetMode::Off), None);
        let tramp = entry("bochs_trampoline", Machine::Bochs, None, Some(EmulStrategy::Trampoline));
        let qemu = entry("qemu", Machine::Qemu, None, None);
        assert!(off.matches(&[MachineName::BochsCetoff], None, None));
        assert!(!tramp.matches(&[MachineName::BochsCetoff], None, None));
        assert!(tramp.matches(&[MachineName::Bochs], None, None) && off.matches(&[MachineName::Bochs], None, None));
        assert!(!qemu.matches(&[MachineName::Bochs], None, None));
        assert!(qemu.matches(&[], Some(CetMode::Auto), None) && !off.matches(&[], Some(CetMode::Auto), None));
        assert!(tramp.matches(&[], None, Some(EmulStrategy::Trampoline)));
        assert!(!qemu.matches(&[], None, Some(EmulStrategy::Trampoline)));
    }

    #[test]
    fn verdicts() {
        panic::set_hook(Box::new(|_| {}));
        let mut e = entry("x", Machine::Qemu, None, None);
        assert_eq!(run_entry(&e), Verdict::Ok);
        e.check = || Coverage::NotCovered("no KVM".into());
        assert_eq!(run_entry(&e), Verdict::NotCovered("no KVM".into()));
        e.check = || panic!("boom {}", 1);
        assert_eq!(run_entry(&e), Verdict::Failed("boom 1".into()));
        let _ = panic::take_hook();
    }
}
