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
use crate::ktap::Report;

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
}

fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-=./:,+@%".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

impl Launch {
    /// A shell command line that repeats this launch (for command.txt).
    pub fn command_line(&self) -> String {
        let mut parts = vec![format!(
            "cd {} &&",
            shell_quote(&self.cwd.to_string_lossy())
        )];
        parts.extend(
            self.env
                .iter()
                .map(|(k, v)| format!("{k}={}", shell_quote(v))),
        );
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
    /// Exit status (after a kill this is the kill's status).
    pub exit: Option<ExitStatus>,
    /// Set when the timeout hit and the emulator was killed.
    pub timed_out: Option<Duration>,
    /// Set when the report ended but the emulator did not exit by itself.
    pub killed_after_end: bool,
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

/// Reads `reader` line by line into a channel; the channel closes at EOF.
fn spawn_line_reader(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
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
                    if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Starts the emulator, echoes (if `echo`) and parses its stdout line by
/// line, and stops it at the timeout. Raw output is also written to `output_log`.
pub fn run_streaming(
    launch: &Launch,
    timeout: Option<Duration>,
    echo: bool,
    output_log: &Path,
) -> Result<Streamed> {
    let stderr = File::create(&launch.stderr_log)
        .context(|| format!("cannot create {}", launch.stderr_log.display()))?;
    let mut log =
        File::create(output_log).context(|| format!("cannot create {}", output_log.display()))?;
    let mut child = Command::new(&launch.program)
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .context(|| format!("cannot start {}", launch.program))?;
    let Some(stdout) = child.stdout.take() else {
        kill(&mut child);
        return Err(crate::error::Error::new("emulator stdout was not captured"));
    };
    let lines = spawn_line_reader(stdout);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut end_deadline: Option<Instant> = None;
    let mut out = Streamed {
        report: Report::new(),
        raw: String::new(),
        exit: None,
        timed_out: None,
        killed_after_end: false,
    };
    loop {
        let wake = match (deadline, end_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let next = match wake {
            Some(w) => lines.recv_timeout(w.saturating_duration_since(Instant::now())),
            None => lines.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(line) => {
                if echo {
                    println!("{line}");
                }
                let _ = writeln!(log, "{line}");
                out.raw.push_str(&line);
                out.raw.push('\n');
                out.report.feed_line(&line);
                if out.report.end_seen && end_deadline.is_none() {
                    end_deadline = Some(Instant::now() + GRACE_AFTER_END);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if end_deadline.is_some_and(|e| Instant::now() >= e) {
                    out.killed_after_end = true;
                } else {
                    out.timed_out = timeout;
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
        }
    }

    #[test]
    fn streams_and_parses() {
        let dir = crate::rundir::RunDir::create("xtask-unit-emu").unwrap();
        let l = sh("printf 'noise\\n<bochs:1> KTAP version 1\\n1..1\\nok 1 a\\n# shadowcall: end of report\\n'", dir.path());
        let s = run_streaming(
            &l,
            Some(Duration::from_secs(20)),
            false,
            &dir.join("out.log"),
        )
        .unwrap();
        assert!(s.report.passed(), "{:?}", s.report.failure_reasons());
        assert!(s.timed_out.is_none() && !s.killed_after_end);
        assert!(s.exit.is_some_and(|e| e.success()));
        assert!(std::fs::read_to_string(dir.join("out.log"))
            .unwrap()
            .starts_with("noise\n"));
        dir.remove().unwrap();
    }

    #[test]
    fn timeout_kills_the_child() {
        let dir = crate::rundir::RunDir::create("xtask-unit-emu").unwrap();
        let l = sh(
            "printf 'KTAP version 1\\n1..2\\nok 1 a\\n'; exec sleep 30",
            dir.path(),
        );
        let start = Instant::now();
        let s = run_streaming(
            &l,
            Some(Duration::from_secs(1)),
            false,
            &dir.join("out.log"),
        )
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(s.timed_out, Some(Duration::from_secs(1)));
        assert_eq!(
            s.report.failure_reasons(),
            ["incomplete plan: 1 of 2 results"]
        );
        dir.remove().unwrap();
    }

    #[test]
    fn command_line_is_quoted() {
        let mut l = sh("echo hi", Path::new("/tmp/x"));
        l.env.push(("SDL_VIDEODRIVER".into(), "dummy".into()));
        assert_eq!(
            l.command_line(),
            "cd /tmp/x && SDL_VIDEODRIVER=dummy sh -c 'echo hi' < /dev/null"
        );
    }
}
