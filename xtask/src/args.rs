//! Strict, hand-written argument parsing for the subcommands.
//!
//! Options take their value as the next word (`--smp 2`) or after `=`
//! (`--smp=2`). Anything unknown, missing or out of range is a [`UsageError`]
//! that names the offending word; `main` prints it with the usage text and
//! exits with status 2.

use std::fmt;
use std::time::Duration;

use crate::machines::{check_cmdline_word, Cet, Emul, Machine};
use crate::runner::RunOptions;

/// A bad command line. The message names the offending word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage_err<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// Options of `cargo xtask iso`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IsoOptions {
    pub cet: Cet,
    pub emul: Option<Emul>,
    pub append: Vec<String>,
    /// A prebuilt kernel ELF; None: build kernel/.
    pub kernel: Option<std::path::PathBuf>,
}

/// Walks `--flag value` / `--flag=value` words.
struct Words<'a> {
    rest: std::slice::Iter<'a, String>,
}

impl<'a> Words<'a> {
    fn new(args: &'a [String]) -> Self {
        Words { rest: args.iter() }
    }

    /// The next option as (name, inline value after `=`).
    fn next_option(&mut self) -> Result<Option<(&'a str, Option<&'a str>)>, UsageError> {
        let Some(word) = self.rest.next() else {
            return Ok(None);
        };
        if !word.starts_with("--") || word.len() == 2 {
            return usage_err(format!("unexpected argument `{word}`"));
        }
        Ok(Some(match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word.as_str(), None),
        }))
    }

    fn value(&mut self, name: &str, inline: Option<&'a str>) -> Result<&'a str, UsageError> {
        let value = match inline {
            Some(v) => v,
            None => match self.rest.next() {
                Some(v) if !v.starts_with("--") => v.as_str(),
                _ => return usage_err(format!("option `{name}` needs a value")),
            },
        };
        if value.is_empty() {
            return usage_err(format!("option `{name}` needs a value"));
        }
        Ok(value)
    }
}

fn no_value(name: &str, inline: Option<&str>) -> Result<(), UsageError> {
    match inline {
        Some(v) => usage_err(format!("option `{name}` takes no value (got `{name}={v}`)")),
        None => Ok(()),
    }
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), UsageError> {
    if slot.is_some() {
        return usage_err(format!("option `{name}` given more than once"));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_machine(v: &str) -> Result<Machine, UsageError> {
    Machine::from_name(v).ok_or_else(|| {
        let names: Vec<_> = Machine::ALL.iter().map(|m| m.name()).collect();
        UsageError(format!("unknown machine `{v}` (expected one of: {})", names.join(", ")))
    })
}

fn parse_cet(v: &str) -> Result<Cet, UsageError> {
    Cet::from_name(v).ok_or_else(|| UsageError(format!("bad --cet value `{v}` (expected auto, on or off)")))
}

fn parse_emul(v: &str) -> Result<Emul, UsageError> {
    Emul::from_name(v)
        .ok_or_else(|| UsageError(format!("bad --emul value `{v}` (expected trampoline, shadowgap or classic)")))
}

fn parse_smp(v: &str) -> Result<u32, UsageError> {
    match v.parse::<u32>() {
        Ok(n) if (1..=8).contains(&n) => Ok(n),
        _ => usage_err(format!("bad --smp value `{v}` (expected a number from 1 to 8)")),
    }
}

fn parse_timeout(v: &str) -> Result<Duration, UsageError> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => usage_err(format!("bad --timeout value `{v}` (expected a whole number of seconds, at least 1)")),
    }
}

fn parse_word(v: &str) -> Result<String, UsageError> {
    check_cmdline_word(v).map_err(|e| UsageError(format!("bad --append value: {e}")))?;
    Ok(v.to_string())
}

