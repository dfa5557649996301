//! Reading the SMP diagnostics of the kernel's report: the per-CPU lines of
//! `smp_online` and the figures of `smp_patch_stress` (and its soak progress
//! lines under `stress=1`).
//!
//! The formats are the kernel's (kernel/src/selftest/smp_tests.rs):
//!
//! ```text
//! # CPU <i> APIC id <n> online; shadow stack [<lo>,<hi>) SSP <ssp>[ NOT ITS OWN| (shadow stacks off)]
//! # <k> CPUs calling, 1 patching: <rounds> patches, <calls> calls (<e> emulated; per round min <a> max <b>; <s> stale int3s re-executed), targets counted <n> [<t0>, <t1>, <t2>]
//! # soak: <rounds> rounds, <calls> calls
//! ```

use std::fmt;

use crate::ktap::Report;

/// The kernel command line word that turns `smp_patch_stress` into the soak.
pub const STRESS_WORD: &str = "stress=1";

/// What marks the `smp_patch_stress` figures line.
const STRESS_MARK: &str = "1 patching:";

/// One `# CPU <i> APIC id <n> online; ...` line of `smp_online`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuOnline {
    pub index: u32,
    pub apic_id: u32,
    /// The kernel found the CPU's SSP outside its own shadow stack.
    pub not_its_own: bool,
    /// The line says the shadow stacks are off (no CET on this run).
    pub shadow_stacks_off: bool,
    /// The diagnostic as printed.
    pub line: String,
}

fn parse_cpu_online(line: &str) -> Option<CpuOnline> {
    let rest = line.strip_prefix("# CPU ")?;
    let (index, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix("APIC id ")?;
    let (apic_id, rest) = rest.split_once(' ')?;
    if !rest.starts_with("online;") {
        return None;
    }
    Some(CpuOnline {
        index: index.parse().ok()?,
        apic_id: apic_id.parse().ok()?,
        not_its_own: rest.contains("NOT ITS OWN"),
        shadow_stacks_off: rest.contains("(shadow stacks off)"),
        line: line.to_string(),
    })
}

/// Every `# CPU ... online` diagnostic of the report, in order.
pub fn cpus_online(report: &Report) -> Vec<CpuOnline> {
    report.diagnostics.iter().filter_map(|d| parse_cpu_online(d)).collect()
}

/// The figures of one `smp_patch_stress` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StressFigures {
    /// CPUs calling the site (all but the patching one).
    pub callers: u64,
    /// Patch rounds (one retarget each).
    pub patches: u64,
    /// Calls the callers made.
    pub calls: u64,
    /// Calls that went through the int3 emulation.
    pub emulated: u64,
    /// Fewest and most emulations in one round.
    pub per_round_min: u64,
    pub per_round_max: u64,
    /// int3s found already gone when handled, re-executed.
    pub stale_int3s: u64,
    /// Calls the three targets counted, in total and each.
    pub counted: u64,
    pub per_target: [u64; 3],
}

impl StressFigures {
    /// Calls made but not counted by a target (or counted twice): |calls - counted|.
    pub fn lost_or_misrouted(&self) -> u64 {
        self.calls.abs_diff(self.counted)
    }

    /// Whether the per-target counts add up to the total the kernel printed.
    pub fn targets_add_up(&self) -> bool {
        self.per_target.iter().sum::<u64>() == self.counted
    }
}

impl fmt::Display for StressFigures {
    /// The `stress: ...` summary (without the `stress: ` prefix).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.per_target;
        write!(
            f,
            "{} CPUs calling, 1 patching; calls {}, patches {}, emulated {} (per round {}..{}), \
             stale int3s {}, targets counted {} [{a}, {b}, {c}], lost/misrouted {}",
            self.callers,
            self.calls,
            self.patches,
            self.emulated,
            self.per_round_min,
            self.per_round_max,
            self.stale_int3s,
            self.counted,
            self.lost_or_misrouted()
        )
    }
}

