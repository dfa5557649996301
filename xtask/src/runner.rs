//! One boot of the kernel on one machine, from options to verdict.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::emulator::{self, Launch};
use crate::error::{Context, Error, Result};
use crate::example::{self, Example};
use crate::install::Policy;
use crate::iso::{self, Loader};
use crate::ktap::Report;
use crate::kvm::{self as kvmerr, KvmInternalError};
use crate::machines::{kernel_words, length_warning, Machine, MachineName, RunnerWords};
use crate::rundir::RunDir;
use crate::smp::{self, StressFigures};
use crate::{bochs, elfcheck, install, kernel, qemu};
use shadowcall_cmdline::{CetMode, EmulStrategy};

/// The default timeout of a `--stress` run.
pub const STRESS_TIMEOUT: Duration = Duration::from_secs(1800);

/// What of the emulator's output is shown while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Nothing (the caller reports).
    Silent,
    /// The kernel's KTAP report only; `# SECURITY` lines marked loudly.
    Report,
    /// Everything the emulator prints (`--verbose`).
    All,
}

/// Options of one run (`cargo xtask run ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    pub machine: Machine,
    /// CPU count, 1..=8.
    pub smp: u32,
    /// `--cet`; None: not given (`cet=auto` unless `--append cet=...`).
    pub cet: Option<CetMode>,
    pub emul: Option<EmulStrategy>,
    /// Extra kernel command line words.
    pub append: Vec<String>,
    /// None: the default (see [`RunOptions::effective_timeout`]).
    pub timeout: Option<Duration>,
    /// QEMU only: wait for gdb on :1234; no timeout.
    pub gdb: bool,
    /// Keep the run directory.
    pub keep: bool,
    /// A kernel ELF already built; None: build it first.
    pub kernel: Option<PathBuf>,
    /// What to show while the emulator runs.
    pub echo: Echo,
    /// Print the "booting" line, the verdict and the summaries.
    pub announce: bool,
    /// With [`Echo::Silent`]: a progress line this often.
    pub progress_every: Option<Duration>,
    /// Install missing host tools (only `cargo xtask` commands do); otherwise
    /// a missing tool is an error saying how to install it.
    pub install: Policy,
    /// `bench=1`.
    pub bench: bool,
    /// The soak: `stress=1` on the command line, a long default timeout,
    /// and the `smp_patch_stress` figures required and summarised.
    pub stress: bool,
    /// Boot this example kernel (examples/<name>/, Multiboot2 from an ISO,
    /// no command line) instead of the reference kernel.
    pub example: Option<Example>,
}

impl RunOptions {
    pub fn new(machine: Machine) -> Self {
        RunOptions {
            machine,
            smp: 1,
            cet: None,
            emul: None,
            append: Vec::new(),
            timeout: None,
            gdb: false,
            keep: false,
            kernel: None,
            echo: Echo::Report,
            announce: true,
            progress_every: None,
            install: Policy::ReportOnly,
            bench: false,
            stress: false,
            example: None,
        }
    }

    /// The kernel command line words of this run; `Err` names a bad or
    /// conflicting `--append` word (see [`kernel_words`]). None for an
    /// example (it reads no command line).
    pub fn words(&self) -> std::result::Result<Vec<String>, String> {
        if self.example.is_some() {
            return Ok(Vec::new());
        }
        let r = RunnerWords {
            machine: Some(self.machine),
            cet: self.cet,
            emul: self.emul,
            stress: self.stress,
            bench: self.bench,
        };
        kernel_words(&r, &self.append)
    }

    /// The machine's name with this `--cet` (`bochs-cetoff` for bochs with cet off).
    pub fn label(&self) -> String {
        MachineName::label(self.machine, self.cet)
    }

    /// The timeout in force: none with --gdb; else `timeout` if set; else
    /// [`STRESS_TIMEOUT`] with `stress`; else the machine's default for
    /// this CPU count ([`Machine::default_timeout_for`]).
    pub fn effective_timeout(&self) -> Option<Duration> {
        if self.gdb {
            return None;
        }
        Some(self.timeout.unwrap_or_else(|| {
            if self.stress {
                STRESS_TIMEOUT
            } else {
                self.machine.default_timeout_for(self.smp)
            }
        }))
    }
}

