//! The command line of `cargo xtask` (clap, derive).
//!
//! Every subcommand takes `--help`/`-h`, and `cargo xtask help <subcommand>`
//! prints the same text; both exit 0. The machine, `--cet` and `--emul`
//! names are one vocabulary for `run`, `iso`, `bench` and `test`: the
//! machines are [`MachineName`]; the CET modes and strategies are the
//! kernel's own words from the `shadowcall-cmdline` crate.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use shadowcall_cmdline::{CetMode, EmulStrategy};

use crate::example::{self, Example};
use crate::machines::{check_cmdline_word, MachineName};
use crate::runner::RunOptions;

/// The longest `--smp`.
pub const MAX_SMP: u32 = 8;
/// The most `--runs` of `bench`.
pub const MAX_RUNS: u32 = 50;
/// QEMU boots per machine of `bench` by default.
pub const DEFAULT_RUNS: u32 = 3;

/// Build, boot and test the shadowcall kernel on Bochs and QEMU.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", disable_version_flag = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the kernel, boot it on one machine and check its KTAP report.
    ///
    /// Exit status 0 only if the plan completed with no `not ok`.
    Run(RunArgs),
    /// What CI runs: install missing host tools, run the host unit tests and boot the emulator matrix.
    ///
    /// Installs with `apt-get install -y --no-install-recommends --no-remove` (as root;
    /// otherwise the exact command is printed and the run fails), then runs
    /// `cargo test --workspace`. `--machine`/`--cet`/`--emul` limit the matrix to the
    /// configurations that match (the host unit tests always run).
    Test(TestArgs),
    /// Build the kernel only and print the ELF path.
    Build,
    /// Build a GRUB ISO for real hardware at target/shadowcall.iso.
    Iso(IsoArgs),
    /// Boot with `bench=1`, print the figures and the design targets.
    ///
    /// Writes nothing in the repository unless `--publish`. Exit status 1 when a
    /// target is MISSED (a target without data is reported, not failed).
    Bench(BenchArgs),
    /// Instruction trace of one call of each #BP hot-path figure (production build, Bochs), by phase.
    ///
    /// Boots Bochs twice (CET on, `--cet off`) under its debugger and traces one call of
    /// `int3_iret`, `emul_call/trampoline`, `emul_call/shadowgap` and `emul_call/classic`
    /// (and the shadow gap's `emul_jmp`, `emul_nop`, `emul_call_1site`), through the #BP
    /// stub's fast path or the handler; prints the per-phase tables of DESIGN §7.4 and
    /// writes the annotated traces to `--out`.
    Trace(TraceArgs),
}

fn cet_parser() -> impl TypedValueParser<Value = CetMode> {
    PossibleValuesParser::new(CetMode::NAMES).map(|s| CetMode::from_name(&s).unwrap_or_default())
}

fn emul_parser() -> impl TypedValueParser<Value = EmulStrategy> {
    PossibleValuesParser::new(EmulStrategy::NAMES).map(|s| EmulStrategy::from_name(&s).unwrap_or(EmulStrategy::Classic))
}

fn example_parser() -> impl TypedValueParser<Value = Example> {
    PossibleValuesParser::new(example::names()).map(|s| Example::from_name(&s).unwrap_or(example::EXAMPLES[0]))
}

fn word_parser(s: &str) -> Result<String, String> {
    check_cmdline_word(s)?;
    Ok(s.to_string())
}

fn timeout_parser(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => Err(format!("`{s}` is not a whole number of seconds, at least 1")),
    }
}

