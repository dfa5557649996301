//! Incremental parser for the kernel's KTAP version 1 report.
//!
//! Lines are fed one at a time as they arrive from the emulator. Everything
//! before the `KTAP version 1` header, and any later line that is not KTAP
//! (Bochs' own messages), is ignored. A Bochs debugger prompt (`<bochs:3> `)
//! in front of a line is stripped first.

/// Outcome of one test line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    NotOk,
    /// `ok N name # SKIP reason`
    Skip(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    pub number: u32,
    pub name: String,
    pub status: Status,
}

/// What a fed line turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    Header,
    Plan,
    Result,
    Diagnostic,
    /// Not part of the report (or before the header).
    Other,
}

pub const HEADER: &str = "KTAP version 1";
pub const END_MARKER: &str = "# shadowcall: end of report";
pub const PANIC_PREFIX: &str = "# PANIC";
/// A real security event: the #BP handler refused a write it was asked
/// for, outside a self-test that provokes it on purpose.
pub const SECURITY_PREFIX: &str = "# SECURITY";
/// A refusal or fault a self-test provokes on purpose (not an alarm).
pub const EXPECTED_PREFIX: &str = "# expected:";

/// The report as parsed so far.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub header_seen: bool,
    /// N of the `1..N` plan line.
    pub plan: Option<u32>,
    pub results: Vec<TestResult>,
    /// Diagnostic lines (starting with `#`), as printed.
    pub diagnostics: Vec<String>,
    /// Protocol errors: duplicate or out-of-order numbers, malformed lines...
    pub errors: Vec<String>,
    /// The first `# PANIC` line, if any (also recognised before the header).
    pub panic: Option<String>,
    /// `# SECURITY ...` diagnostics: shown loudly.
    pub security: Vec<String>,
    /// `# expected: ...` diagnostics: counted, not alarms.
    pub expected: Vec<String>,
    /// Whether `# shadowcall: end of report` was seen.
    pub end_seen: bool,
    /// The KTAP lines (header onwards, prompt prefixes stripped).
    pub lines: Vec<String>,
}

/// Removes any `<bochs:N> ` debugger prompts at the start of a line.
pub fn strip_prompt(mut line: &str) -> &str {
    loop {
        let Some(rest) = line.strip_prefix("<bochs:") else {
            return line;
        };
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let Some(after) = rest[digits..].strip_prefix('>') else {
            return line;
        };
        if digits == 0 {
            return line;
        }
        line = after.strip_prefix(' ').unwrap_or(after);
    }
}

fn parse_plan(line: &str) -> Option<u32> {
    line.strip_prefix("1..")?.trim_end().parse().ok()
}