/// The verdict of one run.
#[derive(Debug)]
pub struct RunOutcome {
    pub machine: Machine,
    pub words: Vec<String>,
    /// The parsed KTAP report.
    pub report: Report,
    /// Everything the emulator printed on stdout.
    pub raw_output: String,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub failures: Vec<String>,
    pub exit_status: Option<ExitStatus>,
    pub timed_out: bool,
    /// The run directory, when it was kept.
    pub run_dir: Option<PathBuf>,
    /// QEMU stopped on "KVM internal error": what it was (see [`crate::kvm`]).
    pub kvm_internal_error: Option<KvmInternalError>,
    /// Wall-clock time from the emulator's start to the end of the report.
    pub boot_to_end: Option<Duration>,
}

impl RunOutcome {
    pub fn summary_line(&self) -> String {
        self.report.summary_line()
    }

    /// The `smp_patch_stress` figures (see [`smp::stress_figures`]).
    pub fn stress_figures(&self) -> Option<std::result::Result<StressFigures, String>> {
        smp::stress_figures(&self.report)
    }

    /// The `stress: ...` line `--stress` prints at the end.
    pub fn stress_summary(&self) -> String {
        let wall =
            self.boot_to_end.map(|t| format!("; boot to end of report {:.1} s", t.as_secs_f64())).unwrap_or_default();
        match self.stress_figures() {
            Some(Ok(f)) => format!("stress: {f}{wall}"),
            Some(Err(e)) => format!("stress: no figures: {e}"),
            None => match smp::last_soak_progress(&self.report) {
                Some(p) => format!("stress: no final figures (smp_patch_stress did not finish); last progress: {p}"),
                None => "stress: no smp_patch_stress figures in the report".to_string(),
            },
        }
    }

    /// The KTAP report and the verdict, for test failure messages.
    pub fn describe(&self) -> String {
        let mut s = format!("machine {} with `{}`\n", self.machine.name(), self.words.join(" "));
        if self.report.header_seen {
            s.push_str("--- KTAP report ---\n");
            s.push_str(&self.report.text());
        } else {
            s.push_str("--- no KTAP report; raw emulator output ---\n");
            s.push_str(&self.raw_output);
        }
        s.push_str("---\n");
        s.push_str(&self.summary_line());
        s.push('\n');
        for f in &self.failures {
            s.push_str(&format!("FAIL: {f}\n"));
        }
        s
    }
}

fn validate(opts: &RunOptions) -> Result<()> {
    if opts.gdb && opts.machine.is_bochs() {
        return Err(Error::new("--gdb works only with the QEMU machines"));
    }
    if !(1..=8).contains(&opts.smp) {
        return Err(Error::new(format!("smp must be from 1 to 8, not {}", opts.smp)));
    }
    opts.words().map_err(Error::new)?;
    Ok(())
}

/// Builds (unless `opts.kernel` is given), checks and boots the kernel once,
/// and judges the KTAP report. `Err` means the run could not be done at all
/// (missing tools, build failure...); a failing kernel is `Ok` with
/// `passed == false`.
pub fn run(opts: &RunOptions) -> Result<RunOutcome> {
    validate(opts)?;
    install::ensure_machines(&[opts.machine], opts.install)?;
    if opts.machine == Machine::QemuKvm {
        qemu::kvm_usable().map_err(|e| Error::new(format!("machine qemu-kvm: /dev/kvm is not usable: {e}")))?;
    }
    let kernel = match (&opts.kernel, opts.example) {
        (Some(k), _) => k.clone(),
        (None, Some(e)) => e.build(opts.install)?,
        (None, None) => kernel::build_kernel(opts.install)?,
    };
    if opts.example.is_some() {
        install::ensure(install::GRUB_ISO, opts.install)?;
        example::check_example_elf(&kernel)?;
    } else {
        elfcheck::check_kernel_elf(&kernel)?;
    }
    let dir = RunDir::create("shadowcall-run")?;
    let result = run_in(&dir, opts, &kernel);
    if opts.keep {
        let path = dir.keep();
        println!("run directory kept: {}", path.display());
        return result.map(|mut o| {
            o.run_dir = Some(path);
            o
        });
    }
    if let Err(e) = dir.remove() {
        eprintln!("warning: {e}");
    }
    result
}

