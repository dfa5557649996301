//! Starting an emulator, streaming its output through the KTAP parser and
//! enforcing the timeout. Only the one child process started here is ever
//! killed.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use crate::ktap::{self, LineKind, Report};
use crate::runner::Echo;
use crate::smp;

/// What to show while the emulator runs.
#[derive(Debug, Clone)]
pub struct Show {
    pub echo: Echo,
    /// With [`Echo::Silent`]: print a progress line this often.
    pub progress_every: Option<Duration>,
    /// What is running (for progress lines).
    pub label: String,
}

impl Show {
    /// Nothing at all (unit tests, callers that report themselves).
    pub fn silent() -> Show {
        Show { echo: Echo::Silent, progress_every: None, label: String::new() }
    }
}

/// `1m05s`, `42s`.
pub fn fmt_elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The line to print for emulator line `line` (parsed as `kind`), if any.
fn shown_line(echo: Echo, line: &str, kind: LineKind) -> Option<String> {
    let ktap_line = ktap::strip_prompt(line);
    match echo {
        Echo::Silent => None,
        Echo::All => Some(line.to_string()),
        Echo::Report if ktap_line.starts_with(ktap::SECURITY_PREFIX) => {
            Some(format!("{ktap_line}    <<<<<<<< !!! SECURITY EVENT"))
        }
        Echo::Report if kind != LineKind::Other || ktap_line.starts_with(ktap::PANIC_PREFIX) => {
            Some(ktap_line.to_string())
        }
        Echo::Report => None,
    }
}

/// How long the emulator may keep running after the end-of-report marker
/// (the kernel ends it right after printing that line).
const GRACE_AFTER_END: Duration = Duration::from_secs(10);
/// How long to wait for the exit once its output has closed.
const GRACE_AFTER_EOF: Duration = Duration::from_secs(10);

/// Everything needed to start one emulator process.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The emulator's stderr goes here.
    pub stderr_log: PathBuf,
    /// Stderr text meaning the guest is dead although the emulator keeps
    /// running (QEMU pauses on "KVM internal error"): stop it at once.
    pub fatal_stderr: Vec<&'static str>,
}

fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "_-=./:,+@%".contains(c)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

impl Launch {
    /// A shell command line that repeats this launch (for command.txt).
    pub fn command_line(&self) -> String {
        let mut parts = vec![format!("cd {} &&", shell_quote(&self.cwd.to_string_lossy()))];
        parts.extend(self.env.iter().map(|(k, v)| format!("{k}={}", shell_quote(v))));
        parts.push(shell_quote(&self.program));
        parts.extend(self.args.iter().map(|a| shell_quote(a)));
        parts.push("< /dev/null".to_string());
        parts.join(" ")
    }
}

/// What happened while the emulator ran.
#[derive(Debug)]
pub struct Streamed {
    pub report: Report,
    /// All of the emulator's stdout.
    pub raw: String,
    /// The last lines of the emulator's stderr.
    pub stderr_tail: Vec<String>,
    /// Exit status (after a kill this is the kill's status).
    pub exit: Option<ExitStatus>,
    /// Set when the timeout hit and the emulator was killed.
    pub timed_out: Option<Duration>,
    /// Set when the report ended but the emulator did not exit by itself.
    pub killed_after_end: bool,
    /// A stderr line matching [`Launch::fatal_stderr`]; the emulator was then stopped.
    pub fatal: Option<String>,
    /// Wall-clock time from the start of the emulator to the end-of-report line.
    pub end_after: Option<Duration>,
}

const STDERR_TAIL: usize = 20;
/// How long to collect more stderr after a fatal message before killing.
const GRACE_AFTER_FATAL: Duration = Duration::from_secs(1);

enum Line {
    Out(String),
    Err(String),
}

/// Why the emulator is stopped before the timeout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    EndOfReport,
    Fatal,
}

fn kill(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill();
    child.wait().ok()
}

/// Polls for the exit for up to `grace`; kills the child if it is still running.
fn wait_or_kill(child: &mut Child, grace: Duration) -> (Option<ExitStatus>, bool) {
    let until = Instant::now() + grace;
    while Instant::now() < until {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break,
        }
    }
    (kill(child), true)
}