/// Parses `ok N name [# directive]` / `not ok N name [# directive]`.
/// `None`: not a result line at all; `Some(Err)`: a malformed one.
fn parse_result(line: &str) -> Option<Result<TestResult, String>> {
    let (ok, rest) = if let Some(rest) = line.strip_prefix("ok ") {
        (true, rest)
    } else if let Some(rest) = line.strip_prefix("not ok ") {
        (false, rest)
    } else {
        return None;
    };
    let (number, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let Ok(number) = number.parse::<u32>() else {
        return Some(Err(format!("malformed result line (bad test number): `{line}`")));
    };
    let (name, directive) = match rest.split_once(" # ") {
        Some((name, directive)) => (name, Some(directive)),
        None => (rest.strip_suffix(" #").unwrap_or(rest), None),
    };
    let name = name.trim().to_string();
    if name.is_empty() {
        return Some(Err(format!("malformed result line (no test name): `{line}`")));
    }
    let skip = directive.and_then(|d| {
        let d = d.trim();
        (d.len() >= 4 && d[..4].eq_ignore_ascii_case("skip")).then(|| d[4..].trim().to_string())
    });
    let status = match (ok, skip) {
        (true, Some(reason)) => Status::Skip(reason),
        (true, None) => Status::Ok,
        (false, _) => Status::NotOk,
    };
    Some(Ok(TestResult { number, name, status }))
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one line of emulator output (without its newline).
    pub fn feed_line(&mut self, raw: &str) -> LineKind {
        let line = strip_prompt(raw.trim_end_matches(['\r', '\n']));
        if line.starts_with(PANIC_PREFIX) && self.panic.is_none() {
            self.panic = Some(line.to_string());
        }
        if line == HEADER {
            if self.header_seen {
                self.errors.push("a second `KTAP version 1` header: did the kernel restart?".to_string());
            }
            self.header_seen = true;
            self.lines.push(line.to_string());
            return LineKind::Header;
        }
        if !self.header_seen {
            return LineKind::Other;
        }
        let kind = self.classify(line);
        if kind != LineKind::Other {
            self.lines.push(line.to_string());
        }
        kind
    }

    fn classify(&mut self, line: &str) -> LineKind {
        if line.starts_with('#') {
            if line.trim_end() == END_MARKER {
                self.end_seen = true;
            }
            if line.starts_with(SECURITY_PREFIX) {
                self.security.push(line.to_string());
            } else if line.starts_with(EXPECTED_PREFIX) {
                self.expected.push(line.to_string());
            }
            self.diagnostics.push(line.to_string());
            return LineKind::Diagnostic;
        }
        if let Some(n) = parse_plan(line) {
            if self.plan.is_some() {
                self.errors.push(format!("a second plan line `{line}`"));
            } else if !self.results.is_empty() {
                self.errors.push(format!("plan line `{line}` after the first result"));
            }
            self.plan.get_or_insert(n);
            return LineKind::Plan;
        }
        match parse_result(line) {
            None => LineKind::Other,
            Some(Err(e)) => {
                self.errors.push(e);
                LineKind::Result
            }
            Some(Ok(result)) => {
                self.check_number(&result);
                self.results.push(result);
                LineKind::Result
            }
        }
    }

    fn check_number(&mut self, result: &TestResult) {
        let expected = self.results.len() as u32 + 1;
        if self.plan.is_none() && self.results.is_empty() {
            self.errors.push(format!("result `{}` before the plan line", result.name));
        }
        if result.number == expected {
            return;
        }
        if self.results.iter().any(|r| r.number == result.number) {
            self.errors.push(format!("duplicate test number {} ({})", result.number, result.name));
        } else {
            self.errors
                .push(format!("test number {} ({}) out of order: expected {expected}", result.number, result.name));
        }
    }

    /// (passed, failed, skipped)
    pub fn counts(&self) -> (usize, usize, usize) {
        let count = |f: fn(&Status) -> bool| self.results.iter().filter(|r| f(&r.status)).count();
        (count(|s| *s == Status::Ok), count(|s| *s == Status::NotOk), count(|s| matches!(s, Status::Skip(_))))
    }

    /// The line `N passed, N failed, N skipped`.
    pub fn summary_line(&self) -> String {
        let (p, f, s) = self.counts();
        format!("{p} passed, {f} failed, {s} skipped")
    }

    pub fn result(&self, name: &str) -> Option<&TestResult> {
        self.results.iter().find(|r| r.name == name)
    }

    pub fn has_diagnostic_containing(&self, needle: &str) -> bool {
        self.diagnostics.iter().any(|d| d.contains(needle))
    }

    /// The diagnostic lines between the previous result line and the
    /// result line of test `name` (None if there is no such result).
    pub fn diagnostics_before(&self, name: &str) -> Option<Vec<&str>> {
        let mut since_last = Vec::new();
        for line in &self.lines {
            if line.starts_with('#') {
                since_last.push(line.as_str());
            } else if let Some(Ok(r)) = parse_result(line) {
                if r.name == name {
                    return Some(since_last);
                }
                since_last.clear();
            }
        }
        None
    }

    /// Why this report is not a pass; empty when it is one.
    pub fn failure_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.header_seen {
            reasons.push(format!("no KTAP report: the line `{HEADER}` never appeared"));
        } else if let Some(n) = self.plan {
            let got = self.results.len();
            if got < n as usize {
                reasons.push(format!("incomplete plan: {got} of {n} results"));
            } else if got > n as usize {
                reasons.push(format!("too many results: {got} for a plan of {n}"));
            }
        } else {
            reasons.push("no plan line (`1..N`) after the KTAP header".to_string());
        }
        reasons.extend(self.errors.iter().map(|e| format!("bad KTAP: {e}")));
        let not_ok: Vec<&str> =
            self.results.iter().filter(|r| r.status == Status::NotOk).map(|r| r.name.as_str()).collect();
        if !not_ok.is_empty() {
            reasons.push(format!("not ok: {}", not_ok.join(", ")));
        }
        if let Some(p) = &self.panic {
            reasons.push(format!("kernel panic: {p}"));
        }
        reasons
    }

    pub fn passed(&self) -> bool {
        self.failure_reasons().is_empty()
    }

    /// The KTAP lines, one per line, for printing.
    pub fn text(&self) -> String {
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Report {
        let mut r = Report::new();
        for line in text.lines() {
            r.feed_line(line);
        }
        r
    }

    const GOOD: &str = "\
Bochs x86 Emulator 2.7
<bochs:1> 
KTAP version 1
1..4
# shadowcall: path=cet-trampoline
ok 1 cmdline
ok 2 cp_near_ret
ok 3 smp # SKIP only one CPU
ok 4 patch_race
# shadowcall: end of report
(0) Magic breakpoint
";

    #[test]
    fn passing_report() {
        let r = parse(GOOD);
        assert!(r.header_seen && r.end_seen);
        assert_eq!(r.plan, Some(4));
        assert_eq!(r.results.len(), 4);
        assert_eq!(
            r.results[2],
            TestResult { number: 3, name: "smp".into(), status: Status::Skip("only one CPU".into()) }
        );
        assert_eq!(r.counts(), (3, 0, 1));
        assert_eq!(r.summary_line(), "3 passed, 0 failed, 1 skipped");
        assert!(r.passed(), "{:?}", r.failure_reasons());
        assert!(r.has_diagnostic_containing("path=cet"));
        assert_eq!(r.lines.first().map(String::as_str), Some(HEADER));
        assert!(!r.text().contains("Magic breakpoint"));
        assert!(!r.text().contains("Bochs x86"));
    }

    #[test]
    fn line_kinds() {
        let mut r = Report::new();
        assert_eq!(r.feed_line("ok 1 before_header"), LineKind::Other);
        assert_eq!(r.feed_line("KTAP version 1"), LineKind::Header);
        assert_eq!(r.feed_line("1..2"), LineKind::Plan);
        assert_eq!(r.feed_line("# hello"), LineKind::Diagnostic);
        assert_eq!(r.feed_line("00012i[CPU0 ] something"), LineKind::Other);
        assert_eq!(r.feed_line("ok 1 a\r"), LineKind::Result);
        assert_eq!(r.results[0].name, "a");
        assert!(r.results.iter().all(|t| t.name != "before_header"));
    }

    #[test]
    fn not_ok_is_failure() {
        let r = parse("KTAP version 1\n1..3\nok 1 a\nnot ok 2 cp_near_ret\nnot ok 3 cmdline # cet=on\n");
        assert_eq!(r.counts(), (1, 2, 0));
        assert_eq!(r.result("cmdline").map(|t| &t.status), Some(&Status::NotOk));
        assert!(r.failure_reasons().contains(&"not ok: cp_near_ret, cmdline".to_string()));
        assert!(!r.passed());
    }

    #[test]
    fn skip_directive_variants() {
        let r = parse("KTAP version 1\n1..3\nok 1 a # SKIP\nok 2 b # skip no smp\nok 3 c # TODO later\n");
        assert_eq!(r.results[0].status, Status::Skip(String::new()));
        assert_eq!(r.results[1].status, Status::Skip("no smp".into()));
        assert_eq!(r.results[2].status, Status::Ok);
        assert_eq!(r.results[2].name, "c");
        assert!(r.passed());
    }

    #[test]
    fn prompt_prefix_is_stripped() {
        assert_eq!(strip_prompt("<bochs:1> KTAP version 1"), "KTAP version 1");
        assert_eq!(strip_prompt("<bochs:12> <bochs:13> ok 1 a"), "ok 1 a");
        assert_eq!(strip_prompt("<bochs:x> ok"), "<bochs:x> ok");
        assert_eq!(strip_prompt("<bochs:> ok"), "<bochs:> ok");
        let r = parse("<bochs:1> KTAP version 1\n<bochs:1> 1..1\n<bochs:2> ok 1 a\n");
        assert_eq!(r.plan, Some(1));
        assert!(r.passed(), "{:?}", r.failure_reasons());
    }

    #[test]
    fn incomplete_plan() {
        let r = parse("KTAP version 1\n1..30\nok 1 a\nok 2 b\n");
        assert_eq!(r.failure_reasons(), ["incomplete plan: 2 of 30 results"]);
        let r = parse("KTAP version 1\n1..1\nok 1 a\nok 2 b\n");
        assert!(r.failure_reasons().iter().any(|e| e.contains("too many results: 2 for a plan of 1")));
    }

    #[test]
    fn missing_header_or_plan() {
        let r = parse("booting\nok 1 a\n");
        assert!(r.failure_reasons()[0].contains("never appeared"));
        assert!(r.results.is_empty());
        let r = parse("KTAP version 1\nok 1 a\n");
        assert!(r.failure_reasons().iter().any(|e| e.contains("no plan line")));
        assert!(r.failure_reasons().iter().any(|e| e.contains("before the plan")));
    }

    #[test]
    fn duplicate_and_out_of_order_numbers() {
        let r = parse("KTAP version 1\n1..3\nok 1 a\nok 1 b\nok 3 c\n");
        let reasons = r.failure_reasons();
        assert!(reasons.iter().any(|e| e.contains("duplicate test number 1 (b)")), "{reasons:?}");
        assert!(!r.passed());
        let r = parse("KTAP version 1\n1..2\nok 2 b\nok 1 a\n");
        let reasons = r.failure_reasons();
        assert!(reasons.iter().any(|e| e.contains("test number 2 (b) out of order: expected 1")), "{reasons:?}");
        assert!(reasons.iter().any(|e| e.contains("test number 1 (a) out of order")), "{reasons:?}");
    }

    #[test]
    fn malformed_result_lines() {
        let r = parse("KTAP version 1\n1..1\nok x a\nok 1\n");
        let reasons = r.failure_reasons();
        assert!(reasons.iter().any(|e| e.contains("bad test number")), "{reasons:?}");
        assert!(reasons.iter().any(|e| e.contains("no test name")), "{reasons:?}");
    }

    #[test]
    fn panic_is_failure_even_with_complete_plan() {
        let r = parse("KTAP version 1\n1..1\nok 1 a\n# PANIC at src/main.rs:10: boom\n");
        assert_eq!(r.failure_reasons(), ["kernel panic: # PANIC at src/main.rs:10: boom"]);
        let r = parse("# PANIC early\n");
        assert!(r.panic.is_some());
    }

    #[test]
    fn restart_and_second_plan_are_errors() {
        let r = parse("KTAP version 1\n1..1\nKTAP version 1\n1..1\nok 1 a\n");
        let reasons = r.failure_reasons();
        assert!(reasons.iter().any(|e| e.contains("second `KTAP version 1`")), "{reasons:?}");
        assert!(reasons.iter().any(|e| e.contains("second plan line")), "{reasons:?}");
    }

    #[test]
    fn security_and_expected_lines() {
        let r = parse(
            "KTAP version 1\n1..1\n# expected: #BP handler refused to write at rip=0x1: slot mismatch\n\
             # SECURITY: #BP handler refused to write at rip=0x2: slot mismatch\nok 1 wrss_guard\n",
        );
        assert_eq!(r.expected.len(), 1);
        assert_eq!(r.security, ["# SECURITY: #BP handler refused to write at rip=0x2: slot mismatch"]);
        // Neither changes the verdict: the kernel's tests decide.
        assert!(r.passed());
        let before = parse("# SECURITY: early\nKTAP version 1\n1..0\n");
        assert!(before.security.is_empty(), "lines before the header are not the report");
    }

    #[test]
    fn empty_plan_passes() {
        assert!(parse("KTAP version 1\n1..0\n").passed());
    }

    #[test]
    fn diagnostics_before_a_result() {
        let r = parse("KTAP version 1\n1..3\n# head\nok 1 a\n# x1\n# x2\nnot ok 2 b\nok 3 c\n");
        assert_eq!(r.diagnostics_before("a"), Some(vec!["# head"]));
        assert_eq!(r.diagnostics_before("b"), Some(vec!["# x1", "# x2"]));
        assert_eq!(r.diagnostics_before("c"), Some(vec![]));
        assert_eq!(r.diagnostics_before("d"), None);
    }
}