fn prepare(dir: &RunDir, opts: &RunOptions, words: &[String]) -> Result<Launch> {
    let kernel = dir.join(qemu::KERNEL);
    let loader = if opts.example.is_some() { Loader::Multiboot2 } else { Loader::Multiboot };
    if opts.machine.is_bochs() {
        bochs::prepare(dir, opts.machine, opts.smp, words, &kernel, loader)
    } else if loader == Loader::Multiboot2 {
        // QEMU's -kernel loads Multiboot v1 only: boot GRUB from an ISO, as Bochs does.
        iso::build_iso(&kernel, loader, words, &dir.join("iso-root"), &dir.join(bochs::ISO))?;
        qemu::prepare(dir, opts.machine, opts.smp, words, opts.gdb, qemu::Boot::Iso(bochs::ISO))
    } else {
        qemu::prepare(dir, opts.machine, opts.smp, words, opts.gdb, qemu::Boot::Kernel)
    }
}

fn run_in(dir: &RunDir, opts: &RunOptions, kernel: &Path) -> Result<RunOutcome> {
    let copy = dir.join(qemu::KERNEL);
    std::fs::copy(kernel, &copy).context(|| format!("cannot copy {} to {}", kernel.display(), copy.display()))?;
    let words = opts.words().map_err(Error::new)?;
    let launch = prepare(dir, opts, &words)?;
    std::fs::write(dir.join("command.txt"), launch.command_line() + "\n").context(|| "cannot write command.txt")?;
    let timeout = opts.effective_timeout();
    if opts.announce {
        match opts.example {
            Some(e) => println!("==> booting example `{}` on {} (smp {})", e.name, opts.machine.name(), opts.smp),
            None => println!("==> booting {} (smp {}) with `{}`", opts.machine.name(), opts.smp, words.join(" ")),
        }
        if let Some(w) = length_warning(&words) {
            println!("{w}");
        }
    }
    if opts.gdb {
        println!("==> QEMU waits for gdb; no timeout. Attach with:");
        println!("    gdb {} -ex 'target remote :1234'", copy.display());
    }
    let show = emulator::Show { echo: opts.echo, progress_every: opts.progress_every, label: opts.label() };
    let streamed = emulator::run_streaming(&launch, timeout, &show, &dir.join("output.log"))?;
    let mut failures = Vec::new();
    let kvm_internal_error =
        streamed.fatal.as_deref().filter(|line| !opts.machine.is_bochs() && line.contains(kvmerr::INTERNAL_ERROR)).map(
            |line| {
                let stderr = std::fs::read_to_string(dir.join(qemu::STDERR_LOG)).unwrap_or_default();
                let elf = std::fs::read(&copy).unwrap_or_default();
                KvmInternalError::new(line, &stderr, &elf, &streamed.report)
            },
        );
    if let Some(t) = streamed.timed_out {
        failures.push(format!("timeout after {} s", t.as_secs()));
    }
    let report_failures = streamed.report.failure_reasons();
    let complete = streamed.report.plan.is_some_and(|n| streamed.report.results.len() >= n as usize);
    if let Some(k) = &kvm_internal_error {
        failures.push(k.to_string());
    } else if let Some(fatal) = &streamed.fatal {
        failures.push(format!("the emulator stopped the guest: {fatal}"));
    } else if streamed.timed_out.is_none() && !complete {
        let status = streamed.exit.map_or("unknown status".to_string(), |s| s.to_string());
        // QEMU exits with status 0 when another process signals it.
        let signalled = streamed
            .stderr_tail
            .iter()
            .find(|l| l.contains("terminating on signal"))
            .map(|l| format!("; it was stopped from outside: `{l}`"))
            .unwrap_or_default();
        failures.push(format!("the emulator exited ({status}) before the report was complete{signalled}"));
    }
    failures.extend(report_failures);
    if opts.stress {
        failures.extend(stress_problems(&streamed.report));
    }
    if opts.machine.is_bochs() {
        let log = std::fs::read_to_string(dir.join(bochs::LOG)).unwrap_or_default();
        failures.extend(bochs::log_problems(&log));
    }
    if opts.announce && !opts.machine.is_bochs() && !complete && !streamed.stderr_tail.is_empty() {
        println!("--- end of the emulator's stderr ---");
        for line in &streamed.stderr_tail {
            println!("{line}");
        }
        println!("---");
    }
    if opts.announce && streamed.killed_after_end {
        println!("note: the emulator did not exit after the end of the report; it was killed");
    }
    let outcome = RunOutcome {
        machine: opts.machine,
        words,
        passed: failures.is_empty(),
        failures,
        report: streamed.report,
        raw_output: streamed.raw,
        exit_status: streamed.exit,
        timed_out: streamed.timed_out.is_some(),
        run_dir: None,
        kvm_internal_error,
        boot_to_end: streamed.end_after,
    };
    if !opts.announce {
        return Ok(outcome);
    }
    print_verdict(&outcome);
    if opts.stress {
        println!("{}", outcome.stress_summary());
    }
    if let Some(k) = &outcome.kvm_internal_error {
        // Straight to the stderr handle: a test harness capturing
        // `eprintln!` must not hide it.
        use std::io::Write;
        let _ = std::io::stderr().write_all(k.banner().as_bytes());
    }
    Ok(outcome)
}