/// Sends `reader`'s lines into `tx` until EOF.
fn spawn_line_reader(reader: impl std::io::Read + Send + 'static, tx: mpsc::Sender<Line>, wrap: fn(String) -> Line) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    if tx.send(wrap(String::from_utf8_lossy(&buf).into_owned())).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Starts the emulator, shows (see [`Show`]) and parses its stdout line by
/// line, and stops it at the timeout. Raw output is also written to
/// `output_log`, stderr to `launch.stderr_log`. Under the soak
/// (`# soak {...}` lines) each progress line is followed by the calls so far
/// against the goal and the elapsed time.
pub fn run_streaming(launch: &Launch, timeout: Option<Duration>, show: &Show, output_log: &Path) -> Result<Streamed> {
    let mut err_log =
        File::create(&launch.stderr_log).context(|| format!("cannot create {}", launch.stderr_log.display()))?;
    let mut log = File::create(output_log).context(|| format!("cannot create {}", output_log.display()))?;
    let mut child = Command::new(&launch.program)
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| format!("cannot start {}", launch.program))?;
    let started = Instant::now();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill(&mut child);
        return Err(crate::error::Error::new("emulator output was not captured"));
    };
    let (tx, lines) = mpsc::channel();
    spawn_line_reader(stdout, tx.clone(), Line::Out);
    spawn_line_reader(stderr, tx, Line::Err);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut stop: Option<(Instant, Stop)> = None;
    let every = show.progress_every.filter(|_| show.echo == Echo::Silent);
    let mut next_tick = every.map(|e| started + e);
    let mut out = Streamed {
        report: Report::new(),
        raw: String::new(),
        stderr_tail: Vec::new(),
        exit: None,
        timed_out: None,
        killed_after_end: false,
        fatal: None,
        end_after: None,
    };
    loop {
        let wake = [deadline, stop.map(|(t, _)| t), next_tick].into_iter().flatten().min();
        let next = match wake {
            Some(w) => lines.recv_timeout(w.saturating_duration_since(Instant::now())),
            None => lines.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(Line::Out(line)) => {
                let _ = writeln!(log, "{line}");
                out.raw.push_str(&line);
                out.raw.push('\n');
                let kind = out.report.feed_line(&line);
                if let Some(shown) = shown_line(show.echo, &line, kind) {
                    println!("{shown}");
                }
                if let (false, Some(p)) = (show.echo == Echo::Silent, smp::parse_soak_line(ktap::strip_prompt(&line))) {
                    println!("    {p}; {} elapsed", fmt_elapsed(started.elapsed()));
                }
                if out.report.end_seen && out.end_after.is_none() {
                    out.end_after = Some(started.elapsed());
                }
                if out.report.end_seen && stop.is_none() {
                    stop = Some((Instant::now() + GRACE_AFTER_END, Stop::EndOfReport));
                }
            }
            Ok(Line::Err(line)) => {
                let _ = writeln!(err_log, "{line}");
                let fatal = launch.fatal_stderr.iter().any(|p| line.contains(p));
                if fatal && out.fatal.is_none() {
                    out.fatal = Some(line.clone());
                    stop = Some((Instant::now() + GRACE_AFTER_FATAL, Stop::Fatal));
                }
                if out.stderr_tail.len() == STDERR_TAIL {
                    out.stderr_tail.remove(0);
                }
                out.stderr_tail.push(line);
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let stopping = stop.is_some_and(|(t, _)| now >= t) || deadline.is_some_and(|d| now >= d);
                if let (false, Some(tick), Some(e)) = (stopping, next_tick, every) {
                    if now >= tick {
                        let r = &out.report;
                        let plan = r.plan.map_or("?".to_string(), |n| n.to_string());
                        println!(
                            "    ... {}: {} elapsed, {} of {plan} results so far",
                            show.label,
                            fmt_elapsed(started.elapsed()),
                            r.results.len()
                        );
                        next_tick = Some(tick + e);
                        continue;
                    }
                }
                match stop {
                    Some((t, Stop::EndOfReport)) if Instant::now() >= t => out.killed_after_end = true,
                    Some((t, Stop::Fatal)) if Instant::now() >= t => {}
                    _ => out.timed_out = timeout,
                }
                out.exit = kill(&mut child);
                return Ok(out);
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let (exit, killed) = wait_or_kill(&mut child, GRACE_AFTER_EOF);
    out.exit = exit;
    out.killed_after_end = killed && out.report.end_seen;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, dir: &Path) -> Launch {
        Launch {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            cwd: dir.to_path_buf(),
            stderr_log: dir.join("stderr.log"),
            fatal_stderr: vec!["FATAL-MARK"],
        }
    }

    #[test]
    fn streams_and_parses() {
        let dir = crate::rundir::RunDir::create("xtask-unit-emu").unwrap();
        let l = sh(
            "printf 'noise\\n<bochs:1> KTAP version 1\\n1..1\\nok 1 a\\n# shadowcall: end of report\\n'",
            dir.path(),
        );
        let s = run_streaming(&l, Some(Duration::from_secs(20)), &Show::silent(), &dir.join("out.log")).unwrap();
        assert!(s.report.passed(), "{:?}", s.report.failure_reasons());
        assert!(s.timed_out.is_none() && !s.killed_after_end);
        assert!(s.exit.is_some_and(|e| e.success()));
        assert!(s.end_after.is_some_and(|t| t < Duration::from_secs(20)));
        assert!(std::fs::read_to_string(dir.join("out.log")).unwrap().starts_with("noise\n"));
        dir.remove().unwrap();
    }

    #[test]
    fn timeout_kills_the_child() {
        let dir = crate::rundir::RunDir::create("xtask-unit-emu").unwrap();
        let l = sh("printf 'KTAP version 1\\n1..2\\nok 1 a\\n'; exec sleep 30", dir.path());
        let start = Instant::now();
        let s = run_streaming(&l, Some(Duration::from_secs(1)), &Show::silent(), &dir.join("out.log")).unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(s.timed_out, Some(Duration::from_secs(1)));
        assert_eq!(s.report.failure_reasons(), ["incomplete plan: 1 of 2 results"]);
        dir.remove().unwrap();
    }

    #[test]
    fn fatal_stderr_stops_early() {
        let dir = crate::rundir::RunDir::create("xtask-unit-emu").unwrap();
        let l =
            sh("printf 'KTAP version 1\\n1..2\\n'; echo 'FATAL-MARK x' >&2; echo more >&2; exec sleep 30", dir.path());
        let start = Instant::now();
        let s = run_streaming(&l, Some(Duration::from_secs(20)), &Show::silent(), &dir.join("out.log")).unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(s.fatal.as_deref(), Some("FATAL-MARK x"));
        assert_eq!(s.stderr_tail, ["FATAL-MARK x", "more"]);
        assert!(s.timed_out.is_none() && !s.killed_after_end);
        let err = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
        assert_eq!(err, "FATAL-MARK x\nmore\n");
        dir.remove().unwrap();
    }

    #[test]
    fn report_echo_hides_emulator_noise() {
        let echo = |e, line: &str| {
            let mut r = Report::new();
            r.feed_line("KTAP version 1");
            let kind = r.feed_line(line);
            shown_line(e, line, kind)
        };
        assert_eq!(echo(Echo::Report, "<bochs:2> ok 1 a"), Some("ok 1 a".into()));
        assert_eq!(echo(Echo::Report, "(0) Magic breakpoint"), None);
        assert_eq!(echo(Echo::Report, "Next at t=123"), None);
        assert_eq!(echo(Echo::All, "(0) Magic breakpoint"), Some("(0) Magic breakpoint".into()));
        assert_eq!(echo(Echo::Silent, "ok 1 a"), None);
        assert_eq!(echo(Echo::Report, "# expected: refused"), Some("# expected: refused".into()));
        let loud = echo(Echo::Report, "# SECURITY: refused").unwrap();
        assert!(loud.starts_with("# SECURITY: refused") && loud.contains("!!! SECURITY EVENT"), "{loud}");
        assert_eq!(fmt_elapsed(Duration::from_secs(65)), "1m05s");
        assert_eq!(fmt_elapsed(Duration::from_secs(9)), "9s");
    }

    #[test]
    fn command_line_is_quoted() {
        let mut l = sh("echo hi", Path::new("/tmp/x"));
        l.env.push(("SDL_VIDEODRIVER".into(), "dummy".into()));
        assert_eq!(l.command_line(), "cd /tmp/x && SDL_VIDEODRIVER=dummy sh -c 'echo hi' < /dev/null");
    }
}
