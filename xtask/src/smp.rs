//! Reading the SMP diagnostics of the kernel's report: the per-CPU lines of
//! `smp_online` and the figures of `smp_patch_stress` (and its soak progress
//! lines under `stress=1`).
//!
//! The formats are the kernel's (kernel/src/selftest/smp_tests.rs); the
//! figures are JSON lines, like the benchmark's `# bench {...}`:
//!
//! ```text
//! # CPU <i> APIC id <n> online; shadow stack [<lo>,<hi>) SSP <ssp>[ NOT ITS OWN| (shadow stacks off)]
//! # stress {"callers":3,"patches":24,"calls":1127,"emulated":72,"per_round_min":3,"per_round_max":5,"stale_int3s":2,"counted":1127,"per_target":[410,376,341]}
//! # soak {"rounds":1000,"calls":123456,"goal_rounds":100,"goal_calls":10000000}
//! ```

use std::fmt;

use serde::Deserialize;

use crate::ktap::Report;

/// The diagnostic prefix of the `smp_patch_stress` figures.
pub const STRESS_PREFIX: &str = "# stress ";
/// The diagnostic prefix of a soak progress line (`stress=1`).
pub const SOAK_PREFIX: &str = "# soak ";

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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

/// Parses the `# stress {...}` figures line (a `Err` names what is wrong).
pub fn parse_stress_line(line: &str) -> Result<StressFigures, String> {
    let json = line.trim_end().strip_prefix(STRESS_PREFIX).ok_or_else(|| format!("no `{STRESS_PREFIX}` prefix"))?;
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// The figures of the report's (last) `# stress {...}` line: `None` when
/// there is none, `Some(Err)` when the line is there but does not parse.
pub fn stress_figures(report: &Report) -> Option<Result<StressFigures, String>> {
    let line = report.diagnostics.iter().rev().find(|d| d.starts_with(STRESS_PREFIX))?;
    Some(parse_stress_line(line).map_err(|e| format!("cannot parse `{line}`: {e}")))
}

/// One soak progress line: the calls so far against the goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct SoakProgress {
    pub rounds: u64,
    pub calls: u64,
    pub goal_rounds: u64,
    pub goal_calls: u64,
}

impl fmt::Display for SoakProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = if self.goal_calls == 0 { 100.0 } else { self.calls as f64 * 100.0 / self.goal_calls as f64 };
        write!(
            f,
            "soak: {} of {} calls ({pct:.0}%), {} of {} rounds",
            self.calls, self.goal_calls, self.rounds, self.goal_rounds
        )
    }
}

/// One `# soak {...}` progress line.
pub fn parse_soak_line(line: &str) -> Option<SoakProgress> {
    serde_json::from_str(line.trim_end().strip_prefix(SOAK_PREFIX)?).ok()
}

/// The last soak progress line of the report.
pub fn last_soak_progress(report: &Report) -> Option<SoakProgress> {
    report.diagnostics.iter().rev().find_map(|d| parse_soak_line(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRESS: &str = r#"# stress {"callers":3,"patches":24,"calls":1127,"emulated":72,"per_round_min":3,"per_round_max":5,"stale_int3s":2,"counted":1127,"per_target":[410,376,341]}"#;

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
        let one = STRESS
            .replace("\"counted\":1127", "\"counted\":1129")
            .replace("\"per_round_max\":5", "\"per_round_max\":18446744073709551615");
        let f = parse_stress_line(&format!("{one}\r")).unwrap();
        assert_eq!(f.per_round_max, u64::MAX);
        assert_eq!(f.lost_or_misrouted(), 2);
        assert!(!f.targets_add_up());
    }

    #[test]
    fn stress_line_errors_say_what() {
        let e = parse_stress_line(&STRESS.replace("1127,", "\"many\",")).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse_stress_line(&STRESS.replace(",341]", "]")).unwrap_err();
        assert!(e.contains("array"), "{e}");
        let e = parse_stress_line(&STRESS.replace(",\"stale_int3s\":2", "")).unwrap_err();
        assert!(e.contains("stale_int3s"), "{e}");
        assert!(parse_stress_line("# soak {}").is_err());
        assert!(parse_stress_line("").is_err());
        // A number too large for u64 is an error, not a wrap.
        assert!(parse_stress_line(&STRESS.replace(":24,", ":99999999999999999999,")).is_err());
    }

    #[test]
    fn stress_figures_from_a_report() {
        let soak = |r: u64, c: u64| {
            format!("# soak {{\"rounds\":{r},\"calls\":{c},\"goal_rounds\":100,\"goal_calls\":10000000}}")
        };
        let r = report(&format!(
            "KTAP version 1\n1..2\n{}\n{}\n{STRESS}\nok 1 smp_patch_stress\n",
            soak(1000, 123456),
            soak(2000, 2500000)
        ));
        assert_eq!(stress_figures(&r).unwrap().unwrap().calls, 1127);
        let p = last_soak_progress(&r).unwrap();
        assert_eq!((p.rounds, p.calls, p.goal_calls), (2000, 2500000, 10_000_000));
        assert_eq!(p.to_string(), "soak: 2500000 of 10000000 calls (25%), 2000 of 100 rounds");
        let r = report("KTAP version 1\n1..1\nok 1 smp_patch_stress # SKIP one CPU: needs at least two\n");
        assert!(stress_figures(&r).is_none());
        assert_eq!(last_soak_progress(&r), None);
        let r = report("KTAP version 1\n1..1\n# stress {\"callers\":3}\n");
        let e = stress_figures(&r).unwrap().unwrap_err();
        assert!(e.contains("cannot parse `# stress {"), "{e}");
    }

    #[test]
    fn soak_lines() {
        let line = r#"# soak {"rounds":1000,"calls":42,"goal_rounds":100,"goal_calls":10000000}"#;
        assert_eq!(parse_soak_line(line).map(|p| (p.rounds, p.calls)), Some((1000, 42)));
        assert!(parse_soak_line(&format!("{line}\r")).is_some());
        assert_eq!(parse_soak_line(r#"# soak {"rounds":1000}"#), None);
        assert_eq!(parse_soak_line("# soak: 1000 rounds, 42 calls"), None);
        assert_eq!(parse_soak_line(r#"# soaked {"rounds":1,"calls":2,"goal_rounds":1,"goal_calls":1}"#), None);
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