/// What makes a `--stress` run fail beyond the report's own verdict: no
/// figures (the test skipped or never finished), or figures that do not add up.
fn stress_problems(report: &crate::ktap::Report) -> Vec<String> {
    let skipped = report.result("smp_patch_stress").is_some_and(|r| matches!(r.status, crate::ktap::Status::Skip(_)));
    match smp::stress_figures(report) {
        None if skipped => {
            vec!["--stress: smp_patch_stress was skipped (it needs at least two CPUs)".into()]
        }
        None => vec!["--stress: the report has no smp_patch_stress figures".into()],
        Some(Err(e)) => vec![format!("--stress: {e}")],
        Some(Ok(f)) => {
            let mut v = Vec::new();
            if f.lost_or_misrouted() != 0 {
                v.push(format!(
                    "--stress: {} calls made, targets counted {}: {} lost or misrouted",
                    f.calls,
                    f.counted,
                    f.lost_or_misrouted()
                ));
            }
            if !f.targets_add_up() {
                v.push(format!("--stress: the per-target counts {:?} do not add up to {}", f.per_target, f.counted));
            }
            v
        }
    }
}

/// The `# SECURITY` lines of a run, loudly; a count of the `# expected:`
/// ones (refusals and faults the self-tests provoke on purpose), quietly.
pub fn security_notes(report: &crate::ktap::Report) -> Vec<String> {
    let mut notes = Vec::new();
    if !report.expected.is_empty() {
        notes.push(format!(
            "{} expected refusal(s)/fault(s) provoked by the self-tests (`# expected:` lines): not alarms",
            report.expected.len()
        ));
    }
    if !report.security.is_empty() {
        let bar = "!".repeat(78);
        let mut s = format!("{bar}\n!!! {} SECURITY event(s) in this run:\n", report.security.len());
        for line in &report.security {
            s.push_str(&format!("!!!   {line}\n"));
        }
        s.push_str(&bar);
        notes.push(s);
    }
    notes
}

fn print_verdict(outcome: &RunOutcome) {
    for note in security_notes(&outcome.report) {
        println!("{note}");
    }
    println!("{}", outcome.summary_line());
    if outcome.passed {
        println!("PASS: {}", outcome.machine.name());
    } else {
        for f in &outcome.failures {
            println!("FAIL: {f}");
        }
    }
}