/// The kernel command line options, shared by every subcommand that boots or packs the kernel.
#[derive(Debug, Clone, Default, Args)]
pub struct KernelArgs {
    /// `cet=` for the kernel: auto (use CET shadow stacks if the CPU has them), on (require them), off.
    #[arg(long, value_name = "MODE", value_parser = cet_parser())]
    pub cet: Option<CetMode>,
    /// `emul=`: the int3 call-emulation strategy (default: shadowgap with shadow stacks, else classic).
    #[arg(long, value_name = "STRATEGY", value_parser = emul_parser())]
    pub emul: Option<EmulStrategy>,
    /// An extra kernel command-line word (repeatable). A word for a key the runner sets
    /// (cet=, emul=, ...) replaces the runner's; a bad value is named before booting.
    #[arg(long, value_name = "WORD", value_parser = word_parser)]
    pub append: Vec<String>,
    /// Boot this prebuilt kernel ELF instead of building kernel/.
    #[arg(long, value_name = "ELF")]
    pub kernel: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The machine to boot (`bochs-cetoff` = `bochs --cet off`).
    #[arg(long, value_enum, default_value = "bochs")]
    pub machine: MachineName,
    /// Number of CPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_SMP as i64))]
    pub smp: u32,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Timeout in seconds (default: 180 Bochs and qemu-kvm, 60 qemu, 300 QEMU with --smp 2+, 1800 with --stress).
    #[arg(long, value_name = "SECS", value_parser = timeout_parser)]
    pub timeout: Option<Duration>,
    /// QEMU only: wait for gdb on :1234 (no timeout).
    #[arg(long, conflicts_with = "timeout")]
    pub gdb: bool,
    /// Keep the run directory (serial log, emulator log, command line).
    #[arg(long)]
    pub keep: bool,
    /// The smp_patch_stress soak (`stress=1`: at least 10,000,000 calls and 100 rounds); needs --smp 2 or more.
    #[arg(long)]
    pub stress: bool,
    /// Also show the emulator's own output (Bochs banner, magic-breakpoint dumps, ...).
    #[arg(long, short)]
    pub verbose: bool,
    /// Boot this example kernel from examples/ instead (Multiboot2 through GRUB; one CPU,
    /// no kernel command line).
    #[arg(long, value_name = "NAME", value_parser = example_parser(),
          conflicts_with_all = ["cet", "emul", "append", "kernel", "stress"])]
    pub example: Option<Example>,
}

#[derive(Debug, Clone, Args)]
pub struct TestArgs {
    /// Boot only the matrix entries on these machines (repeatable; default: all).
    #[arg(long, value_enum, value_name = "MACHINE")]
    pub machine: Vec<MachineName>,
    /// Boot only the matrix entries booted with this `cet=`.
    #[arg(long, value_name = "MODE", value_parser = cet_parser())]
    pub cet: Option<CetMode>,
    /// Boot only the matrix entries booted with this `emul=`.
    #[arg(long, value_name = "STRATEGY", value_parser = emul_parser())]
    pub emul: Option<EmulStrategy>,
}

#[derive(Debug, Clone, Args)]
pub struct IsoArgs {
    /// Add the `expect_cet=` of this machine's CPU (and `cet=off` for bochs-cetoff).
    #[arg(long, value_enum)]
    pub machine: Option<MachineName>,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A machine to measure (repeatable; default: bochs, bochs-cetoff, qemu, and qemu-kvm when this host can run it).
    #[arg(long, value_enum, value_name = "MACHINE")]
    pub machine: Vec<MachineName>,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Boots per QEMU machine (Bochs is deterministic and boots once).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RUNS, value_parser = clap::value_parser!(u32).range(1..=MAX_RUNS as i64))]
    pub runs: u32,
    /// Also write the results as JSON to FILE (anywhere).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write bench/results/ (latest.*, <date>-<host>.json) and the README section.
    /// Refused when a target has no data (e.g. a subset of the machines).
    #[arg(long)]
    pub publish: bool,
    /// Also show the kernel's KTAP report while it runs.
    #[arg(long, short)]
    pub verbose: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// Trace this prebuilt kernel ELF instead of building the production kernel.
    #[arg(long, value_name = "ELF")]
    pub kernel: Option<PathBuf>,
    /// Where the annotated traces go (one file per figure; created if missing).
    #[arg(long, value_name = "DIR", default_value = "target/trace")]
    pub out: PathBuf,
}

impl RunArgs {
    /// The run these options ask for (the caller decides about installing).
    pub fn to_options(&self) -> Result<RunOptions, String> {
        let (machine, cet) = self.machine.resolve(self.kernel.cet)?;
        if self.gdb && machine.is_bochs() {
            return Err(format!("`--gdb` works only with the QEMU machines, not `{}`", self.machine.name()));
        }
        if self.stress && self.smp < 2 {
            return Err(
                "`--stress` needs at least two CPUs (one patches, the others call): add `--smp 2` or more".into()
            );
        }
        if let Some(e) = self.example {
            if self.machine == MachineName::BochsCetoff {
                return Err(format!(
                    "example `{}` reads no command line, so `bochs-cetoff` (cet=off) means nothing to it: \
                     use `bochs`, `bochs-nocet`, `qemu` or `qemu-kvm`",
                    e.name
                ));
            }
            if self.smp != 1 {
                return Err(format!("example `{}` runs on one CPU: drop `--smp {}`", e.name, self.smp));
            }
        }
        let mut opts = RunOptions::new(machine);
        opts.example = self.example;
        opts.smp = self.smp;
        opts.cet = cet;
        opts.emul = self.kernel.emul;
        opts.append = self.kernel.append.clone();
        opts.kernel = self.kernel.kernel.clone();
        opts.timeout = self.timeout;
        opts.gdb = self.gdb;
        opts.keep = self.keep;
        opts.stress = self.stress;
        if self.verbose {
            opts.echo = crate::runner::Echo::All;
        }
        // Fail now, not after the build, on a bad or conflicting word.
        opts.words()?;
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;
    use crate::machines::Machine;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
    }

