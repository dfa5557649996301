//! `cargo xtask <subcommand>`: see `cargo xtask help`.
//!
//! To add a subcommand, write a `fn(&[String]) -> Outcome` and add one
//! line to `SUBCOMMANDS`.

use std::process::ExitCode;

use xtask::args::{self, UsageError};

/// What a subcommand ended with.
enum Outcome {
    Success,
    /// The work ran but failed (e.g. a test failed): exit 1.
    Failed,
    /// The command line was wrong: exit 2 with the usage text.
    Usage(UsageError),
    /// Could not do the work: exit 1 with the message.
    Error(xtask::Error),
}

struct Subcommand {
    name: &'static str,
    synopsis: &'static str,
    run: fn(&[String]) -> Outcome,
}

const SUBCOMMANDS: &[Subcommand] = &[
    Subcommand {
        name: "run",
        synopsis: "run [--machine bochs|bochs-nocet|qemu|qemu-kvm] [--smp N] [--cet auto|on|off]\n\
                   \x20       [--emul trampoline|shadowgap|classic] [--append WORD]... [--timeout SECS]\n\
                   \x20       [--gdb] [--keep] [--kernel ELF] [--stress]\n\
                   \x20   Build the kernel, boot it (default machine: bochs) and check its KTAP report.\n\
                   \x20   --kernel boots a prebuilt ELF instead of building kernel/.\n\
                   \x20   Default timeout: 180 s Bochs, 60 s QEMU (300 s with --smp 2 or more).\n\
                   \x20   --stress (needs --smp 2 or more): the smp_patch_stress soak (`stress=1`: at least\n\
                   \x20   10,000,000 calls and 100 rounds); timeout 1800 s unless --timeout; ends with a\n\
                   \x20   `stress: ...` line (calls, patches, emulated, stale int3s, targets, lost/misrouted).",
        run: cmd_run,
    },
    Subcommand {
        name: "test",
        synopsis: "test\n    Install missing host tools, then `cargo test --workspace` (unit tests + emulator matrix).",
        run: cmd_test,
    },
    Subcommand { name: "build", synopsis: "build\n    Build the kernel only and print the ELF path.", run: cmd_build },
    Subcommand {
        name: "iso",
        synopsis: "iso [--cet auto|on|off] [--emul trampoline|shadowgap|classic] [--append WORD]... [--kernel ELF]\n\
                   \x20   Build a GRUB ISO for real hardware at target/shadowcall.iso.",
        run: cmd_iso,
    },
    Subcommand {
        name: "bench",
        synopsis: "bench [--machine bochs|bochs-cetoff|bochs-nocet|qemu|qemu-kvm]... [--runs N] [--kernel ELF]\n\
                   \x20   Boot with bench=1 on each machine (default: bochs, bochs-cetoff, qemu, and qemu-kvm\n\
                   \x20   when this host can run it), QEMU --runs times (default 3); write bench/results/\n\
                   \x20   (JSON, Markdown, SVG) and the README section between the bench markers.",
        run: cmd_bench,
    },
    Subcommand { name: "help", synopsis: "help\n    Print this text.", run: cmd_help },
];

fn usage() -> String {
    let mut s = String::from("usage: cargo xtask <subcommand> [options]\n\nsubcommands:\n");
    for sub in SUBCOMMANDS {
        s.push_str(&format!("  {}\n", sub.synopsis));
    }
    s
}

fn from_result<T>(result: xtask::Result<T>, on_ok: impl FnOnce(T) -> Outcome) -> Outcome {
    match result {
        Ok(v) => on_ok(v),
        Err(e) => Outcome::Error(e),
    }
}

fn cmd_run(argv: &[String]) -> Outcome {
    let opts = match args::parse_run(argv) {
        Ok(o) => o,
        Err(e) => return Outcome::Usage(e),
    };
    from_result(xtask::run(&opts), |o| if o.passed { Outcome::Success } else { Outcome::Failed })
}

fn cmd_test(argv: &[String]) -> Outcome {
    if let Err(e) = args::parse_none("test", argv) {
        return Outcome::Usage(e);
    }
    from_result(xtask::test_everything(), |()| Outcome::Success)
}

fn cmd_build(argv: &[String]) -> Outcome {
    if let Err(e) = args::parse_none("build", argv) {
        return Outcome::Usage(e);
    }
    from_result(xtask::build_kernel(), |elf| {
        println!("{}", elf.display());
        Outcome::Success
    })
}

fn cmd_iso(argv: &[String]) -> Outcome {
    let opts = match args::parse_iso(argv) {
        Ok(o) => o,
        Err(e) => return Outcome::Usage(e),
    };
    from_result(xtask::hardware_iso(&opts), |iso| {
        println!("ISO written: {}", iso.display());
        println!("Write it to a USB stick (this ERASES the stick; check the device name with lsblk first):");
        println!("    sudo dd if={} of=/dev/sdX bs=4M conv=fsync status=progress", iso.display());
        Outcome::Success
    })
}

fn cmd_bench(argv: &[String]) -> Outcome {
    let opts = match args::parse_bench(argv) {
        Ok(o) => o,
        Err(e) => return Outcome::Usage(e),
    };
    from_result(xtask::bench::run_bench(&opts), |r| {
        println!("\n======== targets ========");
        print!("{}", xtask::bench::markdown_targets(&r));
        for n in &r.not_covered {
            println!("NOT COVERED: {n}");
        }
        Outcome::Success
    })
}

fn cmd_help(argv: &[String]) -> Outcome {
    if let Err(e) = args::parse_none("help", argv) {
        return Outcome::Usage(e);
    }
    print!("{}", usage());
    Outcome::Success
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    let outcome = match argv.split_first() {
        None => Outcome::Usage(UsageError("no subcommand given".into())),
        Some((name, rest)) => match SUBCOMMANDS.iter().find(|s| s.name == name.as_str()) {
            Some(sub) => (sub.run)(rest),
            None => Outcome::Usage(UsageError(format!("unknown subcommand `{name}`"))),
        },
    };
    match outcome {
        Outcome::Success => ExitCode::SUCCESS,
        Outcome::Failed => ExitCode::from(1),
        Outcome::Usage(e) => {
            eprintln!("error: {e}\n\n{}", usage());
            ExitCode::from(2)
        }
        Outcome::Error(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