/// A cursor over one diagnostic line: literal text and unsigned numbers.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn lit(&mut self, text: &str) -> Result<(), String> {
        match self.rest.strip_prefix(text) {
            Some(r) => {
                self.rest = r;
                Ok(())
            }
            None => Err(format!("expected `{text}` at `{}`", self.rest)),
        }
    }

    /// One of several literals.
    fn one_of(&mut self, texts: &[&str]) -> Result<(), String> {
        for t in texts {
            if let Some(r) = self.rest.strip_prefix(t) {
                self.rest = r;
                return Ok(());
            }
        }
        Err(format!("expected one of {texts:?} at `{}`", self.rest))
    }

    fn num(&mut self) -> Result<u64, String> {
        let digits = self.rest.bytes().take_while(u8::is_ascii_digit).count();
        let (n, r) = self.rest.split_at(digits);
        let n = n.parse().map_err(|_| format!("expected a number at `{}`", self.rest))?;
        self.rest = r;
        Ok(n)
    }
}

/// Parses the `smp_patch_stress` figures line (with or without the `# `).
pub fn parse_stress_line(line: &str) -> Result<StressFigures, String> {
    let line = line.trim_end();
    let mut c = Cursor { rest: line.strip_prefix("# ").unwrap_or(line) };
    let callers = c.num()?;
    c.one_of(&[" CPUs calling, 1 patching: ", " CPU calling, 1 patching: "])?;
    let patches = c.num()?;
    c.lit(" patches, ")?;
    let calls = c.num()?;
    c.lit(" calls (")?;
    let emulated = c.num()?;
    c.lit(" emulated; per round min ")?;
    let per_round_min = c.num()?;
    c.lit(" max ")?;
    let per_round_max = c.num()?;
    c.lit("; ")?;
    let stale_int3s = c.num()?;
    c.lit(" stale int3s re-executed), targets counted ")?;
    let counted = c.num()?;
    c.lit(" [")?;
    let t0 = c.num()?;
    c.lit(", ")?;
    let t1 = c.num()?;
    c.lit(", ")?;
    let t2 = c.num()?;
    c.lit("]")?;
    if !c.rest.is_empty() {
        return Err(format!("unexpected text after the figures: `{}`", c.rest));
    }
    Ok(StressFigures {
        callers,
        patches,
        calls,
        emulated,
        per_round_min,
        per_round_max,
        stale_int3s,
        counted,
        per_target: [t0, t1, t2],
    })
}

/// The figures of the report's (last) `smp_patch_stress` line: `None` when
/// there is none, `Some(Err)` when the line is there but does not parse.
pub fn stress_figures(report: &Report) -> Option<Result<StressFigures, String>> {
    let line = report.diagnostics.iter().rev().find(|d| d.contains(STRESS_MARK))?;
    Some(parse_stress_line(line).map_err(|e| format!("cannot parse `{line}`: {e}")))
}

/// One `# soak: <rounds> rounds, <calls> calls` progress line.
pub fn parse_soak_line(line: &str) -> Option<(u64, u64)> {
    let mut c = Cursor { rest: line.trim_end().strip_prefix("# soak: ")? };
    let rounds = c.num().ok()?;
    c.lit(" rounds, ").ok()?;
    let calls = c.num().ok()?;
    c.lit(" calls").ok()?;
    c.rest.is_empty().then_some((rounds, calls))
}