/// `cargo xtask run [options]`.
pub fn parse_run(args: &[String]) -> Result<RunOptions, UsageError> {
    let mut words = Words::new(args);
    let (mut machine, mut smp, mut cet, mut emul, mut timeout) = (None, None, None, None, None);
    let (mut gdb, mut keep, mut append, mut kernel) = (false, false, Vec::new(), None);
    let mut stress = false;
    while let Some((name, inline)) = words.next_option()? {
        match name {
            "--machine" => set_once(&mut machine, name, parse_machine(words.value(name, inline)?)?)?,
            "--smp" => set_once(&mut smp, name, parse_smp(words.value(name, inline)?)?)?,
            "--cet" => set_once(&mut cet, name, parse_cet(words.value(name, inline)?)?)?,
            "--emul" => set_once(&mut emul, name, parse_emul(words.value(name, inline)?)?)?,
            "--timeout" => set_once(&mut timeout, name, parse_timeout(words.value(name, inline)?)?)?,
            "--append" => append.push(parse_word(words.value(name, inline)?)?),
            "--kernel" => set_once(&mut kernel, name, std::path::PathBuf::from(words.value(name, inline)?))?,
            "--gdb" => {
                no_value(name, inline)?;
                gdb = true;
            }
            "--keep" => {
                no_value(name, inline)?;
                keep = true;
            }
            "--stress" => {
                no_value(name, inline)?;
                if stress {
                    return usage_err("option `--stress` given more than once");
                }
                stress = true;
            }
            _ => return usage_err(format!("unknown option `{name}` for `run`")),
        }
    }
    let machine = machine.unwrap_or(Machine::Bochs);
    if gdb && machine.is_bochs() {
        return usage_err(format!("`--gdb` works only with the QEMU machines, not `{}`", machine.name()));
    }
    if gdb && timeout.is_some() {
        return usage_err("`--gdb` disables the timeout; do not combine it with `--timeout`");
    }
    if stress && smp.unwrap_or(1) < 2 {
        return usage_err("`--stress` needs at least two CPUs (one patches, the others call): add `--smp 2` or more");
    }
    let mut opts = RunOptions::new(machine);
    opts.stress = stress;
    opts.smp = smp.unwrap_or(1);
    opts.cet = cet.unwrap_or_default();
    opts.emul = emul;
    opts.append = append;
    opts.timeout = timeout;
    opts.gdb = gdb;
    opts.keep = keep;
    opts.kernel = kernel;
    Ok(opts)
}

/// `cargo xtask iso [--cet V] [--emul V] [--append WORD]...`.
pub fn parse_iso(args: &[String]) -> Result<IsoOptions, UsageError> {
    let mut words = Words::new(args);
    let (mut cet, mut emul, mut append, mut kernel) = (None, None, Vec::new(), None);
    while let Some((name, inline)) = words.next_option()? {
        match name {
            "--cet" => set_once(&mut cet, name, parse_cet(words.value(name, inline)?)?)?,
            "--emul" => set_once(&mut emul, name, parse_emul(words.value(name, inline)?)?)?,
            "--append" => append.push(parse_word(words.value(name, inline)?)?),
            "--kernel" => set_once(&mut kernel, name, std::path::PathBuf::from(words.value(name, inline)?))?,
            _ => return usage_err(format!("unknown option `{name}` for `iso`")),
        }
    }
    Ok(IsoOptions { cet: cet.unwrap_or_default(), emul, append, kernel })
}

/// `cargo xtask bench [--machine M]... [--runs N] [--kernel ELF]`.
pub fn parse_bench(args: &[String]) -> Result<crate::bench::BenchOptions, UsageError> {
    use crate::bench::{BenchMachine, BENCH_MACHINES, DEFAULT_LABELS};
    let mut words = Words::new(args);
    let (mut machines, mut runs, mut kernel) = (Vec::new(), None, None);
    while let Some((name, inline)) = words.next_option()? {
        match name {
            "--machine" => {
                let v = words.value(name, inline)?;
                let m = BenchMachine::from_label(v).ok_or_else(|| {
                    let names: Vec<_> = BENCH_MACHINES.iter().map(|m| m.label).collect();
                    UsageError(format!("unknown bench machine `{v}` (expected one of: {})", names.join(", ")))
                })?;
                if machines.contains(&m) {
                    return usage_err(format!("machine `{v}` given more than once"));
                }
                machines.push(m);
            }
            "--runs" => {
                let v = words.value(name, inline)?;
                let n = match v.parse::<u32>() {
                    Ok(n) if (1..=50).contains(&n) => n,
                    _ => return usage_err(format!("bad --runs value `{v}` (expected 1 to 50)")),
                };
                set_once(&mut runs, name, n)?;
            }
            "--kernel" => set_once(&mut kernel, name, std::path::PathBuf::from(words.value(name, inline)?))?,
            _ => return usage_err(format!("unknown option `{name}` for `bench`")),
        }
    }
    if machines.is_empty() {
        machines = DEFAULT_LABELS.iter().filter_map(|l| BenchMachine::from_label(l)).collect();
    }
    Ok(crate::bench::BenchOptions { machines, runs: runs.unwrap_or(3), kernel })
}