    fn run(args: &[&str]) -> Result<RunOptions, String> {
        let mut all = vec!["run"];
        all.extend(args);
        match parse(&all).map_err(|e| e.to_string())?.command {
            Command::Run(r) => r.to_options(),
            c => panic!("{c:?}"),
        }
    }

    fn bench(args: &[&str]) -> BenchArgs {
        let mut all = vec!["bench"];
        all.extend(args);
        match parse(&all).unwrap().command {
            Command::Bench(b) => b,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_everywhere() {
        for sub in ["run", "test", "build", "iso", "bench", "trace"] {
            for flag in ["--help", "-h"] {
                let e = parse(&[sub, flag]).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{sub} {flag}");
                assert_eq!(e.exit_code(), 0);
            }
            let e = parse(&["help", sub]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "help {sub}");
            assert_eq!(e.exit_code(), 0);
        }
        for top in [&["--help"][..], &["-h"], &["help"]] {
            assert_eq!(parse(top).unwrap_err().exit_code(), 0);
        }
        let help = parse(&["run", "--help"]).unwrap_err().to_string();
        for option in ["--machine", "--smp", "--cet", "--emul", "--append", "--timeout", "--gdb", "--keep", "--stress"]
        {
            assert!(help.contains(option), "run --help lacks {option}:\n{help}");
        }
        let help = parse(&["bench", "-h"]).unwrap_err().to_string();
        for option in ["--machine", "--cet", "--runs", "--json", "--publish", "bochs-cetoff"] {
            assert!(help.contains(option), "bench -h lacks {option}:\n{help}");
        }
    }

    #[test]
    fn run_defaults() {
        let o = run(&[]).unwrap();
        assert_eq!(o.machine, Machine::Bochs);
        assert_eq!(
            (o.smp, o.cet, o.emul, o.timeout, o.gdb, o.keep, o.stress),
            (1, None, None, None, false, false, false)
        );
        assert!(o.append.is_empty());
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(180)));
        assert_eq!(run(&["--machine", "qemu"]).unwrap().effective_timeout(), Some(Duration::from_secs(60)));
        assert_eq!(run(&["--machine", "qemu-kvm"]).unwrap().effective_timeout(), Some(Duration::from_secs(180)));
        let o = run(&["--machine", "qemu", "--smp", "4"]).unwrap();
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(300)));
    }

    #[test]
    fn run_all_options() {
        let o = run(&[
            "--machine",
            "qemu",
            "--smp=4",
            "--cet=off",
            "--emul",
            "classic",
            "--append",
            "a=1",
            "--append=b",
            "--timeout",
            "30",
            "--keep",
            "-v",
        ])
        .unwrap();
        assert_eq!(o.machine, Machine::Qemu);
        assert_eq!((o.smp, o.cet, o.emul), (4, Some(CetMode::Off), Some(EmulStrategy::Classic)));
        assert_eq!(o.append, ["a=1", "b"]);
        assert_eq!(o.timeout, Some(Duration::from_secs(30)));
        assert!(o.keep && !o.gdb && o.echo == crate::runner::Echo::All);
        assert_eq!(o.words().unwrap(), ["cet=off", "expect_cet=0", "emul=classic", "a=1", "b"]);
        let o = run(&["--kernel", "/tmp/k.elf"]).unwrap();
        assert_eq!(o.kernel.as_deref(), Some(std::path::Path::new("/tmp/k.elf")));
        assert!(run(&["--machine", "qemu-kvm", "--gdb"]).unwrap().gdb);
    }

    #[test]
    fn every_machine_name_in_every_subcommand() {
        for m in MachineName::ALL {
            let o = run(&["--machine", m.name()]).unwrap();
            assert_eq!(MachineName::label(o.machine, o.cet), m.name());
            assert_eq!(bench(&["--machine", m.name()]).machine, [m]);
            assert!(parse(&["iso", "--machine", m.name()]).is_ok());
            assert!(parse(&["test", "--machine", m.name()]).is_ok());
        }
        let o = run(&["--machine", "bochs-cetoff"]).unwrap();
        assert_eq!((o.machine, o.cet), (Machine::Bochs, Some(CetMode::Off)));
        assert_eq!(o.words().unwrap(), ["cet=off", "expect_cet=1"]);
        assert!(run(&["--machine", "bochs-cetoff", "--cet", "on"]).unwrap_err().contains("`--cet on`"));
        let b = bench(&["--machine", "bochs", "--cet", "off", "--runs", "1", "--json", "/tmp/x.json"]);
        assert_eq!((b.kernel.cet, b.runs, b.json.as_deref()), (Some(CetMode::Off), 1, Some("/tmp/x.json".as_ref())));
        assert!(!b.publish);
    }

    #[test]
    fn example() {
        let o = run(&["--example", "minimal", "--machine", "qemu"]).unwrap();
        assert_eq!((o.example.map(|e| e.name), o.machine), (Some("minimal"), Machine::Qemu));
        assert!(o.words().unwrap().is_empty());
        assert_eq!(run(&["--example=minimal"]).unwrap().machine, Machine::Bochs);
        assert_eq!(run(&[]).unwrap().example, None);
        let e = run(&["--example", "tiny"]).unwrap_err();
        assert!(e.contains("'tiny'") && e.contains("minimal"), "{e}");
        for other in [&["--cet", "off"][..], &["--emul", "classic"], &["--append", "a=1"], &["--kernel", "k.elf"]] {
            let mut args = vec!["--example", "minimal"];
            args.extend(other);
            let e = run(&args).unwrap_err();
            assert!(e.contains("--example") && e.contains(other[0]), "{e}");
        }
        assert!(run(&["--example", "minimal", "--smp", "2"]).unwrap_err().contains("one CPU"));
        assert!(run(&["--example", "minimal", "--machine", "bochs-cetoff"]).unwrap_err().contains("bochs-cetoff"));
        assert!(parse(&["run", "--help"]).unwrap_err().to_string().contains("--example"));
    }

    #[test]
    fn stress() {
        let o = run(&["--machine", "qemu", "--smp", "4", "--stress"]).unwrap();
        assert_eq!(o.words().unwrap(), ["cet=auto", "expect_cet=0", "stress=1"]);
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(1800)));
        let o = run(&["--stress", "--smp=2", "--timeout", "90", "--append", "x=1"]).unwrap();
        assert_eq!(o.words().unwrap(), ["cet=auto", "expect_cet=1", "x=1", "stress=1"]);
        assert_eq!(o.effective_timeout(), Some(Duration::from_secs(90)));
        assert_eq!(run(&["--machine", "qemu", "--smp", "2", "--stress", "--gdb"]).unwrap().effective_timeout(), None);
        assert!(run(&["--stress"]).unwrap_err().contains("`--smp 2`"));
    }

    #[test]
    fn errors_name_the_word() {
        let err = |args: &[&str]| run(args).unwrap_err();
        assert!(err(&["--machine", "vmware"]).contains("vmware"));
        assert!(err(&["--frobnicate"]).contains("--frobnicate"));
        assert!(err(&["qemu"]).contains("'qemu'"));
        assert!(err(&["--cet", "maybe"]).contains("maybe"));
        assert!(err(&["--emul", "fast"]).contains("fast"));
        for bad in ["0", "9", "two"] {
            assert!(err(&["--smp", bad]).contains(bad), "{bad}");
        }
        assert!(err(&["--timeout", "0"]).contains("`0`"));
        assert!(err(&["--append", "a b"]).contains("`a b`"));
        assert!(err(&["--gdb"]).contains("only with the QEMU machines"));
        assert!(err(&["--machine", "bochs-nocet", "--gdb"]).contains("bochs-nocet"));
        assert!(err(&["--machine", "qemu", "--gdb", "--timeout", "5"]).contains("--timeout"));
        assert!(err(&["--smp", "1", "--smp", "2"]).contains("--smp"));
        // The value of a key the runner also sets is named before booting.
        assert!(err(&["--append", "cet=ON"]).contains("bad value 'ON' for cet="));
        assert!(err(&["--cet", "off", "--append", "cet=on"]).contains("`--cet off` and `--append cet=on`"));
        let e = parse(&["bench", "--runs", "0"]).unwrap_err().to_string();
        assert!(e.contains("'0'"), "{e}");
        assert!(parse(&["build", "--fast"]).is_err());
        assert!(parse(&["iso", "--smp", "2"]).is_err());
    }
}