/// The last soak progress line of the report, as (rounds, calls).
pub fn last_soak_progress(report: &Report) -> Option<(u64, u64)> {
    report.diagnostics.iter().rev().find_map(|d| parse_soak_line(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRESS: &str = "# 3 CPUs calling, 1 patching: 24 patches, 1127 calls (72 emulated; \
                          per round min 3 max 5; 2 stale int3s re-executed), targets counted 1127 [410, 376, 341]";

    fn report(text: &str) -> Report {
        let mut r = Report::new();
        for l in text.lines() {
            r.feed_line(l);
        }
        r
    }

    #[test]
    fn stress_line_parses() {
        let f = parse_stress_line(STRESS).unwrap();
        assert_eq!(
            f,
            StressFigures {
                callers: 3,
                patches: 24,
                calls: 1127,
                emulated: 72,
                per_round_min: 3,
                per_round_max: 5,
                stale_int3s: 2,
                counted: 1127,
                per_target: [410, 376, 341],
            }
        );
        assert_eq!(f.lost_or_misrouted(), 0);
        assert!(f.targets_add_up());
        assert_eq!(
            f.to_string(),
            "3 CPUs calling, 1 patching; calls 1127, patches 24, emulated 72 (per round 3..5), \
             stale int3s 2, targets counted 1127 [410, 376, 341], lost/misrouted 0"
        );
        // Without the `# `, with a CR, with one caller.
        let one = "1 CPUs calling, 1 patching: 24 patches, 10 calls (9 emulated; per round min 0 \
                   max 18446744073709551615; 0 stale int3s re-executed), targets counted 12 [4, 4, 4]\r";
        let f = parse_stress_line(one).unwrap();
        assert_eq!((f.callers, f.calls, f.counted), (1, 10, 12));
        assert_eq!(f.per_round_max, u64::MAX);
        assert_eq!(f.lost_or_misrouted(), 2);
        assert!(parse_stress_line(&one.replace("CPUs", "CPU")).is_ok());
    }

    #[test]
    fn stress_line_errors_say_where() {
        let e = parse_stress_line(&STRESS.replace("1127 calls", "many calls")).unwrap_err();
        assert!(e.contains("expected a number at `many calls"), "{e}");
        let e = parse_stress_line(&STRESS.replace(", 341]", "]")).unwrap_err();
        assert!(e.contains("expected `, ` at `]`"), "{e}");
        let e = parse_stress_line(&format!("{STRESS} extra")).unwrap_err();
        assert!(e.contains("unexpected text after the figures: ` extra`"), "{e}");
        assert!(parse_stress_line("# soak: 1000 rounds, 5 calls").is_err());
        assert!(parse_stress_line("").is_err());
        // A number too large for u64 is an error, not a wrap.
        assert!(parse_stress_line(&STRESS.replace("24 patches", "99999999999999999999 patches")).is_err());
    }

    #[test]
    fn stress_figures_from_a_report() {
        let r = report(&format!(
            "KTAP version 1\n1..2\n# soak: 1000 rounds, 123456 calls\n# soak: 2000 rounds, 250000 calls\n{STRESS}\nok 1 smp_patch_stress\n"
        ));
        assert_eq!(stress_figures(&r).unwrap().unwrap().calls, 1127);
        assert_eq!(last_soak_progress(&r), Some((2000, 250000)));
        let r = report("KTAP version 1\n1..1\nok 1 smp_patch_stress # SKIP one CPU: needs at least two\n");
        assert!(stress_figures(&r).is_none());
        assert_eq!(last_soak_progress(&r), None);
        let r = report("KTAP version 1\n1..1\n# 3 CPUs calling, 1 patching: garbled\n");
        let e = stress_figures(&r).unwrap().unwrap_err();
        assert!(e.contains("cannot parse `# 3 CPUs calling"), "{e}");
    }

    #[test]
    fn soak_lines() {
        assert_eq!(parse_soak_line("# soak: 1000 rounds, 42 calls"), Some((1000, 42)));
        assert_eq!(parse_soak_line("# soak: 1000 rounds, 42 calls\r"), Some((1000, 42)));
        assert_eq!(parse_soak_line("# soak: 1000 rounds"), None);
        assert_eq!(parse_soak_line("# soak: x rounds, 42 calls"), None);
        assert_eq!(parse_soak_line("# soaked: 1 rounds, 2 calls"), None);
    }

    #[test]
    fn cpu_online_lines() {
        let r = report(
            "KTAP version 1\n1..2\n\
             # CPUs reported by ACPI MADT: APIC ids [0, 1]; APIC mode x2APIC\n\
             # CPU 0 APIC id 0 online; shadow stack [0x2a0000,0x2a4000) SSP 0x2a3fe0\n\
             # CPU 1 APIC id 3 online; shadow stack [0x2dc000,0x2e0000) SSP 0x2a3ff0 NOT ITS OWN\n\
             # CPU 2 APIC id 2 online; shadow stack [0x2dc000,0x2e0000) SSP 0x0 (shadow stacks off)\n\
             ok 1 smp_online\n\
             # CPU 0: serialized itself (sync round 74)\n\
             # CPU 1: 74 serializations by sync IPI (+1)\n\
             ok 2 smp_sync\n",
        );
        let cpus = cpus_online(&r);
        assert_eq!(cpus.len(), 3);
        assert_eq!((cpus[0].index, cpus[0].apic_id), (0, 0));
        assert!(!cpus[0].not_its_own && !cpus[0].shadow_stacks_off);
        assert_eq!((cpus[1].index, cpus[1].apic_id), (1, 3));
        assert!(cpus[1].not_its_own);
        assert!(cpus[2].shadow_stacks_off && !cpus[2].not_its_own);
        assert!(cpus[2].line.starts_with("# CPU 2 APIC id 2 online;"));
    }
}