/// A subcommand that takes no arguments.
pub fn parse_none(subcommand: &str, args: &[String]) -> Result<(), UsageError> {
    match args.first() {
        Some(word) => usage_err(format!("`{subcommand}` takes no arguments (got `{word}`)")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn run_err(words: &[&str]) -> String {
        parse_run(&v(words)).expect_err("should be rejected").0
    }

    #[test]
    fn run_defaults() {
        let o = parse_run(&[]).unwrap();
        assert_eq!(o.machine, Machine::Bochs);
        assert_eq!(
            (o.smp, o.cet, o.emul, o.timeout, o.gdb, o.keep, o.stress),
            (1, Cet::Auto, None, None, false, false, false)
        );
        assert!(o.append.is_empty());
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(180)));
        let o = parse_run(&v(&["--machine", "qemu"])).unwrap();
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(60)));
        let o = parse_run(&v(&["--machine", "qemu", "--smp", "4"])).unwrap();
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(300)));
        let o = parse_run(&v(&["--machine", "bochs", "--smp", "2"])).unwrap();
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(180)));
    }

    #[test]
    fn run_stress() {
        let o = parse_run(&v(&["--machine", "qemu", "--smp", "4", "--stress"])).unwrap();
        assert!(o.stress);
        assert_eq!(o.words(), ["cet=auto", "expect_cet=0", "stress=1"]);
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(1800)));
        let o = parse_run(&v(&["--stress", "--smp=2", "--timeout", "90", "--append", "x=1"])).unwrap();
        assert_eq!(o.words(), ["cet=auto", "expect_cet=1", "x=1", "stress=1"]);
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(90)));
        // Given both ways, the word appears once.
        let o = parse_run(&v(&["--stress", "--smp", "2", "--append", "stress=1"])).unwrap();
        assert_eq!(o.words().iter().filter(|w| *w == "stress=1").count(), 1);
        let o = parse_run(&v(&["--machine", "qemu", "--smp", "2", "--stress", "--gdb"])).unwrap();
        assert_eq!(o.effective_timeout(), None);
        assert!(run_err(&["--stress"]).contains("needs at least two CPUs"));
        assert!(run_err(&["--stress", "--smp", "1"]).contains("`--smp 2`"));
        assert!(run_err(&["--stress=yes", "--smp", "2"]).contains("takes no value"));
        assert!(run_err(&["--stress", "--stress", "--smp", "2"]).contains("more than once"));
    }

    #[test]
    fn run_all_options() {
        let o = parse_run(&v(&[
            "--machine",
            "qemu",
            "--smp",
            "4",
            "--cet=off",
            "--emul",
            "classic",
            "--append",
            "a=1",
            "--append=b",
            "--timeout",
            "30",
            "--keep",
        ]))
        .unwrap();
        assert_eq!(o.machine, Machine::Qemu);
        assert_eq!((o.smp, o.cet, o.emul), (4, Cet::Off, Some(Emul::Classic)));
        assert_eq!(o.append, ["a=1", "b"]);
        assert_eq!(o.timeout, Some(Duration::from_secs(30)));
        assert!(o.keep && !o.gdb);
        assert_eq!(o.kernel, None);
        let o = parse_run(&v(&["--kernel", "/tmp/k.elf"])).unwrap();
        assert_eq!(o.kernel.as_deref(), Some(std::path::Path::new("/tmp/k.elf")));
        let o = parse_run(&v(&["--machine", "qemu-kvm", "--gdb"])).unwrap();
        assert!(o.gdb);
    }

    #[test]
    fn run_errors_name_the_word() {
        assert!(run_err(&["--machine", "vmware"]).contains("unknown machine `vmware`"));
        assert!(run_err(&["--frobnicate"]).contains("unknown option `--frobnicate`"));
        assert!(run_err(&["qemu"]).contains("unexpected argument `qemu`"));
        assert!(run_err(&["--machine"]).contains("`--machine` needs a value"));
        assert!(run_err(&["--smp", "--keep"]).contains("`--smp` needs a value"));
        assert!(run_err(&["--cet="]).contains("`--cet` needs a value"));
        assert!(run_err(&["--cet", "maybe"]).contains("bad --cet value `maybe`"));
        assert!(run_err(&["--emul", "fast"]).contains("bad --emul value `fast`"));
        assert!(run_err(&["--smp", "0"]).contains("bad --smp value `0`"));
        assert!(run_err(&["--smp", "9"]).contains("bad --smp value `9`"));
        assert!(run_err(&["--smp", "two"]).contains("bad --smp value `two`"));
        assert!(run_err(&["--timeout", "0"]).contains("bad --timeout value `0`"));
        assert!(run_err(&["--timeout", "-5"]).contains("bad --timeout value `-5`"));
        assert!(run_err(&["--append", "a b"]).contains("`a b`"));
        assert!(run_err(&["--keep=yes"]).contains("takes no value"));
        assert!(run_err(&["--smp", "1", "--smp", "2"]).contains("more than once"));
        assert!(run_err(&["--gdb"]).contains("only with the QEMU machines"));
        assert!(run_err(&["--machine", "bochs-nocet", "--gdb"]).contains("bochs-nocet"));
        assert!(run_err(&["--machine", "qemu", "--gdb", "--timeout", "5"]).contains("--timeout"));
        assert!(run_err(&["--"]).contains("unexpected argument `--`"));
    }

    #[test]
    fn iso_options() {
        let o = parse_iso(&v(&["--append", "x=1", "--cet", "on"])).unwrap();
        assert_eq!(o, IsoOptions { cet: Cet::On, emul: None, append: v(&["x=1"]), kernel: None });
        assert!(parse_iso(&v(&["--machine", "qemu"])).unwrap_err().0.contains("unknown option `--machine`"));
        assert!(parse_iso(&v(&["--append"])).unwrap_err().0.contains("needs a value"));
    }

    #[test]
    fn no_argument_subcommands() {
        assert!(parse_none("test", &[]).is_ok());
        assert!(parse_none("test", &v(&["--fast"])).unwrap_err().0.contains("`--fast`"));
    }

    #[test]
    fn bench_options() {
        let o = parse_bench(&[]).unwrap();
        let labels: Vec<_> = o.machines.iter().map(|m| m.label).collect();
        assert_eq!(labels, ["bochs", "bochs-cetoff", "qemu", "qemu-kvm"]);
        assert_eq!((o.runs, o.kernel), (3, None));
        let o = parse_bench(&v(&["--machine", "qemu", "--machine=bochs-cetoff", "--runs", "5"])).unwrap();
        let labels: Vec<_> = o.machines.iter().map(|m| m.label).collect();
        assert_eq!(labels, ["qemu", "bochs-cetoff"]);
        assert_eq!(o.machines[1].cet, Cet::Off);
        assert_eq!(o.runs, 5);
        let err = |w: &[&str]| parse_bench(&v(w)).unwrap_err().0;
        assert!(err(&["--machine", "vmware"]).contains("unknown bench machine `vmware`"));
        assert!(err(&["--machine", "qemu", "--machine", "qemu"]).contains("more than once"));
        assert!(err(&["--runs", "0"]).contains("bad --runs value `0`"));
        assert!(err(&["--cet", "on"]).contains("unknown option `--cet`"));
    }
}
