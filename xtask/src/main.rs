//! `cargo xtask <subcommand>`: see `cargo xtask --help` (the command line
//! is in `xtask::cli`). Only these commands install missing host tools.

use std::process::ExitCode;

use clap::Parser;
use xtask::bench::{self, BenchMachine, BenchOptions};
use xtask::cli::{BenchArgs, Cli, Command, RunArgs, TraceArgs};
use xtask::Policy;

/// Exit status when the work ran and found a failure (a test, a missed target).
const FAILED: u8 = 1;
/// Exit status of a bad command line (as clap's own).
const USAGE: u8 = 2;

enum Outcome {
    Success,
    /// The work ran but failed (a test failed, a target was missed): exit 1.
    Failed,
    /// The command line was wrong (caught after clap): exit 2.
    Usage(String),
    /// Could not do the work: exit 1 with the message.
    Error(xtask::Error),
}

fn from_result<T>(result: xtask::Result<T>, on_ok: impl FnOnce(T) -> Outcome) -> Outcome {
    match result {
        Ok(v) => on_ok(v),
        Err(e) => Outcome::Error(e),
    }
}

fn cmd_run(args: &RunArgs) -> Outcome {
    let mut opts = match args.to_options() {
        Ok(o) => o,
        Err(e) => return Outcome::Usage(e),
    };
    opts.install = Policy::Install;
    from_result(xtask::run(&opts), |o| if o.passed { Outcome::Success } else { Outcome::Failed })
}

fn cmd_bench(args: &BenchArgs) -> Outcome {
    let machines = match BenchMachine::list(&args.machine, args.kernel.cet) {
        Ok(m) => m,
        Err(e) => return Outcome::Usage(e),
    };
    let opts = BenchOptions {
        machines,
        runs: args.runs,
        kernel: args.kernel.kernel.clone(),
        emul: args.kernel.emul,
        append: args.kernel.append.clone(),
        json: args.json.clone(),
        publish: args.publish,
        verbose: args.verbose,
    };
    from_result(bench::run_bench(&opts), |r| {
        println!("\n======== figures ========");
        println!(
            "kernel: {} ({})",
            if r.test_hooks { "self-test hooks compiled in" } else { "production build (test hooks compiled out)" },
            r.kernel_source
        );
        for n in &r.not_covered {
            println!("NOT COVERED: {n}");
        }
        print!("{}", bench::markdown_table(&r));
        println!("\n======== targets ========");
        print!("{}", bench::markdown_targets(&r));
        if !args.publish && args.json.is_none() {
            println!(
                "(nothing written: --json FILE writes the results, --publish writes bench/results/ and README.md)"
            );
        }
        let missed = bench::missed_targets(&r);
        if missed.is_empty() {
            Outcome::Success
        } else {
            let names: Vec<&str> = missed.iter().map(|t| t.name.as_str()).collect();
            println!("\nFAIL: {} target(s) MISSED: {}", missed.len(), names.join(", "));
            Outcome::Failed
        }
    })
}

fn cmd_trace(args: &TraceArgs) -> Outcome {
    from_result(xtask::trace::run_trace(args.kernel.as_deref(), &args.out), |(table, _)| {
        println!("\n======== instructions per phase (one call each; DESIGN §7.4) ========");
        print!("{table}");
        println!("annotated traces: {}", args.out.display());
        Outcome::Success
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Test(args) => from_result(xtask::test_everything(args), |()| Outcome::Success),
        Command::Build => from_result(xtask::build_kernel(Policy::Install), |elf| {
            println!("{}", elf.display());
            Outcome::Success
        }),
        Command::Iso(args) => from_result(xtask::hardware_iso(args), |iso| {
            println!("ISO written: {}", iso.display());
            println!("Write it to a USB stick (this ERASES the stick; check the device name with lsblk first):");
            println!("    sudo dd if={} of=/dev/sdX bs=4M conv=fsync status=progress", iso.display());
            Outcome::Success
        }),
        Command::Bench(args) => cmd_bench(args),
        Command::Trace(args) => cmd_trace(args),
    };
    match outcome {
        Outcome::Success => ExitCode::SUCCESS,
        Outcome::Failed => ExitCode::from(FAILED),
        Outcome::Usage(e) => {
            eprintln!("error: {e}\n\nFor more information, try '--help'.");
            ExitCode::from(USAGE)
        }
        Outcome::Error(e) => {
            eprintln!("error: {e}");
            ExitCode::from(FAILED)
        }
    }
}
